"""The LM head's two chunked paths: the head fused with the cross-entropy (training, validation
loss) and the log-probabilities of given tokens (scoring); and the head's matmul in FP8
(:func:`fp8_linear`, a training lever, off by default). Both give the numbers of
``log_softmax(h @ W[:vocab_size].T)`` without ever holding the (rows x vocabulary) logits: the
fused loss walks the rows in chunks (its backward is computed in the same pass), the scorer
walks the vocabulary in slices (each slice's logits stay in cache). ``GPT.loss`` and
``GPT.token_logprobs`` call them; nothing else applies the head.

Torch only, like the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _head_ce_chunks(h, weight, targets, vocab_size, chunk_size, compute_dtype, reduction, with_grad):
    """The loop behind :func:`linear_cross_entropy`, over chunks of ``chunk_size`` rows.

    h: (N, C); weight: (V_rows, C), only the first ``vocab_size`` rows are used; targets: (N,).
    Returns (loss, grad_h, grad_w): loss is the sum / mean (0-dim) or (N,) for 'none'; with
    ``with_grad`` the gradients of that loss w.r.t. h (N, C) and weight (V_rows, C), computed
    chunk by chunk from the chunk's softmax (so the backward pass has nothing left to do but
    scale them). No host sync: the ignored-token count stays a tensor."""
    N = h.size(0)
    w = weight[:vocab_size].to(compute_dtype)  # (V, C): padded rows sliced off
    valid = targets != -100  # (N,)
    safe_t = torch.where(valid, targets, 0)  # (N,) an in-range index for ignored rows
    # d loss / d logit_ij = scale_i * (softmax_ij - [j == t_i]); scale 0 on ignored rows.
    scale = valid.float()
    if reduction == "mean":
        scale = scale / valid.sum()  # 0-dim tensor: nan when every target is ignored, as F.cross_entropy
    grad_h = torch.empty_like(h) if with_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if with_grad else None
    losses = []
    for lo in range(0, N, chunk_size):
        hi = min(lo + chunk_size, N)
        hc = h[lo:hi].to(compute_dtype)  # (R, C)
        t = safe_t[lo:hi]  # (R,)
        sc = scale[lo:hi]  # (R,)
        # The chunk's logits, transposed: (V, R) = w @ hc^T. The only (vocabulary x rows)
        # tensor, one chunk at a time; vocabulary-major because on CPUs that matmul is ~1.5x
        # faster than (R, V) = hc @ w^T (the output is written in long contiguous rows).
        logits = (w @ hc.t()).float()  # (V, R)
        tgt = logits.gather(0, t[None, :]).squeeze(0)  # (R,)
        # log-sum-exp by hand, in place (no second (V, R) tensor); the exponentials are reused
        # for the gradient: softmax = exp(logit - max) / sum.
        m = logits.amax(dim=0, keepdim=True)  # (1, R)
        e = logits.sub_(m).exp_()  # (V, R)
        s = e.sum(dim=0, keepdim=True)  # (1, R)
        lse = (m + s.log()).squeeze(0)  # (R,)
        losses.append(torch.where(valid[lo:hi], lse - tgt, 0.0))  # (R,)
        if with_grad:
            g = e.mul_(sc[None, :] / s)  # (V, R) scale * softmax
            g.scatter_add_(0, t[None, :], -sc[None, :])  # - scale * one-hot
            g = g.to(compute_dtype)  # (V, R)
            grad_h[lo:hi] = g.t() @ w  # (R, C)
            if compute_dtype == torch.float32:
                grad_w[:vocab_size].addmm_(g, hc)  # (V, C)
            else:
                grad_w[:vocab_size] += (g @ hc).float()  # (V, C), accumulated in fp32
    per_row = torch.cat(losses)  # (N,)
    if reduction == "none":
        loss = per_row
    else:
        loss = per_row.sum()
        if reduction == "mean":
            loss = loss / valid.sum()
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Liger-style: the gradients are computed in the forward pass, chunk by chunk, so no
    chunk's logits are kept for (or recomputed in) the backward pass, which only scales them
    by the incoming gradient (1/accumulation, DDP's hooks, ...)."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, chunk_size, compute_dtype, reduction):
        loss, grad_h, grad_w = _head_ce_chunks(h, weight, targets, vocab_size, chunk_size, compute_dtype,
                                               reduction, with_grad=True)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # In place: the buffers are this call's own, and a second backward is not supported.
        return grad_h.mul_(grad_loss), grad_w.mul_(grad_loss).to(ctx.weight_dtype), None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int | None = None,
    chunk_size: int = 512,
    reduction: str = "mean",
) -> torch.Tensor:
    """``F.cross_entropy(h @ weight[:vocab_size].T, targets, ignore_index=-100)`` without the
    (N, V) logits: rows are processed ``chunk_size`` at a time, and at most one chunk's
    (chunk_size, V) fp32 logits exist at once, in the forward and the backward pass alike.

    h: (N, C); weight: (V_rows, C) (rows >= ``vocab_size`` are padding: sliced off, and their
    gradient is 0); targets: (N,) long, -100 = ignored. ``reduction``: 'mean' (over the
    non-ignored targets), 'sum' or 'none' (N,) ('none' carries no gradient). Under autocast
    the matmuls run in the autocast dtype and the log-sum-exp in fp32, as the unfused
    ``F.cross_entropy(logits.float())`` does. A plain loop of tensor ops: ``torch.compile``
    traces it without graph breaks and it never syncs with the device."""
    V = weight.size(0) if vocab_size is None else vocab_size
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    dev = h.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if with_grad and reduction == "none":
        raise ValueError("linear_cross_entropy: reduction='none' has no gradient; use 'mean' or 'sum'")
    if with_grad:
        return _LinearCrossEntropy.apply(h, weight, targets, V, chunk_size, compute_dtype, reduction)
    return _head_ce_chunks(h, weight, targets, V, chunk_size, compute_dtype, reduction, with_grad=False)[0]


def target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, *,
                    vocab_size: int | None = None, bias: torch.Tensor | None = None,
                    vocab_chunk: int = 2048, greedy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(hidden @ weight.T + bias)[rows, targets]`` in fp32, without building the
    full (U, V) logits: the vocabulary is walked in slices of ``vocab_chunk`` rows of ``weight``
    and the log-sum-exp is combined online (max-shifted per slice), so each slice's logits stay
    in cache. On a CPU that is ~1.7x faster than one (U, V) matmul + ``log_softmax`` for a GPT-2
    head, and the result differs only by float summation order.

    hidden: (U, C), one row per distinct prefix; weight: (V_rows, C) (only the first
    ``vocab_size`` rows count); rows, targets: (S,) the hidden row and the token of each scored
    position (several positions may share a row). Returns (S,) fp32; with ``greedy`` also (S,)
    bool: whether the target is the row's argmax (``logits.argmax()``: the first maximum), which
    lm-evaluation-harness reports with each log-likelihood (``is_greedy``, LAMBADA's ``acc``)."""
    V = weight.size(0) if vocab_size is None else vocab_size
    tgt_logit = torch.zeros(rows.numel(), dtype=torch.float32, device=hidden.device)
    maxes, sums, firsts = [], [], []
    for lo in range(0, V, vocab_chunk):
        hi = min(lo + vocab_chunk, V)
        logits = F.linear(hidden, weight[lo:hi], None if bias is None else bias[lo:hi]).float()  # (U, hi-lo)
        inside = (targets >= lo) & (targets < hi)
        picked = logits[rows, (targets - lo).clamp(0, hi - lo - 1)]  # (S,)
        tgt_logit = torch.where(inside, picked, tgt_logit)
        if greedy:
            m, first = logits.max(dim=1, keepdim=True)  # (U, 1) each: the slice's max and its first index
            firsts.append(first + lo)
        else:
            m = logits.amax(dim=1, keepdim=True)  # (U, 1)
        maxes.append(m)
        sums.append(logits.sub_(m).exp_().sum(dim=1, keepdim=True))  # (U, 1)
    m_all, s_all = torch.cat(maxes, dim=1), torch.cat(sums, dim=1)  # (U, n_slices)
    top, top_slice = m_all.max(dim=1, keepdim=True)  # (U, 1): the first slice holding the row's max
    lse = (top + (s_all * (m_all - top).exp()).sum(dim=1, keepdim=True).log()).squeeze(1)  # (U,)
    logp = tgt_logit - lse[rows]
    if not greedy:
        return logp
    argmax = torch.cat(firsts, dim=1).gather(1, top_slice).squeeze(1)  # (U,)
    return logp, argmax[rows] == targets


# ---------------------------------------------------------------------------------------------
# The head's matmul in FP8 (a training lever; ``GPT.head_fp8``)


def _to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` scaled so its largest magnitude is the format's largest finite value, cast to ``dtype``;
    and the fp32 inverse scale that ``torch._scaled_mm`` multiplies back (tensor-wise dynamic
    scaling, torchao's default float8 recipe). No host sync: the scale stays on the device."""
    amax = t.detach().abs().amax().float().clamp(min=1e-12)  # 0-dim
    scale = torch.finfo(dtype).max / amax
    return (t.float() * scale).to(dtype), scale.reciprocal()


class _Fp8Linear(torch.autograd.Function):
    """``x @ w.T`` with both operands in float8 e4m3 and fp32 accumulation (``torch._scaled_mm``);
    the backward's two products take the output gradient in e5m2 (more range, as gradients need):
    modded-nanogpt's FP8 LM head, with dynamic per-tensor scales instead of fixed ones. x: (M, K),
    w: (N, K) -> (M, N) bf16. On CUDA it needs sm89+ (H100/H200) and M, K, N multiples of 16."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x8, x_inv = _to_fp8(x, torch.float8_e4m3fn)  # (M, K)
        w8, w_inv = _to_fp8(w, torch.float8_e4m3fn)  # (N, K)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.dtypes = (x.dtype, w.dtype)
        # _scaled_mm wants its first operand row-major and its second column-major: w8.t() is.
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=torch.bfloat16,
                                use_fast_accum=True)  # (M, N)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = _to_fp8(grad.contiguous(), torch.float8_e5m2)  # (M, N)
        # dx = g @ w: (M, N) @ (N, K), the second operand column-major (a transposed copy of w8).
        dx = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=g_inv, scale_b=w_inv, out_dtype=torch.bfloat16)
        # dw = g.T @ x: (N, M) @ (M, K): g.T row-major (a copy), x column-major (a copy).
        dw = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=g_inv, scale_b=x_inv,
                              out_dtype=torch.float32)
        return dx.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T in float8 (:class:`_Fp8Linear`): bf16 (..., N), gradients for
    both. A lever for the LM head's matmuls (27% of GPT-2 small's training FLOPs), A/B-tested by
    ``benchmarks/gpu_check.py`` against the bf16 head before it is used by default."""
    lead = x.shape[:-1]
    out = _Fp8Linear.apply(x.reshape(-1, x.size(-1)), weight)  # (M, N)
    return out.view(*lead, weight.size(0))
