"""Typed errors. Library code raises these; only the CLI prints them."""

from __future__ import annotations


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
