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

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline import integrity
from pretrain.model.gpt import GPT, GPTConfig
from pretrain.model.hf import EXPORT_MARKER, HFConversionError, config_from_hf, state_dict_from_hf


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


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise WeightsError(f"{path} does not exist; pass a Hugging Face GPT-2 directory with config.json") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); re-download or re-export the model") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _is_hf_config(path: Path) -> bool:
    try:
        data = _read_json(path)
    except WeightsError:
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
        return WeightsSource(spec, "hf", p, recorded=_has_record(p))
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
        return WeightsSource(spec, "hf", p, recorded=_has_record(p))  # weights without config.json: the HF reader says what is missing
    raise WeightsError(
        f"{p} is neither a Hugging Face directory (config.json + model.safetensors) nor a checkpoint "
        "(manifest.json) nor a directory of step_XXXXXXXX checkpoints; pass one of those"
    )


# ---------------------------------------------------------------------------------------------
# Reading


def read(source: WeightsSource | str | os.PathLike,
         padded_vocab_size: int | None = None) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of ``source`` (a spec is resolved first), full tensors on CPU.
    ``padded_vocab_size`` pads a Hugging Face model's vocabulary rows (native checkpoints keep
    their own)."""
    if not isinstance(source, WeightsSource):
        source = resolve(source)
    try:
        if source.kind == "checkpoint":
            config, sd = _read_checkpoint(source.path)
        else:
            config, sd = _read_hf(source.path if source.kind == "hf" else _download(source.spec), padded_vocab_size)
    except HFConversionError as e:
        raise WeightsError(str(e)) from None
    if config.tie_embeddings:  # one tensor under both names, as GPT.state_dict() has it
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return config, sd


def inspect(source: WeightsSource) -> GPTConfig | None:
    """The architecture of ``source``, with its files verified (a native checkpoint against its
    manifest, an export against its record), without loading the weights: the run plan checks a
    ``model.init_from`` source with it before anything is built. None for a hub model (that needs
    the network; reading it does)."""
    try:
        if source.kind == "checkpoint":
            from pretrain.checkpoint import CheckpointError, verify_model_state

            try:
                _, config_dict = verify_model_state(source.path)
            except CheckpointError as e:
                raise WeightsError(str(e)) from e
            return _native_config(config_dict, str(source.path))
        if source.kind == "hf":
            config_path = source.path / "config.json"
            config = config_from_hf(_read_json(config_path), str(config_path))
            _verify_export(source.path)
            return config
    except HFConversionError as e:
        raise WeightsError(str(e)) from None
    return None


def load_model(spec: WeightsSource | str | os.PathLike, padded_vocab_size: int | None = None) -> GPT:
    """A ``GPT`` of ``spec``'s weights (:func:`read`), on CPU, in eval mode (like
    ``from_pretrained``: GPT-2's config has dropout 0.1, off in eval mode)."""
    config, state = read(spec, padded_vocab_size)
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
# Hugging Face directories


def provenance(source: WeightsSource) -> dict:
    """What a run records about the weights it started from (``model.init_from``): the spec, its
    kind, the directory read, and for an export of ours the sha256 its record holds of the weights
    file (a model card states them: pretrain/card.py)."""
    out = {"spec": source.spec, "kind": source.kind, "path": str(source.path) if source.path is not None else None}
    if source.kind == "hf" and source.path is not None and (source.path / EXPORT_MARKER).is_file():
        try:
            files = _read_json(source.path / EXPORT_MARKER).get("files") or {}
            out["sha256"] = {n: r["sha256"] for n, r in files.items() if n.endswith((".safetensors", ".bin"))}
        except (WeightsError, AttributeError, KeyError, TypeError):
            pass
    return out


def _has_record(directory: Path) -> bool:
    try:
        return bool((directory / EXPORT_MARKER).is_file() and _read_json(directory / EXPORT_MARKER).get("files"))
    except WeightsError:
        return True  # a broken record: reading it says so


WEIGHT_FILES = ("config.json", "model.safetensors")  # what a load reads: the rest of an export is card and tokenizer
_NOTED: set[str] = set()  # exports whose edited extra files were noted already (a load reads the record twice)


def _verify_export(directory: Path) -> None:
    """An export of ours holds what its ``gpt2_export.json`` records (sha256 and size of every
    file written); a directory without the record is not ours, or predates it: nothing to check
    against (``WeightsSource.note`` says so)."""
    marker = directory / EXPORT_MARKER
    info = _read_json(marker) if marker.is_file() else {}
    if info.get("complete") is False:
        raise WeightsError(f"{directory} is an unfinished export ({marker} says complete: false; gpt2-export was "
                           f"interrupted); export it again (gpt2-export export --checkpoint CHECKPOINT --out {directory})")
    record = info.get("files")
    if not isinstance(record, dict) or not record:
        return
    try:
        expected = [integrity.Expected(directory / name, str(r["sha256"]), int(r["size"])) for name, r in record.items()]
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{marker}: unreadable file record ({e}); export the model again") from None
    uncovered = [n for n in WEIGHT_FILES if n not in record]
    if uncovered:
        raise WeightsError(f"{marker}: records {len(record)} files but not {uncovered[0]}, so the weights cannot be "
                           "verified; export the model again (gpt2-export export ... --overwrite)")
    bad = integrity.verify_files(expected)
    weights = [b for b in bad if b.path.name in WEIGHT_FILES]
    if weights:
        others = f"; {len(bad) - len(weights)} other file(s) changed too" if len(bad) > len(weights) else ""
        raise WeightsError(
            f"{weights[0].path}: content does not match its {EXPORT_MARKER} record ({weights[0].describe(digits=12)})"
            f"{others}; the weights changed since the export: export it again (gpt2-export export ... --overwrite)"
        )
    if bad and str(directory) not in _NOTED:  # a card edited by hand: say so, and load
        _NOTED.add(str(directory))
        names = ", ".join(b.path.name for b in bad[:3]) + (", ..." if len(bad) > 3 else "")
        print(f"note: {directory}: {names} changed since the export ({bad[0].describe(digits=12)}); "
              f"{', '.join(WEIGHT_FILES)} match their {EXPORT_MARKER} record, so the weights are intact", file=sys.stderr)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(
            f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
            "(corrupt or truncated file?); re-download or re-export it"
        ) from e


def read_hf_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a HF checkpoint directory (model.safetensors, a sharded
    model.safetensors.index.json, or pytorch_model.bin) and the file they came from."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    legacy = directory / "pytorch_model.bin"
    if single.is_file():
        return _load_safetensors(single), str(single)
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index} has no 'weight_map'; re-download the model")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_load_safetensors(directory / shard))
        return tensors, str(index)
    if legacy.is_file():
        try:
            sd = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors have many types; all mean the same thing here
            raise WeightsError(
                f"cannot read {legacy}: {type(e).__name__} (corrupt file, or not a plain state dict); "
                "re-download it or convert it to model.safetensors"
            ) from e
        if not isinstance(sd, dict):
            raise WeightsError(f"{legacy} holds a {type(sd).__name__}, not a state dict")
        return sd, str(legacy)
    raise WeightsError(
        f"{directory} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
        "pass a directory written by save_pretrained() or gpt2-export"
    )


def _read_hf(directory: Path, padded_vocab_size: int | None) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    if not directory.is_dir():
        raise WeightsError(f"{directory} is not a directory; pass the directory holding config.json")
    config_path = directory / "config.json"
    config = config_from_hf(_read_json(config_path), str(config_path), padded_vocab_size)
    _verify_export(directory)
    hf_sd, source = read_hf_weights(directory)
    return config, state_dict_from_hf(hf_sd, config, source)


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
