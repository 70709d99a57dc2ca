"""Weights from anywhere: the one answer to "which weights does this spec name, and what are they".

::

    spec                                       kind
    gpt2 | gpt2-medium | owner/name            hub          the Hugging Face hub (needs the network)
    DIR holding a GPT-2 config.json            hf           save_pretrained() / gpt2-export output
    DIR/step_XXXXXXXX (manifest.json)          checkpoint   a native checkpoint of the trainer
    DIR holding step_XXXXXXXX directories      checkpoint   a run's checkpoints/: its newest complete one

    source = resolve(spec)            # the kind, guessed once, and the path; no weights read yet
    config, state = read(source)      # (GPTConfig, state dict with our parameter names, CPU)
    model = load_model(spec)          # a GPT in eval mode (export, eval, generate)

Every consumer goes through here: ``model.init_from`` (``pretrain/training/init_from.py``),
``gpt2-eval``, ``gpt2-generate`` and ``gpt2-export``. The Hugging Face side is converted by the
table in ``hf.py``; native checkpoints are read by ``pretrain.checkpoint.load_model_state`` (their
files verified against the checkpoint's manifest); an export written by ``gpt2-export`` is verified
against the sha256 record in its ``gpt2_export.json`` (a directory without that record, a
foreign one, still loads, with one note that its contents are not verified).

The returned state dict holds every parameter name of ``GPT(config).state_dict()``; a tied head
(``config.tie_embeddings``) is the same tensor as the token embedding.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.model.gpt import GPT, GPTConfig
from pretrain.model.hf import (
    EXPORT_MARKER,
    HFConversionError,
    has_export_record,
    inspect_hf_dir,
    read_hf_dir,
    read_json_object,
)


class WeightsError(ValueError):
    """Weights that cannot be read; the message is one line naming the path and the fix."""


KINDS = {"hub": "Hugging Face hub model", "hf": "Hugging Face directory", "checkpoint": "checkpoint"}


@dataclass(frozen=True)
class WeightsSource:
    """Where weights come from, resolved once (:func:`resolve`): ``kind`` is hub | hf | checkpoint;
    ``path`` the directory to read (for a run's checkpoints/ folder, its newest checkpoint; None for
    a hub name, downloaded when read)."""

    spec: str
    kind: str
    path: Path | None
    recorded: bool = True
    """False for a Hugging Face directory without gpt2-export's record of its files (a foreign
    one, or an export older than the record): it loads, unverified (:attr:`note`)."""
    config: GPTConfig | None = None
    """The architecture, once :func:`inspect` has read it (and the run plan checked it); None
    before, and for a hub model until it is downloaded."""

    @property
    def note(self) -> str | None:
        """One line for the log when the contents cannot be verified, else None."""
        if self.recorded:
            return None
        return (f"note: {self.path} has no {EXPORT_MARKER} record of its files (not written by this version of "
                "gpt2-export): its contents are not verified")


# ---------------------------------------------------------------------------------------------
# Resolving a spec


def _looks_like_hub_name(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith((".", "/", "~"))


def _is_hf_config(path: Path) -> bool:
    try:
        data = read_json_object(path)
    except HFConversionError:
        return True  # let the HF reader report the broken config.json
    return "model_type" in data or "n_embd" in data


def resolve(spec: str | os.PathLike) -> WeightsSource:
    """The kind and path of ``spec`` (see the module docstring), without reading any weights.
    Raises :class:`WeightsError` for a path that exists but holds none of the three kinds."""
    spec = str(spec)
    p = Path(spec).expanduser()
    if not p.exists():
        if not _looks_like_hub_name(spec):
            raise WeightsError(f"{p} does not exist; pass a Hugging Face GPT-2 directory, hub name or checkpoint")
        return WeightsSource(spec, "hub", None)
    if (p / "config.json").is_file() and _is_hf_config(p / "config.json"):
        return WeightsSource(spec, "hf", p, recorded=has_export_record(p))
    if not p.is_dir():
        raise WeightsError(f"{p} is not a directory; pass a HF model directory or a checkpoint directory")
    if (p / "manifest.json").is_file() or (p / "trainer_state.pt").is_file():
        return WeightsSource(spec, "checkpoint", p)  # (an incomplete one: reading it says so)
    from pretrain.checkpoint import Checkpointer

    for folder in (p, p / "checkpoints"):  # a run's checkpoints/ folder, or the run directory itself
        latest = Checkpointer(folder, keep_last=1).latest()
        if latest is not None:
            return WeightsSource(spec, "checkpoint", latest)
    if any(p.glob("model*.safetensors*")) or (p / "pytorch_model.bin").is_file():
        return WeightsSource(spec, "hf", p, recorded=has_export_record(p))  # weights without config.json: the HF reader says what is missing
    raise WeightsError(
        f"{p} is neither a Hugging Face directory (config.json + model.safetensors) nor a checkpoint "
        "(manifest.json) nor a directory of step_XXXXXXXX checkpoints; pass one of those"
    )


# ---------------------------------------------------------------------------------------------
# Reading


def read(source: WeightsSource, padded_vocab_size: int | None = None) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of ``source`` (:func:`resolve` made it), full tensors on CPU.
    ``padded_vocab_size`` pads a Hugging Face model's vocabulary rows (native checkpoints keep
    their own)."""
    if source.kind == "checkpoint":
        config, sd = _read_checkpoint(source.path)
    else:
        directory = source.path if source.kind == "hf" else _download(source.spec)
        try:
            config, sd = read_hf_dir(directory, padded_vocab_size)
        except HFConversionError as e:
            raise WeightsError(str(e)) from None
    if config.tie_embeddings:  # one tensor under both names, as GPT.state_dict() has it
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return config, sd


def inspect(source: WeightsSource) -> GPTConfig | None:
    """The architecture of ``source``, with its files verified (a native checkpoint against its
    manifest, an export against its record), without loading the weights: the run plan checks a
    ``model.init_from`` source with it before anything is built (and keeps it in
    ``WeightsSource.config``). None for a hub model (that needs the network; reading it does)."""
    try:
        if source.kind == "checkpoint":
            from pretrain.checkpoint import CheckpointError, verify_model_state

            try:
                _, config_dict = verify_model_state(source.path)
            except CheckpointError as e:
                raise WeightsError(str(e)) from e
            return _native_config(config_dict, str(source.path))
        if source.kind == "hf":
            return inspect_hf_dir(source.path)
    except HFConversionError as e:
        raise WeightsError(str(e)) from None
    return None


def load_model(spec: WeightsSource | str | os.PathLike, padded_vocab_size: int | None = None) -> GPT:
    """A ``GPT`` of ``spec``'s weights (:func:`read`), on CPU, in eval mode (like
    ``from_pretrained``: GPT-2's config has dropout 0.1, off in eval mode)."""
    config, state = read(spec if isinstance(spec, WeightsSource) else resolve(spec), padded_vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # to_empty keeps one Parameter; be explicit
    model.load_state_dict(state)  # strict: read() returns every name
    model.init_buffers()
    return model.eval()


def load_hf(path_or_name: str | os.PathLike, padded_vocab_size: int | None = None) -> GPT:
    """A ``GPT`` from a Hugging Face GPT-2 (a local directory or a hub name), in eval mode."""
    source = resolve(path_or_name)
    if source.kind == "checkpoint":
        raise WeightsError(f"{source.path} is a native checkpoint, not a Hugging Face directory; use load_model")
    return load_model(source, padded_vocab_size)


def _read_checkpoint(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    from pretrain.checkpoint import CheckpointError, load_model_state

    try:
        state, config_dict = load_model_state(path)
    except CheckpointError as e:
        raise WeightsError(str(e)) from e
    return state_from_native(state, config_dict, str(path))


def _native_config(config_dict: dict, source: str) -> GPTConfig:
    """The architecture recorded with a native checkpoint (its run config's ``model`` section)."""
    model_cfg = config_dict.get("model") if isinstance(config_dict, dict) else None
    if not isinstance(model_cfg, dict):
        raise WeightsError(f"{source}: the checkpoint's config has no 'model' section")
    try:
        return GPTConfig.from_dict(model_cfg)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{source}: bad model config in the checkpoint: {e}") from e


def state_from_native(state_dict: dict, config_dict: dict, source: str) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, state dict) from a native state dict and its run's config dict, whose ``model``
    section is either GPTConfig fields or the trainer's (``preset`` plus overrides)."""
    config = _native_config(config_dict, source)
    # torch.compile / DDP wrappers add prefixes; the names under them are the model's own.
    sd = {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in state_dict.items()}
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    tied = {"lm_head.weight"} if config.tie_embeddings else set()  # read() ties it
    missing = sorted(set(expected) - set(sd) - tied)
    unexpected = sorted(set(sd) - set(expected))
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{source}: checkpoint does not match its model config "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shapes {wrong[:4]})"
        )
    return config, sd


# ---------------------------------------------------------------------------------------------
# Provenance


def provenance(source: WeightsSource) -> dict:
    """What a run records about the weights it started from (``model.init_from``): the spec, its
    kind, the directory read, and for an export of ours the sha256 its record holds of the weights
    file (a model card states them: pretrain/card.py)."""
    out = {"spec": source.spec, "kind": source.kind, "path": str(source.path) if source.path is not None else None}
    if source.kind == "hf" and source.path is not None and (source.path / EXPORT_MARKER).is_file():
        try:
            files = read_json_object(source.path / EXPORT_MARKER).get("files") or {}
            out["sha256"] = {n: r["sha256"] for n, r in files.items() if n.endswith((".safetensors", ".bin"))}
        except (HFConversionError, AttributeError, KeyError, TypeError):
            pass
    return out


# ---------------------------------------------------------------------------------------------
# The hub


def _download(name: str) -> Path:
    """Download config + weights of hub model ``name``; one clear line when that fails."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name, allow_patterns=["config.json", "model.safetensors"]))
        if not (path / "model.safetensors").is_file():
            path = Path(snapshot_download(name, allow_patterns=["config.json", "pytorch_model.bin"]))
        return path
    except Exception as e:  # offline, unknown repo, auth, HTTP: all end the same way for the user
        raise WeightsError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}; offline?) and there is "
            f"no local directory of that name; pass a local directory containing config.json and model.safetensors"
        ) from e
