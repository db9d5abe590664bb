"""Errors that the CLI turns into exit codes and short messages (never a traceback).

A message may name settings as `{0}`, `{1}`, ... with their keyword names passed beside it:
`OnnxlrError("{0} must be in (0, 1], got 2", "rank_ratio")`. The Python API then reads
"rank_ratio must be ...", the CLI (`cli_message`) "--rank-ratio must be ...", so each names what
its user typed.
"""

from __future__ import annotations

from typing import Any

# Keywords whose flag is not simply "--" + the keyword with dashes.
FLAGS = {
    "calibration": "--calibration",
    "heldout": "--inputs",
    "input_shapes": "--shape",
    "targets_file": "--targets",
}


def flag(keyword: str) -> str:
    """The CLI flag of a Python API keyword: rank_ratio -> --rank-ratio."""
    return FLAGS.get(keyword, "--" + keyword.replace("_", "-"))


class OnnxlrError(Exception):
    """Bad input or usage: the CLI prints the message and exits with code 2."""

    exit_code = 2

    def __init__(self, message: str, *settings: str) -> None:
        self.template = message
        self.settings = settings
        super().__init__(_fill(message, settings))

    def cli_message(self) -> str:
        """The message with each named setting as its command-line flag."""
        return _fill(self.template, [flag(name) for name in self.settings])


def _fill(template: str, names: list[str] | tuple[str, ...]) -> str:
    # Plain replacement, not str.format: the message may quote user values that hold braces.
    for index, name in enumerate(names):
        template = template.replace(f"{{{index}}}", name)
    return template


class GateFailed(OnnxlrError):
    """A verification gate or check failed: exit code 1. `report` (onnxlr.factorize.results.Report), when the run got that
    far: what was measured, for the caller to show or write."""

    exit_code = 1

    def __init__(self, message: str, *settings: str, report: Any = None) -> None:
        super().__init__(message, *settings)
        self.report = report
