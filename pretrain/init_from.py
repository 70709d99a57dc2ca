"""Start a run from existing weights: ``model.init_from`` (nanoGPT's ``init_from='gpt2'``).

::

    model.init_from: gpt2                    # a hub name: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | owner/name
    model.init_from: demo/latest/export      # a local Hugging Face GPT-2 directory (save_pretrained / export_hf)
    model.init_from: runs/a/checkpoints      # a run's checkpoints/ (its newest complete one) or one step_XXXXXXXX

Weights only: the optimizer starts empty, the step at 0, the schedule is this run's. The source
is read by ``pretrain.hf.load_model`` (HF directory, hub name or native checkpoint, with or
without FSDP) into a full model on CPU, then copied into the configured one.

The architecture is the config's, and it must match the source's: ``vocab_size, n_layer,
n_head, n_embd, bias, activation, layer_norm_epsilon, tie_embeddings`` differ -> one line naming
each field with both values and the overrides that match (nothing is taken from the source
silently: the resolved config printed at start and saved with every checkpoint is what runs).
Three differences are deliberate and allowed:

- ``padded_vocab_size``: rows are added (zeros: padded logits are masked to -inf, so they never
  get probability) or dropped (only padding rows, since ``vocab_size`` must match);
- ``block_size`` smaller than the source's: the first ``block_size`` position embeddings are
  kept (nanoGPT's ``crop_block_size``); a larger one is refused (no weights for the new positions);
- ``dropout``: a training setting; the config's applies.

Order in the trainer: seeded init, then ``init_from`` into the plain model on every rank, then
``parallel.wrap_model`` (compile, DDP replicates / FSDP2 shards what was loaded). ``load_into``
also loads into a model already sharded by FSDP2 (each rank keeps its shard of the full tensors),
so both orders give the same weights. A run that resumes a checkpoint never calls this: the
checkpoint wins (``Trainer.build`` logs that ``init_from`` was ignored).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.config import ConfigError
from pretrain.model import GPT, GPTConfig

# Fields whose values change what the weights mean or their shapes; they must match the source.
MATCHED_FIELDS = ("vocab_size", "n_layer", "n_head", "n_embd", "bias", "activation", "layer_norm_epsilon",
                  "tie_embeddings")
_VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")


class InitFromError(ConfigError):
    """``model.init_from`` cannot be used; one line naming the source and the fix (exit 2)."""


def read_source(spec: str) -> tuple[GPT, str]:
    """The source model (full, CPU, float32) and a one-word kind for the log."""
    from pretrain.hf import HFConversionError, load_model

    p = Path(spec).expanduser()
    if not p.exists():
        kind = "hub"
    elif (p / "manifest.json").is_file() or not (p / "config.json").is_file():
        kind = "checkpoint"
    else:
        kind = "Hugging Face directory"
    try:
        model = load_model(spec)
    except HFConversionError as e:
        raise InitFromError(f"model.init_from={spec!r}: {' '.join(str(e).split())}") from None
    return model.float(), kind


def mismatches(config: GPTConfig, source: GPTConfig) -> list[str]:
    """The architecture fields of ``config`` that cannot take ``source``'s weights, as
    ``model.FIELD=config's (source has X)``."""
    out = [f"model.{f}={getattr(config, f)!r} (the source has {getattr(source, f)!r})"
           for f in MATCHED_FIELDS if getattr(config, f) != getattr(source, f)]
    if config.block_size > source.block_size:
        out.append(f"model.block_size={config.block_size} (the source has {source.block_size}; "
                   "a smaller block_size crops positions, a larger one has no weights)")
    return out


def adapt_state_dict(sd: dict[str, torch.Tensor], source: GPTConfig, config: GPTConfig) -> dict[str, torch.Tensor]:
    """``sd`` (of ``source``) reshaped for ``config``: vocabulary rows padded with zeros or
    padding rows dropped, position embeddings cropped. Requires ``mismatches() == []``."""
    out = dict(sd)
    for name in _VOCAB_ROWS:
        if name not in out:
            continue
        t = out[name][: config.vocab_rows]  # (vocab_rows, C): only padding rows can go (vocab_size matches)
        if t.size(0) < config.vocab_rows:
            t = torch.cat([t, t.new_zeros(config.vocab_rows - t.size(0), t.size(1))])
        out[name] = t
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


def init_from(model: torch.nn.Module, spec: str, config: GPTConfig) -> str:
    """Load the weights of ``spec`` into ``model`` (configured as ``config``); returns the log line."""
    source, kind = read_source(spec)
    bad = mismatches(config, source.config)
    if bad:
        fields = [f for f in MATCHED_FIELDS if getattr(config, f) != getattr(source.config, f)]
        fields += ["block_size"] if config.block_size > source.config.block_size else []
        fix = " ".join(f"model.{f}={getattr(source.config, f)}" for f in fields)
        raise InitFromError(
            f"model.init_from={spec!r}: the configured architecture does not match the source: "
            f"{'; '.join(bad)}; set {fix} (or choose another source)"
        )
    sd = adapt_state_dict(source.state_dict(), source.config, config)
    load_into(model, sd)
    notes = []
    if source.config.vocab_rows != config.vocab_rows:
        verb = "added" if config.vocab_rows > source.config.vocab_rows else "dropped"
        notes.append(f"vocabulary rows {source.config.vocab_rows} -> {config.vocab_rows} ({verb} padding)")
    if source.config.block_size != config.block_size:
        notes.append(f"positions cropped {source.config.block_size} -> {config.block_size}")
    extra = f"; {', '.join(notes)}" if notes else ""
    return (f"model.init_from: weights of {spec} ({kind}, {source.num_params():,} parameters){extra}; "
            f"fresh optimizer, step 0")
