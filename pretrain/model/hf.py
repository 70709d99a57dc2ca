"""Hugging Face GPT-2 <-> native weights: the conversion as one table, and the exporter.

Our parameter names already follow ``GPT2LMHeadModel``, so the map below is mostly the
identity. What differs is layout: HF's ``Conv1D`` stores its weight as (in, out) where
``nn.Linear`` stores (out, in), so four weights per block are transposed on the way in and
out. Everything else (embeddings, LayerNorms, biases) is copied as is. The padded vocabulary
rows (``VOCAB_ROW_PARAMS``) are added on the way in and dropped on the way out.

    config, sd = read_hf_dir(directory)           # a HF directory's files -> GPTConfig, our state dict
    state_dict_from_hf(tensors, config, source)   # HF names and layout -> ours
    export_hf(model, "out/gpt2-hf")               # a directory `transformers` loads offline

Which directory a spec names (a hub name is downloaded) is ``pretrain/model/weights.py``; the
``gpt2-export`` command is ``pretrain/export.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline import integrity
from data_pipeline.integrity import sha256_file
from data_pipeline.tokenizer import EOT_ID, VOCAB_SIZE
from pretrain.model.gpt import GPT, VOCAB_ROW_PARAMS, GPTConfig


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
            vocab_size=hf.get("vocab_size", VOCAB_SIZE),
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


def _hf_name(key: str) -> str:
    # The hub's original gpt2 files use GPT2Model's names ("h.0.attn...", "wte.weight").
    if key.startswith(("transformer.", "lm_head.")):
        return key
    return "transformer." + key


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """Our state dict from HF tensors: rename by the table, transpose Conv1D weights, pad the
    vocabulary rows to ``config.vocab_rows``; checks every name and shape."""
    hf_sd = {_hf_name(k): v for k, v in hf_sd.items() if not _HF_IGNORED.match(_hf_name(k))}
    table = expand_map(config.n_layer)
    expected = _expected_shapes(config)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for hf_name, ours, transposed in table:
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
        if ours in VOCAB_ROW_PARAMS:
            want[0] = config.vocab_size  # files hold the real vocabulary; we pad below
        if list(t.shape) != want:
            shown = list(t.t().shape) if transposed and t.dim() == 2 else list(t.shape)
            want_shown = want[::-1] if transposed else want
            raise HFConversionError(
                f"{source}: weight {hf_name!r} has shape {shown} but config.json (n_layer={config.n_layer}, "
                f"n_embd={config.n_embd}, vocab_size={config.vocab_size}, n_positions={config.block_size}) "
                f"implies {want_shown}; the weights and config.json do not belong together"
            )
        if ours in VOCAB_ROW_PARAMS and config.vocab_rows > config.vocab_size:
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


# ---------------------------------------------------------------------------------------------
# Reading a HF directory (its files; which directory a spec names is weights.py's)


def read_json_object(path: Path) -> dict:
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


def has_export_record(directory: Path) -> bool:
    try:
        return bool((directory / EXPORT_MARKER).is_file() and read_json_object(directory / EXPORT_MARKER).get("files"))
    except HFConversionError:
        return True  # a broken record: reading it says so


WEIGHT_FILES = ("config.json", "model.safetensors")  # what a load reads: the rest of an export is card and tokenizer
_NOTED: set[str] = set()  # exports whose edited extra files were noted already (a load reads the record twice)


def verify_export(directory: Path) -> None:
    """An export of ours holds what its ``gpt2_export.json`` records (sha256 and size of every
    file written); a directory without the record is not ours, or predates it: nothing to check
    against (``WeightsSource.note`` says so)."""
    marker = directory / EXPORT_MARKER
    info = read_json_object(marker) if marker.is_file() else {}
    if info.get("complete") is False:
        raise HFConversionError(f"{directory} is an unfinished export ({marker} says complete: false; gpt2-export was "
                           f"interrupted); export it again (gpt2-export export --checkpoint CHECKPOINT --out {directory})")
    record = info.get("files")
    if not isinstance(record, dict) or not record:
        return
    try:
        expected = [integrity.Expected(directory / name, str(r["sha256"]), int(r["size"])) for name, r in record.items()]
    except (KeyError, TypeError, ValueError) as e:
        raise HFConversionError(f"{marker}: unreadable file record ({e}); export the model again") from None
    uncovered = [n for n in WEIGHT_FILES if n not in record]
    if uncovered:
        raise HFConversionError(f"{marker}: records {len(record)} files but not {uncovered[0]}, so the weights cannot "
                                "be verified; export the model again (gpt2-export export ... --overwrite)")
    bad = integrity.verify_files(expected)
    weights = [b for b in bad if b.path.name in WEIGHT_FILES]
    if weights:
        others = f"; {len(bad) - len(weights)} other file(s) changed too" if len(bad) > len(weights) else ""
        raise HFConversionError(
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
        weight_map = read_json_object(index).get("weight_map")
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
        "pass a directory written by save_pretrained() or gpt2-export"
    )


def inspect_hf_dir(directory: Path, padded_vocab_size: int | None = None) -> GPTConfig:
    """The architecture of a HF directory (its config.json), its files verified against an
    export's record (:func:`verify_export`); no weights are loaded."""
    config_path = directory / "config.json"
    config = config_from_hf(read_json_object(config_path), str(config_path), padded_vocab_size)
    verify_export(directory)
    return config


def read_hf_dir(directory: Path, padded_vocab_size: int | None = None) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) of a HF GPT-2 directory (save_pretrained / gpt2-export / a hub
    download), its files verified first."""
    if not directory.is_dir():
        raise HFConversionError(f"{directory} is not a directory; pass the directory holding config.json")
    config = inspect_hf_dir(directory, padded_vocab_size)
    hf_sd, source = read_hf_weights(directory)
    return config, state_dict_from_hf(hf_sd, config, source)


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
        if ours in VOCAB_ROW_PARAMS:
            t = t[: config.vocab_size]
        if transposed:
            t = t.t()
        out[hf_name] = t.to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
    return out


def check_out_dir(out: Path, overwrite: bool) -> None:
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
    if out.is_dir() and not overwrite and (out / EXPORT_MARKER).is_file():
        changed = _changed_since_export(out)
        if changed:
            raise HFConversionError(f"{out / changed}: changed since gpt2-export wrote it (it no longer matches "
                                    f"{EXPORT_MARKER}); pass --overwrite to replace it, or choose another --out")


def _changed_since_export(out: Path) -> str | None:
    """The first weights file of the earlier export in ``out`` that no longer matches its record
    (weights fine-tuned in place, say): a re-export must not replace it silently."""
    try:
        record = read_json_object(out / EXPORT_MARKER).get("files") or {}
    except (HFConversionError, OSError):
        return None  # an unreadable record: the export is replaced, as an unfinished one is
    for name in WEIGHT_FILES:
        r = record.get(name) if isinstance(record, dict) else None
        if isinstance(r, dict) and (out / name).is_file() and sha256_file(out / name)[0] != r.get("sha256"):
            return name
    return None


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
    if config.vocab_size != VOCAB_SIZE:
        raise HFConversionError(
            f"model.vocab_size is {config.vocab_size}; a HF GPT-2 export needs the GPT-2 tokenizer's {VOCAB_SIZE}"
        )
    out = Path(out_dir).expanduser()
    check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / EXPORT_MARKER, {**_MARKER, "complete": False})  # ours from here on, not finished yet
    tensors = state_dict_to_hf(model)
    dtype = next(iter(tensors.values())).dtype
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates it 0600; the export's files share one mode
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
    write_record(out, [n for n in EXPORT_FILES if n != EXPORT_MARKER])
    return out


_MARKER = {"written_by": "gpt2-export (pretrain.model.hf.export_hf)",
           "note": "marks a directory a new export may replace; 'files' records what it wrote (verified on load)"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_record(out: Path, names: list[str]) -> None:
    """Finish an export: ``gpt2_export.json`` records the sha256 and size of each of ``names`` (the
    files the export wrote; anything written into it later, a model card, is added by calling this
    again with the longer list). Loading our own export verifies them (``weights.py``)."""
    files = {}
    for name in names:
        digest, size = sha256_file(out / name)
        files[name] = {"sha256": digest, "size": size}
    _write_json(out / EXPORT_MARKER, {**_MARKER, "complete": True, "files": files})
