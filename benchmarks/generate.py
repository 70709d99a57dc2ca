"""Generation throughput with and without the KV cache, against nanoGPT's sampler and the
memory-bandwidth bound; a batch of prompts of different lengths against generating them one by one.

    python benchmarks/generate.py                       # 6 x 384 model, 256 new tokens, batch 1 and 8
    python benchmarks/generate.py --w1 --repeats 3      # W1 model: batch 1 vs nanoGPT, batch of 8 vs one by one
    python benchmarks/generate.py --w1 --compile        # ... and the compiled decode step (inductor)
    python benchmarks/generate.py --device cuda --dtype bfloat16

``--w1``: the 4-layer x 256-wide model (4 heads, 256 positions, vocabulary padded to 50,304).
(1) Batch 1, 16-token prompt, 240 new tokens, top-k 50: ``pretrain.inference.generate.generate`` (the
fixed-shape decode step, eager on a CPU) and nanoGPT's ``generate`` loop (no cache: the whole context
through the body every token, the head at the last position only, ``torch.multinomial``). (2) Eight
prompts of 5 to 64 tokens, 192 new tokens each: one left-padded batch against eight calls one by one
(the rows whose tokens equal their call alone are counted; the screen the batch uses and the candidates
it rescores per step are printed). Interleaved ``--repeats`` times, medians.
The bound: weights read per token (every parameter once, the position table one row, plus the KV
cache read so far on average) over the measured read bandwidth of a 256 MB tensor (a streaming
``amax``, bytes read per second; the copy rate is printed too, but a copy also writes). Printed
twice: for the fp32 weights, and for what is read with the head screened in int8 (the int8 head,
its scales and the candidates' fp32 rows instead of the fp32 head; ``ScreenedHead``). Then the aten
operator calls per decoded token (top-level calls, ``torch.profiler``; the difference between a
240- and a 120-token call over 120; for the batch of 8 the same per decode step, 192 vs 96 tokens). ``--compile``: the same with ``step='compile'``, after printing
what the first call's compile costs.

``--ops-only`` prints that count alone, so the same script counts the code before the fixed-shape
step (the dynamic cache, commit 21b4d42) with that commit's package first on the path:

    mkdir /tmp/before && git archive 21b4d42 pretrain data_pipeline | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before python benchmarks/generate.py --w1 --ops-only

A randomly initialised GPT-2-style model (GPT-2 init; the weights do not change the cost),
random prompts, tokens with no early stop at <|endoftext|>. tokens/s = rows x new tokens / wall
time, after one short warm-up run per setting; tokens/CPU-s divides by this process's CPU time
instead (steadier on a shared machine). "no cache" recomputes the whole context (and all its
logits) every step, as the simplest sampler does. Prints the machine first, then one row per
setting; results go in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from _common import read_bandwidth

from pretrain.inference.generate import generate
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


@torch.inference_mode()
def nanogpt_generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, top_k: int, generator) -> torch.Tensor:
    """nanoGPT's ``GPT.generate`` over our model's modules: no KV cache, the whole (cropped) context
    through the body for every new token, the LM head at the last position only."""
    t = model.transformer
    for _ in range(max_new_tokens):
        ctx = idx[:, -model.config.block_size:]  # (B, T)
        x = t.wte(ctx) + t.wpe(torch.arange(ctx.size(1)))  # (B, T, C)
        for block in t.h:
            x = block(x)
        logits = model.lm_head(t.ln_f(x[:, [-1], :]))[:, -1, : model.config.vocab_size]  # (B, V)
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)  # (B, 1)
        idx = torch.cat((idx, nxt), dim=1)
    return idx


def copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes copied per second by ``dst.copy_(src)`` of an ``mb`` MB fp32 tensor (median)."""
    src = torch.randn(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return src.numel() * 4 / sorted(times)[repeats // 2]


def screen_candidates(model: GPT, prompts, n: int) -> tuple[str, float] | None:
    """(the screen's class, the mean number of candidates it rescores per decode step) over one
    top-k 50 run of ``n`` tokens of ``prompts`` (for a batch: the union of the rows'); None when no
    screen applies here (another dtype, a width not a multiple of 16)."""
    import pretrain.inference.decode as dec

    counts, kinds = [], set()
    real = dec.ScreenedHead.top

    def counting(self, h, k):
        found = real(self, h, k)
        counts.append(found[0].numel() if found is not None else self.weight.size(0))
        kinds.add(type(self).__name__)
        return found

    dec.ScreenedHead.top = counting  # BatchScreenedHead inherits it
    try:
        generate(model, prompts, max_new_tokens=n, temperature=1.0, top_k=50, seed=0, eot_id=None)
    finally:
        dec.ScreenedHead.top = real
    return (", ".join(sorted(kinds)), statistics.mean(counts)) if counts else None


def screened_bytes_per_token(model: GPT, found: tuple[str, float] | None, per_token: float) -> float:
    """Bytes read per token at batch 1 when the head is screened: ``per_token`` (fp32 weights +
    cache) with the fp32 head replaced by its int8 copy and bf16 scales plus the fp32 rows of the
    candidates it rescores (``found``: :func:`screen_candidates` at batch 1)."""
    if found is None:
        return per_token
    V, C = model.config.vocab_size, model.config.n_embd
    return per_token - V * C * 4 + V * C + V * 2 + found[1] * C * 4


def aten_ops(fn: Callable[[], object]) -> int:
    """Top-level aten operator calls made while ``fn()`` runs (``torch.profiler``; an op called from
    inside another aten op, e.g. ``linear``'s ``addmm``, is not counted again). A compiled graph
    counts the aten ops its generated code calls (extern matmuls, allocations), not its kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    n = 0
    for e in prof.events():
        if e.name.startswith("aten::"):
            p = e.cpu_parent
            while p is not None and not p.name.startswith("aten::"):
                p = p.cpu_parent
            n += p is None
    return n


def ops_per_token(model: GPT, prompts, n1: int, n2: int, **kw) -> float:
    """Aten ops per decoded token: the difference between a call of n2 and one of n1 new tokens
    (the same cache bucket), over n2 - n1 -- the prefill and per-call setup cancel out."""
    generate(model, prompts, max_new_tokens=n1, **kw)  # warm-up (and any compile)
    return (aten_ops(lambda: generate(model, prompts, max_new_tokens=n2, **kw))
            - aten_ops(lambda: generate(model, prompts, max_new_tokens=n1, **kw))) / (n2 - n1)


RAGGED_LENGTHS = (5, 9, 12, 16, 23, 31, 40, 64)  # the batch of 8 prompts of different lengths


def main_w1(args) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256, padded_vocab_size=50304)
    model = GPT(cfg).eval()
    B, T0, n = 1, 16, 240
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (B, T0), generator=g)
    kw = dict(temperature=1.0, top_k=50, seed=0, eot_id=None)
    ragged = [torch.randint(0, cfg.vocab_size, (k,), generator=g).tolist() for k in RAGGED_LENGTHS]
    n_r = cfg.block_size - max(RAGGED_LENGTHS)  # 192: every row fits its context
    if args.ops_only:
        import pretrain.inference.generate as gen

        print(f"{gen.__file__}: aten ops per decoded token (W1, batch 1, top-k 50, top-level calls): "
              f"{ops_per_token(model, prompts, n // 2, n, **kw):.1f}; per decode step of the batch of 8 ragged: "
              f"{ops_per_token(model, ragged, n_r // 2, n_r, **kw):.1f}")
        return
    print(machine("cpu"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= model.transformer.wpe.weight.numel() * 4 - cfg.n_embd * 4  # one position row per token
    kv = 2 * cfg.n_layer * cfg.n_embd * 4 * (T0 + n / 2)  # keys + values read, on average
    per_token = weights + kv
    one_row = screen_candidates(model, prompts, n)
    screened = screened_bytes_per_token(model, one_row, per_token)
    print(f"model W1: {model.num_params() / 1e6:.1f}M params; batch {B}, prompt {T0}, {n} new tokens, top-k 50; "
          f"{per_token / 1e6:.1f} MB of fp32 weights and cache per token; read with the int8 screen of the head "
          f"(pretrain.inference.decode.ScreenedHead): {screened / 1e6:.1f} MB")
    modes = {
        "kv cache": lambda: generate(model, prompts, max_new_tokens=n, **kw),
        "nanoGPT (no cache)": lambda: nanogpt_generate(model, prompts, n, 50, torch.Generator().manual_seed(0)),
        "batch of 8 ragged": lambda: generate(model, ragged, max_new_tokens=n_r, **kw),
        "the 8 one by one": lambda: [generate(model, [p], max_new_tokens=n_r, **dict(kw, seed=i))
                                     for i, p in enumerate(ragged)],
    }
    tokens = {"kv cache": B * n, "nanoGPT (no cache)": B * n, "batch of 8 ragged": 8 * n_r, "the 8 one by one": 8 * n_r}
    # each row as alone, up to near-ties (generate.GUARANTEE; tests/test_generate.py checks that they are)
    same = sum(a == b[0] for a, b in zip(modes["batch of 8 ragged"](), modes["the 8 one by one"]()))
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in modes}
    bws, copies = [], []
    for _ in range(args.repeats):
        bws.append(read_bandwidth())
        copies.append(copy_bandwidth())
        for k, f in modes.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            res[k].append((tokens[k] / (time.perf_counter() - t0), tokens[k] / (time.process_time() - c0)))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in res.items()}
    bw = statistics.median(bws)
    bound = bw / per_token
    print(f"read bandwidth {bw / 1e9:.2f} GB/s (copy: {statistics.median(copies) / 1e9:.2f} GB/s copied) -> "
          f"bound {bound:.0f} tokens/s reading the fp32 weights, {bw / screened:.0f} tokens/s reading what the "
          f"screened head reads (medians of {args.repeats})")
    print(f"ragged batch: prompts of {', '.join(map(str, RAGGED_LENGTHS))} tokens, {n_r} new tokens each; "
          f"{same} of 8 rows' tokens equal generating them alone (the rest part at a near-tie)")
    found = screen_candidates(model, ragged, n_r)
    if found is not None and one_row is not None:
        print(f"  its head: {found[0]}, {found[1]:.0f} candidates rescored per step (the rows' union); "
              f"batch 1: {one_row[1]:.0f} per step")
    print(f"{'mode':<20} {'tokens/s':>9} {'tokens/CPU-s':>13}  runs (tokens/s)")
    for k, (w, c) in med.items():
        print(f"{k:<20} {w:>9.1f} {c:>13.1f}  {[round(x, 1) for x, _ in res[k]]}")
    ratio = lambda a, b, i: med[a][i] / med[b][i]  # noqa: E731
    print(f"KV cache vs nanoGPT: {ratio('kv cache', 'nanoGPT (no cache)', 0):.1f}x wall, "
          f"{ratio('kv cache', 'nanoGPT (no cache)', 1):.1f}x CPU; {med['kv cache'][0] / bound:.0%} of the fp32-weights "
          f"bound, {med['kv cache'][0] / (bw / screened):.0%} of the screened bound")
    # Paired: the two arms of one repeat ran back to back, so a load change between repeats cancels in their ratio.
    pairs = [[a[i] / b[i] for a, b in zip(res["batch of 8 ragged"], res["the 8 one by one"])] for i in (0, 1)]
    print(f"batch of 8 ragged vs one by one: {ratio('batch of 8 ragged', 'the 8 one by one', 0):.1f}x wall, "
          f"{ratio('batch of 8 ragged', 'the 8 one by one', 1):.1f}x CPU; paired per repeat (median): "
          f"{statistics.median(pairs[0]):.2f}x wall, {statistics.median(pairs[1]):.2f}x CPU "
          f"{[round(x, 2) for x in pairs[1]]}")
    ops = ops_per_token(model, prompts, n // 2, n, **kw)
    print(f"aten ops per decoded token (batch 1, top-k 50, top-level calls): eager step {ops:.1f}")
    ops_r = ops_per_token(model, ragged, n_r // 2, n_r, **kw)
    print(f"aten ops per decode step of the batch of 8 ragged: {ops_r:.1f} ({ops_r / 8:.1f} per token)")
    if args.compile:
        compiled(model, prompts, n, kw)


def compiled(model: GPT, prompts, n: int, kw: dict) -> None:
    """step='compile' (inductor): what the first call costs (the compile, paid once per batch size
    and cache bucket), what the next calls run at, and the aten ops per token left."""
    from profiling import graph_breaks, reset_dynamo_counters

    from pretrain.inference.decode import decoders

    kw = dict(kw, step="compile")
    with reset_dynamo_counters():
        t0 = time.perf_counter()
        generate(model, prompts, max_new_tokens=n, **kw)
        first = time.perf_counter() - t0
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            generate(model, prompts, max_new_tokens=n, **kw)
            runs.append(prompts.size(0) * n / (time.perf_counter() - t0))
        stats = graph_breaks()
    build = [round(d.build_s, 1) for d in decoders(model) if d.mode == "compile"]
    print(f"compiled step (inductor): first call {first:.1f} s (compile {build} s, once per batch size and cache "
          f"bucket), then {statistics.median(runs):.1f} tokens/s {[round(r, 1) for r in runs]}; "
          f"{stats['unique_graphs']} graph(s), {stats['graph_breaks']} breaks; aten ops per decoded token "
          f"{ops_per_token(model, prompts, n // 2, n, **kw):.1f}")


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
    p.add_argument("--w1", action="store_true", help="issue 13's comparison (see the module docstring)")
    p.add_argument("--repeats", type=int, default=3, help="--w1: interleaved repeats")
    p.add_argument("--compile", action="store_true", help="--w1: also the compiled decode step (inductor)")
    p.add_argument("--ops-only", action="store_true", help="--w1: only the aten ops per decoded token")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.w1:
        main_w1(args)
        return
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
