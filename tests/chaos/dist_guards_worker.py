"""torchrun target for tests/test_hardening.py: the distributed guarantees of
pretrain/dist.py (named collectives) and pretrain/training/spikes.py (one spike decision).

Modes (argv[1]):
  spike  every rank feeds LossSpikeDetector its own loss; only rank 0's is a spike. Every rank must
         decide to skip (the decision is all-reduced); prints "rank R skip=True" per rank.
  hang   rank 1 stops answering before all_reduce(loss) (GPT2_TEST_HANG=1:all_reduce(loss),
         set by the test); rank 0 must fail within the process-group timeout (argv[2] seconds)
         with a CollectiveError naming the operation instead of waiting forever.
  evalhang  the same through the evaluators' reduction (pretrain.dist.all_reduce named 'val loss', the val-loss sum;
         GPT2_TEST_HANG=1:all_reduce(val loss); tests/faults.py): a rank frozen during an eval fails the
         others just as clearly.
"""

import datetime
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import dist as pdist
from pretrain.dist import exit_process, note_group
from pretrain.training.spikes import LossSpikeDetector


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import faults  # tests/faults.py: the hang the environment names

    faults.install_from_env()
    mode, timeout_s = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 30.0
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    note_group()
    rank = dist.get_rank()
    torch.set_num_threads(1)
    if mode == "spike":
        det = LossSpikeDetector(window=4, threshold=3.0, warmup=4)
        for v in (3.0, 3.1, 2.9, 3.0):  # identical, accepted history
            assert det.update(v) is False
        skip = det.update(30.0 if rank == 0 else 3.0)  # a (deliberately) rank-local spike
        print(f"rank {rank} skip={skip} skipped={det.skipped}", flush=True)
        pdist.barrier("end")
    elif mode in ("hang", "evalhang"):
        t0 = time.monotonic()
        try:
            if mode == "hang":
                pdist.all_reduce(torch.ones(1), "loss")
            else:
                pdist.all_reduce(torch.ones(1), "val loss")
        except pdist.CollectiveError as e:
            print(f"rank {rank} CollectiveError after {time.monotonic() - t0:.1f}s: {e}", flush=True)
            sys.exit(17)
        print(f"rank {rank} all_reduce returned", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}; use spike, hang or evalhang")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)  # not a plain return: gloo's threads can abort the interpreter's finalisation
