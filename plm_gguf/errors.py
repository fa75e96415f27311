"""Typed errors. Library code raises these; only the CLI prints them."""

from __future__ import annotations

import errno


class PlmGgufError(Exception):
    """A problem the user can act on: one line naming it, one line of hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class UsageError(PlmGgufError):
    """Bad arguments or options."""

    exit_code = 2


class CheckpointError(PlmGgufError):
    """The input checkpoint is not a valid PLM checkpoint."""

    exit_code = 3


class TokenizerError(PlmGgufError):
    """The tokenizer files are missing or unsupported."""

    exit_code = 3


class OutputError(PlmGgufError):
    """The output cannot be written (exists, disk full, permissions)."""

    exit_code = 4


class LlamaCppError(PlmGgufError):
    """llama.cpp failed or aborted in its child process."""

    exit_code = 5


class VerificationError(PlmGgufError):
    """The GGUF does not compute what the checkpoint computes."""

    exit_code = 6


class DeviceError(PlmGgufError):
    """A device, its transport or its toolchain failed, or a check before deploying refused."""

    exit_code = 7


class InputError(PlmGgufError):
    """An input file is malformed (a GGUF header, a tokenizer file, a recipe)."""

    exit_code = 3


class SystemIOError(PlmGgufError):
    """The operating system refused a file operation (no space, no permission, a name too long)."""

    exit_code = 74  # sysexits.h EX_IOERR


# errno -> what to do about it; the message names the path and the OS's own words.
_OS_HINTS = {
    "ENOSPC": "free disk space on that file system, or write the output elsewhere",
    "EDQUOT": "your disk quota is used up; free space or write the output elsewhere",
    "EACCES": "check the file's and its folder's permissions, or choose another path",
    "EPERM": "check the file's and its folder's permissions, or choose another path",
    "EROFS": "that file system is read-only; write the output elsewhere",
    "ENAMETOOLONG": "use a shorter file name (most file systems allow 255 bytes per name)",
    "ENOENT": "check the path; a folder on the way may be missing",
    "ENOTDIR": "a part of the path is a file where a folder is expected",
    "EISDIR": "that path is a folder; pass a file",
    "ELOOP": "the path has a symbolic link loop",
    "EMFILE": "too many open files; raise the limit with `ulimit -n`",
    "EIO": "the disk reported an I/O error; check it and retry",
    "EFBIG": "the file size limit (ulimit -f) or the file system's largest file was reached; write elsewhere",
}


def from_os_error(exc: OSError) -> PlmGgufError:
    """A typed, one-line error for an OSError raised anywhere below the command line."""
    name = errno.errorcode.get(exc.errno or 0, "")
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    words = exc.strerror or str(exc) or type(exc).__name__
    message = f"{words}: {where}" if where else words
    return SystemIOError(message, _OS_HINTS.get(name, "check the path and retry"))
