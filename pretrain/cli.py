"""How a command of this project ends (``gpt2-train``, ``gpt2-eval``): its ``main()``'s exit code
through ``pretrain.dist.exit_process`` (an exit gloo's threads cannot turn into an abort), and a
Ctrl-C at any moment before ``main`` handles one itself -- while torch is still being imported --
as one line and exit 130. Standard library only at import time, so that import is covered too."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


def run(main: Callable[[], int], interrupted: str) -> NoReturn:
    """``main()``, then its exit code; ``interrupted`` is the line a Ctrl-C prints (exit 130)."""
    try:
        from pretrain.dist import exit_process

        rc = main()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    exit_process(rc)
