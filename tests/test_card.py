"""gpt2-export's model card (pretrain/card.py) and --push-to-hub, up to the network boundary: the
card from a real training run loads back with huggingface_hub, the folder runs in transformers'
pipeline offline, and the push hands the library's upload call the folder with the card."""

from __future__ import annotations

import json

import pytest
from helpers import make_synthetic_shards, tiny_overrides

from pretrain.export import main as export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 6-step run of the tiny GPT-2 (GPT-2 vocabulary, so it exports) with val loss at 3 and 6,
    and a gpt2-eval-style eval.json with HellaSwag and a harness task."""
    from pretrain.train import main as train

    root = tmp_path_factory.mktemp("card")
    data = make_synthetic_shards(root / "data")
    run = root / "run"
    assert train(tiny_overrides(data, run, **{"model.preset": "tiny", "schedule.max_steps": 6, "eval.interval": 3,
                                              "eval.val_tokens": 512, "checkpoint.interval": 3})) == 0
    (run / "eval.json").write_text(json.dumps({"results": {
        "val/loss": 6.25, "hellaswag/acc_norm": 0.27, "hellaswag/acc_norm_stderr": 0.01,
        "tasks/lambada_openai/acc": 0.05, "tasks/lambada_openai/perplexity": 12345.5}}))
    return run


def test_card_loads_back_with_the_runs_figures_and_the_export_runs_offline(run_dir, tmp_path, capsys):
    from huggingface_hub import ModelCard

    out = tmp_path / "hf"
    assert export(["export", "--checkpoint", str(run_dir / "checkpoints"), "--out", str(out)]) == 0
    assert "model card:" in capsys.readouterr().out
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and "gpt2" in card.data.tags and card.data.pipeline_tag == "text-generation"
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got[("Rowan/hellaswag", "acc_norm")] == 0.27
    assert got[("lambada_openai", "acc")] == 0.05 and got[("lambada_openai", "perplexity")] == 12345.5
    assert got[("local", "loss")] == 6.25  # eval.json wins over the in-training value
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert got[("local", "ppl")] == pytest.approx(records[-1]["val/ppl"], rel=1e-6)  # in training, step 6
    text = card.text
    assert "6 optimizer steps" in text and f"{records[-1]['tokens_seen']:,} tokens" in text
    assert "| optimizer | adamw (lr 0.003" in text and "commit `" in text and "torch " in text
    assert "| `hellaswag/acc_norm` | 0.2700 | 0.3114 |" in text and "![loss curves](loss.png)" in text
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # The record covers the card and the image: loading verifies them.
    record = json.loads((out / "gpt2_export.json").read_text())["files"]
    assert {"README.md", "loss.png", "model.safetensors"} <= set(record)
    from pretrain.model.weights import WeightsError, load_model

    load_model(out)
    (out / "README.md").write_text(card.content + "\nedited\n")  # a card edited by hand: named; the weights load
    load_model(out)
    assert "README.md changed since the export" in capsys.readouterr().err
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    with pytest.raises(WeightsError, match="model.safetensors: content does not match"):
        load_model(out)
    (out / "model.safetensors").write_bytes(weights)
    card.save(out / "README.md")  # back as written: transformers below

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    torch.manual_seed(0)
    text = pipeline("text-generation", model=model, tokenizer=tok)("Hello, I'm", max_new_tokens=5,
                                                                   do_sample=False)[0]["generated_text"]
    assert text.startswith("Hello, I'm") and len(text) > len("Hello, I'm")


def test_push_hands_the_folder_with_the_card_to_the_librarys_upload(run_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import HfApi, constants

    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(("create_branch", repo_id, kw)))

    def upload_folder(self, **kw):
        from pathlib import Path

        folder = Path(kw["folder_path"])
        calls.append(("upload_folder", kw["repo_id"], {"revision": kw["revision"],
                                                       "files": sorted(p.name for p in folder.iterdir())}))
        card = huggingface_hub.ModelCard.load(folder / "README.md")
        assert card.data.eval_results and 'from_pretrained("me/tiny-gpt2"' in card.text
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/me/tiny-gpt2/commit/abc"})()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "hf"
    assert export(["export", "--checkpoint", str(run_dir / "checkpoints"), "--out", str(out),
                   "--push-to-hub", "me/tiny-gpt2", "--private", "--revision", "v1"]) == 0
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][2]["private"] is True and calls[1][2]["branch"] == "v1" and calls[2][2]["revision"] == "v1"
    assert {"README.md", "loss.png", "model.safetensors", "config.json", "gpt2_export.json"} <= set(calls[2][2]["files"])
    assert "pushed " in capsys.readouterr().out

    # The Hub refuses (auth, quota, name taken): one line, exit 2, the local export stays, nothing claimed.
    def refuse(self, **kw):
        import importlib.util

        http = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")  # hub 2.x | 1.x
        response = http.Response(403, request=http.Request("POST", "https://huggingface.co/api/models/me/tiny-gpt2"))
        raise huggingface_hub.errors.HfHubHTTPError("403 Forbidden: you cannot write to me/tiny-gpt2",
                                                    response=response)

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    assert export(["export", "--checkpoint", str(run_dir / "checkpoints"), "--out", str(out),
                   "--push-to-hub", "me/tiny-gpt2"]) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and "nothing was pushed" in lines[0] and "403" in lines[0] and "pushed " not in cap.out


@pytest.mark.parametrize("offline", [True, False])
def test_push_offline_or_without_a_token_is_refused_before_anything_is_written(run_dir, tmp_path, monkeypatch,
                                                                               capsys, offline):
    import huggingface_hub
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: pytest.fail("no upload may start"))
    out = tmp_path / "hf"
    assert export(["export", "--checkpoint", str(run_dir / "checkpoints"), "--out", str(out),
                   "--push-to-hub", "me/tiny-gpt2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt2-export: error: --push-to-hub me/tiny-gpt2:")
    assert ("offline mode" if offline else "no Hugging Face token") in lines[0]
    assert not out.exists()


def test_card_and_report_state_what_each_start_ran_with_after_a_resume_with_other_settings(tmp_path, capsys):
    """A run of 4 steps (lr 3e-3, fp32) resumed to 8 with another lr, max_steps and dtype: config.yaml
    holds the second start's settings only. The card of step 4 states the first start's (it never
    saw the second), and the report states each start's value where a resume changed it."""
    from pretrain.report import render
    from pretrain.train import main as train

    data = make_synthetic_shards(tmp_path / "data")
    run = tmp_path / "run"
    first = tiny_overrides(data, run, **{"model.preset": "tiny", "schedule.max_steps": 4, "checkpoint.interval": 4})
    assert train(first) == 0
    assert train([*first, "schedule.max_steps=8", "optim.lr=0.001", "train.dtype=bf16"]) == 0
    assert export(["export", "--checkpoint", str(run / "checkpoints" / "step_00000004"), "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| optimizer | adamw (lr 0.003," in card and "warmup 2 steps, 4 steps," in card, card
    assert "| precision | fp32, compile False |" in card, card
    text = render(run)
    assert "| `optim.lr` | 0.0006 | 0.0030 from step 0; 0.0010 from step 4 |" in text, text
    assert "| `train.dtype` | `bf16` | `fp32` from step 0; `bf16` from step 4 |" in text, text
    assert "| `schedule.max_steps` | `19073` | `4` from step 0; `8` from step 4 |" in text, text
