"""Hugging Face GPT-2 <-> native weights: one table, a loader and an exporter.

Our parameter names already follow ``GPT2LMHeadModel``, so the map below is mostly the
identity. What differs is layout: HF's ``Conv1D`` stores its weight as (in, out) where
``nn.Linear`` stores (out, in), so four weights per block are transposed on the way in and
out. Everything else (embeddings, LayerNorms, biases) is copied as is.

    load_hf("gpt2")                  # hub name (needs the network) or a local HF directory
    load_model("runs/x/checkpoints/step_00001000")   # HF directory or native checkpoint
    export_hf(model, "out/gpt2-hf")  # a directory `transformers` loads offline

CLI: ``python -m pretrain.hf export --checkpoint PATH --out DIR [--overwrite]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.model import GPT, GPTConfig

EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257


class HFConversionError(ValueError):
    """Bad input to the converter: the message is one line naming the file/key and the fix."""


@dataclass(frozen=True)
class WeightRule:
    hf: str  # name in GPT2LMHeadModel; "{i}" = block index
    ours: str  # name in pretrain.model.GPT
    transposed: bool = False  # HF Conv1D stores (in, out); nn.Linear stores (out, in)


# The whole conversion, as data. Per block ({i}) and global entries; biases of LayerNorms and
# Linears are listed explicitly so a missing one is an error, not a silent zero.
WEIGHT_MAP: tuple[WeightRule, ...] = (
    WeightRule("transformer.wte.weight", "transformer.wte.weight"),
    WeightRule("transformer.wpe.weight", "transformer.wpe.weight"),
    WeightRule("transformer.h.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight"),
    WeightRule("transformer.h.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias"),
    WeightRule("transformer.h.{i}.attn.c_attn.weight", "transformer.h.{i}.attn.c_attn.weight", True),
    WeightRule("transformer.h.{i}.attn.c_attn.bias", "transformer.h.{i}.attn.c_attn.bias"),
    WeightRule("transformer.h.{i}.attn.c_proj.weight", "transformer.h.{i}.attn.c_proj.weight", True),
    WeightRule("transformer.h.{i}.attn.c_proj.bias", "transformer.h.{i}.attn.c_proj.bias"),
    WeightRule("transformer.h.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight"),
    WeightRule("transformer.h.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias"),
    WeightRule("transformer.h.{i}.mlp.c_fc.weight", "transformer.h.{i}.mlp.c_fc.weight", True),
    WeightRule("transformer.h.{i}.mlp.c_fc.bias", "transformer.h.{i}.mlp.c_fc.bias"),
    WeightRule("transformer.h.{i}.mlp.c_proj.weight", "transformer.h.{i}.mlp.c_proj.weight", True),
    WeightRule("transformer.h.{i}.mlp.c_proj.bias", "transformer.h.{i}.mlp.c_proj.bias"),
    WeightRule("transformer.ln_f.weight", "transformer.ln_f.weight"),
    WeightRule("transformer.ln_f.bias", "transformer.ln_f.bias"),
    WeightRule("lm_head.weight", "lm_head.weight"),  # absent from files when tied to wte
)

# Non-parameters that older transformers versions saved (the causal-mask buffers).
_HF_IGNORED = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
_VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")  # padded rows live here

# Written first by every export: a directory holding it is one gpt2-export wrote before, whose
# files a new export may replace. File names alone cannot tell (a user's own config.json).
EXPORT_MARKER = "gpt2_export.json"
# The files of an export (the marker included).
EXPORT_FILES = (
    EXPORT_MARKER,
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

_ACTIVATIONS_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "relu": "relu"}


def expand_map(n_layer: int) -> list[tuple[str, str, bool]]:
    """(hf_name, our_name, transposed) for every parameter of an ``n_layer`` model."""
    out = []
    for rule in WEIGHT_MAP:
        layers = range(n_layer) if "{i}" in rule.hf else [None]
        for i in layers:
            out.append((rule.hf.format(i=i), rule.ours.format(i=i), rule.transposed))
    return out


# ---------------------------------------------------------------------------------------------
# config.json <-> GPTConfig


def config_from_hf(hf: dict, source: str = "config.json", padded_vocab_size: int | None = None) -> GPTConfig:
    """GPTConfig from a GPT-2 ``config.json`` dict; rejects settings our model does not implement."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise HFConversionError(f"{source}: model_type is {hf.get('model_type')!r}; only 'gpt2' models convert")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS_FROM_HF:
        raise HFConversionError(
            f"{source}: activation_function {act!r} is not supported; use one of {sorted(_ACTIVATIONS_FROM_HF)}"
        )
    n_embd = hf.get("n_embd", 768)
    unsupported = {
        "n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise HFConversionError(f"{source}: {key}={value!r} is not supported by pretrain.model (needs {allowed[0]!r})")
    try:
        return GPTConfig(
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            vocab_size=hf.get("vocab_size", GPT2_VOCAB_SIZE),
            padded_vocab_size=padded_vocab_size,
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_embd=n_embd,
            # One dropout rate for all three sites; GPT-2's files use 0.1 everywhere. Dropout
            # only acts in train mode, so it never changes eval logits.
            dropout=float(hf.get("resid_pdrop", 0.0)),
            bias=True,
            activation=_ACTIVATIONS_FROM_HF[act],
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    except (ValueError, TypeError) as e:
        raise HFConversionError(f"{source}: {e}") from e


def config_to_hf(config: GPTConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A ``config.json`` for ``GPT2LMHeadModel`` equivalent to ``config``."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": _ACTIVATIONS_TO_HF[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------------------------------------
# Reading HF directories


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise HFConversionError(f"{path} does not exist; pass a Hugging Face GPT-2 directory with config.json") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFConversionError(f"{path} is not valid JSON ({e}); re-download or re-export the model") from e
    if not isinstance(data, dict):
        raise HFConversionError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise HFConversionError(
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
            raise HFConversionError(f"{index} has no 'weight_map'; re-download the model")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_load_safetensors(directory / shard))
        return tensors, str(index)
    if legacy.is_file():
        try:
            sd = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors have many types; all mean the same thing here
            raise HFConversionError(
                f"cannot read {legacy}: {type(e).__name__} (corrupt file, or not a plain state dict); "
                "re-download it or convert it to model.safetensors"
            ) from e
        if not isinstance(sd, dict):
            raise HFConversionError(f"{legacy} holds a {type(sd).__name__}, not a state dict")
        return sd, str(legacy)
    raise HFConversionError(
        f"{directory} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
        "pass a directory written by save_pretrained() or export_hf()"
    )


def _hf_name(key: str) -> str:
    # The hub's original gpt2 files use GPT2Model's names ("h.0.attn...", "wte.weight").
    if key.startswith(("transformer.", "lm_head.")):
        return key
    return "transformer." + key


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """Our state dict from HF tensors: rename by the table, transpose Conv1D weights, pad the
    vocabulary rows to ``config.vocab_rows``; checks every name and shape."""
    hf_sd = {_hf_name(k): v for k, v in hf_sd.items() if not _HF_IGNORED.match(_hf_name(k))}
    expected = _expected_shapes(config)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for hf_name, ours, transposed in expand_map(config.n_layer):
        if ours == "lm_head.weight" and config.tie_embeddings:
            used.add(hf_name)  # a tied head may be stored too; it is wte by construction
            continue
        if hf_name not in hf_sd:
            raise HFConversionError(
                f"{source}: missing weight {hf_name!r}; the file does not hold a GPT-2 with n_layer={config.n_layer}"
            )
        t = hf_sd[hf_name]
        used.add(hf_name)
        t = t.t() if transposed and t.dim() == 2 else t
        want = list(expected[ours])
        if ours in _VOCAB_ROWS:
            want[0] = config.vocab_size  # files hold the real vocabulary; we pad below
        if list(t.shape) != want:
            shown = list(t.t().shape) if transposed and t.dim() == 2 else list(t.shape)
            want_shown = want[::-1] if transposed else want
            raise HFConversionError(
                f"{source}: weight {hf_name!r} has shape {shown} but config.json (n_layer={config.n_layer}, "
                f"n_embd={config.n_embd}, vocab_size={config.vocab_size}, n_positions={config.block_size}) "
                f"implies {want_shown}; the weights and config.json do not belong together"
            )
        if ours in _VOCAB_ROWS and config.vocab_rows > config.vocab_size:
            # Padded rows are never used (their logits are -inf); zeros keep them inert.
            t = torch.cat([t, t.new_zeros(config.vocab_rows - config.vocab_size, t.size(1))])
        out[ours] = t.contiguous()
    unexpected = sorted(set(hf_sd) - used)
    if unexpected:
        raise HFConversionError(
            f"{source}: unexpected weights {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}; "
            "not a GPT2LMHeadModel checkpoint matching its config.json"
        )
    return out


def _expected_shapes(config: GPTConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = GPT(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _resolve_hub(name: str) -> Path:
    """Download config + weights of hub model ``name``; one clear line when that fails."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name, allow_patterns=["config.json", "model.safetensors"]))
        if not (path / "model.safetensors").is_file():
            path = Path(snapshot_download(name, allow_patterns=["config.json", "pytorch_model.bin"]))
        return path
    except Exception as e:  # offline, unknown repo, auth, HTTP: all end the same way for the user
        raise HFConversionError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}; offline?) and there is "
            f"no local directory of that name; pass a local directory containing config.json and model.safetensors"
        ) from e


def _looks_like_hub_name(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith((".", "/", "~"))


def load_hf(path_or_name: str | os.PathLike, padded_vocab_size: int | None = None) -> GPT:
    """A ``GPT`` from a Hugging Face GPT-2: a local directory (config.json + model.safetensors
    or pytorch_model.bin) or a hub name ("gpt2", "openai-community/gpt2-medium", ...).
    Returned in eval mode, on CPU, in float32."""
    directory = Path(path_or_name).expanduser()
    if not directory.exists():
        if not _looks_like_hub_name(str(path_or_name)):
            raise HFConversionError(f"{directory} does not exist; pass a Hugging Face GPT-2 directory or hub name")
        directory = _resolve_hub(str(path_or_name))
    if not directory.is_dir():
        raise HFConversionError(f"{directory} is not a directory; pass the directory holding config.json")
    config_path = directory / "config.json"
    config = config_from_hf(_read_json(config_path), str(config_path), padded_vocab_size)
    hf_sd, source = read_hf_weights(directory)
    sd = state_dict_from_hf(hf_sd, config, source)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # to_empty keeps one Parameter; be explicit
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:  # pragma: no cover - state_dict_from_hf checked every name
        raise HFConversionError(f"{source}: missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}")
    model.init_buffers()
    return model.eval()  # like from_pretrained: GPT-2's config has dropout 0.1, off in eval mode


# ---------------------------------------------------------------------------------------------
# Native checkpoints


def load_model(path: str | os.PathLike, padded_vocab_size: int | None = None) -> GPT:
    """A ``GPT`` from any of: a Hugging Face directory (config.json with GPT-2 fields) or hub
    name; a native checkpoint ``step_XXXXXXXX`` directory written by the trainer; or a run's
    checkpoint directory holding those (its newest complete checkpoint is used). Native
    checkpoints are read through ``pretrain.checkpoint.load_model_state``. Returned in eval mode."""
    p = Path(path).expanduser()
    if not p.exists() or ((p / "config.json").is_file() and _is_hf_config(p / "config.json")):
        return load_hf(path, padded_vocab_size=padded_vocab_size)
    if not p.is_dir():
        raise HFConversionError(f"{p} is not a directory; pass a HF model directory or a checkpoint directory")
    try:
        from pretrain.checkpoint import Checkpointer, CheckpointError, load_model_state
    except ImportError as e:
        raise HFConversionError(
            f"{p} is not a Hugging Face directory (no GPT-2 config.json) and pretrain.checkpoint cannot be imported ({e})"
        ) from e
    try:
        if not (p / "manifest.json").is_file():
            latest = Checkpointer(p, keep_last=1).latest()  # a run's checkpoints/ directory?
            if latest is None:
                raise HFConversionError(
                    f"{p} is neither a Hugging Face directory (config.json + model.safetensors) nor a checkpoint "
                    "(manifest.json) nor a directory of step_XXXXXXXX checkpoints; pass one of those"
                )
            p = latest
        state_dict, config_dict = load_model_state(p)
    except CheckpointError as e:
        raise HFConversionError(str(e)) from e
    return model_from_state(state_dict, config_dict, str(p))


def _is_hf_config(path: Path) -> bool:
    try:
        data = _read_json(path)
    except HFConversionError:
        return True  # let load_hf report the broken config.json
    return "model_type" in data or "n_embd" in data


def model_from_state(state_dict: dict, config_dict: dict, source: str) -> GPT:
    """A ``GPT`` from a native state dict and the run's config. ``config_dict["model"]`` is
    either GPTConfig fields or the trainer's model section: ``preset`` plus overrides, where
    None means the preset's value (``pretrain.config.ModelSection``)."""
    model_cfg = config_dict.get("model") if isinstance(config_dict, dict) else None
    if not isinstance(model_cfg, dict):
        raise HFConversionError(f"{source}: the checkpoint's config has no 'model' section")
    try:
        if "preset" in model_cfg:
            # init_from: where the run's first weights came from, not an architecture field.
            overrides = {k: v for k, v in model_cfg.items() if k not in ("preset", "init_from") and v is not None}
            config = GPTConfig.from_preset(model_cfg["preset"], **overrides)
        else:
            config = GPTConfig(**model_cfg)
    except (TypeError, ValueError) as e:
        raise HFConversionError(f"{source}: bad model config in the checkpoint: {e}") from e
    # torch.compile / DDP wrappers add prefixes; the names under them are the model's own.
    sd = {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in state_dict.items()}
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    model = GPT(config)
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise HFConversionError(
            f"{source}: checkpoint does not match its model config "
            f"(missing {missing[:4]}, unexpected {result.unexpected_keys[:4]})"
        )
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Export


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """HF tensors for ``model``: padded vocabulary rows dropped, Conv1D weights transposed,
    zero biases written for a bias-free model (GPT-2 always has them), ``lm_head.weight``
    left out when tied (as ``save_pretrained`` does)."""
    config = model.config
    sd = model.state_dict()
    out = {}
    for hf_name, ours, transposed in expand_map(config.n_layer):
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue
        if ours in sd:
            t = sd[ours].detach()
        elif ours.endswith(".bias"):  # bias=False: the same function with a zero bias
            weight = sd[ours[: -len(".bias")] + ".weight"]
            t = weight.new_zeros(weight.shape[0])
        else:  # pragma: no cover - the map and the model disagree
            raise HFConversionError(f"model has no parameter {ours!r}")
        if ours in _VOCAB_ROWS:
            t = t[: config.vocab_size]
        if transposed:
            t = t.t()
        out[hf_name] = t.to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
    return out


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """An export goes only into a new or empty directory, one it wrote before (``EXPORT_MARKER``),
    or anywhere with ``overwrite`` (files of the export's names replaced, others kept)."""
    if out.exists() and not out.is_dir():
        raise HFConversionError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and not overwrite and not (out / EXPORT_MARKER).is_file():
        held = sorted(p.name for p in out.iterdir())
        if held:
            raise HFConversionError(
                f"{out} is not empty and not a previous export (holds {held[:3]}, no {EXPORT_MARKER}); "
                "choose an empty directory or pass overwrite=True (--overwrite)"
            )


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def export_hf(model: GPT, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 directory (config, safetensors weights,
    generation config, GPT-2 tokenizer files) that ``transformers`` loads offline with
    ``AutoModelForCausalLM`` / ``AutoTokenizer``. Returns the directory."""
    from safetensors.torch import save_file

    from data_pipeline.tokenizer import EOT_TOKEN, bpe_files

    config = model.config
    research = [f"model.{k}=true" for k in ("rotary", "qk_norm") if getattr(config, k)]
    research += ["model.activation=relu2"] if config.activation == "relu2" else []
    if research:
        raise HFConversionError(
            f"{research[0]} is a research option, not GPT-2: GPT2LMHeadModel cannot run it, so it is not "
            "exported; export a model trained without it"
        )
    if config.vocab_size != GPT2_VOCAB_SIZE:
        raise HFConversionError(
            f"model.vocab_size is {config.vocab_size}; a HF GPT-2 export needs the GPT-2 tokenizer's {GPT2_VOCAB_SIZE}"
        )
    out = Path(out_dir).expanduser()
    _check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / EXPORT_MARKER, {"written_by": "gpt2-export (pretrain.hf.export_hf)",
                                      "note": "marks a directory a new export may replace"})
    tensors = state_dict_to_hf(model)
    dtype = next(iter(tensors.values())).dtype
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    _write_json(out / "config.json", config_to_hf(config, dtype))
    _write_json(out / "generation_config.json", {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID})
    vocab_bpe, encoder_json = bpe_files()
    shutil.copyfile(encoder_json, out / "vocab.json")  # token -> id
    shutil.copyfile(vocab_bpe, out / "merges.txt")  # "#version: 0.2" then one merge per line
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": config.block_size,
            "add_prefix_space": False,
            "add_bos_token": False,
            **special,
        },
    )
    _write_json(out / "special_tokens_map.json", special)
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpt2-export",
        description="Convert between native checkpoints and Hugging Face GPT-2 directories.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser(
        "export",
        help="native checkpoint (or HF dir) -> HF directory",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    exp.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS, help="native checkpoint directory, HF directory or hub name")
    exp.add_argument("--out", required=True, default=argparse.SUPPRESS, help="output directory for the HF model")
    exp.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out that is not a previous export (files of the export's names are replaced, others kept)",
    )
    exp.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the written weights"
    )
    args = parser.parse_args(argv)
    try:
        _check_out_dir(Path(args.out).expanduser(), args.overwrite)  # before loading: paths first
        model = load_model(args.checkpoint)
        model.to(getattr(torch, args.dtype))
        out = export_hf(model, args.out, overwrite=args.overwrite)
    except HFConversionError as e:
        print(f"gpt2-export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an --out that cannot be created or written
        print(f"gpt2-export: error: {e.filename or args.out}: {e.strerror or e}; choose a writable --out",
              file=sys.stderr)
        return 2
    print(f"exported {model.num_params():,} parameters to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
