"""gpt2-serve under load: concurrency 1, 4, 16, 64 streaming clients on loopback.

    python benchmarks/serve.py                         # the demo architecture (configs/demo.yaml), random weights
    python benchmarks/serve.py --model 124m --max-batch 16 --max-tokens 16
    python benchmarks/serve.py --model demo/latest/export   # a real export

Starts ``gpt2-serve`` as a child process on 127.0.0.1 (a free port; a random model is exported to a
temporary directory first), then for each concurrency C runs C clients, each sending streaming
completions one after another (``max_tokens`` tokens, top-k 50 sampling, a seed per request, prompts
of 8-24 tokens) until ``--requests`` (default 2 C, at least 8) have finished or ``--level-s`` seconds
passed. Per level: aggregate tokens/s (completion tokens from ``usage`` / the level's wall time),
requests/s, time to first token (request sent -> first text event) and inter-token latency (between
a request's consecutive events) p50 / p99, client-side. One warm-up request first. The acceptance
line of issue 30: tokens/s at concurrency 16 >= 4x concurrency 1 (printed as a ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def export_random(kind: str, out: Path) -> Path:
    import torch

    from pretrain.model import GPT, GPTConfig
    from pretrain.model.hf import export_hf

    cfg = {"demo": lambda: GPTConfig.from_preset("gpt2", block_size=256, n_layer=4, n_head=4, n_embd=128),
           "124m": lambda: GPTConfig.from_preset("gpt2"), "tiny": lambda: GPTConfig.from_preset("tiny")}[kind]()
    torch.manual_seed(0)
    return export_hf(GPT(cfg), out)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def one_request(client: httpx.AsyncClient, url: str, body: dict, stats: dict) -> None:
    t0 = time.perf_counter()
    last = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            now = time.perf_counter()
            if ev.get("usage"):
                stats["tokens"] += ev["usage"]["completion_tokens"]
                continue
            if not ev["choices"] or not ev["choices"][0]["text"]:
                continue
            if last is None:
                stats["ttft"].append(now - t0)
            else:
                stats["itl"].append(now - last)
            last = now
    stats["requests"] += 1


async def level(url: str, concurrency: int, n_requests: int, max_tokens: int, level_s: float) -> dict:
    stats = {"tokens": 0, "requests": 0, "ttft": [], "itl": []}
    rng = random.Random(concurrency)
    issued = 0
    deadline = time.perf_counter() + level_s

    async def worker(client):
        nonlocal issued
        while issued < n_requests and time.perf_counter() < deadline:
            issued += 1
            words = " ".join(rng.choice(["the", "model", "token", "python", "data", "serve", "a", "of"])
                             for _ in range(rng.randint(8, 24)))
            body = {"prompt": words, "max_tokens": max_tokens, "temperature": 1.0, "top_k": 50, "seed": issued,
                    "stream": True, "stream_options": {"include_usage": True}}
            await one_request(client, url, body, stats)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": stats["requests"], "tokens": stats["tokens"], "wall_s": wall,
            "tokens_per_s": stats["tokens"] / wall, "requests_per_s": stats["requests"] / wall,
            "ttft_p50": pct(stats["ttft"], 0.5), "ttft_p99": pct(stats["ttft"], 0.99),
            "itl_p50": pct(stats["itl"], 0.5), "itl_p99": pct(stats["itl"], 0.99)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            sys.exit(f"gpt2-serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    sys.exit("gpt2-serve did not become ready")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="demo | 124m | tiny (random weights) | a model path")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=None, help="requests per level (default max(8, 2 C))")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--level-s", type=float, default=120.0, help="time limit per level")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default: inherited)")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model in ("demo", "124m", "tiny"):
            model = str(export_random(model, Path(tmp) / "export"))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        proc = subprocess.Popen([sys.executable, "-m", "pretrain.serve.main", "--model", model, "--port", str(port),
                                 "--max-batch", str(args.max_batch), "--max-queue", "256", "--device", args.device,
                                 "--dtype", args.dtype],
                                cwd=REPO, env=env)
        try:
            wait_ready(url, proc)
            asyncio.run(level(url, 1, 1, args.max_tokens, args.level_s))  # warm-up
            rows = []
            print(f"model {args.model}, max_tokens {args.max_tokens}, max_batch {args.max_batch}, {os.cpu_count()} CPUs")
            print(f"{'conc':>5} {'reqs':>5} {'tokens':>7} {'tok/s':>8} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
                  f"{'ITL p50':>8} {'ITL p99':>8}")
            for c in args.concurrency:
                r = asyncio.run(level(url, c, args.requests or max(8, 2 * c), args.max_tokens, args.level_s))
                rows.append(r)
                print(f"{c:>5} {r['requests']:>5} {r['tokens']:>7} {r['tokens_per_s']:>8.1f} {r['requests_per_s']:>7.2f} "
                      f"{r['ttft_p50'] * 1e3:>7.0f}ms {r['ttft_p99'] * 1e3:>7.0f}ms {r['itl_p50'] * 1e3:>6.1f}ms "
                      f"{r['itl_p99'] * 1e3:>6.1f}ms", flush=True)
            by = {r["concurrency"]: r for r in rows}
            if 1 in by and 16 in by:
                ratio = by[16]["tokens_per_s"] / by[1]["tokens_per_s"]
                print(f"tokens/s at concurrency 16 / concurrency 1 = {ratio:.2f}x (acceptance: >= 4x); "
                      f"p99 inter-token latency at 16: {by[16]['itl_p99'] * 1e3:.1f} ms")
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
        finally:
            proc.terminate()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
