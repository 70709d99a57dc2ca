"""The CPU backend of decoding: the only module that calls torch's private CPU ops.

- oneDNN with packed weights (``torch.ops.mkldnn._reorder_linear_weight`` /
  ``_linear_pointwise``): a batch's Linear layers and the bf16 head screen (``decode.py``:
  ``decode_layout``, ``DecodeHead``, ``BatchScreenedHead``);
- int8 weights with per-row scales (``torch._weight_int8pack_mm``): the one-row head screen
  (``ScreenedHead``).

Every entry is guarded: where this torch or this CPU lacks an op (another build, a CPU without
AVX512-BF16 / AMX, ``ONEDNN_MAX_CPU_ISA`` capping it), the ``*_applies`` check says no, the
caller takes the portable path (MKL / ``F.linear``, the fp32 head), and one line is logged
once per missing op. Nothing happens at import: the custom op that lets ``torch.compile`` call
oneDNN as it is (``pretrain::onednn_linear``) is registered on the first compiled call.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

ONEDNN_ROWS = 8
"""The rows oneDNN's weight packing is laid out for (``torch.ops.mkldnn._reorder_linear_weight``'s
batch hint): the batches this packing is used for (2 or more rows) run at the same speed with it
(W1's bf16 head, cold cache, 1 thread: 792-1,123 us for 2-8 rows packed for 8 or for their own count)."""


@functools.cache
def _missing(what: str, why: str) -> None:
    """One logged line per missing fast path (then the portable path, silently)."""
    log.info("decoding without %s (%s): the portable path", what, why)


def _op(namespace, name: str, what: str):
    """``namespace.name`` (a private torch op), or None after one logged line."""
    try:
        return getattr(namespace, name)
    except (AttributeError, RuntimeError):
        _missing(what, f"this torch has no {name}")
        return None


def onednn_applies(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN can run ``x @ weight^T`` in ``dtype`` here, in full precision: a CPU fp32 weight, this
    torch built with oneDNN and its packed-linear ops (and bf16 kernels for ``dtype`` bf16), fp32
    matmuls not set to a reduced precision (``torch.backends.mkldnn.matmul.fp32_precision``), no
    CPU autocast (which would cast F.linear's inputs, not ours)."""
    if not (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2):
        return False
    mkldnn = torch.backends.mkldnn
    if not mkldnn.is_available():
        _missing("oneDNN", "this torch is built without it")
        return False
    if _op(torch.ops.mkldnn, "_linear_pointwise", "oneDNN packed weights") is None \
            or _op(torch.ops.mkldnn, "_reorder_linear_weight", "oneDNN packed weights") is None:
        return False
    if getattr(mkldnn.matmul, "fp32_precision", "none") not in ("none", "ieee") or torch.is_autocast_enabled("cpu"):
        return False
    if dtype == torch.bfloat16:
        probe = _op(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", "oneDNN bf16")
        if probe is None or not probe():
            _missing("the oneDNN bf16 screen", "no bf16 kernels on this CPU (AVX512-BF16 / AMX)")
            return False
    return dtype in (torch.float32, torch.bfloat16)


def onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` (out, in) packed for :func:`onednn_linear` (an opaque oneDNN layout, a copy), or
    None where this torch's oneDNN refuses it (logged once)."""
    _compiled_op()  # registered here, eagerly: a compiled step cannot register it while tracing
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), ONEDNN_ROWS)
        onednn_linear(torch.zeros(2, weight.size(1), dtype=weight.dtype), packed, None)
    except RuntimeError as e:
        _missing("oneDNN packed weights", f"refused: {str(e).splitlines()[0][:120]}")
        return None
    return packed


@functools.cache
def _compiled_op():
    """``pretrain::onednn_linear``: an op of our own around oneDNN's, so that torch.compile (inductor
    too) calls it as it is and a compiled step computes what the eager step computes. Registered
    when the first weight is packed (never at import)."""

    @torch.library.custom_op("pretrain::onednn_linear", mutates_args=())
    def op(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @op.register_fake
    def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], packed.size(0))

    return op


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear through oneDNN with a packed weight: x (..., in) -> (..., out). The same oneDNN
    call eager and compiled; eagerly without the custom op's dispatch (~8 us a call)."""
    if torch.compiler.is_compiling():  # registered by onednn_pack, which made ``packed``
        return torch.ops.pretrain.onednn_linear(x, packed, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def int8_applies(weight: torch.Tensor) -> bool:
    """``torch._weight_int8pack_mm`` can screen ``weight`` (V, C): a contiguous CPU fp32 matrix
    whose width is a multiple of 16 (the op's CPU kernels step through C in 8s or 16s with
    aligned loads), and this torch has the op."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.size(1) % 16 == 0
            and weight.is_contiguous() and _op(torch, "_weight_int8pack_mm", "the int8 head screen") is not None)


def int8_mm(h: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``bf16(h) @ (q * scale)^T``: h (B, C), q (V, C) int8, scale (V,) bf16 -> (B, V) fp32 (fp32
    accumulation, bf16 output)."""
    return torch._weight_int8pack_mm(h.to(torch.bfloat16).contiguous(), q, scale).float()
