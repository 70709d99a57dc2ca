"""``python tests/chaos/train_entry.py ARGS`` == ``python pretrain/train.py ARGS``, plus phase markers
for the chaos soak.

With ``CHAOS_PHASE_DIR`` set, every rank keeps ``$CHAOS_PHASE_DIR/rank{R}`` holding one line,
``<seq> <phase> <step> <unix time>``, rewritten atomically on every phase change:

    startup     imports, process group, model build
    load        inside Checkpointer.load (a resume)
    train       training steps (the train loader handed out a batch)
    eval        inside the val-loss evaluator
    checkpoint  inside Checkpointer.save

so the soak can aim its SIGKILLs at a phase and record where each one landed. With
``CHAOS_SLOW_IO=SECONDS`` every checkpoint file write is followed by that sleep, which widens the
"half-written checkpoint" window from a few milliseconds to something a kill can hit. Neither
changes a single number the run computes: the markers only observe, the sleep only delays.
The faults of ``tests/faults.py`` named in the environment (``GPT2_TEST_FAULT``) are installed too.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _install_markers() -> None:
    phase_dir = os.environ.get("CHAOS_PHASE_DIR")
    slow_io = float(os.environ.get("CHAOS_SLOW_IO", "0") or 0)
    if not phase_dir and not slow_io:
        return
    rank = os.environ.get("RANK", "0")
    path = Path(phase_dir) / f"rank{rank}" if phase_dir else None
    state = {"seq": 0, "phase": None}

    def mark(phase: str, step: int = -1) -> None:
        if path is None or phase == state["phase"]:
            return
        state["seq"] += 1
        state["phase"] = phase
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{state['seq']} {phase} {step} {time.time():.6f}\n")
        os.replace(tmp, path)

    mark("startup")

    import pretrain.checkpoint as ck
    from data_pipeline.loader import DistributedTokenLoader

    def around(obj, name, phase, after, step_arg=None):
        real = getattr(obj, name)

        @functools.wraps(real)
        def wrapped(*args, **kwargs):
            step = args[step_arg] if step_arg is not None and len(args) > step_arg else kwargs.get("step", -1)
            mark(phase, step if isinstance(step, int) else -1)
            try:
                return real(*args, **kwargs)
            finally:
                mark(after)

        setattr(obj, name, wrapped)

    around(ck.Checkpointer, "save", "checkpoint", "train", step_arg=1)
    around(ck.Checkpointer, "load", "load", "resumed")
    try:
        import evals.val_loss as vl

        around(vl.ValLossEvaluator, "__call__", "eval", "train")
    except ImportError:  # pragma: no cover - evals not installed
        pass

    real_next = DistributedTokenLoader.next_batch

    @functools.wraps(real_next)
    def next_batch(self):
        if self.split == "train" and state["phase"] != "train":
            mark("train")
        return real_next(self)

    DistributedTokenLoader.next_batch = next_batch

    if slow_io:
        import pretrain.checkpoint.writing as ck_writing  # where a save's torch.save files are written

        real_save = ck_writing._torch_save

        @functools.wraps(real_save)
        def slow_save(obj, p):
            real_save(obj, p)
            time.sleep(slow_io)

        ck_writing._torch_save = slow_save


def _install_faults() -> None:
    """The faults the environment names (tests/faults.py: GPT2_TEST_FAULT, GPT2_TEST_HANG)."""
    sys.path.insert(0, str(REPO / "tests"))
    import faults

    sys.path.pop(0)
    faults.install_from_env()


def main() -> None:
    _install_markers()
    _install_faults()
    script = REPO / "pretrain" / "train.py"
    sys.argv = [str(script), *sys.argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
