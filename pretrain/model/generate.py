"""Sampling from a GPT: batched, with the KV cache (or without, for tests and benchmarks).

Batching without padding. GPT-2 has learned absolute positions, so a left-padded row would
put its prompt at shifted positions (and need a per-row attention mask). Instead, prompts of
equal length share a batch, and ``generate`` splits a ragged list of prompts into one batch
per length, returning results in the input order. ``--num-samples N`` is one batch of N
copies of the prompt.

Sampling per step (on fp32 logits, padded-vocab columns removed):
temperature 0 -> greedy argmax; else logits / temperature, then top-k (keep the k largest;
ties with the k-th are kept), then top-p (keep the smallest set of most likely tokens whose
probability reaches p), then one draw (by inversion of the cumulative distribution, one random
number per row: :func:`draw`) from ``torch.Generator`` seeded by ``seed``. On a CPU, top-k
works on the k candidates only (:func:`sample_next`): the same distribution, without passes
over the whole vocabulary.

The LM head while sampling (``pretrain/model/decode.py``): only the last position of each row
needs logits, so the trunk (``GPT.hidden_states``) runs and the head is applied to that one
position, from the weight layout that reads fastest on the device (:func:`decode_layout`,
:class:`DecodeHead`), or screened in int8 for top-k and greedy on a CPU (:class:`ScreenedHead`).

Stopping: a row stops at its first ``<|endoftext|>`` (not included in the output; later
steps of a finished row are ignored); the batch stops when every row has or after
``max_new_tokens``. Context: prompt + continuation must fit in ``block_size`` positions, so
at most ``block_size - len(prompt)`` tokens are generated (``max_new_tokens`` is reduced to
that, and the CLI says so); a prompt longer than ``block_size`` is an error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from data_pipeline.tokenizer import EOT_ID
from pretrain.dist import is_fsdp
from pretrain.model.decode import DecodeHead, ScreenedHead, decode_layout
from pretrain.model.gpt import GPT, KVCache

# Attention backends while decoding. Not cuDNN's: it builds (and caches) a graph per shape, and
# every decoded token is a new key length -- on an H200 the 124M model spent 599 of 759 ms of host
# time generating 16 tokens in _cudnn_attention_forward (3.1 ms per layer and token; the GPU
# check's host profile). Flash / memory-efficient / math take any length as it comes.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class GenerationError(ValueError):
    """Bad generation input (prompt too long, bad sampling settings): a one-line message."""


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / top-p support to -inf. logits: (B, V) float."""
    V = logits.size(-1)
    if top_k is not None and top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold >= top_p of the mass;
        # the most likely token is always kept.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from logits (B, V): greedy when temperature is 0. Returns (B,) long."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1) and logits.device.type == "cpu":
        nxt = _sample_top_k(logits, top_k, top_p, generator)
        if nxt is not None:
            return nxt
    logits = filter_logits(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return draw(probs, generator)


def _sample_top_k(logits: torch.Tensor, top_k: int, top_p: float | None,
                  generator: torch.Generator | None) -> torch.Tensor | None:
    """:func:`sample_next` after top-k on the k candidates alone: softmax, top-p and the draw on
    (B, k) instead of (B, V) -- the same distribution as masking the full row. The candidates
    are put back in vocabulary order before the draw, so the inversion walks the same cumulative
    distribution as over the full row (the masked entries add 0). None when a row has ties with
    its k-th value beyond the k (they are kept by the full path; the caller falls back to it):
    top-k takes k + 1 values, and a tie exists exactly when the (k+1)-th equals the k-th. On CPU
    only: the tie check reads a value on the host (a device sync on a GPU)."""
    vals, ids = torch.topk(logits, top_k + 1, dim=-1)  # (B, k+1) each, values descending
    return _sample_from_top(vals, ids, top_k, top_p, generator)


def _sample_from_top(vals: torch.Tensor, ids: torch.Tensor, top_k: int, top_p: float | None,
                     generator: torch.Generator | None) -> torch.Tensor | None:
    """The second half of :func:`_sample_top_k`: vals (B, k+1), the k + 1 largest logits of each
    row (descending, temperature applied), ids (B, k+1) their token ids. (B,) long, or None on a
    tie with the k-th value."""
    if bool((vals[:, top_k] == vals[:, top_k - 1]).any()):  # the (k+1)-th ties with the k-th
        return None
    vals, ids = vals[:, :top_k], ids[:, :top_k]  # (B, k)
    if top_p is not None and top_p < 1.0:
        probs = vals.softmax(dim=-1)  # (B, k), descending
        drop = (probs.cumsum(dim=-1) - probs) >= top_p  # as filter_logits
        vals = vals.masked_fill(drop, float("-inf"))
    ids, order = ids.sort(dim=-1)  # (B, k): vocabulary order
    probs = vals.gather(-1, order).softmax(dim=-1)  # (B, k)
    return ids.gather(-1, draw(probs, generator)[:, None]).squeeze(-1)  # (B,)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` (B, V), with probability proportional to its entry, by
    inversion: the first index whose cumulative probability exceeds u ~ U(0, row total). One
    random number per row, where ``torch.multinomial`` draws one per vocabulary entry (on a CPU
    that was a third of the time of a token of a small model). Returns (B,) long."""
    cdf = probs.double().cumsum(dim=-1)  # (B, V), fp64: exact enough over 50k entries
    total = cdf[:, -1:]  # (B, 1)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device, dtype=cdf.dtype) * total
    # u < total strictly, so the index is a token with probability > 0 (never a filtered one).
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)  # (B,)


def _check_settings(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not 0 <= temperature < float("inf"):  # NaN fails every comparison
        raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1 (or None for no limit), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1] (or None), got {top_p!r}")


def _next_token_fn(model: GPT, temperature: float, top_k: int | None, top_p: float | None,
                   generator: torch.Generator | None):
    """``f(idx (B, T), cache) -> (B,)``: the next token of each row, sampled from the logits at
    the last position, real vocabulary only (padded ids can never be produced). A plain GPT: the
    trunk, then the head at that position -- :class:`ScreenedHead` for top-k and greedy on a CPU,
    else :class:`DecodeHead`. An FSDP-sharded one goes through ``forward`` (its hooks gather the
    parameters, and the head weight outside the forward is a shard)."""
    V = model.config.vocab_size

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, temperature, top_k, top_p, generator)

    if is_fsdp(model):  # the head at the last position; padded columns are -inf, never drawn
        return lambda idx, cache: pick(model(idx, kv_cache=cache, at="last")[0][:, -1])
    greedy = temperature == 0
    wanted = (greedy or (top_k is not None and top_k < V)) and not torch.is_autocast_enabled("cpu")
    screened = ScreenedHead.build(model) if wanted else None  # under autocast the logits are not fp32
    if screened is None:
        head = DecodeHead(model)
        return lambda idx, cache: pick(head(model.hidden_states(idx, kv_cache=cache)[:, -1]))

    def screened_next(idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        h = model.hidden_states(idx, kv_cache=cache)[:, -1]  # (B, C)
        found = screened.candidates(h, 1 if greedy else top_k + 1)
        if found is not None:
            cand, r = found  # (U,), (B, U)
            if greedy:
                return cand[r.argmax(dim=-1)]  # the first maximum, as over the full row
            vals, pos = torch.topk(r, top_k + 1, dim=-1)  # (B, k+1) each
            if temperature != 1.0:
                vals = vals / temperature
            nxt = _sample_from_top(vals, cand[pos], top_k, top_p, generator)
            if nxt is not None:
                return nxt
        return pick(screened.full_logits(h))  # ties at the k-th value (or a non-finite screen)

    return screened_next


@torch.inference_mode()
@sdpa_kernel(DECODE_BACKENDS)
def _generate_batch(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    next_token,
    eot_id: int | None,
    use_kv_cache: bool,
) -> torch.Tensor:
    """New tokens (B, n) for equal-length prompts idx (B, T0); n <= max_new_tokens."""
    cfg = model.config
    B, T0 = idx.shape
    n_new = min(max_new_tokens, cfg.block_size - T0)
    if n_new <= 0:
        return idx.new_empty(B, 0)
    cache = None
    if use_kv_cache:
        # The last sampled token is never fed back, so T0 + n_new - 1 positions suffice.
        # k, v come out of the qkv projection: in the autocast dtype when autocast is on.
        dtype = model.transformer.wte.weight.dtype
        if torch.is_autocast_enabled(idx.device.type):
            dtype = torch.get_autocast_dtype(idx.device.type)
        cache = KVCache.empty(cfg, B, T0 + n_new - 1, idx.device, dtype)
    nxt = next_token(idx, cache)  # (B,): the prefill
    seq = idx
    out = []
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for step in range(n_new):
        if eot_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eot_id), nxt)
            done |= nxt == eot_id
        out.append(nxt)
        if step == n_new - 1 or (eot_id is not None and bool(done.all())):
            break
        if use_kv_cache:
            nxt = next_token(nxt[:, None], cache)  # (B,)
        else:
            seq = torch.cat([seq, nxt[:, None]], dim=1)  # (B, T0 + step + 1)
            nxt = next_token(seq, None)  # (B,): the whole context, recomputed
    return torch.stack(out, dim=1)  # (B, n)


def generate(
    model: GPT,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    eot_id: int | None = EOT_ID,
    use_kv_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt (token ids); returns the new tokens of each, in input order,
    cut before the first ``eot_id`` (None = never stop early).

    ``prompts``: a (B, T) long tensor or a list of id lists (any lengths; one batch per
    length). ``seed`` seeds a fresh ``torch.Generator`` on the model's device (or pass
    ``generator``); the same seed, settings and batch give the same tokens."""
    _check_settings(max_new_tokens, temperature, top_k, top_p)
    cfg = model.config
    device = model.transformer.wte.weight.device
    rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]
    for i, p in enumerate(rows):
        if not p:
            raise GenerationError(f"prompt {i} is empty; start it with <|endoftext|> ({EOT_ID}) for unconditional samples")
        if len(p) > cfg.block_size:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens but the model's context is {cfg.block_size} (block_size); "
                "shorten the prompt"
            )
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} holds token ids outside [0, {cfg.vocab_size}): {bad[:4]}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(rows):
        by_length[len(p)].append(i)
    results: list[list[int]] = [[] for _ in rows]
    was_training = model.training
    model.eval()
    try:
        with nullcontext() if is_fsdp(model) else decode_layout(model), torch.inference_mode():
            next_token = _next_token_fn(model, temperature, top_k, top_p, generator)
            for length in sorted(by_length):
                members = by_length[length]
                idx = torch.tensor([rows[i] for i in members], dtype=torch.long, device=device)  # (B, T0)
                new = _generate_batch(model, idx, max_new_tokens, next_token, eot_id, use_kv_cache).tolist()
                for i, toks in zip(members, new):
                    if eot_id is not None and eot_id in toks:
                        toks = toks[: toks.index(eot_id)]
                    results[i] = toks
    finally:
        model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2-generate",
        description="Sample continuations of a prompt from a GPT-2 (HF directory, hub name or native checkpoint).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="HF model directory / hub name, or a native checkpoint directory")
    parser.add_argument(
        "--prompt", default="", help="text to continue (default: '%(default)s' = unconditional, starting at <|endoftext|>)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    parser.add_argument("--num-samples", type=int, default=1, help="samples of the prompt, generated as one batch")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto = cuda when available")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and activations dtype"
    )
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole context every step")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data_pipeline.tokenizer import get_tokenizer
    from pretrain.model.weights import WeightsError, load_model, resolve

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        if args.num_samples < 1:
            raise GenerationError(f"--num-samples must be >= 1, got {args.num_samples}")
        _check_settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p)  # before the model loads
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise GenerationError(f"--device {args.device}: CUDA is not available here; pass --device cpu")
        source = resolve(args.model)
        model = load_model(source).to(device=device, dtype=getattr(torch, args.dtype))
        if source.note:
            print(source.note, file=sys.stderr)
        tok = get_tokenizer()
        ids = tok.encode(args.prompt) or [tok.eot_id]
        room = model.config.block_size - len(ids)
        if 0 <= room < args.max_new_tokens:
            print(
                f"note: the context holds {model.config.block_size} tokens and the prompt {len(ids)}; "
                f"generating at most {room}",
                file=sys.stderr,
            )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = generate(
            model,
            [ids] * args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            use_kv_cache=not args.no_kv_cache,
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    except (GenerationError, WeightsError) as e:
        print(f"gpt2-generate: error: {e}", file=sys.stderr)
        return 2
    for i, new in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples} ---")
        print(args.prompt + tok.decode(new))
    n = sum(len(o) for o in outs)
    print(
        f"{n} new tokens in {dt:.2f} s: {n / max(dt, 1e-9):.1f} tokens/s "
        f"(batch {args.num_samples}, {'no ' if args.no_kv_cache else ''}KV cache, {device}, {args.dtype})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
