"""The `plm-gguf` command: a thin dispatcher. Each stage registers its own commands."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from plm_gguf.errors import PlmGgufError, from_os_error

app = typer.Typer(
    name="plm-gguf",
    help="PLM checkpoints to verified GGUF files, quantization sweeps and device deployment. "
         "--debug (anywhere) prints tracebacks and llama.cpp's full log.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

err_console = Console(stderr=True, highlight=False)


def _register_stages() -> None:
    # Imported here, not at module import, so `plm-gguf --help` stays fast.
    from plm_gguf.convert import cli as convert_cli
    from plm_gguf import demo

    convert_cli.register(app)
    demo.register(app)
    for optional in ("plm_gguf.quant_eval.cli", "plm_gguf.devices.cli"):
        try:
            module = __import__(optional, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != optional:
                raise
            continue
        module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point: the one error boundary. Typed errors and OS errors become one line and a
    hint; anything else becomes one line naming a saved traceback (`--debug` shows it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _take_flag(args, "--debug") or os.environ.get("PLM_GGUF_DEBUG") == "1"
    if debug:
        os.environ["PLM_GGUF_DEBUG"] = "1"  # children (llama.cpp workers) log in full too
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name prints escaped, never raises
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    _install_signal_handlers()
    _register_stages()
    try:
        try:
            app(args=args, prog_name="plm-gguf")  # standalone: typer formats usage errors itself
        except OSError as exc:
            raise from_os_error(exc) from exc
        except MemoryError as exc:
            raise PlmGgufError("out of memory", "close other programs, or use a smaller --ctx or model") from exc
    except PlmGgufError as exc:
        if debug:
            traceback.print_exc()
        _print_error(exc.message, exc.hint)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return _interrupted() if code == 130 or _signalled else code  # typer turns Ctrl-C into 130
    except Exception as exc:  # noqa: BLE001 - the boundary: a bug is one line and a saved traceback
        if debug:
            traceback.print_exc()
        saved = _save_traceback()
        summary = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        _print_error(f"internal error: {summary}",
                     f"this is a bug in plm-gguf; the traceback is in {saved} (--debug prints it); please report it")
        return 70  # sysexits.h EX_SOFTWARE
    return 0


def _take_flag(args: list[str], flag: str) -> bool:
    """Remove FLAG wherever it stands before `--`; True if it was there."""
    cut = args.index("--") if "--" in args else len(args)
    found = flag in args[:cut]
    args[:cut] = [a for a in args[:cut] if a != flag]
    return found


def _print_error(message: str, hint: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        err_console.print(f"[dim]hint:[/] {escape(hint)}", soft_wrap=True)


_signalled: int = 0  # the signal that ended the run (SIGTERM, SIGHUP), 0 for Ctrl-C or none


def _install_signal_handlers() -> None:
    """SIGTERM and SIGHUP behave like Ctrl-C: a KeyboardInterrupt unwinds the run, so children
    are ended and temporaries removed by the same code; the exit status is 128 + the signal."""
    # A shell starts background jobs with SIGINT ignored; an interrupt must still end a run cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def stop(signum: int, _frame) -> None:
        global _signalled
        if _signalled:  # a second signal during clean-up is ignored; SIGKILL remains
            return
        _signalled = signum
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def _interrupted() -> int:
    name = signal.Signals(_signalled).name if _signalled else "interrupted"
    err_console.print(f"[bold red]{name}[/]: stopped; nothing was left half-written")
    return 128 + (_signalled or signal.SIGINT)


def _save_traceback() -> str:
    """Write the current exception's traceback under the cache's logs/; the path (or a note)."""
    import tempfile
    import time

    text = traceback.format_exc()
    try:
        from plm_gguf.cache import cache_dir

        folder = cache_dir() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
    except Exception:  # noqa: BLE001 - an unwritable cache must not hide the original error
        folder = Path(tempfile.gettempdir())
    path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        path.write_text(text, encoding="utf-8", errors="backslashreplace")
    except OSError:
        return "(could not be saved; rerun with --debug)"
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
