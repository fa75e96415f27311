"""The `plm-gguf` command: a thin dispatcher. Each stage registers its own commands."""

from __future__ import annotations

import signal
import sys

import typer
from rich.console import Console
from rich.markup import escape

from plm_gguf.errors import PlmGgufError

app = typer.Typer(
    name="plm-gguf",
    help="PLM checkpoints to verified GGUF files, quantization sweeps and device deployment.",
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
    """Entry point: runs the app and turns typed errors into one-line messages."""
    # A shell starts background jobs with SIGINT ignored; an interrupt must still end a run cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _register_stages()
    try:
        app(args=argv, prog_name="plm-gguf")  # standalone: typer formats usage errors itself
    except PlmGgufError as exc:
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)
        if exc.hint:
            err_console.print(f"[dim]hint:[/] {escape(exc.hint)}", soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return _interrupted() if code == 130 else code  # typer turns Ctrl-C into exit 130
    return 0


def _interrupted() -> int:
    err_console.print("[bold red]interrupted[/]: nothing was left half-written")
    return 130


if __name__ == "__main__":
    sys.exit(main())
