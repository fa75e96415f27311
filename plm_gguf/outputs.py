"""Where plm-gguf writes a file: checked before any work, claimed while it is written, and
renamed into place only when complete.

An output is refused, even with --force, when it resolves to one of the command's inputs (the
checkpoint's own files, the GGUF being quantized) or to anything but a regular file (a folder, a
device, a FIFO). While a command writes it, the target is held by an exclusive lock, so two
commands writing one file cannot both report success.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator

from plm_gguf.errors import OutputError


def check_target(target: Path, force: bool, inputs: Iterable[Path] = (), option: str = "--outfile") -> None:
    """Refuse TARGET before any work: an input, not a regular file, existing without --force,
    or in a folder that is missing or not writable."""
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{target} is a folder", f"give {option} a file name ending in .gguf")
    for source in inputs:
        if _same_file(target, Path(source)):
            raise OutputError(f"{option} {target} is one of the inputs ({source})",
                              "write the output to another file; plm-gguf never overwrites its input, even with --force")
    if target.exists() or target.is_symlink():
        mode = target.lstat().st_mode if not target.exists() else target.stat().st_mode
        if not stat.S_ISREG(mode):
            raise OutputError(f"{target} exists and is not a regular file ({_kind(mode)})",
                              f"give {option} a path for a new .gguf file; plm-gguf replaces only regular files")
        if not force:
            raise OutputError(f"{target} already exists", f"pass --force to overwrite it, or choose another {option}")
    if not target.parent.is_dir():
        raise OutputError(f"folder {target.parent} does not exist", f"create it first or choose another {option}")
    if not os.access(target.parent, os.W_OK):
        raise OutputError(f"cannot write to {target.parent}", f"choose a writable {option}")


def _same_file(a: Path, b: Path) -> bool:
    """True if A and B name one file: the same resolved path, or the same inode (hard links)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError):  # a symlink loop names nothing we could clobber
        return False


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a broken symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def claimed(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on TARGET while it is written: a second writer is refused at once.

    The lock is a hidden file beside the target (`.NAME.lock`), removed on release; a waiter that
    locked a file another process already removed tries again, so two holders never coexist."""
    target = Path(target)
    lock = target.with_name(f".{target.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise OutputError(f"another plm-gguf command is writing {target}",
                              "wait for it to finish, or choose another output") from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break  # the lock file we hold is the one on disk
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by its previous holder between our open and our lock: again
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def partial_path(target: Path, suffix: str = ".partial") -> Iterator[Path]:
    """A temporary path beside TARGET (so the final rename is atomic), removed unless it was
    renamed into place."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}{suffix}")
    try:
        yield tmp
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"the disk holding {target.parent} is full", "free space or choose another output") from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)
