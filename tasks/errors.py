"""The one error type for bad input: its message names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class DefectflowError(Exception):
    """Bad input or configuration. The CLI prints it as one line, without a traceback."""

    def __init__(self, problem: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
