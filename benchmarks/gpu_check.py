"""The GPU check: every CUDA path of the project, measured and checked in one command.

    python benchmarks/gpu_check.py                      # on one GPU: every block, ~7 min on an H100/H200
    python benchmarks/gpu_check.py --smoke              # the same blocks on CPU, tiny sizes (the test suite)
    python benchmarks/gpu_check.py --blocks throughput --micro-batches 64 --steps 5

Blocks (``--blocks``, comma-separated; default all), run in this order:

  tests        ``pytest -m gpu`` over the test files that hold GPU-marked tests: passed / failed / skipped.
  generation   The ``gpt2`` preset (124M, bf16 weights) decoding ``--gen-tokens`` tokens after a 16-token
               prompt, top-k 50, at batch 1, 8 and 64, with each decode step (``pretrain/inference/decode.py``
               DECODE_MODES: eager, graph = a captured CUDA graph, compile = inductor, compile+graph,
               reduce-overhead): tokens/s, ms per step, the first call's compile / capture seconds (once per
               batch size and cache bucket), time to first token (the prefill and the first pick, eager in
               every mode: measured with the eager rows), and the HBM read bound (weights + the keys
               and values a step reads, over the measured read bandwidth of a streaming ``amax``). Whether the
               tokens equal the eager step's. Stops starting new cases after ``--gen-budget-s``.
  throughput   The ``gpt2`` preset (124M, vocabulary padded to 50304, T=1024) training through the real
               ``Trainer`` on synthetic shards, global batch 2**19 tokens as in configs/gpt2_124m.yaml:
               bf16 + torch.compile at each ``--micro-batches`` (an out-of-memory is recorded, not fatal),
               then at the best micro-batch: eager bf16, FSDP2 (one rank) and DDP (one rank, NCCL), all
               compiled. Each: tokens/s, MFU, peak memory, first-step (compile) seconds, graph breaks
               (``torch._dynamo`` counters), host syncs per optimizer step, and for the compiled single-
               process cases a ``torch.profiler`` summary of one optimizer step (the top kernels). The tokens
               repeat with a period of 4,096 and the LR warms up in 5 steps, so the loss falls within the
               measured steps (the lever's loss comparison); neither changes the speed.
  lever        One training lever A/B on the same warm machine: the best compiled case again with
               ``--lever`` set (default ``head_fp8=true``: the LM head's matmuls in FP8, the largest matmul
               of the step), kept only if faster with every step's loss within ``LEVER_TOLERANCE`` of A's.
               Runs between the compiled throughput cases and the others (eager, FSDP2, DDP).
  correctness  On the 124M preset, eager: 20 steps in bf16 vs fp32 (true fp32: TF32 off) from the same
               init, the losses within 2% of each other; resume on CUDA (10 steps, save, a new Trainer
               resumes, steps 11-20) against two uninterrupted runs, with deterministic algorithms on;
               one training step under a FLASH_ATTENTION-only SDPA context.
  evals        HellaSwag examples/s on the 124M preset (1,000 synthetic examples, both scoring styles), CORE
               items/s (evals/core.py on benchmarks/core.py's CORE-shaped synthetic bundle, ``core_items`` per task),
               generation tokens/s at batch 1 and 16 the way the trainer samples (fp32 weights under bf16
               autocast, ``step='auto'``), and how long an asynchronous 124M checkpoint save blocks
               training (vs a synchronous one).
  serving      ``benchmarks/serve.py``: gpt2-serve (continuous batching) on the 124M preset (random weights,
               bf16) at concurrency 1 and 64 streaming clients on loopback, 64 tokens each, ``--max-batch 64``:
               tokens/s, requests/s, time to first token and inter-token latency p50 / p99.

MFU = tokens/s x FLOPs per token / peak. FLOPs per token = 6N + 12 L H Q T (PaLM appendix B, as
nanoGPT; N = parameters without the position embeddings, including the tied 50304 x 768 head;
L=12, H=12, Q=64, T=1024): 855 MFLOP per token for the 124M preset. Peak: 989.5 TFLOP/s dense bf16
for an H100 SXM, and the same for an H200 (the same chip; pretrain/training/metrics.py PEAK_FLOPS). The
project's bar, 600k tokens/s on one H100, is 52% MFU by this count.

Each case runs in its own Python process (a fresh CUDA context and compile state; an OOM or a crash
stays in its row). The table is printed at the end and everything goes to ``--out`` as JSON.
``--budget-s`` skips the cases still to run once that much wall time has passed, so one device call
always returns its results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import read_bandwidth, synthetic_shards  # noqa: E402

BLOCKS = ("tests", "generation", "throughput", "lever", "correctness", "evals", "serving")
LEVER_TOLERANCE = 0.01  # max relative difference of any step's loss, lever on vs off
LEVER_CPU_TIMEOUT_S = 150
"""The lever's B run on a CPU (--smoke): FP8 matmuls have no CPU kernels of speed -- torch emulates
them, in minutes on some CPUs (a 2-core Xeon with AMX: over 240 s) and ~1 min on others -- so past
this the lever is reported "not measurable on this CPU" instead of holding the check up."""
FLOPS_NOTE = "6N + 12*L*H*Q*T per token (N without wpe); peak 989.5 TFLOP/s dense bf16 (H100 SXM / H200)"


# --------------------------------------------------------------------------------------- sizes


def sizes(smoke: bool) -> dict:
    """The model and batch of every block: the real ones, or tiny ones for --smoke on CPU."""
    if smoke:
        return dict(config="smoke_cpu.yaml", model=["model.preset=tiny"], seq_len=64, global_tokens=512,
                    corr_micro=4, corr_steps=6, hs_examples=16, core_items=11, gen_tokens=16, gen_batches=(1, 4),
                    device="cpu",
                    decode_preset="tiny", decode_batches=(1, 4), decode_modes=("eager", "compile"),
                    serve_model="tiny", serve_dtype="float32", serve_concurrency=(1, 4), serve_tokens=4)
    return dict(config="gpt2_124m.yaml", model=[], seq_len=1024, global_tokens=524288,
                corr_micro=8, corr_steps=20, hs_examples=1000, core_items=200, gen_tokens=256, gen_batches=(1, 16),
                device="cuda",
                decode_preset="gpt2", decode_batches=(1, 8, 64),
                decode_modes=("eager", "graph", "compile+graph", "reduce-overhead", "compile"),
                serve_model="124m", serve_dtype="bfloat16", serve_concurrency=(1, 64), serve_tokens=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------- cases
# Each case runs in a child process: ``gpu_check.py --case JSON`` prints one JSON line.


def build_trainer(spec: dict):
    from pretrain.config import load_config, world_size_from_env
    from pretrain.plan import make_plan
    from pretrain.training.build import build_trainer as build

    cfg = load_config(REPO / "configs" / spec["config"], spec["overrides"])
    t = build(make_plan(cfg, world_size_from_env()))
    for name, value in spec.get("model_attrs", {}).items():  # --model-attr: an A/B switch of the model's
        if not hasattr(t.model, name):
            raise AttributeError(f"--model-attr {name}: the model has no attribute {name!r}")
        setattr(t.model, name, value)
    return t


def _sync(t) -> None:
    import torch

    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def case_train(spec: dict) -> dict:
    """Throughput of one configuration: first step, warm-up, timed steps, syncs, graph breaks, profile."""
    import torch
    from profiling import HostSyncCounter, graph_breaks, profile_summary

    from pretrain.training.metrics import mfu

    t = build_trainer(spec)
    try:
        cuda = t.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(t.device)
        t0 = time.perf_counter()
        results = [t.train_step()]
        _sync(t)
        first = time.perf_counter() - t0
        for _ in range(spec["warmup"]):
            results.append(t.train_step())
        _sync(t)
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            results.append(t.train_step())
        _sync(t)
        dt = time.perf_counter() - t0
        r = results[-1]
        tps = spec["steps"] * t.plan.batch.tokens_per_step / dt
        out = {
            "tokens_per_s": round(tps), "ms_per_step": round(1000 * dt / spec["steps"], 2),
            "mfu": mfu(tps, t.flops_token, t.peak, t.info.world_size),
            "first_step_s": round(first, 2), "compile_s": round(max(first - dt / spec["steps"], 0.0), 2),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated(t.device) / 1e9, 2) if cuda else None,
            "grad_accum": t.plan.batch.grad_accum_steps, "loss": r.loss, "mode": t.wrapped.mode,
            "losses": [x.loss for x in results],
        }
        with HostSyncCounter(t.device) as c:
            for _ in range(2):
                t.train_step()
            _sync(t)
        out["host_syncs_per_step"] = c.count / 2
        out["sync_sites"] = dict(c.calls)
        out.update(graph_breaks())
        if spec.get("profile"):
            out["profile"] = profile_summary(t.train_step, t.device)
        return out
    finally:
        t.logger.close()
        t.close()


def case_correctness(spec: dict) -> dict:
    """bf16 vs fp32 losses; resumed vs uninterrupted (twice, to see run-to-run determinism); flash-only."""
    import warnings
    from contextlib import nullcontext

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.use_deterministic_algorithms(True, warn_only=True)
    caught = warnings.catch_warnings(record=True)
    seen = caught.__enter__()
    warnings.simplefilter("always")
    n, half = spec["steps"], spec["steps"] // 2
    attention = spec.get("attention", "default")
    attn = (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])) if attention == "flash" else nullcontext
    run_root = Path(spec["run_root"])

    def trainer(name: str, dtype: str, resume: str = "none"):
        ov = spec["overrides"] + [f"train.run_dir={run_root / name}", f"train.dtype={dtype}",
                                  f"checkpoint.resume={resume}"]
        t = build_trainer({**spec, "overrides": ov})
        if dtype == "fp32" and t.device.type == "cuda":  # a true fp32 reference: no TF32 matmuls
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
        return t

    def done(t) -> None:
        t.logger.close()
        t.close()

    def run(t, steps: int) -> list[float]:
        with attn() if t.cfg.train.dtype == "bf16" else nullcontext():  # flash: bf16 / fp16 only
            losses = [t.train_step().loss for _ in range(steps)]
        _sync(t)
        return losses

    def params(t) -> dict:
        return {k: v.detach().float().cpu().clone() for k, v in t.model.state_dict().items()}

    out: dict = {}
    t = trainer("fp32", "fp32")
    fp32 = run(t, n)
    done(t)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")

    t = trainer("bf16-a", "bf16")
    bf16 = run(t, n)
    pa = params(t)
    # One more step with only the flash kernel allowed: it raises if flash cannot run this step.
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            r = t.train_step()
        _sync(t)
        out["flash_only_step"] = {"ok": True, "loss": r.loss}
    except Exception as e:  # recorded: the table shows it failed and why
        out["flash_only_step"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    done(t)

    rel = [abs(a - b) / abs(b) for a, b in zip(bf16, fp32)]
    out["bf16_vs_fp32"] = {"fp32": fp32, "bf16": bf16, "max_rel_diff": max(rel), "tolerance": 0.02,
                           "ok": max(rel) <= 0.02}

    t = trainer("bf16-b", "bf16")
    again = run(t, n)
    pb = params(t)
    done(t)

    t = trainer("bf16-r", "bf16")
    first = run(t, half)
    t.save()
    t.checkpointer.wait()
    done(t)
    t = trainer("bf16-r", "bf16", resume="auto")
    resumed_at = t.step
    second = run(t, n - half)
    pr = params(t)
    done(t)

    def diff(x: dict, y: dict) -> float:
        return max(float((x[k] - y[k]).abs().max()) for k in x)

    caught.__exit__(None, None, None)
    nondet = sorted({str(w.message).split(".")[0][:160] for w in seen if "determinis" in str(w.message)})
    out["resume"] = {
        "attention": attention, "nondeterministic_ops_warned": nondet,
        "resumed_at_step": resumed_at,
        "losses_uninterrupted": bf16, "losses_resumed": first + second,
        "bitwise_equal_to_uninterrupted": (first + second) == bf16 and diff(pa, pr) == 0.0,
        "max_param_diff_resumed": diff(pa, pr),
        "two_uninterrupted_runs_bitwise_equal": again == bf16 and diff(pa, pb) == 0.0,
        "max_param_diff_between_uninterrupted_runs": diff(pa, pb),
    }
    return out


def synthetic_hellaswag(n: int, seed: int = 0) -> list[dict]:
    """HellaSwag-shaped examples (contexts of ~30-60 words, four endings of ~10-25 words)."""
    import random

    rng = random.Random(seed)
    words = ("the a man woman dog is was then and with on in to of person ball water car house runs walks "
             "jumps takes puts holds looks turns opens closes starts stops shows camera kitchen garden "
             "table chair window door hand face hair shoe paper knife bowl cup").split()

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    return [{"activity_label": text(1, 3), "ctx_a": text(15, 30), "ctx_b": text(10, 25),
             "ctx": "", "endings": [text(10, 25) for _ in range(4)], "label": rng.randrange(4)}
            for _ in range(n)]


def core_throughput(model, t, spec: dict) -> dict:
    """CORE items/s (evals/core.py) on benchmarks/core.py's CORE-shaped synthetic bundle, after a
    warm-up pass over the same items (the first call's CUDA kernels and autotuning are not counted)."""
    import importlib.util

    from evals.core import CoreEvaluator

    spec_ = importlib.util.spec_from_file_location("core_bench", Path(__file__).with_name("core.py"))
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    bundle = bench.synthetic_bundle(Path(spec["run_root"]) / "core_bundle", spec["core_items"])
    ev = CoreEvaluator(bundle, batch_size=spec["hs_batch"], device=t.device, block_size=model.config.block_size)
    ev(model)
    _sync(t)
    t0 = time.perf_counter()
    res = ev(model)
    _sync(t)
    dt = time.perf_counter() - t0
    return {"items": ev.num_examples, "items_per_s": round(ev.num_examples / dt, 1), "seconds": round(dt, 2),
            "core": res["core/CORE"]}


def case_evals(spec: dict) -> dict:
    """HellaSwag examples/s, generation tokens/s, async checkpoint blocking time."""
    import torch
    from profiling import profile_summary

    from evals.hellaswag import evaluate, prepare
    from pretrain.checkpoint import Checkpointer, capture_rng_state
    from pretrain.inference.generate import generate

    t = build_trainer(spec)
    out: dict = {}
    try:
        cuda = t.device.type == "cuda"
        t.train_step()  # a full AdamW state for the checkpoint
        model = t.model
        model.eval()

        examples = synthetic_hellaswag(spec["hs_examples"])
        for ex in examples:
            ex["ctx"] = ex["ctx_a"] + " " + ex["ctx_b"]
        prep = prepare(examples)
        warm = prepare(examples[:8])
        with torch.no_grad():
            evaluate(model, warm, batch_size=spec["hs_batch"], device=t.device)
            _sync(t)
            t0 = time.perf_counter()
            res = evaluate(model, prep, batch_size=spec["hs_batch"], device=t.device)
            _sync(t)
        dt = time.perf_counter() - t0
        out["hellaswag"] = {"examples": len(prep), "examples_per_s": round(len(prep) / dt, 1), "seconds": round(dt, 2),
                            "acc_norm": res["hellaswag/acc_norm"]}
        out["core"] = core_throughput(model, t, spec)

        gen = {}
        prompt = list(range(1000, 1016))  # 16 tokens
        ac = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        for b in spec["gen_batches"]:
            with ac:
                generate(model, [prompt] * b, max_new_tokens=8, top_k=50, seed=0, eot_id=None)  # warm-up
                _sync(t)
                t0 = time.perf_counter()
                new = generate(model, [prompt] * b, max_new_tokens=spec["gen_tokens"], top_k=50, seed=0, eot_id=None)
                _sync(t)
            dt = time.perf_counter() - t0
            gen[f"batch_{b}"] = {"new_tokens": sum(map(len, new)), "tokens_per_s": round(sum(map(len, new)) / dt, 1),
                                 "ms_per_token_step": round(1000 * dt / spec["gen_tokens"], 2)}
        with ac:  # where a generated token's time goes, on the host (the GPU is idle between tokens)
            prof = profile_summary(lambda: generate(model, [prompt], max_new_tokens=16, top_k=50, seed=0, eot_id=None),
                                   t.device, top=12, host=True)
        gen["profile_batch_1_16_tokens"] = prof
        out["generate_kv_cache"] = gen
        model.train()

        state = (t.step, t.model, t.optimizer, t.state_dict(), {"rng": capture_rng_state()}, t.cfg.to_dict())
        ck = {}
        for mode in ("async", "sync"):
            cp = Checkpointer(Path(spec["run_root"]) / f"ckpt-{mode}", 1, async_save=mode == "async")
            t0 = time.perf_counter()
            cp.save(*state, fsdp=False)
            blocked = time.perf_counter() - t0
            cp.wait()
            ck[mode] = {"blocked_s": round(blocked, 3), "total_s": round(time.perf_counter() - t0, 3)}
        ck["state_gb"] = round(sum(p.numel() * 4 * 3 for p in t.model.parameters()) / 1e9, 2)
        out["checkpoint"] = ck
        return out
    finally:
        t.logger.close()
        t.close()


def case_generation(spec: dict) -> dict:
    """Decoding speed of each decode step mode at each batch size (module docstring, "generation")."""
    import torch

    from pretrain.model import GPT, GPTConfig

    for name in ("recompile_limit", "cache_size_limit"):  # one compiled step per (batch, bucket, mode)
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    device = spec["device"]
    cuda = device == "cuda"
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(spec["preset"], padded_vocab_size=50304 if spec["preset"] == "gpt2" else None)
    model = GPT(cfg).to(device=device, dtype=torch.bfloat16 if cuda else torch.float32).eval()
    bw = read_bandwidth(device, mb=2048 if cuda else 256)
    out: dict = {"model": spec["preset"], "params_m": round(model.num_params() / 1e6, 1),
                 "dtype": "bf16" if cuda else "fp32", "new_tokens": spec["gen_tokens"], "prompt_tokens": 16,
                 "top_k": 50, "read_bw_gbs": round(bw / 1e9, 1), "cases": {}}
    t_start, eager_tokens = time.perf_counter(), {}
    # Every mode at the smallest batch first, then the default paths (eager, graph) at the larger ones,
    # then the compiled modes there (each compiles again per batch size): the budget cuts the tail.
    modes, batches = spec["modes"], spec["batches"]
    order = [(m, batches[0]) for m in modes] + [(m, b) for m in modes[:2] for b in batches[1:]] + \
        [(m, b) for m in modes[2:] for b in batches[1:]]
    for mode, b in order:
        key = f"{mode}_b{b}"
        if time.perf_counter() - t_start > spec["budget_s"]:
            out["cases"][key] = {"skipped": f"over the block's {spec['budget_s']} s"}
            continue
        try:
            out["cases"][key] = _decode_case(model, mode, b, spec["gen_tokens"], bw, eager_tokens)
        except Exception as e:  # recorded: the table shows which mode failed and why
            out["cases"][key] = {"error": f"{type(e).__name__}: {e}"[:400]}
            traceback.print_exc()
        print(f"[generation] {key}: {out['cases'][key]}", file=sys.stderr, flush=True)
    return out


def _decode_case(model, mode: str, b: int, n: int, bw: float, eager_tokens: dict) -> dict:
    """One (mode, batch) row: the first call (with its compile / capture), the best of two more,
    time to first token, and the read bound of the step as this mode runs it."""
    import torch

    from pretrain.inference.decode import cache_bucket, decoders
    from pretrain.inference.generate import generate

    cuda = model.transformer.wte.weight.is_cuda

    def timed(**kw) -> tuple[float, list]:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        toks = generate(model, [list(range(1000, 1016))] * b, top_k=50, temperature=1.0, seed=0, eot_id=None,
                        step=mode, **kw)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, toks

    first, toks = timed(max_new_tokens=n)
    build = [round(d.build_s, 2) for d in decoders(model) if d.mode == mode and d.batch_size == b]
    best = min(timed(max_new_tokens=n)[0] for _ in range(2))
    ttft = None
    if mode == "eager":  # the prefill and the first pick run eagerly in every mode: measured once
        eager_tokens[b] = toks
        ttft = round(1000 * min(timed(max_new_tokens=1)[0] for _ in range(3)), 2)
    cfg = model.config
    L = cache_bucket(16 + n - 1)
    cols = L if mode != "eager" else 16 + n / 2  # eager attends over the columns written so far
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= model.transformer.wpe.weight.numel() * model.transformer.wpe.weight.element_size()
    kv = 2 * cfg.n_layer * b * cols * cfg.n_embd * model.transformer.wte.weight.element_size()
    bound = b * bw / (weights + kv)
    tps = b * n / best
    return {"tokens_per_s": round(tps, 1), "ms_per_step": round(1000 * best / n, 3), "first_call_s": round(first, 2),
            "build_s": build, "ttft_ms": ttft, "bound_tokens_per_s": round(bound),
            "of_bound": round(tps / bound, 3), "bytes_per_step_mb": round((weights + kv) / 1e6, 1),
            "same_tokens_as_eager": toks == eager_tokens.get(b) if b in eager_tokens else None}


CASES = {"train": case_train, "correctness": case_correctness, "evals": case_evals, "generation": case_generation}


def child_main(raw: str) -> int:
    spec = json.loads(raw)
    if spec.get("compile_backend"):
        # --smoke: dynamo traces exactly as on a GPU (graph breaks, recompiles), but AOTAutograd's
        # graphs run eagerly instead of going through inductor's minutes of C++ compilation.
        import functools

        import torch

        torch.compile = functools.partial(torch.compile, backend=spec["compile_backend"])
    try:
        res = CASES[spec["kind"]](spec)
    except Exception as e:
        import torch

        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        res = {"error": f"{type(e).__name__}: {e}"[:500], "oom": oom}
        if not oom:
            traceback.print_exc()
    print("GPU_CHECK_RESULT " + json.dumps(res, default=float), flush=True)
    return 0


# --------------------------------------------------------------------------------------- driver


class Runner:
    def __init__(self, args, out_dir: Path) -> None:
        self.args, self.out_dir, self.t0 = args, out_dir, time.perf_counter()
        self.results: dict = {}

    def over_budget(self) -> bool:
        return self.args.budget_s is not None and time.perf_counter() - self.t0 > self.args.budget_s

    def child(self, spec: dict, env: dict | None = None, timeout: float = 240) -> dict:
        if self.over_budget():
            return {"skipped": f"over --budget-s {self.args.budget_s}"}
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)], cwd=REPO,
                               env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f}s"}
        line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("GPU_CHECK_RESULT ")), None)
        if line is None:
            tail = (p.stderr or p.stdout)[-600:]
            return {"error": f"child exited {p.returncode} without a result: {tail}"}
        res = json.loads(line.split(" ", 1)[1])
        if "error" in res and not res.get("oom"):
            res["stderr_tail"] = p.stderr[-1500:]
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"[gpu_check {time.perf_counter() - self.t0:6.1f}s] {spec.get('label', spec['kind'])}: "
              f"{json.dumps({k: v for k, v in res.items() if k not in ('profile', 'stderr_tail')}, default=float)[:400]}",
              flush=True)
        return res


def block_tests(r: Runner) -> dict:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text())
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        print("[gpu_check] tests: timed out after 300 s", flush=True)
        return {"files": files, "summary": "timed out after 300 s", "passed": 0, "failed": 0, "errors": 1, "skipped": 0,
                "exit_code": None, "wall_s": round(time.perf_counter() - t0, 1), "output_tail": out[-3000:]}
    summary = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-300:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", summary)}
    res = {"files": files, "summary": summary, "passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
           "errors": counts.get("error", 0) + counts.get("errors", 0), "skipped": counts.get("skipped", 0),
           "exit_code": p.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    if p.returncode not in (0, 5):
        res["output_tail"] = p.stdout[-3000:]
    print(f"[gpu_check] tests: {summary}", flush=True)
    return res


def train_spec(r: Runner, sz: dict, data: Path, tmp: Path, label: str, mb: int, compile: bool, mode: str = "ddp",
               profile: bool = False, model_attrs: dict | None = None) -> dict:
    """A throughput case: the 124M (or --smoke tiny) training config at micro-batch ``mb``."""
    a = r.args
    ov = sz["model"] + [f"data.dir={data}", "eval.interval=0", "checkpoint.interval=0", "logging.wandb=disabled",
                        "checkpoint.resume=none", f"train.device={sz['device']}", "schedule.warmup_steps=5",
                        f"train.global_batch_tokens={sz['global_tokens']}", "train.dtype=bf16",
                        f"train.micro_batch_size={mb}", f"train.compile={str(compile).lower()}",
                        f"distributed.mode={mode}", f"train.run_dir={tmp / label}"]
    return {"kind": "train", "label": label, "config": sz["config"], "overrides": ov, "warmup": a.warmup,
            "steps": a.steps, "profile": profile, "model_attrs": {**a.model_attrs, **(model_attrs or {})},
            "compile_backend": "aot_eager" if a.smoke else None}


def block_throughput(r: Runner, sz: dict, data: Path, tmp: Path) -> dict:
    """The compiled cases at each micro-batch (the extras at the best one: :func:`block_throughput_extras`)."""
    out: dict = {"seq_len": sz["seq_len"], "global_batch_tokens": sz["global_tokens"], "flops": FLOPS_NOTE,
                 "cases": {}}
    cases = out["cases"]
    for mb in sorted(r.args.micro_batches, reverse=True):  # the likely best first, should --budget-s cut the rest
        cases[f"compiled_mb{mb}"] = r.child(train_spec(r, sz, data, tmp, f"compiled_mb{mb}", mb, True, profile=True))
    ok = {k: v for k, v in cases.items() if "tokens_per_s" in v}
    if not ok:
        return out
    best_key = max(ok, key=lambda k: ok[k]["tokens_per_s"])
    out["best_micro_batch"] = int(best_key.removeprefix("compiled_mb"))
    best = cases[best_key]
    out["best_tokens_per_s"] = best["tokens_per_s"]
    out["best_mfu"] = best["mfu"]
    out["ratio_to_600k_target"] = round(best["tokens_per_s"] / 600_000, 3)
    return out


def block_throughput_extras(r: Runner, sz: dict, data: Path, tmp: Path, out: dict) -> None:
    """Eager, FSDP2 (one rank) and DDP (one rank) at the best micro-batch, into ``out["cases"]``."""
    if r.args.compiled_only or "best_micro_batch" not in out:
        return
    mb, cases = out["best_micro_batch"], out["cases"]
    cases[f"eager_mb{mb}"] = r.child(train_spec(r, sz, data, tmp, f"eager_mb{mb}", mb, False))
    cases[f"fsdp2_1rank_mb{mb}"] = r.child(train_spec(r, sz, data, tmp, f"fsdp2_mb{mb}", mb, True, mode="fsdp"))
    ddp_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
               "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    cases[f"ddp_1rank_mb{mb}"] = r.child(train_spec(r, sz, data, tmp, f"ddp_mb{mb}", mb, True, mode="ddp"), env=ddp_env)


def block_lever(r: Runner, sz: dict, data: Path, tmp: Path, throughput: dict | None) -> dict:
    """A = the best compiled throughput case (run here if the throughput block did not), B = the same
    with ``--lever`` set, back to back on the same machine. Kept when B is faster and every step's
    loss is within LEVER_TOLERANCE (relative) of A's."""
    lever = r.args.lever
    mb = (throughput or {}).get("best_micro_batch") or max(r.args.micro_batches)
    a = (throughput or {}).get("cases", {}).get(f"compiled_mb{mb}")
    if a is None or "tokens_per_s" not in a:
        a = r.child(train_spec(r, sz, data, tmp, f"lever_off_mb{mb}", mb, True))
    cpu = sz["device"] == "cpu"
    b = r.child(train_spec(r, sz, data, tmp, f"lever_on_mb{mb}", mb, True, model_attrs=lever),
                **({"timeout": LEVER_CPU_TIMEOUT_S} if cpu else {}))
    out = {"lever": lever, "micro_batch": mb, "tolerance": LEVER_TOLERANCE, "off": a, "on": b}
    if cpu and str(b.get("error", "")).startswith("timed out"):
        out["not_measurable"] = (f"not measurable on this CPU: the lever's run did not finish within "
                                 f"{LEVER_CPU_TIMEOUT_S} s (FP8 matmuls are emulated on CPUs)")
        return out
    if "tokens_per_s" in a and "tokens_per_s" in b:
        rel = [abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"])]
        out.update(speedup=round(b["tokens_per_s"] / a["tokens_per_s"], 4), max_rel_loss_diff=round(max(rel), 5),
                   losses_off=a["losses"], losses_on=b["losses"])
        out["keep"] = out["speedup"] > 1.0 and out["max_rel_loss_diff"] <= LEVER_TOLERANCE
    return out


def block_generation(r: Runner, sz: dict) -> dict:
    spec = {"kind": "generation", "label": "generation", "device": sz["device"], "preset": sz["decode_preset"],
            "batches": list(sz["decode_batches"]), "modes": list(r.args.decode_modes or sz["decode_modes"]),
            "gen_tokens": r.args.gen_tokens or (16 if r.args.smoke else 256), "budget_s": r.args.gen_budget_s,
            "compile_backend": "aot_eager" if r.args.smoke else None}
    return r.child(spec, timeout=r.args.gen_budget_s + 180)


def block_correctness(r: Runner, sz: dict, data: Path, tmp: Path) -> dict:
    ov = sz["model"] + [f"data.dir={data}", "eval.interval=0", "checkpoint.interval=0", "logging.wandb=disabled",
                        f"train.device={sz['device']}", "train.compile=false", f"train.micro_batch_size={sz['corr_micro']}",
                        f"train.global_batch_tokens={sz['corr_micro'] * sz['seq_len']}", "schedule.warmup_steps=5",
                        f"schedule.max_steps={sz['corr_steps'] + 1}", "checkpoint.keep_last=1"]
    spec = {"kind": "correctness", "label": "correctness", "config": sz["config"], "overrides": ov,
            "steps": sz["corr_steps"], "run_root": str(tmp / "correctness"), "attention": r.args.attention}
    return r.child(spec, env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})


def block_serving(r: Runner, sz: dict, tmp: Path) -> dict:
    """gpt2-serve under load (benchmarks/serve.py in its own process, which starts the server)."""
    if r.over_budget():
        return {"skipped": f"over --budget-s {r.args.budget_s}"}
    out = tmp / "serving.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "serve.py"), "--model", sz["serve_model"], "--device", sz["device"],
           "--dtype", sz["serve_dtype"], "--concurrency", *map(str, sz["serve_concurrency"]),
           "--max-tokens", str(sz["serve_tokens"]), "--max-batch", "64", "--level-s", "120", "--json", str(out)]
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 420 s"}
    if p.returncode != 0 or not out.exists():
        return {"error": f"benchmarks/serve.py exited {p.returncode}: {(p.stderr or p.stdout)[-600:]}"}
    res = {"model": sz["serve_model"], "levels": json.loads(out.read_text())}
    print(f"[gpu_check] serving: {json.dumps(res)[:400]}", flush=True)
    return res


def block_evals(r: Runner, sz: dict, data: Path, tmp: Path) -> dict:
    ov = sz["model"] + [f"data.dir={data}", "eval.interval=0", "checkpoint.interval=0", "logging.wandb=disabled",
                        f"train.device={sz['device']}", "train.compile=false", "train.micro_batch_size=4",
                        f"train.global_batch_tokens={4 * sz['seq_len']}", f"train.run_dir={tmp / 'evals'}",
                        "checkpoint.resume=none"]
    spec = {"kind": "evals", "label": "evals", "config": sz["config"], "overrides": ov, "hs_examples": sz["hs_examples"],
            "core_items": sz["core_items"],
            "hs_batch": 32, "gen_tokens": sz["gen_tokens"], "gen_batches": list(sz["gen_batches"]),
            "run_root": str(tmp / "evals-ckpt")}
    return r.child(spec)


# --------------------------------------------------------------------------------------- report


def fmt(v, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def generation_rows(g: dict) -> list[tuple[str, str, str]]:
    if "cases" not in g:
        return [("generation", "error", g.get("skipped") or g.get("error", "?")[:200])]
    rows = [("generation", "setup", f"{g['model']} ({g['params_m']}M, {g['dtype']}), prompt {g['prompt_tokens']}, "
                                    f"{g['new_tokens']} new tokens, top-k {g['top_k']}; read bandwidth {g['read_bw_gbs']} GB/s")]
    for name, c in g["cases"].items():
        if "tokens_per_s" not in c:
            rows.append(("generation", name, c.get("skipped") or c.get("error", "?")[:160]))
            continue
        same = {True: ", tokens = eager's", False: ", tokens differ from eager's", None: ""}[c["same_tokens_as_eager"]]
        rows.append(("generation", name, f"{c['tokens_per_s']:,.0f} tok/s ({c['ms_per_step']} ms/step), "
                     f"{100 * c['of_bound']:.1f}% of the read bound ({c['bound_tokens_per_s']:,} tok/s at "
                     f"{c['bytes_per_step_mb']} MB/step); first call {c['first_call_s']} s (build {c['build_s']} s)"
                     f"{'' if c['ttft_ms'] is None else '; TTFT ' + str(c['ttft_ms']) + ' ms (prefill + first pick)'}{same}"))
    return rows


def lever_rows(lv: dict) -> list[tuple[str, str, str]]:
    name = ",".join(f"{k}={v}" for k, v in lv["lever"].items())
    if "not_measurable" in lv:
        return [("lever", name, lv["not_measurable"])]
    if "speedup" not in lv:
        err = next((x.get("skipped") or x.get("error", "?") for x in (lv["off"], lv["on"]) if "tokens_per_s" not in x), "?")
        return [("lever", name, str(err)[:200])]
    on, off = lv["on"], lv["off"]
    return [("lever", f"{name}, micro-batch {lv['micro_batch']}",
             f"{on['tokens_per_s']:,} vs {off['tokens_per_s']:,} tok/s = {lv['speedup']:.4f}x; max step-loss rel diff "
             f"{lv['max_rel_loss_diff']:.4g} (tol {lv['tolerance']}); peak {on['peak_mem_gb']} vs {off['peak_mem_gb']} GB; "
             f"{'KEEP' if lv['keep'] else 'drop'}")]


def table(res: dict) -> str:
    rows = [("block", "item", "value")]
    env = res["environment"]
    rows.append(("env", "device", f"{env['device']} (torch {env['torch']}, {env['python']})"))
    if "tests" in res:
        t = res["tests"]
        rows.append(("tests", "pytest -m gpu", f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                                               f"{t['skipped']} skipped ({t['wall_s']}s)"))
    if "generation" in res:
        rows += generation_rows(res["generation"])
    if "throughput" in res:
        th = res["throughput"]
        for name, c in th["cases"].items():
            if "tokens_per_s" in c:
                mfu = f"{100 * c['mfu']:.1f}% MFU" if c.get("mfu") else "MFU n/a"
                rows.append(("throughput", name,
                             f"{c['tokens_per_s']:,} tok/s, {mfu}, {c['ms_per_step']} ms/step (accum {c['grad_accum']}), "
                             f"peak {fmt(c['peak_mem_gb'], 1)} GB, first step {c['first_step_s']}s, "
                             f"graph breaks {c['graph_breaks']}, syncs/step {c['host_syncs_per_step']}"))
            else:
                rows.append(("throughput", name, "OOM" if c.get("oom") else c.get("skipped") or c.get("error", "?")[:160]))
        if "best_tokens_per_s" in th:
            rows.append(("throughput", "best vs 600k tok/s target", f"{th['ratio_to_600k_target']:.3f}x "
                         f"(micro-batch {th['best_micro_batch']})"))
            prof = th["cases"][f"compiled_mb{th['best_micro_batch']}"].get("profile")
            if prof:
                top = ", ".join(f"{e['name'][:40]} {100 * e['share']:.0f}%" for e in prof["top"][:5])
                rows.append(("throughput", f"profile ({prof['by']}, 1 step)",
                             f"wall {prof['wall_ms']} ms, busy {prof['total_ms']} ms; top: {top}"))
    if "lever" in res:
        rows += lever_rows(res["lever"])
    if "correctness" in res:
        c = res["correctness"]
        if "bf16_vs_fp32" in c:
            b = c["bf16_vs_fp32"]
            rows.append(("correctness", "bf16 vs fp32 losses", f"max rel diff {b['max_rel_diff']:.4f} "
                         f"(tol {b['tolerance']}) {'ok' if b['ok'] else 'FAIL'}; loss {b['fp32'][0]:.3f} -> {b['fp32'][-1]:.3f}"))
            rs = c["resume"]
            rows.append(("correctness", "resume at step " + str(rs["resumed_at_step"]),
                         f"bitwise={rs['bitwise_equal_to_uninterrupted']} (max param diff {rs['max_param_diff_resumed']:.3g}); "
                         f"two uninterrupted runs bitwise={rs['two_uninterrupted_runs_bitwise_equal']} "
                         f"(max diff {rs['max_param_diff_between_uninterrupted_runs']:.3g}); attention "
                         f"{rs['attention']}; nondeterministic ops warned: {len(rs['nondeterministic_ops_warned'])}"))
            f = c["flash_only_step"]
            rows.append(("correctness", "FLASH_ATTENTION-only step", "ok" if f["ok"] else f["error"][:160]))
        else:
            rows.append(("correctness", "error", c.get("skipped") or c.get("error", "?")[:200]))
    if "evals" in res:
        e = res["evals"]
        if "hellaswag" in e:
            rows.append(("evals", "HellaSwag", f"{e['hellaswag']['examples_per_s']} examples/s "
                                               f"({e['hellaswag']['examples']} examples)"))
            if "core" in e:
                rows.append(("evals", "CORE", f"{e['core']['items_per_s']} items/s ({e['core']['items']} items, "
                                              "CORE-shaped synthetic bundle)"))
            for k, g in e["generate_kv_cache"].items():
                if k.startswith("profile"):
                    continue
                rows.append(("evals", f"generate {k}", f"{g['tokens_per_s']} tokens/s ({g['ms_per_token_step']} ms/step)"))
            ck = e["checkpoint"]
            rows.append(("evals", "checkpoint blocks training", f"async {ck['async']['blocked_s']}s "
                         f"(done in {ck['async']['total_s']}s) vs sync {ck['sync']['blocked_s']}s; state {ck['state_gb']} GB"))
        else:
            rows.append(("evals", "error", e.get("skipped") or e.get("error", "?")[:200]))
    if "serving" in res:
        sv = res["serving"]
        for lv in sv.get("levels", []):
            rows.append(("serving", f"gpt2-serve {sv['model']} concurrency {lv['concurrency']}",
                         f"{lv['tokens_per_s']:.1f} tok/s, {lv['requests_per_s']:.2f} req/s, TTFT p50/p99 "
                         f"{1e3 * lv['ttft_p50']:.0f}/{1e3 * lv['ttft_p99']:.0f} ms, ITL p50/p99 "
                         f"{1e3 * lv['itl_p50']:.1f}/{1e3 * lv['itl_p99']:.1f} ms"))
        if "levels" not in sv:
            rows.append(("serving", "error", sv.get("skipped") or sv.get("error", "?")[:200]))
    rows.append(("total", "wall", f"{res['wall_s']}s"))
    w = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"| {r[0]:<{w[0]}} | {r[1]:<{w[1]}} | {r[2]} |" for r in rows]
    lines.insert(1, f"|{'-' * (w[0] + 2)}|{'-' * (w[1] + 2)}|---|")
    return "\n".join(lines)


def environment(device: str) -> dict:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def attr_setting(p: argparse.ArgumentParser, flag: str, item: str) -> dict:
    """NAME=VALUE -> {NAME: VALUE}, VALUE read as JSON, else as a string."""
    name, sep, value = item.partition("=")
    if not sep or not name:
        p.error(f"{flag} needs NAME=VALUE, got {item!r}")
    try:
        return {name: json.loads(value)}
    except json.JSONDecodeError:
        return {name: value}


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="run every block on CPU with tiny sizes")
    p.add_argument("--blocks", default=",".join(BLOCKS), help=f"comma-separated subset of {','.join(BLOCKS)}")
    p.add_argument("--micro-batches", default=None,
                   help="micro-batches of the compiled throughput cases (default 64, the best of 16/32/64 in both "
                        "earlier runs; --smoke: 2,4)")
    p.add_argument("--warmup", type=int, default=None, help="steps after the first before timing (default 2; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per case (default 5; smoke 2)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the cases still to run after this many seconds (default 420)")
    p.add_argument("--out", default="gpu_check.json", help="where to write the JSON (default gpu_check.json)")
    p.add_argument("--compiled-only", action="store_true",
                   help="throughput: only the compiled micro-batch cases (no eager / FSDP2 / DDP)")
    p.add_argument("--model-attr", action="append", default=[], metavar="NAME=VALUE",
                   help="throughput: set an attribute of the model before the first step (an A/B switch; "
                        "VALUE is read as JSON, else as a string); repeatable")
    p.add_argument("--lever", default="head_fp8=true", metavar="NAME=VALUE",
                   help="lever: the model attribute the A/B sets (as --model-attr); default: the FP8 LM head")
    p.add_argument("--gen-tokens", type=int, default=None, help="generation: new tokens per row (default 256; smoke 16)")
    p.add_argument("--gen-budget-s", type=float, default=150.0,
                   help="generation: start no new (mode, batch) case after this many seconds (default 150)")
    p.add_argument("--decode-modes", default=None, type=lambda v: [m for m in v.split(",") if m],
                   help="generation: comma-separated decode steps (default eager,graph,compile+graph,reduce-overhead,"
                        "compile; smoke: eager,compile)")
    p.add_argument("--attention", choices=["default", "flash"], default="default",
                   help="correctness: the SDPA backends of the bf16 runs (flash = FLASH_ATTENTION only)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    bad = [b for b in blocks if b not in BLOCKS]
    if bad:
        p.error(f"--blocks: unknown block(s) {bad}; choose from {','.join(BLOCKS)}")
    args.blocks = blocks
    mbs = args.micro_batches or ("2,4" if args.smoke else "64")
    try:
        args.micro_batches = [int(x) for x in mbs.split(",")]
    except ValueError:
        p.error(f"--micro-batches must be comma-separated integers, got {mbs!r}")
    args.model_attrs = {}
    for item in args.model_attr:
        args.model_attrs.update(attr_setting(p, "--model-attr", item))
    args.lever = attr_setting(p, "--lever", args.lever)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case:
        return child_main(args.case)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: error: CUDA is not available; run on a GPU machine, or pass --smoke for the CPU dry run",
              file=sys.stderr)
        return 2
    sz = sizes(args.smoke)
    res: dict = {"environment": environment(sz["device"]), "smoke": args.smoke, "args": {
        k: v for k, v in vars(args).items() if k != "case"}}
    r = Runner(args, Path(args.out).parent)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        tmp = Path(tmp)
        steps_total = (1 + args.warmup + args.steps + 6) * sz["global_tokens"] + sz["seq_len"] * 64
        rand = synthetic_shards(tmp / "random", 4 * sz["seq_len"] * 64, val_tokens=70_000)
        # A learnable stream (period 4,096) for training, so losses fall within the measured steps.
        tiled = synthetic_shards(tmp / "tiled", max(steps_total, 64 * sz["corr_micro"] * sz["seq_len"] * 2),
                                 val_tokens=70_000, period=4096)
        if "tests" in args.blocks:
            res["tests"] = block_tests(r)
        if "generation" in args.blocks:
            res["generation"] = block_generation(r, sz)
        if "throughput" in args.blocks:
            res["throughput"] = block_throughput(r, sz, tiled, tmp)
        if "lever" in args.blocks:
            res["lever"] = block_lever(r, sz, tiled, tmp, res.get("throughput"))
        if "throughput" in args.blocks:
            block_throughput_extras(r, sz, tiled, tmp, res["throughput"])
        if "correctness" in args.blocks:
            res["correctness"] = block_correctness(r, sz, tiled, tmp)
        if "evals" in args.blocks:
            res["evals"] = block_evals(r, sz, rand, tmp)
        if "serving" in args.blocks:
            res["serving"] = block_serving(r, sz, tmp)
    res["wall_s"] = round(time.perf_counter() - r.t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=1, default=float))
    print(table(res))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
