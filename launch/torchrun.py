"""torchrun, ending in one line instead of a traceback when a signal stopped it or a rank failed.

The launchers (launch/common.sh) start this instead of ``python -m torch.distributed.run``: a
preemption (SLURM's SIGTERM, the SIGUSR1 a batch shell forwards) makes torchrun raise
``SignalException`` after it has passed the signal to its ranks, which then checkpoint and exit;
torchrun's own traceback says nothing more. Exit status 128 + the signal number. A failed rank
has printed its own error already (or was killed by a signal, which the line names): torchrun adds
one line naming it (exit status 1, as torchrun's).
A torchrun that loses the rendezvous store (hosted by the first node's torchrun, which ended after
its rank failed, or whose link went down) says so in one line too (exit status 1), and its C++
warnings about it (each with a C++ backtrace) are off (``TORCH_CPP_LOG_LEVEL=ERROR`` for torchrun
itself, unless set).
"""

import os
import signal
import sys


def _failure(code: int) -> str:
    """How a rank ended: a negative exit code is the signal that killed it (a crash, the OOM killer:
    the rank printed nothing), else its exit status after its own error line."""
    if code >= 0:
        return f"exit status {code}; its error is above"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


if __name__ == "__main__":
    # torchrun's own C++ warnings carry a whole C++ backtrace each (~25 lines): a TCPStore read that
    # fails because the node hosting the rendezvous store ended, after a rank failed and said so in
    # one line, printed two of them on the surviving node. Torch reads the level once, at import:
    # this process only; its ranks keep the default (and a TORCH_CPP_LOG_LEVEL you set wins).
    quiet = "TORCH_CPP_LOG_LEVEL" not in os.environ
    if quiet:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import main

    if quiet:
        del os.environ["TORCH_CPP_LOG_LEVEL"]

    try:
        main()
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"torchrun: rank {rank} failed ({_failure(failure.exitcode)}); the other ranks of this node were stopped",
              file=sys.stderr, flush=True)
        sys.exit(1)
    except SignalException as e:
        print(f"torchrun: stopped by {e.sigval.name} (passed on to its ranks, which checkpoint and exit)",
              file=sys.stderr, flush=True)
        sys.exit(128 + int(e.sigval))
    except RendezvousConnectionError:
        print("torchrun: lost the rendezvous store (--rdzv-endpoint: the node hosting it ended its torchrun, "
              "e.g. after a rank failed, or cannot be reached); see that node's lines above", file=sys.stderr, flush=True)
        sys.exit(1)
