"""Generation throughput with and without the KV cache.

    python benchmarks/generate.py                       # 6 x 384 model, 256 new tokens, batch 1 and 8
    python benchmarks/generate.py --device cuda --dtype bfloat16

A randomly initialised GPT-2-style model (GPT-2 init; the weights do not change the cost),
a random prompt, ``--new-tokens`` tokens with no early stop at <|endoftext|>. tokens/s =
batch x new tokens / wall time, after one short warm-up run per setting. "no cache"
recomputes the whole context (and all its logits) every step, as the simplest sampler does.
Prints the machine first, then one row per setting; results go in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from pretrain.generate import generate
from pretrain.model import GPT, GPTConfig


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"CPU: {cpu}", f"torch {torch.__version__}", f"threads {torch.get_num_threads()}"]
    if device.startswith("cuda"):
        parts.insert(1, f"GPU: {torch.cuda.get_device_name(device)}")
    return ", ".join(parts)


def run(model: GPT, batch: int, prompt_len: int, new_tokens: int, use_kv_cache: bool, device: str) -> tuple[float, float]:
    """(tokens per wall-clock second, tokens per CPU second of this process)."""
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g)
    kw = dict(temperature=1.0, top_k=50, seed=0, eot_id=None, use_kv_cache=use_kv_cache)
    generate(model, prompts, max_new_tokens=8, **kw)  # warm-up (allocator, kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    out = generate(model, prompts, max_new_tokens=new_tokens, **kw)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    assert all(len(o) == new_tokens for o in out)
    return batch * new_tokens / dt, batch * new_tokens / dc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    p.add_argument("--no-cache-batch-sizes", default=None, help="comma-separated; default = --batch-sizes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default = torch's choice")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(cfg).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    print(machine(args.device))
    print(
        f"model: {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads, vocab {cfg.vocab_size}, "
        f"{model.num_params() / 1e6:.1f}M params, {args.dtype} on {args.device}; prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, top-k 50 sampling"
    )
    batches = [int(b) for b in args.batch_sizes.split(",")]
    no_cache = [int(b) for b in (args.no_cache_batch_sizes or args.batch_sizes).split(",")]
    # tokens/CPU-s: throughput per second of CPU time this process used; on a machine shared
    # with other jobs it is steadier than wall-clock tokens/s (on GPU it is not meaningful).
    print(f"{'mode':<10} {'batch':>5} {'tokens/s':>10} {'tokens/CPU-s':>13}")
    results = {}
    settings = [("kv cache", b, True) for b in batches] + [("no cache", b, False) for b in no_cache]
    for mode, b, cached in settings:
        results[(mode, b)] = run(model, b, args.prompt_len, args.new_tokens, cached, args.device)
        wall, cpu = results[(mode, b)]
        print(f"{mode:<10} {b:>5} {wall:>10.1f} {cpu:>13.1f}", flush=True)
    for b in sorted(set(batches) & set(no_cache)):
        kv, nc = results[("kv cache", b)], results[("no cache", b)]
        print(f"speed-up from the KV cache at batch {b}: {kv[0] / nc[0]:.1f}x wall, {kv[1] / nc[1]:.1f}x CPU")


if __name__ == "__main__":
    main()
