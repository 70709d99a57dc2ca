"""gpt2-serve: serve a model (an HF export, a hub name, a checkpoint or a run's checkpoints/) over
OpenAI's completions API on this machine, with continuous batching (``engine.py``, ``app.py``).

    gpt2-serve --model runs/gpt2-124m/export [--host 127.0.0.1] [--port 8000] [--max-batch 8]
               [--max-queue 64] [--max-tokens 0] [--device auto] [--dtype float32]

Binds to loopback unless ``--host`` says otherwise. SIGTERM or Ctrl-C: stop admitting (new requests get
503, waiting ones end), let running rows finish for ``--grace`` seconds, cancel the rest, exit 0. A bad
model path or setting: one line and exit 2, before anything listens.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

PROG = "gpt2-serve"


def build_parser() -> argparse.ArgumentParser:
    from data_pipeline.arguments import Parser  # argparse whose refusals are one line, as every CLI's

    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory / hub name, or a native checkpoint (directory)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--max-batch", type=int, default=8, help="rows of the KV cache: sequences generating at once")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a row; more get 429")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="the largest max_tokens a request may ask for; 0 = the model's context")
    p.add_argument("--grace", type=float, default=10.0, help="seconds running rows may finish after SIGTERM")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto = cuda when available")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations dtype")
    p.add_argument("--name", default=None, help="the model's name in the API (default: the --model argument)")
    return p


class ServeError(ValueError):
    """A bad setting of gpt2-serve (one line)."""


def _check(args) -> None:
    if args.max_batch < 1:
        raise ServeError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue < 0:
        raise ServeError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_tokens < 0:
        raise ServeError(f"--max-tokens must be >= 1 (or 0: the model's context), got {args.max_tokens}")
    if not 0 <= args.port < 65536:
        raise ServeError(f"--port must be in [0, 65535], got {args.port}")


def serve(args) -> int:
    import torch

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"{PROG}: error: {e.name} is not installed; install the serve extra: pip install -e '.[serve]'",
              file=sys.stderr)
        return 2
    from pretrain.model.weights import WeightsError, load_model, resolve
    from pretrain.serve.app import create_app
    from pretrain.serve.engine import Engine

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        _check(args)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ServeError(f"--device {args.device}: CUDA is not available here; pass --device cpu")
        source = resolve(args.model)
        model = load_model(source).to(device=device, dtype=getattr(torch, args.dtype))
    except (ServeError, WeightsError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if source.note:
        print(source.note, file=sys.stderr)
    cap = args.max_tokens or model.config.block_size
    try:
        engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue)  # the KV cache is allocated here
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        print(f"{PROG}: error: --max-batch {args.max_batch}: the KV cache for {args.max_batch} rows of "
              f"{model.config.block_size} tokens does not fit in {device} memory; lower --max-batch", file=sys.stderr)
        return 2
    engine.start()
    app = create_app(engine, args.name or args.model, cap)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM / SIGINT: drain the engine, then stop
            if not self.should_exit:
                threading.Thread(target=engine.shutdown, args=(args.grace,), daemon=True).start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                   timeout_graceful_shutdown=int(args.grace) + 5))
    print(f"{PROG}: serving {args.model} on http://{args.host}:{args.port} (max batch {args.max_batch}, "
          f"{device}, {args.dtype})", file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM while it runs and raises it again once stopped; by then the drain is done,
    # so the re-raised one is let go and the command exits 0 (SIGINT goes on to pretrain.cli: exit 130).
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    server.run()
    engine.shutdown(0.0)
    if not server.started:  # the port was taken (uvicorn printed why)
        return 2
    print(f"{PROG}: stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return serve(build_parser().parse_args(argv))


def cli() -> None:
    from pretrain.cli import run

    run(main, f"{PROG}: interrupted")


if __name__ == "__main__":
    cli()
