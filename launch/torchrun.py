"""torchrun, ending in one line instead of a traceback when a signal stopped it.

The launchers (launch/common.sh) start this instead of ``python -m torch.distributed.run``: a
preemption (SLURM's SIGTERM, the SIGUSR1 a batch shell forwards) makes torchrun raise
``SignalException`` after it has passed the signal to its ranks, which then checkpoint and exit;
torchrun's own traceback says nothing more. Exit status 128 + the signal number.
"""

import sys

if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    try:
        main()
    except SignalException as e:
        print(f"torchrun: stopped by {e.sigval.name} (passed on to its ranks, which checkpoint and exit)",
              file=sys.stderr, flush=True)
        sys.exit(128 + int(e.sigval))
