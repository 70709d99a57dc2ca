"""Start a run from existing weights: ``model.init_from`` (nanoGPT's ``init_from='gpt2'``).

::

    model.init_from: gpt2                    # a hub name: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | owner/name
    model.init_from: demo/latest/export      # a local Hugging Face GPT-2 directory (save_pretrained / export_hf)
    model.init_from: runs/a/checkpoints      # a run's checkpoints/ (its newest complete one) or one step_XXXXXXXX

Weights only: the optimizer starts empty, the step at 0, the schedule is this run's. The source
is resolved once, by the run plan (``pretrain/plan.py``: ``pretrain.model.weights.resolve``, its
architecture inspected and checked there when its files are local), and read here by
``pretrain.model.weights.read`` (HF directory, hub name or native checkpoint, with
or without FSDP) as full tensors on CPU, then adapted and copied into the configured model.

The architecture is the config's, and it must match the source's in every field of
``GPTConfig`` (``pretrain.model.ARCH_FIELDS``: sizes, bias, activation, LayerNorm epsilon, tying
and the research options ``rotary``, ``qk_norm``, ``rotary_base``) -> one line naming each field
that differs with both values and the overrides that match (nothing is taken from the source
silently: the resolved config printed at start and saved with every checkpoint is what runs).
Three differences are deliberate and allowed (``ADAPTED``):

- ``padded_vocab_size``: rows are added (zeros: padded logits are masked to -inf, so they never
  get probability) or dropped (only padding rows, since ``vocab_size`` must match);
- ``block_size`` smaller than the source's: the first ``block_size`` position embeddings are
  kept (nanoGPT's ``crop_block_size``); a larger one is refused (no weights for the new positions);
- ``dropout``: a training setting; the config's applies.

Order in the trainer: seeded init, then ``init_from`` into the plain model on every rank, then
``parallel.wrap_model`` (compile, DDP replicates / FSDP2 shards what was loaded). ``load_into``
also loads into a model already sharded by FSDP2 (each rank keeps its shard of the full tensors),
so both orders give the same weights. A run that resumes a checkpoint never calls this: the
checkpoint wins (the plan says so, and the trainer logs it).
"""

from __future__ import annotations

import torch

from pretrain.config import ConfigError
from pretrain.model import ARCH_FIELDS, VOCAB_ROW_PARAMS, GPTConfig
from pretrain.model.weights import KINDS, WeightsError, WeightsSource, read

# The architecture fields a source may differ in (see the module docstring); all others must match.
ADAPTED = ("padded_vocab_size", "block_size", "dropout")
MATCHED_FIELDS = tuple(f for f in ARCH_FIELDS if f not in ADAPTED)


class InitFromError(ConfigError):
    """``model.init_from`` cannot be used; one line naming the source and the fix (exit 2)."""


def mismatches(config: GPTConfig, source: GPTConfig) -> list[str]:
    """The fields of ``config`` that cannot take ``source``'s weights, each as
    ``model.FIELD=config's (the source has X)``."""
    out = [f"model.{f}={getattr(config, f)!r} (the source has {getattr(source, f)!r})"
           for f in MATCHED_FIELDS if getattr(config, f) != getattr(source, f)]
    if config.block_size > source.block_size:
        out.append(f"model.block_size={config.block_size} (the source has {source.block_size}; "
                   "a smaller block_size crops positions, a larger one has no weights)")
    return out


def check_architecture(spec: str, config: GPTConfig, source: GPTConfig) -> None:
    """Refuse, in one line naming each field and the overrides that match, a source whose
    architecture ``config`` cannot take (:func:`mismatches`)."""
    bad = mismatches(config, source)
    if bad:
        fields = [f for f in MATCHED_FIELDS if getattr(config, f) != getattr(source, f)]
        fields += ["block_size"] if config.block_size > source.block_size else []
        fix = " ".join(f"model.{f}={getattr(source, f)}" for f in fields)
        raise InitFromError(
            f"model.init_from={spec!r}: the configured architecture does not match the source: "
            f"{'; '.join(bad)}; set {fix} (or choose another source)"
        )


def adapt_state_dict(sd: dict[str, torch.Tensor], source: GPTConfig, config: GPTConfig) -> dict[str, torch.Tensor]:
    """``sd`` (of ``source``) reshaped for ``config``: vocabulary rows padded with zeros or
    padding rows dropped, position embeddings cropped. Requires ``mismatches() == []``."""
    out = dict(sd)
    for name in VOCAB_ROW_PARAMS:
        if name not in out:
            continue
        t = out[name][: config.vocab_rows]  # (vocab_rows, C): only padding rows can go (vocab_size matches)
        if t.size(0) < config.vocab_rows:
            t = torch.cat([t, t.new_zeros(config.vocab_rows - t.size(0), t.size(1))])
        out[name] = t
    if "transformer.wpe.weight" in out:  # learned positions (a rotary model has none)
        out["transformer.wpe.weight"] = out["transformer.wpe.weight"][: config.block_size]  # (block_size, C)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.no_grad()
def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy full tensors ``sd`` into ``model``: a plain ``GPT`` (copied in place, ties kept), or one
    already sharded by FSDP2 (every rank passes the same full tensors and keeps its shard)."""
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))
        return
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=True)


def init_from(model: torch.nn.Module, source: WeightsSource, config: GPTConfig) -> str:
    """Load the weights of ``source`` (as the run plan resolved it) into ``model`` (configured as
    ``config``); returns the log line. The architecture is checked here only when the plan could
    not (``source.config`` is None: a hub model, known once downloaded)."""
    spec = source.spec
    try:
        src_config, sd = read(source)
    except WeightsError as e:
        raise InitFromError(f"model.init_from={spec!r}: {' '.join(str(e).split())}") from None
    if source.config is None:
        check_architecture(spec, config, src_config)
    load_into(model, adapt_state_dict({k: v.float() for k, v in sd.items()}, src_config, config))
    notes = []
    if src_config.vocab_rows != config.vocab_rows:
        verb = "added" if config.vocab_rows > src_config.vocab_rows else "dropped"
        notes.append(f"vocabulary rows {src_config.vocab_rows} -> {config.vocab_rows} ({verb} padding)")
    if src_config.block_size != config.block_size:
        notes.append(f"positions cropped {src_config.block_size} -> {config.block_size}")
    extra = f"; {', '.join(notes)}" if notes else ""
    n_params = sum(t.numel() for k, t in sd.items() if not (src_config.tie_embeddings and k == "lm_head.weight"))
    line = (f"model.init_from: weights of {spec} ({KINDS[source.kind]}, {n_params:,} parameters){extra}; "
            f"fresh optimizer, step 0")
    return line if source.note is None else f"{line}\n{source.note}"
