"""The command-line parser of every CLI (all seven): ``argparse``'s, except that a refusal (an
unknown option, a value of the wrong type, a missing argument) is one line on stderr like every
other expected failure -- ``PROG: error: <what>; see PROG --help`` -- and exit 2 (docs/DESIGN.md
"Failures"), not argparse's usage block followed by the error.

It lives here, in the room every CLI may import (``data_pipeline`` imports nothing of the project)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        said = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {said[:240]}; see {self.prog} --help\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        sys.exit(status)
