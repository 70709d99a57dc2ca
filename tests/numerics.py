"""What two floating-point code paths may differ by: tolerances derived from the dtype and the
length of the sums, not guessed -- the one place the suite takes them from.

Two paths that compute the same value with sums in another order (another kernel, chunking,
batch, CPU instruction set) each land within the classic bound of a sum of n terms of the exact
value (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.5 and sec. 4.2):

    |fl(sum x_i) - sum x_i| <= gamma_n * sum |x_i|,   gamma_n = n u / (1 - n u),

with ``u`` the unit roundoff (half of ``torch.finfo(dtype).eps``): fp32 2^-24, bf16 2^-8. So
two paths are within twice that of each other. Bitwise equality is asserted only where the same
kernels run on the same shapes, and the test says so beside the assertion.

Through a network (:func:`network_bound`) the sums along the path from the input to a logit add
their lengths; the bound is ``gamma`` of that total times the logit's own magnitude scale
(``||h|| max_j ||w_j||``, the head's sum of |terms| by Cauchy-Schwarz). That treats each block
as passing its input's relative error on without amplifying it -- an assumption, not a proof,
which the worst case ``n u`` per sum (typical errors grow like ``sqrt(n) u``) leaves room for;
tests that rely on it compare against a float64 run of the same model (:func:`float64_copy`).
"""

from __future__ import annotations

import copy
import math

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """u: the largest relative error of one rounding to nearest in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """gamma_n = n u / (1 - n u): the relative bound of a sum (or dot product) of n terms."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"a sum of {n} terms in {dtype} has no useful bound"
    return nu / (1 - nu)


def sum_tolerance(abs_sum, n: int, dtype: torch.dtype = torch.float32, paths: int = 2):
    """How far ``paths`` computations of a sum of n terms whose |terms| add up to ``abs_sum`` (a
    float or a tensor, elementwise) may be apart: each within gamma_n * abs_sum of the exact sum.
    ``paths=1``: one computation against an exact (float64) reference."""
    return paths * gamma(n, dtype) * abs_sum


def path_length(config, tokens: int) -> int:
    """The summed lengths of the sums along a GPT's path from the input to one logit: per block
    layer norm (C), q/k/v (C), the attention scores (C / n_head), softmax and attention-weighted
    values (T each), the output projection (C), layer norm (C), the MLP (C and 4C); then ln_f and
    the head (C each)."""
    C, T = config.n_embd, tokens
    per_block = C + C + C // config.n_head + T + T + C + C + C + 4 * C
    return config.n_layer * per_block + 2 * C


def network_bound(config, tokens: int, h: torch.Tensor, head_weight: torch.Tensor,
                  dtype: torch.dtype = torch.float32, paths: int = 1) -> torch.Tensor:
    """(B, 1): how far a logit of a row computed in ``dtype`` may be from the exact one (``paths=1``;
    2: from another ``dtype`` path's): gamma of :func:`path_length` times ``||h_b|| max_j ||w_j||``
    (h (B, C) the row's hidden state after ln_f, ideally from the float64 run; head_weight (V, C))."""
    scale = h.double().norm(dim=-1, keepdim=True) * head_weight.double().norm(dim=-1).max()  # (B, 1)
    return paths * gamma(path_length(config, tokens), dtype) * scale


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model in float64: the reference that is exact at fp32's scale (u = 2^-53)."""
    return copy.deepcopy(model).double().eval()


def assert_within(got: torch.Tensor, ref: torch.Tensor, tol, what: str = "") -> None:
    """|got - ref| <= tol elementwise (tol a float or a broadcastable tensor); the message names the
    worst element's difference and its tolerance."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    diff = (got.double() - ref.double()).abs()
    tol_t = torch.as_tensor(tol, dtype=torch.float64).expand_as(diff)
    ratio = diff / tol_t.clamp_min(torch.finfo(torch.float64).tiny)
    worst = int(ratio.argmax())
    assert bool((diff <= tol_t).all()), (
        f"{what}: |diff| {diff.flatten()[worst].item():.3g} > tolerance {tol_t.flatten()[worst].item():.3g} "
        f"at flat index {worst} ({int((diff > tol_t).sum())} of {diff.numel()} outside)")


def can_pick(logits: torch.Tensor, delta: float, token: int, u: float, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None) -> bool:
    """Whether the sampler of ``pretrain.inference.generate`` (greedy at temperature 0; else top-k,
    top-p, then the draw by inversion with the uniform ``u`` over the kept tokens in vocabulary
    order) can pick ``token`` from SOME logits within ``delta`` of ``logits`` (V,) (the exact, float64
    ones). Conservative (it may say yes where no such logits exist, never no where they do): two
    paths whose logits are each within ``delta`` of the exact may disagree on a token only where
    this holds for both tokens -- a near-tie."""
    z = logits.double()
    if temperature == 0:  # argmax: the token's logit can reach the largest one
        return bool(z[token] >= z.max() - 2 * delta)
    z, d = z / temperature, delta / temperature
    V = z.numel()
    sure = torch.ones(V, dtype=torch.bool)  # in the support for every admissible logits
    maybe = torch.ones(V, dtype=torch.bool)  # in it for some
    if top_k is not None and top_k < V:
        desc = z.sort(descending=True).values
        maybe &= z >= desc[top_k - 1] - 2 * d  # can reach the k-th largest
        sure &= z > desc[top_k] + 2 * d  # stays above the (k+1)-th
    if top_p is not None and top_p < 1.0:
        # Each kept token's probability moves by at most a factor e^{2d} (softmax of logits moved
        # by <= d); the mass ranked above a token is bounded from the tokens surely / possibly above it.
        w = torch.where(maybe, (z - z.max()).exp(), torch.zeros_like(z))
        p = w / w.sum()  # (V,)
        za, order = z.sort()  # ascending
        sure_cum = torch.cat([torch.zeros(1, dtype=z.dtype), (p * sure)[order].cumsum(0)])  # (V + 1,)
        maybe_cum = torch.cat([torch.zeros(1, dtype=z.dtype), (p * maybe)[order].cumsum(0)])
        above_lo = (sure_cum[-1] - sure_cum[torch.searchsorted(za, z + 2 * d, right=True)]) * math.exp(-2 * d)
        above_hi = (maybe_cum[-1] - maybe_cum[torch.searchsorted(za, z - 2 * d)] - p) * math.exp(2 * d)
        maybe &= above_lo < top_p
        sure &= above_hi < top_p
    if not maybe[token]:
        return False
    e_lo = (z - z.max() - d).exp()  # the unnormalised weights at their least and most
    e_hi = (z - z.max() + d).exp()
    before = torch.arange(V) < token
    after = torch.arange(V) > token
    a_lo = e_lo[before & sure].sum()  # the least mass before the token, the most from it on
    b_hi = e_hi[~before & maybe].sum()
    c_hi = e_hi[~after & maybe].sum()  # the most mass up to the token, the least after it
    d_lo = e_lo[after & sure].sum()
    return bool(a_lo / (a_lo + b_hi) <= u < c_hi / (c_hi + d_lo))


def logits_tolerance(model, idx: torch.Tensor, paths: int = 2) -> torch.Tensor:
    """(B, T, 1): how far two fp32 paths' logits of ``model`` at ``idx`` (B, T) may be apart
    (``paths=1``: one path from the exact), by :func:`network_bound` on the float64 run's hidden
    states."""
    ref = float64_copy(model)
    with torch.no_grad():
        h = ref.hidden_states(idx)  # (B, T, C)
    B, T, C = h.shape
    tol = network_bound(model.config, T, h.reshape(B * T, C), ref.head_weight(), paths=paths)  # (B*T, 1)
    return tol.view(B, T, 1)


def loss_tolerance(model, idx: torch.Tensor, total: float, n: int, paths: int = 2) -> float:
    """How far two fp32 paths' cross-entropy summed over ``n`` tokens (``total``: its value; divide
    the result by n for the mean) may be apart: a logit within ``delta`` of the exact moves each
    token's log-softmax by at most 2 ``delta``, and the sum adds gamma_n times its positive terms."""
    delta = logits_tolerance(model, idx, paths=1).max().item()
    return paths * n * 2 * delta + sum_tolerance(abs(total), n, paths=paths)


def grad_tolerance(config, idx: torch.Tensor, ref_grad: torch.Tensor, paths: int = 2) -> float:
    """How far two fp32 paths' gradient of a parameter may be apart: the backward pass runs the
    forward path's sums again (:func:`path_length`) plus the sum over the batch's tokens into each
    weight's gradient; the scale of the terms is taken as the tensor's largest gradient entry."""
    n = path_length(config, idx.size(-1)) + idx.numel()
    return paths * gamma(n) * ref_grad.abs().max().item()


def divergences(model, prompts, got, want, seeds, temperature: float = 1.0, top_k=None, top_p=None) -> int:
    """The promise of ``generate`` between two paths (a row in a batch and alone, cached and not,
    compiled and eager, screened head and full head): each row's tokens are equal, except that at
    the first token where they part the exact (float64) logits of that context put the decision
    within ``delta`` of a tie (:func:`can_pick` holds for both tokens), ``delta`` the fp32 bound
    of :func:`network_bound`. Asserts that; returns how many rows parted so (the near-ties), for
    the caller to report or bound. After the first difference the contexts differ, so nothing
    further is compared. ``seeds``: each row's seed (None for greedy)."""
    from pretrain.inference.generate import uniforms

    ref = float64_copy(model)
    V = model.config.vocab_size
    parted = 0
    for b, (p, g, w) in enumerate(zip(prompts, got, want)):
        t = next((i for i, (x, y) in enumerate(zip(g, w)) if x != y), None)
        if t is None:
            assert len(g) == len(w), (b, "same tokens, different lengths", len(g), len(w))
            continue
        ctx = torch.tensor([list(p) + list(g[:t])])  # (1, T): the context both paths saw
        with torch.no_grad():
            h = ref.hidden_states(ctx)[:, -1]  # (1, C)
            logits = ref.logits(h)[0, :V]  # (V,)
        delta = network_bound(model.config, model.config.block_size, h, ref.head_weight()).item()
        u = 0.0 if temperature == 0 else uniforms(torch.tensor([seeds[b]]), t + 1)[0, t].item()
        for tok in (g[t], w[t]):
            assert can_pick(logits, delta, tok, u, temperature, top_k, top_p), (
                f"row {b} token {t}: {g[t]} vs {w[t]} is not a near-tie (token {tok}: logit "
                f"{logits[tok].item():.6f}, max {logits.max().item():.6f}, delta {delta:.3g}, u {u:.6f})")
        parted += 1
    return parted


def logprob_sum_tolerance(model, contexts, continuations, sums, block_size: int, paths: int = 2):
    """(N,) how far two fp32 paths' summed log-probabilities of each continuation may be apart
    (HellaSwag's scores): per token 2 ``delta`` of the sequence's logits (as :func:`loss_tolerance`),
    plus the sum of the continuation's terms."""
    tol = []
    for c, k, s in zip(contexts, continuations, sums):
        toks = (list(c) + list(k))[-(block_size + 1):]
        delta = logits_tolerance(model, torch.tensor([toks[:-1]]), paths=1).max().item()
        tol.append(paths * len(k) * 2 * delta + sum_tolerance(abs(float(s)), len(k), paths=paths))
    return torch.tensor(tol, dtype=torch.float64)
