"""Config: defaults < YAML < CLI, typed and validated before any work, one clear error line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from helpers import REPO, env

from pretrain.config import Config, ConfigError, field_docs, from_dict, help_text, load_config
from pretrain.plan import batching
from pretrain.train import main

PRESET = str(REPO / "configs" / "gpt2_124m.yaml")
SMOKE = str(REPO / "configs" / "smoke_cpu.yaml")


def resolve(path, overrides=(), world_size=1):
    """A config and its batch arithmetic at ``world_size`` (what the run plan computes first)."""
    cfg = load_config(path, list(overrides))
    return cfg, batching(cfg, world_size)


def test_gpt2_124m_preset_resolves_to_the_reproduction():
    cfg, d = resolve(PRESET, world_size=8)
    assert cfg.train.global_batch_tokens == 524_288 and cfg.train.micro_batch_size == 64
    assert cfg.data.seq_len == 1024 and d.grad_accum_steps == 1 and d.global_batch_seqs == 512
    assert resolve(PRESET, world_size=1)[1].grad_accum_steps == 8
    assert d.total_tokens == 524_288 * 19_073
    assert cfg.optim.lr == 6e-4 and cfg.optim.betas == [0.9, 0.95] and cfg.optim.eps == 1e-8
    assert cfg.optim.weight_decay == 0.1 and cfg.optim.grad_clip == 1.0
    assert (cfg.schedule.warmup_steps, cfg.schedule.max_steps, cfg.schedule.min_lr_ratio) == (715, 19073, 0.1)
    gpt = cfg.gpt_config
    assert (gpt.n_layer, gpt.n_head, gpt.n_embd, gpt.vocab_rows) == (12, 12, 768, 50304)
    assert cfg.train.dtype == "bf16" and cfg.train.compile
    assert cfg.eval.interval == 250 and cfg.checkpoint.interval == 1000
    assert cfg.data.dir == "data/fineweb-edu-10B"


def test_fast_config_keeps_the_architecture_and_changes_only_the_recipe():
    fast, fast_batch = resolve(REPO / "configs" / "gpt2_124m_fast.yaml", world_size=8)
    ref, ref_batch = resolve(PRESET, world_size=8)
    assert fast.gpt_config == ref.gpt_config and fast.model == ref.model  # GPT-2 124M, exportable
    assert (fast.optim.name, fast.schedule.name, fast.schedule.cooldown) == ("muon", "wsd", "1-sqrt")
    assert fast.data == ref.data and fast.train.global_batch_tokens == ref.train.global_batch_tokens
    assert fast_batch.total_tokens < 0.6 * ref_batch.total_tokens


def test_precedence_defaults_yaml_cli(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-3\n  weight_decay: 0.05\ntrain:\n  micro_batch_size: 16\n")
    cfg = load_config(p, ["optim.lr=3e-4", "eval.hellaswag_path=none", "model.n_layer=4"])
    assert cfg.optim.lr == 3e-4  # CLI beats YAML
    assert cfg.optim.weight_decay == 0.05  # YAML beats default (and "1e-3" YAML 1.1 string -> float)
    assert cfg.optim.eps == 1e-8  # default
    assert cfg.eval.hellaswag_path is None and cfg.gpt_config.n_layer == 4
    cfg2 = from_dict(cfg.to_dict())  # the saved form round-trips
    assert cfg2 == cfg
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()


@pytest.mark.parametrize(
    "yaml_text, overrides, match",
    [
        ("optim:\n  lrr: 1e-3\n", [], r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?"),
        ("optimm:\n  lr: 1e-3\n", [], r"unknown config key 'optimm'; did you mean 'optim'\?"),
        ("", ["train.micro_batch=4"], r"did you mean 'train.micro_batch_size'"),
        ("train:\n  micro_batch_size: four\n", [], r"train.micro_batch_size: expected int, got 'four'"),
        ("", ["train.compile=maybe"], r"train.compile: expected bool"),
        ("", ["schedule.max_steps=1.5"], r"schedule.max_steps: expected int, got 1.5"),
        ("train:\n  seed: !!python/object/apply:os.system ['true']\n", [], r"YAML tags like !!python are not allowed"),
        ("", ["train.global_batch_tokens=1000"], r"not a multiple of data.seq_len=1024"),
        ("", ["train.global_batch_tokens=65536", "train.micro_batch_size=48"],
         r"not divisible by micro_batch_size\*seq_len\*world_size = 48\*1024\*1"),
        ("", ["data.seq_len=2048"], r"data.seq_len=2048 exceeds the model's context model.block_size=1024"),
        ("", ["optim.lr=0"], r"optim.lr=0.0 must be > 0"),
        ("", ["optim.lr=-1e-3"], r"optim.lr=-0.001 must be > 0"),
        ("", ["train.dtype=fp16"], r"train.dtype='fp16' must be one of bf16, fp32"),
        ("", ["distributed.mode=fdsp"], r"did you mean 'fsdp'"),
        ("", ["optim.betas=[0.9]"], r"optim.betas=\[0.9\] must be two numbers"),
        ("", ["model.n_head=5"], r"n_embd \(768\) must be divisible by model.n_head \(5\)"),
        ("", ["optim.lr"], r"write section.key=value"),
        ("", ["optim.name=sgd"], r"optim.name='sgd' must be one of adamw, muon"),
        ("", ["optim.name=muon", "distributed.mode=fsdp"],
         r"optim.name=muon needs whole weight matrices .* distributed.mode=fsdp shards them .* use distributed.mode=ddp"),
        ("", ["optim.name=muon", "optim.muon_lr=0"], r"optim.muon_lr=0.0 must be a finite number > 0"),
        ("", ["schedule.name=wsd", "schedule.cooldown=sqrt"], r"schedule.cooldown='sqrt' must be one of linear, 1-sqrt"),
        ("", ["schedule.name=wsd", "schedule.cooldown_frac=0"], r"schedule.cooldown_frac=0.0 must be in \(0, 1\]"),
        ("", ["schedule.name=wsd", "schedule.cooldown_frac=0.99"], r"starts the cool-down at step 191, inside the warmup"),
        ("", ["schedule.batch_warmup_steps=10", "schedule.batch_warmup_start_tokens=100000"],
         r"batch_warmup_start_tokens=100000 must be > 0 and divide train.global_batch_tokens=524288"),
        ("", ["schedule.batch_warmup_steps=10", "schedule.batch_warmup_start_tokens=32768"],
         r"batch_warmup_start_tokens=32768 is not a multiple of micro_batch_size\*seq_len\*world_size = 65536"),
    ],
)
def test_bad_configs_give_one_clear_error(tmp_path, yaml_text, overrides, match):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match) as e:
        resolve(p if yaml_text else None, overrides)  # an empty file is refused on its own (below)
    assert "\n" not in str(e.value)


def test_world_size_enters_the_divisibility_check():
    resolve(PRESET, world_size=8)
    with pytest.raises(ConfigError, match=r"64\*1024\*3"):
        resolve(PRESET, world_size=3)


@pytest.mark.parametrize(
    "args, match",
    [
        (["optim.lrr=1"], "did you mean 'optim.lr'"),
        (["train.micro_batch_size=x"], "expected int"),
        (["train.global_batch_tokens=1000"], "not a multiple"),
        (["data.dir=/nonexistent/shards"],
         "holds no training shards; create them with: python -m data_pipeline.prepare fineweb-edu-10B"),
    ],
)
def test_cli_exits_2_with_one_line(capsys, args, match):
    assert main(["--config", PRESET, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt2-train: error: ") and match in err and "\n" not in err


def test_cli_python_tag_no_traceback(tmp_path):
    """The real script: exit 2, one line, no traceback (before any process group)."""
    p = tmp_path / "evil.yaml"
    p.write_text("train:\n  run_dir: !!python/object/apply:os.system ['echo pwned']\n")
    r = subprocess.run([sys.executable, str(REPO / "pretrain" / "train.py"), "--config", str(p)], cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "pwned" not in r.stdout
    assert r.stderr.strip().count("\n") == 0 and "!!python are not allowed" in r.stderr


def test_smoke_config_error_names_the_prepare_command(capsys, tmp_path):
    assert main(["--config", SMOKE, f"data.dir={tmp_path / 'empty'}"]) == 2
    err = capsys.readouterr().err
    assert "python -m data_pipeline.prepare builtin:python-docs data/python-docs" in err


def test_every_field_has_a_docstring_in_help():
    from pretrain.config import SECTIONS

    for name, cls in SECTIONS.items():
        import dataclasses

        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert not missing, f"{name}: no docstring for {missing}"
    text = help_text()
    assert "optim.lr = 0.0006" in text and "Peak learning rate" in text
    assert Config().to_dict()["optim"]["lr"] == 6e-4


def test_model_section_is_gpt_config_one_schema():
    """The config's model keys are GPTConfig's fields (names in order, types, docstrings), each
    defaulting to None = the preset's value, plus preset and init_from; nothing else."""
    import dataclasses
    import typing

    from pretrain.config import ModelSection
    from pretrain.model import ARCH_FIELDS, GPTConfig

    own = {"preset", "init_from"}
    fields = {f.name: f for f in dataclasses.fields(ModelSection)}
    assert [n for n in fields if n not in own] == list(ARCH_FIELDS) == [f.name for f in dataclasses.fields(GPTConfig)]
    hints, model_hints = typing.get_type_hints(ModelSection), typing.get_type_hints(GPTConfig)
    docs, model_docs = field_docs(ModelSection), field_docs(GPTConfig)
    for name in ARCH_FIELDS:
        assert hints[name] == (model_hints[name] | None), name
        assert fields[name].default is None, name
        assert docs[name].startswith(model_docs[name]), name
    # None = the preset's: the defaults are GPTConfig's own for the default preset, and every field
    # set on the model section reaches the architecture.
    assert Config().gpt_config == GPTConfig.from_preset(Config().model.preset)
    changed = {"rotary_base": 500.0, "n_layer": 3, "activation": "relu"}
    cfg = load_config(None, [f"model.{k}={v}" for k, v in changed.items()])
    assert {k: getattr(cfg.gpt_config, k) for k in changed} == changed
