"""Transports: how commands and files reach a device. Three verbs each: run, put, get.

``run`` takes a POSIX shell script (build it with :func:`sh`, which quotes every argument) and
runs it on the device with a timeout. ``put`` and ``get`` copy one file; ``get`` writes a
temporary beside the local file and renames it only when the copy is complete, so a failed
copy leaves nothing behind. Everything above this module (probe, deploy, bench) is written
once against :class:`Transport`: what differs between transports (resumable uploads, how a
port on the device is reached from here) is a method of that interface, never a question of
which transport it is.
"""

from __future__ import annotations

import os
import pty
import re
import select
import shlex
import shutil
import subprocess
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from plm_gguf.errors import DeviceError, UsageError
from plm_gguf.outputs import partial_path

from .profiles import CONTROL_CHAR, Profile, TransportSpec

DEFAULT_TIMEOUT = 120.0
GENERIC_HINT = "check that the device is reachable: `plm-gguf devices probe DEVICE` runs one command there"
MIN_RATE = 256 * 1024  # bytes/s a file copy may not fall below before it times out
STALL_TIMEOUT = 120.0  # s an ssh upload may send nothing before it is given up
REPORT_INTERVAL = 0.5  # s between two progress reports of an upload
CHUNK = 1 << 20
ADB_PERCENT = re.compile(rb"\[\s*(\d+)%\]")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
Report = Callable[[int], None]  # told the bytes of the file sent so far (an upload's progress)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Transport(ABC):
    """How commands and files reach one device: the only interface the layers above use.

    run, put, get and describe are what every transport does. The capabilities that differ are
    methods here too, with defaults for a transport that lacks them:

    - ``can_append`` / ``append(local, remote, offset)``: resumable uploads (deploy resumes an
      interrupted upload only where ``can_append`` is true);
    - ``report``, a keyword of put and append: called about every REPORT_INTERVAL and at the end
      with the bytes of the file sent so far (an append starts at its offset);
    - ``forward(local, port)``: make the device's 127.0.0.1:port reachable here as
      127.0.0.1:local, set up now or described as the command the user runs; returns that
      description. ``unforward(local)`` undoes what ``forward`` set up (nothing by default).
    """

    name: str = ""
    can_append: bool = False

    @abstractmethod
    def run(self, script: str, *, timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> Result:
        """Run a POSIX shell script on the device; check=True raises DeviceError on a failure."""

    @abstractmethod
    def put(self, local: Path, remote: str, *, report: Report | None = None) -> None:
        """Copy one local file to `remote` on the device."""

    @abstractmethod
    def get(self, remote: str, local: Path) -> None:
        """Copy one file from the device; `local` appears only when the copy is complete."""

    @abstractmethod
    def describe(self) -> str:
        """The device as a person names it (in messages and results)."""

    def append(self, local: Path, remote: str, offset: int, *, report: Report | None = None) -> None:
        """Send `local` from byte `offset` onto the end of `remote` (resuming an interrupted upload)."""
        raise DeviceError(f"{self.describe()} cannot resume an upload", "send the whole file with put")

    @abstractmethod
    def forward(self, local: int, port: int) -> str:
        """Make the device's 127.0.0.1:port reachable here as 127.0.0.1:local; says what was done
        (or the command the user runs to do it)."""

    def unforward(self, local: int) -> None:
        """Remove what forward(local, ...) set up; nothing for transports that set nothing up."""


def sh(*argv: str | os.PathLike) -> str:
    """One shell command with every argument quoted: paths with spaces or quotes stay data."""
    return shlex.join(str(a) for a in argv)


def plain_name(name: str) -> bool:
    """A file name that stays in its folder and on one line: no /, not . or .., no control characters."""
    return name not in ("", ".", "..") and "/" not in name and not CONTROL_CHAR.search(name)


def _copy_timeout(size: int) -> float:
    return DEFAULT_TIMEOUT + size / MIN_RATE


@contextmanager
def _local_errors(what: str) -> Iterator[None]:
    """An OSError on this machine as a DeviceError naming what failed."""
    try:
        yield
    except OSError as exc:
        raise DeviceError(f"{what} failed: {exc.strerror or exc}", "check the path and its permissions") from None


@contextmanager
def _download(local: Path) -> Iterator[Path]:
    """A fresh temporary name beside `local` that becomes `local` when the block ends without an
    error; on any error (an interrupt too) the temporary is removed and `local` is left as it was."""
    with partial_path(local) as tmp:
        yield tmp
        with _local_errors(f"saving {local}"):
            os.replace(tmp, local)


def _exec(argv: list[str], what: str, timeout: float, check: bool, stdin=None, input_text=None,
          stdout=subprocess.PIPE) -> Result:
    """Run argv; stdout=FILE sends its output there (a download) instead of into the Result."""
    try:
        if stdin is None and input_text is None:
            stdin = subprocess.DEVNULL  # never let a device command read our terminal
        proc = subprocess.run(argv, stdin=stdin, input=input_text, stdout=stdout, stderr=subprocess.PIPE,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _timed_out(what, timeout) from None
    except FileNotFoundError:
        raise _not_installed(argv[0], what) from None
    return _checked(Result(proc.returncode, (proc.stdout or b"").decode(errors="replace"),
                           proc.stderr.decode(errors="replace")), what, check)


def _timed_out(what: str, timeout: float) -> DeviceError:
    return DeviceError(f"{what} timed out after {timeout:.0f} s", "is the device reachable and responsive?")


def _not_installed(program: str, what: str) -> DeviceError:
    return DeviceError(f"{program} is not installed", f"install it to reach this device ({what})")


def _checked(result: Result, what: str, check: bool) -> Result:
    """The result; check=True raises a failure as a DeviceError naming its last line of output."""
    if check and not result.ok:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise DeviceError(f"{what} failed (exit {result.returncode}): {last[0][:300]}", _hint_for(result.stderr))
    return result


def _throttled(report: Report | None) -> Callable[[int, bool], None]:
    """report(n), at most once per REPORT_INTERVAL unless final=True."""
    last = float("-inf")

    def tick(sent: int, final: bool = False) -> None:
        nonlocal last
        now = time.monotonic()
        if report and (final or now - last >= REPORT_INTERVAL):
            last = now
            report(sent)
    return tick


def _exec_streaming(argv: list[str], what: str, timeout: float, sent: Callable[[bytes], int], start: int, total: int,
                    report: Report | None, *, stdin=subprocess.DEVNULL, pty_stdout: bool = False,
                    stall: float | None = None) -> Result:
    """An upload, with _exec(check=True)'s errors, reporting `sent(the end of its stdout so far)` as it goes
    (never backwards): `start` first and `total` once it succeeded. pty_stdout gives the child a terminal as its stdout (adb
    prints its progress only there). stall: give up when `sent` has not moved for that many seconds."""
    tick = _throttled(report)
    tick(start, True)
    master, slave = pty.openpty() if pty_stdout else (-1, -1)
    try:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=slave if pty_stdout else subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except FileNotFoundError:
        if pty_stdout:
            os.close(master)
        raise _not_installed(argv[0], what) from None
    finally:
        if pty_stdout:
            os.close(slave)
    out, err = master if pty_stdout else proc.stdout.fileno(), proc.stderr.fileno()
    output, reading = {out: bytearray(), err: bytearray()}, {out, err}
    began = moved = time.monotonic()
    position = start
    try:
        while proc.poll() is None:
            _drain(output, reading, min(0.1, REPORT_INTERVAL))
            now, at = time.monotonic(), sent(bytes(output[out][-1024:]))
            if at > position:
                position, moved = at, now
            tick(position)
            if now - began > timeout:
                raise _timed_out(what, timeout)
            if stall is not None and now - moved > stall:
                raise DeviceError(f"{what} stalled: nothing sent for {stall:.0f} s",
                                  "is the device reachable and responsive?")
        _drain(output, reading, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if pty_stdout:
            os.close(master)
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()
    stdout = output[out].decode(errors="replace")
    if pty_stdout:
        stdout = "".join(line + "\n" for line in _screen_lines(stdout))
    result = _checked(Result(proc.returncode, stdout, output[err].decode(errors="replace")), what, True)
    tick(total, True)
    return result


def _drain(output: dict[int, bytearray], reading: set[int], wait: float) -> None:
    """Add what the child wrote to each fd's buffer: waits up to `wait` s for some, or (wait=0) takes all
    there is; an fd at its end leaves `reading`."""
    while reading:
        ready, _, _ = select.select(list(reading), [], [], wait)
        for fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # a pty whose other end is closed
                chunk = b""
            if chunk:
                output[fd] += chunk
            else:
                reading.discard(fd)
        if wait or not ready:
            return


def _screen_lines(text: str) -> list[str]:
    """What a terminal shows of `text`: each line as its last carriage return left it, progress lines dropped."""
    lines = []
    for line in ANSI_ESCAPE.sub("", text).split("\n"):
        shown = ([part for part in line.split("\r") if part.strip()] or [""])[-1]
        if shown.strip() and not ADB_PERCENT.match(shown.encode()):
            lines.append(shown)
    return lines


def _hint_for(stderr: str) -> str:
    if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        return ("the host key is unknown or changed: check its fingerprint, then add it to known_hosts "
                "(ssh-keyscan, or one interactive ssh), or set transport.known_hosts in the profile")
    if "Permission denied" in stderr and "publickey" in stderr:
        return "the key was refused: ssh-copy-id, or set transport.identity_file"
    if any(s in stderr for s in ("no devices/emulators found", "device offline", "device unauthorized")) or (
            "not found" in stderr and "device" in stderr):
        return "is the phone connected with USB debugging on? check `adb devices`"
    if "Illegal instruction" in stderr or "SIGILL" in stderr:
        return "the binary uses CPU features the device lacks: pick a profile for an older CPU"
    if "cannot connect to daemon" in stderr:
        return "the adb server is not reachable: run `adb start-server` (or check ADB_SERVER_SOCKET)"
    return GENERIC_HINT


def _copy_from(local: Path, target: Path, offset: int, report: Report | None) -> None:
    """Copy `local` from byte `offset` on: onto the end of `target` when offset > 0, else over it."""
    tick = _throttled(report)
    with open(local, "rb") as src, open(target, "ab" if offset else "wb") as dst:
        src.seek(offset)
        sent = offset
        tick(sent, True)
        while chunk := src.read(CHUNK):
            dst.write(chunk)
            sent += len(chunk)
            tick(sent)
    tick(sent, True)


class LocalTransport(Transport):
    """This machine, through /bin/sh: a port on it needs no forward."""

    name = "local"
    can_append = True

    def run(self, script: str, *, timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> Result:
        return _exec(["/bin/sh", "-c", script], f"local command {_first_line(script)!r}", timeout, check)

    def put(self, local: Path, remote: str, *, report: Report | None = None) -> None:
        target = Path(os.path.expanduser(remote))
        with _local_errors(f"copy of {local.name} to {target}"):
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_from(local, target, 0, report)

    def get(self, remote: str, local: Path) -> None:
        with _download(local) as tmp, _local_errors(f"copy of {remote} to {local}"):
            shutil.copyfile(os.path.expanduser(remote), tmp)

    def append(self, local: Path, remote: str, offset: int, *, report: Report | None = None) -> None:
        with _local_errors(f"copy of {local.name} to {remote}"):
            _copy_from(local, Path(os.path.expanduser(remote)), offset, report)

    def forward(self, local: int, port: int) -> str:
        return "none needed (local)"

    def describe(self) -> str:
        return "local"


class SshTransport(Transport):
    """The OpenSSH client: ~/.ssh/config, keys, agents and ProxyJump apply as for a plain `ssh`.

    Host keys are always checked (StrictHostKeyChecking=yes); an unknown host is refused,
    never added silently.
    """

    name = "ssh"
    can_append = True

    def __init__(self, spec: TransportSpec) -> None:
        if not spec.host:
            raise UsageError("this ssh profile names no host", "pass --address user@host:port or set transport.host in the profile")
        self.spec = spec

    def _base(self) -> list[str]:
        s = self.spec
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=15",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if s.ssh_config:
            argv += ["-F", os.path.expanduser(s.ssh_config)]
        if s.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(s.known_hosts)}"]
        if s.identity_file:
            argv += ["-i", os.path.expanduser(s.identity_file), "-o", "IdentitiesOnly=yes"]
        if s.port:
            argv += ["-p", str(s.port)]
        for option in s.options:
            argv += ["-o", option]
        return argv

    @property
    def destination(self) -> str:
        return f"{self.spec.user}@{self.spec.host}" if self.spec.user else self.spec.host

    def run(self, script: str, *, timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> Result:
        # `--` ends ssh's options; the script travels as one argument for the remote shell.
        argv = self._base() + ["-T", "--", self.destination, script]
        result = _exec(argv, f"ssh {self.destination}", timeout, check=False)
        if check and result.returncode == 255:  # ssh's own failure: connection, auth, host key
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            hint = _hint_for(result.stderr)
            if hint == GENERIC_HINT:
                port = f"-p {self.spec.port} " if self.spec.port else ""
                hint = f"check the address (--address user@host:port) and that `ssh {port}{self.destination}` works"
            raise DeviceError(f"ssh to {self.destination} failed: {last[:300]}", hint)
        if check and not result.ok:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise DeviceError(f"{_first_line(script)!r} on {self.destination} failed (exit {result.returncode}): "
                              f"{last[0][:300]}",
                              _hint_for(result.stderr))
        return result

    def put(self, local: Path, remote: str, *, report: Report | None = None) -> None:
        self._send(local, "cat > " + _remote_path(remote), 0, report)

    def append(self, local: Path, remote: str, offset: int, *, report: Report | None = None) -> None:
        """Send the file from byte `offset` onto the end of `remote` (resuming an interrupted upload)."""
        self._send(local, "cat >> " + _remote_path(remote), offset, report)

    def _send(self, local: Path, script: str, offset: int, report: Report | None) -> None:
        """ssh reads the file itself (its stdin); its progress is the offset of the file they share."""
        with open(local, "rb") as fh:
            fh.seek(offset)
            size = os.fstat(fh.fileno()).st_size
            _exec_streaming(self._base() + ["-T", "--", self.destination, script],
                            f"copy of {local.name} to {self.destination}", _copy_timeout(size - offset),
                            lambda _: os.lseek(fh.fileno(), 0, os.SEEK_CUR), offset, size, report, stdin=fh,
                            stall=STALL_TIMEOUT)

    def get(self, remote: str, local: Path) -> None:
        what = f"copy of {remote} from {self.destination}"
        with _download(local) as tmp:
            with _local_errors(what), open(tmp, "wb") as fh:
                argv = self._base() + ["-T", "--", self.destination, "cat " + _remote_path(remote)]
                _exec(argv, what, DEFAULT_TIMEOUT * 10, True, stdout=fh)

    def forward(self, local: int, port: int) -> str:
        """Nothing is set up here: the ssh command that makes the device's 127.0.0.1:port
        reachable here as 127.0.0.1:local, for the user to run."""
        return sh(*self._base(), "-N", "-L", f"{local}:127.0.0.1:{port}", self.destination)

    def describe(self) -> str:
        return f"ssh {self.destination}" + (f" port {self.spec.port}" if self.spec.port else "")


class AdbTransport(Transport):
    """The adb client; `-s SERIAL` when the profile or --address names one. No resumable uploads
    (adb push has no append); ports are forwarded with `adb forward`, which outlives this command."""

    name = "adb"

    def __init__(self, spec: TransportSpec) -> None:
        self.spec = spec

    def _base(self) -> list[str]:
        return ["adb"] + (["-s", self.spec.serial] if self.spec.serial else [])

    def run(self, script: str, *, timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> Result:
        # adb joins its arguments with spaces for the device shell: hand it one quoted-by-us script.
        return _exec(self._base() + ["shell", script], f"{self.describe()} shell {_first_line(script)!r}", timeout, check)

    def put(self, local: Path, remote: str, *, report: Report | None = None) -> None:
        """adb push prints "[ NN%] path" while its stdout is a terminal: it gets one, and those become bytes."""
        size = local.stat().st_size

        def sent(output: bytes) -> int:
            percents = ADB_PERCENT.findall(output)
            return min(size, int(percents[-1]) * size // 100) if percents else 0

        _exec_streaming(self._base() + ["push", str(local), remote], f"adb push {local.name}", _copy_timeout(size),
                        sent, 0, size, report, pty_stdout=True)

    def get(self, remote: str, local: Path) -> None:
        with _download(local) as tmp:
            _exec(self._base() + ["pull", remote, str(tmp)], f"adb pull {remote}", DEFAULT_TIMEOUT * 10, True)

    def forward(self, local: int, port: int) -> str:
        _exec(self._base() + ["forward", f"tcp:{local}", f"tcp:{port}"], "adb forward", 30, True)
        return f"adb forward tcp:{local} tcp:{port} (set up): http://127.0.0.1:{local}"

    def unforward(self, local: int) -> None:
        _exec(self._base() + ["forward", "--remove", f"tcp:{local}"], "adb forward --remove", 30, False)

    def describe(self) -> str:
        return "adb" + (f" -s {self.spec.serial}" if self.spec.serial else "")


def _first_line(script: str, width: int = 50) -> str:
    lines = [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("s() {")]
    first = lines[0] if lines else ""
    return first if len(first) <= width else first[: width - 3] + "..."


def _remote_path(path: str) -> str:
    """A quoted path for the remote shell; a leading ~/ stays expandable."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def quote_path(path: str) -> str:
    return _remote_path(path)


def connect(profile: Profile) -> Transport:
    kind = profile.transport.kind
    if kind == "local":
        return LocalTransport()
    if kind == "ssh":
        return SshTransport(profile.transport)
    if kind == "adb":
        return AdbTransport(profile.transport)
    raise UsageError(f"unknown transport {kind!r}", "use ssh, adb or local")


def exec_argv(profile: Profile, binary: str, *args: str | os.PathLike) -> str:
    """A quoted command that runs an installed binary, behind the profile's exec_wrapper if any."""
    return " ".join([*(shlex.quote(w) for w in profile.exec_wrapper), quote_path(binary),
                     *(shlex.quote(str(a)) for a in args)])


def run_args(values: Sequence[str]) -> str:
    return " ".join(shlex.quote(v) for v in values)
