"""Errors that the CLI turns into exit codes and short messages (never a traceback)."""

from __future__ import annotations


class OnnxlrError(Exception):
    """Bad input or usage: the CLI prints the message and exits with code 2."""

    exit_code = 2


class GateFailed(OnnxlrError):
    """A verification gate or check failed: exit code 1."""

    exit_code = 1
