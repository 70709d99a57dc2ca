"""HF GPT-2 conversion through the real code: tiny random transformers models, no download."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

from data_pipeline.tokenizer import gpt2_encoding  # noqa: E402
from pretrain.export import main  # noqa: E402
from pretrain.model import GPT, GPTConfig  # noqa: E402
from pretrain.model.hf import EXPORT_FILES, WEIGHT_MAP, HFConversionError, export_hf  # noqa: E402
from pretrain.model.weights import WeightsError, load_hf, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_HF = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=50257)


def _randomize_(params, seed: int, std: float = 0.1) -> None:
    """Random non-symmetric weights; LayerNorm weights around 1, all biases random too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            base = 1.0 if (".ln_" in name or "ln_f" in name) and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))


def _hf_model(**overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**{**TINY_HF, **overrides}))
    _randomize_(model.named_parameters(), seed=1)
    return model.eval()


def _our_model(**overrides) -> GPT:
    model = GPT(GPTConfig.from_preset("tiny", **overrides))
    _randomize_(model.named_parameters(), seed=2)
    return model.eval()


def _logits_hf(model, idx):
    with torch.no_grad():
        return model(idx).logits


def _logits_ours(model, idx):
    with torch.no_grad():
        return model(idx)[0][..., : model.config.vocab_size]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tiny")
    _hf_model().save_pretrained(d)
    return d


IDX = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------------
# HF -> ours


def test_weight_map_covers_every_hf_parameter():
    hf_names = set(_hf_model().state_dict())
    ours = {r.hf.format(i=i) for r in WEIGHT_MAP for i in range(TINY_HF["n_layer"])}
    assert hf_names == ours
    transposed = {r.hf.split(".")[-2] for r in WEIGHT_MAP if r.transposed}
    assert transposed == {"c_attn", "c_proj", "c_fc"}  # HF Conv1D: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    assert sum(r.transposed for r in WEIGHT_MAP) == 4


def test_load_hf_matches_transformers_logits(hf_dir):
    ref = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = load_hf(hf_dir).eval()
    assert model.config.n_head == 4 and model.config.block_size == 64
    assert model.lm_head.weight is model.transformer.wte.weight
    a, b = _logits_hf(ref, IDX), _logits_ours(model, IDX)
    assert a.abs().max() > 1.0
    assert (a - b).abs().max().item() < 1e-5


def test_load_hf_with_padded_vocab(hf_dir):
    ref = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = load_hf(hf_dir, padded_vocab_size=50304).eval()
    assert model.transformer.wte.weight.shape == (50304, 64)
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        logits, _ = model(IDX)
    assert torch.isneginf(logits[..., 50257:]).all()
    assert (logits[..., :50257] - _logits_hf(ref, IDX)).abs().max().item() < 1e-5


def test_load_hf_from_pytorch_model_bin_and_hub_style_names(tmp_path, hf_dir):
    ref = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    # pytorch_model.bin (read with weights_only=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save(ref.state_dict(), bin_dir / "pytorch_model.bin")
    assert (_logits_ours(load_hf(bin_dir), IDX) - _logits_hf(ref, IDX)).abs().max().item() < 1e-5
    # The hub's original gpt2 files: GPT2Model names ("h.0...", "wte.weight"), the old
    # attention-mask buffers, and no lm_head.
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    (hub_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(sd, str(hub_dir / "model.safetensors"))
    assert (_logits_ours(load_hf(hub_dir), IDX) - _logits_hf(ref, IDX)).abs().max().item() < 1e-5


def test_load_hf_relu_and_untied(tmp_path):
    ref = _hf_model(activation_function="relu", tie_word_embeddings=False)
    with torch.no_grad():  # an untied head that differs from wte
        ref.lm_head.weight = torch.nn.Parameter(torch.randn(50257, 64) * 0.1)
    ref.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    assert model.config.activation == "relu" and not model.config.tie_embeddings
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert (_logits_ours(model, IDX) - _logits_hf(ref, IDX)).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------
# ours -> HF


def _check_export(model: GPT, out: Path) -> None:
    export_hf(model, out)
    ref, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref.eval()
    a, b = _logits_hf(ref, IDX), _logits_ours(model, IDX)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-5
    if model.config.tie_embeddings:
        assert ref.lm_head.weight.data_ptr() == ref.transformer.wte.weight.data_ptr()
        assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"padded_vocab_size": 50304},
        {"activation": "relu", "tie_embeddings": False},
        {"bias": False},  # exported as zero biases: the same function
    ],
    ids=["plain", "padded", "relu-untied", "no-bias"],
)
def test_export_loads_in_transformers_with_equal_logits(tmp_path, overrides):
    _check_export(_our_model(**overrides), tmp_path / "out")


def test_export_drops_padded_rows_and_round_trips(tmp_path):
    model = _our_model(padded_vocab_size=50304)
    export_hf(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["transformer.wte.weight"].shape == (50257, 64)
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D layout (in, out)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2"
    assert cfg["activation_function"] == "gelu_new" and cfg["vocab_size"] == 50257
    assert cfg["n_positions"] == cfg["n_ctx"] == 64 and cfg["bos_token_id"] == cfg["eos_token_id"] == 50256
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 50256
    back = load_hf(tmp_path, padded_vocab_size=50304)
    for k, v in model.state_dict().items():
        w = back.state_dict()[k]
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v, w = v[:50257], w[:50257]
        assert torch.equal(v, w), k


def test_exported_tokenizer_loads_offline_and_matches_tiktoken(tmp_path):
    export_hf(_our_model(), tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(EXPORT_FILES)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok("Hello world").input_ids == [15496, 995]
    assert tok.eos_token == tok.bos_token == tok.unk_token == "<|endoftext|>" and tok.eos_token_id == 50256
    assert tok.model_max_length == 64
    text = "GPT-2's tokenizer: naïve café, 日本語, emoji 🤖,  two  spaces\n\ttab's 12345 ok?!"
    enc = gpt2_encoding()
    assert tok(text).input_ids == enc.encode_ordinary(text)
    assert tok.decode(enc.encode_ordinary(text)) == text


def test_full_gpt2_preset_round_trip(tmp_path):
    """Every name and shape of the real 124M layout, through export and both loaders."""
    model = GPT(GPTConfig.from_preset("gpt2"))  # GPT-2 init: random, non-symmetric
    export_hf(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert len(tensors) == 2 + 12 * 12 + 2  # wte, wpe, 12 per block, ln_f; lm_head tied
    assert sum(t.numel() for t in tensors.values()) == 124_439_808
    back = load_hf(tmp_path)
    assert back.num_params() == 124_439_808 and back.lm_head.weight is back.transformer.wte.weight
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    ref, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert ref.lm_head.weight.data_ptr() == ref.transformer.wte.weight.data_ptr()
    idx = IDX[:1, :8]
    assert (_logits_hf(ref.eval(), idx) - _logits_ours(model.eval(), idx)).abs().max().item() < 1e-5


def test_export_refuses_a_foreign_non_empty_directory(tmp_path):
    model = _our_model()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(HFConversionError, match="not a previous export.*overwrite"):
        export_hf(model, tmp_path)
    export_hf(model, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # other files are left alone
    clean = tmp_path / "clean"
    export_hf(model, clean)
    export_hf(_our_model(activation="relu"), clean)  # a previous export may be replaced
    assert json.loads((clean / "config.json").read_text())["activation_function"] == "relu"
    with pytest.raises(HFConversionError, match="vocab_size"):
        export_hf(GPT(GPTConfig.from_preset("tiny-vocab")), tmp_path / "other")


# ---------------------------------------------------------------------------------------------
# Native checkpoints


def test_load_model_reads_a_native_checkpoint(tmp_path):
    checkpoint = pytest.importorskip("pretrain.checkpoint")
    model = _our_model(padded_vocab_size=50304)
    config = {"model": {"preset": "tiny", "padded_vocab_size": 50304, "n_layer": None}, "train": {"seed": 0}}
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpts", keep_last=2)
    path = ckpt.save(3, model, None, {"step": 3}, None, config)
    for source in (path, tmp_path / "ckpts"):  # a step directory, or the run's checkpoint directory
        loaded = load_model(source)
        assert loaded.config == model.config
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        assert torch.equal(_logits_ours(loaded.eval(), IDX), _logits_ours(model, IDX))
    # and the CLI exports it
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 0
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (_logits_hf(ref, IDX) - _logits_ours(model, IDX)).abs().max().item() < 1e-5


def test_load_model_accepts_gptconfig_fields_and_reports_mismatches(monkeypatch, tmp_path):
    checkpoint = pytest.importorskip("pretrain.checkpoint")
    model = _our_model()
    (tmp_path / "manifest.json").write_text("{}")
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # a compiled model's names
    monkeypatch.setattr(checkpoint, "load_model_state", lambda p: (state, {"model": model.config.to_dict()}))
    loaded = load_model(tmp_path)
    assert torch.equal(_logits_ours(loaded.eval(), IDX), _logits_ours(model, IDX))
    wrong = {"model": {**model.config.to_dict(), "n_layer": 3}}
    monkeypatch.setattr(checkpoint, "load_model_state", lambda p: (state, wrong))
    with pytest.raises(WeightsError, match="does not match its model config"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error each


def test_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_hf(tmp_path / "nope" / "model")


def test_directory_without_weights(tmp_path, hf_dir):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(WeightsError, match="has no model.safetensors"):
        load_hf(tmp_path)


def test_directory_without_config(tmp_path, hf_dir):
    (tmp_path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=r"config.json does not exist"):
        load_hf(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, hf_dir, damage):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    data = (hf_dir / "model.safetensors").read_bytes()
    data = data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 100
    (tmp_path / "model.safetensors").write_bytes(data)
    with pytest.raises(WeightsError, match=r"cannot read .*model.safetensors.*corrupt"):
        load_hf(tmp_path)


def test_corrupt_pytorch_model_bin(tmp_path, hf_dir):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip file")
    with pytest.raises(WeightsError, match=r"cannot read .*pytorch_model.bin"):
        load_hf(tmp_path)


def test_corrupt_config_json(tmp_path, hf_dir):
    (tmp_path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_hf(tmp_path)


def test_weights_of_another_shape_than_config(tmp_path, hf_dir):
    (tmp_path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    cfg = json.loads((hf_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_embd": 32, "n_head": 4}))
    with pytest.raises(WeightsError, match=r"has shape \[50257, 64\] but config.json .* implies \[50257, 32\]"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(WeightsError, match=r"missing weight 'transformer.h.2"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_layer": 1}))
    with pytest.raises(WeightsError, match=r"unexpected weights \['transformer.h.1"):
        load_hf(tmp_path)


def test_unsupported_config(tmp_path, hf_dir):
    (tmp_path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    cfg = json.loads((hf_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_function": "silu"}))
    with pytest.raises(WeightsError, match="activation_function 'silu' is not supported"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(WeightsError, match="only 'gpt2'"):
        load_hf(tmp_path)


def test_hub_name_offline_is_one_clear_line(monkeypatch, tmp_path):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local directory named gpt2
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError) as e:
        load_hf("gpt2")
    msg = str(e.value)
    assert "could not download 'gpt2' from the Hugging Face hub" in msg
    assert "pass a local directory containing config.json and model.safetensors" in msg
    assert "\n" not in msg


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2-export: error: ") and err.count("\n") == 1
    # The real entry point: no traceback.
    r = subprocess.run(
        [sys.executable, "-m", "pretrain.export", "export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "neither a Hugging Face directory" in r.stderr


def test_export_refuses_a_directory_holding_the_users_own_config_json(tmp_path):
    """A config.json the user wrote is not a previous export: only the export's marker file says so."""
    (tmp_path / "config.json").write_text('{"mine": true}\n')
    with pytest.raises(HFConversionError, match="not a previous export"):
        export_hf(_our_model(), tmp_path)
    assert (tmp_path / "config.json").read_text() == '{"mine": true}\n'
    assert main(["export", "--checkpoint", str(tmp_path / "config.json"), "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize(
    "overrides, named",
    [({"rotary": True}, "model.rotary=true"), ({"qk_norm": True}, "model.qk_norm=true"),
     ({"activation": "relu2"}, "model.activation=relu2")],
    ids=["rotary", "qk_norm", "relu2"],
)
def test_export_refuses_research_options_in_one_line(tmp_path, capsys, overrides, named):
    """A research option makes the model something GPT2LMHeadModel does not compute: refused
    before anything is written, by the function and by the CLI (exit 2, one line naming it)."""
    model = _our_model(**overrides)
    with pytest.raises(HFConversionError) as e:
        export_hf(model, tmp_path / "out")
    assert str(e.value).startswith(f"{named} is a research option, not GPT-2") and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    # Through the CLI, from a native checkpoint of that model.
    from pretrain.checkpoint import Checkpointer

    ckpts = tmp_path / "checkpoints"
    Checkpointer(ckpts, keep_last=1, rank=0, world_size=1).save(
        1, model, None, {"step": 1}, {}, {"model": {"preset": "tiny", **overrides}})
    assert main(["export", "--checkpoint", str(ckpts), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2-export: error: {named} is a research option") and err.count("\n") == 1
    assert not (tmp_path / "cli").exists()


def test_fast_recipe_checkpoint_exports_with_equal_logits(tmp_path):
    """A model trained by the real trainer with the fast recipe's optimizer and schedule (Muon +
    AdamW, wsd) is still GPT-2: its checkpoint exports through the unchanged path and loads in
    transformers with equal logits."""
    from helpers import make_synthetic_shards, python_cmd, run, tiny_overrides

    from pretrain.model.weights import load_model

    data = make_synthetic_shards(tmp_path / "data", train_tokens=8_000, val_tokens=2_000)
    run(python_cmd(tiny_overrides(data, tmp_path / "run", **{
        "model.preset": "tiny", "schedule.max_steps": 3, "schedule.warmup_steps": 1, "checkpoint.interval": 3,
        "optim.name": "muon", "schedule.name": "wsd", "schedule.cooldown": "1-sqrt", "schedule.cooldown_frac": 0.4})))
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--out", str(tmp_path / "hf")]) == 0
    ours = load_model(str(tmp_path / "run" / "checkpoints"))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (_logits_hf(ref, IDX) - _logits_ours(ours, IDX)).abs().max().item() < 1e-5


def test_export_records_every_file_and_is_verified_on_load(tmp_path, hf_dir, capsys):
    """gpt2_export.json records the sha256 of every file the export wrote; a byte flipped inside the
    weights (the header intact) is refused on load in one line, where it used to load as garbage.
    The files share one mode (model.safetensors was 0600). A foreign HF directory without a
    record still loads, and its source says once that it is not verified."""
    from pretrain.model.hf import EXPORT_MARKER
    from pretrain.model.weights import resolve

    model = _our_model()
    out = export_hf(model, tmp_path / "out")
    record = json.loads((out / EXPORT_MARKER).read_text())
    assert record["complete"] and set(record["files"]) == set(EXPORT_FILES) - {EXPORT_MARKER}
    assert len({(out / n).stat().st_mode for n in EXPORT_FILES}) == 1
    assert resolve(out).note is None and torch.equal(load_model(out).lm_head.weight, model.lm_head.weight)
    blob = bytearray((out / "model.safetensors").read_bytes())
    blob[-8] ^= 0x40  # the last tensor's data
    (out / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match=r"model.safetensors: content does not match its gpt2_export.json record") as e:
        load_model(out)
    assert "\n" not in str(e.value)
    foreign = resolve(hf_dir)  # save_pretrained's directory: nothing to check against
    assert foreign.note is not None and "not verified" in foreign.note and load_model(foreign) is not None
