"""Nothing wrong accepted (issue 29's bad classes): a merge checks what each task manifest says of
itself against where it was found; a model card states the weights a run started from (and counts
every life of a resumed run); every YAML value -- command-line overrides and task YAMLs too -- goes
through the one bounded loader."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from helpers import make_synthetic_shards, tiny_overrides

# ---- gpt2-prepare --merge ------------------------------------------------------------------------


def _docs(path: Path, n: int = 120) -> Path:
    words = "the of and to in is was for on that with as by at data model".split()
    path.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(40 + i % 30))})
                            + "\n" for i in range(n)))
    return path


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory) -> Path:
    """A source prepared as 3 tasks (each complete, not merged)."""
    from data_pipeline.prepare import main

    root = tmp_path_factory.mktemp("merge")
    src = root / "src"
    src.mkdir()
    for k in range(3):
        _docs(src / f"f{k}.jsonl")
    out = root / "parts"
    for i in range(3):
        assert main([str(src), str(out), "--tasks", "3", "--task-id", str(i), "--shard-tokens", "500",
                     "--val-tokens", "500", "--workers", "1", "--no-progress"]) == 0
    return out


def _copy_over(d: Path) -> str:
    """Task 1's manifest copied over task 2's: task 1's shards twice, task 2's dropped."""
    shutil.copy(d / "manifest.task-00001-of-00003.json", d / "manifest.task-00002-of-00003.json")
    return "records task 1 of 3, not task 2 of 3"


def _renumbered(d: Path) -> str:
    """The copy with its task record edited to match the name: its shards are still task 1's."""
    m = json.loads((d / "manifest.task-00001-of-00003.json").read_text())
    m["task"]["id"] = 2
    (d / "manifest.task-00002-of-00003.json").write_text(json.dumps(m))
    return "where task 2 writes train_t00002_000000.bin"


def _dropped_and_totals_edited(d: Path) -> str:
    """Task 2's last shard left out of its list and its totals edited to match: still on disk."""
    p = d / "manifest.task-00002-of-00003.json"
    m = json.loads(p.read_text())
    m["shards"] = m["shards"][:-1]
    m["totals"]["train_shards"] -= 1
    p.write_text(json.dumps(m))
    return "does not list train_t00002_"


def _fewer_shards(d: Path) -> str:
    """Task 2's manifest with its last shard left out of the list (its totals still count it)."""
    p = d / "manifest.task-00002-of-00003.json"
    m = json.loads(p.read_text())
    m["shards"] = m["shards"][:-1]
    p.write_text(json.dumps(m))
    return "but its totals say"


@pytest.mark.parametrize("damage", [_copy_over, _renumbered, _fewer_shards, _dropped_and_totals_edited],
                         ids=lambda f: f.__name__.strip("_"))
def test_merge_checks_each_task_manifest_against_its_name(three_tasks, tmp_path, capsys, damage):
    from data_pipeline.prepare import main

    d = tmp_path / "parts"
    shutil.copytree(three_tasks, d)
    needle = damage(d)
    capsys.readouterr()
    assert main(["--merge", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpt2-prepare: error: ") and needle in err, err
    assert len(err) <= 300 + len(str(d)), err
    assert not (d / "manifest.json").exists()


def test_merge_of_untouched_tasks_still_succeeds(three_tasks, tmp_path):
    from data_pipeline.prepare import main

    d = tmp_path / "parts"
    shutil.copytree(three_tasks, d)
    assert main(["--merge", str(d)]) == 0
    merged = json.loads((d / "manifest.json").read_text())
    assert len({s["file"] for s in merged["shards"]}) == len(merged["shards"]) == merged["totals"]["val_shards"] + \
        merged["totals"]["train_shards"]


# ---- provenance: the card and report.md of a run started from other weights ------------------------


def test_card_and_report_state_the_starting_weights_and_every_life(tmp_path, capsys):
    from huggingface_hub import ModelCard

    from pretrain.export import main as export
    from pretrain.model import GPT, GPTConfig
    from pretrain.model.hf import export_hf
    from pretrain.report import main as report
    from pretrain.train import main as train

    base = tmp_path / "base_export"
    export_hf(GPT(GPTConfig.from_preset("tiny")), base)  # an export of ours, with its sha256 record
    digest = json.loads((base / "gpt2_export.json").read_text())["files"]["model.safetensors"]["sha256"]
    data = make_synthetic_shards(tmp_path / "data")
    run = tmp_path / "run"
    common = {"model.preset": "tiny", "checkpoint.interval": 2, "model.init_from": str(base)}
    assert train(tiny_overrides(data, run, **common, **{"schedule.max_steps": 2})) == 0
    assert train(tiny_overrides(data, run, **common, **{"schedule.max_steps": 4})) == 0  # a second life
    out = tmp_path / "hf"
    assert export(["export", "--checkpoint", str(run / "checkpoints"), "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    assert "trained from scratch" not in text
    assert str(base) in text and digest in text, text
    assert "- 4 optimizer steps" in text
    tokens = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["tokens_seen"]
    assert f"{tokens:,} tokens" in text
    assert report([str(run)]) == 0
    md = (run / "report.md").read_text()
    assert str(base) in md and digest in md and "trained from scratch" not in md
    assert ModelCard.load(out / "README.md").data.base_model is None  # a local export has no Hub id


def test_card_metadata_names_a_hub_base_model():
    from pretrain.card import RunFacts, build_card
    from pretrain.model import GPT, GPTConfig

    facts = RunFacts(run_dir=Path("run"), step=10, environment=[
        {"start_step": 0, "init_from": {"spec": "gpt2", "kind": "hub", "path": None}}])
    card = build_card(GPT(GPTConfig.from_preset("tiny")), facts, "mine")
    assert card.data.base_model == "openai-community/gpt2"
    assert "fine-tuned from the Hugging Face Hub model `gpt2`" in card.text


# ---- one bounded loader for every YAML value ---------------------------------------------------------


def _inline_bomb(levels: int = 6) -> str:
    """A flow-style YAML value of a few hundred bytes expanding to 9**levels strings."""
    parts = ["&a [" + ", ".join(["lol"] * 9) + "]"]
    for p, c in zip("abcdefgh"[: levels - 1], "bcdefghi"):
        parts.append(f"&{c} [" + ", ".join([f"*{p}"] * 9) + "]")
    return "[" + ", ".join(parts) + "]"


def test_override_alias_bomb_is_refused_before_it_expands():
    from pretrain.config import ConfigError, load_config

    value = _inline_bomb()
    assert len(value) < 400
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"train.seed={value}"])
    assert time.perf_counter() - t0 < 1.0
    assert "train.seed" in str(e.value) and "expands to more than" in str(e.value)
    assert len(str(e.value)) <= 300


def test_short_quotes_any_value_within_bounds():
    from pretrain.values import short

    huge = [["x" * 1000] * 1000] * 1000  # its repr would be a gigabyte
    t0 = time.perf_counter()
    text = short(huge)
    assert time.perf_counter() - t0 < 0.1 and len(text) <= 80


def test_task_yaml_bomb_and_malformed_task_yaml_are_named(tmp_path):
    pytest.importorskip("lm_eval")
    from evals.tasks import TaskError, task_manager

    (tmp_path / "bomb.yaml").write_text(f"task: bomb\ndataset_kwargs: {_inline_bomb()}\n")
    with pytest.raises(TaskError, match="bomb.yaml: malformed task YAML .*expands to more than"):
        task_manager(["bomb"], tmp_path)
    (tmp_path / "bomb.yaml").write_text("task: bomb\n  output_type: [\n")
    with pytest.raises(TaskError, match="bomb.yaml: malformed task YAML"):
        task_manager(["bomb"], tmp_path)


# ---- an export's files: which one changed, and whether the weights are intact -----------------------


def test_an_edited_card_is_named_and_the_weights_still_load(tmp_path, capsys):
    from pretrain.model import GPT, GPTConfig
    from pretrain.model.hf import EXPORT_FILES, EXPORT_MARKER, export_hf, write_record
    from pretrain.model.weights import WeightsError, load_model

    out = export_hf(GPT(GPTConfig.from_preset("tiny")), tmp_path / "hf")
    (out / "README.md").write_text("# my model\n")
    write_record(out, [n for n in EXPORT_FILES if n != EXPORT_MARKER] + ["README.md"])
    (out / "README.md").write_text("# my model, described by hand\n")
    load_model(str(out))  # the weights match their record: it loads
    err = capsys.readouterr().err
    assert "README.md changed since the export" in err and "weights are intact" in err, err
    blob = bytearray((out / "model.safetensors").read_bytes())
    blob[-100] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match=r"model.safetensors: content does not match .*1 other file\(s\) changed"):
        load_model(str(out))


# ---- state that blocks work: a prepare killed before it listed its first shard ------------------------


def test_prepare_killed_before_its_first_listing_resumes(tmp_path):
    """kill -9 between the first shard's rename and the manifest that lists it: the rerun rewrites
    that shard (its claim names it) instead of refusing the directory as someone else's."""
    import os
    import signal
    import subprocess
    import sys

    import faults
    from helpers import REPO

    from data_pipeline.prepare import main

    src = _docs(tmp_path / "docs.jsonl", 60)
    out = tmp_path / "out"
    args = [str(src), str(out), "--shard-tokens", "500", "--val-tokens", "500", "--workers", "1", "--no-progress"]
    p = subprocess.Popen([sys.executable, "-m", "data_pipeline.prepare", *args], cwd=REPO,
                         env={**os.environ, **faults.child_env(prepare_sleep=30)}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out / "val_000000.bin").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "val_000000.bin").exists()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert json.loads((out / "manifest.json").read_text())["shards"] == []  # killed before the listing
    assert main(args) == 0
    assert main(["--verify", str(out)]) == 0


def test_a_sample_prompt_the_context_cannot_hold_is_noted(tmp_path, capsys):
    from pretrain.train import main as train

    data = make_synthetic_shards(tmp_path / "data")
    args = tiny_overrides(data, tmp_path / "run", **{"schedule.max_steps": 2, "eval.interval": 2, "eval.val_tokens": 0,
                                                     "eval.sample_tokens": 2,
                                                     "data.seq_len": 16, "model.block_size": 16})
    assert train([*args, "eval.sample_prompt=" + "word " * 40]) == 0
    assert "note: eval.sample_prompt: 41 tokens, but the context holds 16" in capsys.readouterr().err


def test_a_run_on_an_unfinished_prepare_resumes_after_it_finishes(tmp_path, capsys):
    """data.allow_incomplete: trained on the first shard of a prepare still running; once the
    prepare has written its second shard the run resumes on the shard it had (not refused, and
    no advice that starts over), and says how to train on all of them."""
    from data_pipeline.shards import file_sha256, read_header
    from pretrain.train import main as train

    data = make_synthetic_shards(tmp_path / "data", n_train_shards=2)
    entries = [{"file": p, "split": p.split("_")[0], "tokens": read_header(data / p), "documents": 1,
                "sha256": file_sha256(data / p)} for p in ("val_000000.bin", "train_000000.bin", "train_000001.bin")]

    def manifest(n: int, complete: bool) -> None:
        (data / "manifest.json").write_text(json.dumps({"complete": complete, "shards": entries[:n]}))

    manifest(2, False)  # the prepare is still writing train_000001.bin
    run = tmp_path / "run"
    assert train(tiny_overrides(data, run, **{"schedule.max_steps": 4, "data.allow_incomplete": "true"})) == 0
    manifest(3, True)  # the prepare finished
    capsys.readouterr()
    assert train(tiny_overrides(data, run, **{"schedule.max_steps": 8})) == 0
    out = capsys.readouterr().out
    assert "trained on the first 1 training shards" in out and "continues on the 1 it had" in out
    assert (run / "checkpoints" / "step_00000008" / "COMMITTED").exists()


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killed_local_tasks_leave_no_orphans(tmp_path):
    """kill -9 of `gpt2-prepare --tasks 2 --local`: its task processes stop too (SIGTERM from the
    kernel when their parent dies), keeping their complete shards."""
    import os
    import signal
    import subprocess
    import sys

    import faults
    from helpers import REPO

    src = tmp_path / "src"
    src.mkdir()
    for k in range(2):
        _docs(src / f"f{k}.jsonl", 60)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "data_pipeline.prepare", str(src), str(out), "--tasks", "2", "--local",
                          "--shard-tokens", "500", "--val-tokens", "500", "--workers", "2", "--no-progress"],
                         cwd=REPO, env={**os.environ, **faults.child_env(prepare_sleep=30)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children_file = Path(f"/proc/{p.pid}/task/{p.pid}/children")
    deadline = time.monotonic() + 60
    children: list[int] = []
    while len(children) < 2 and time.monotonic() < deadline:
        children = [int(c) for c in children_file.read_text().split()] if children_file.exists() else []
        time.sleep(0.05)
    assert len(children) == 2
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 30
    alive = children
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [c for c in alive if Path(f"/proc/{c}").exists() and "Z" not in _state(c)]
    assert not alive, f"orphaned task processes {alive}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_an_offline_task_download_fails_at_once_with_the_offline_hint(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import evals.tasks as tasks

    (tmp_path / "remote.yaml").write_text(
        "task: remote_only\ndataset_path: gpt2-pretrain-tests/not-a-cached-dataset\noutput_type: loglikelihood\n"
        "test_split: test\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: perplexity\n")
    monkeypatch.setattr(tasks, "hub_unreachable", lambda timeout_s=3.0: True)
    tm = tasks.task_manager(["remote_only"], tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(tasks.TaskError, match="cannot be reached from here and the dataset is not in the cache") as e:
        tasks.load_tasks(tm, ["remote_only"])
    assert time.perf_counter() - t0 < 5 and len(str(e.value)) <= 400


def test_default_generate_batch_is_bounded_by_memory():
    """20,000 prompts without --batch-size: batches that fit BATCH_MEMORY_BYTES, not one 20,000-row tensor."""
    from pretrain.inference.generate import BATCH_MEMORY_BYTES, default_batch
    from pretrain.model import GPTConfig

    cfg = GPTConfig.from_preset("gpt2")
    rows = default_batch(cfg, prompt_tokens=20, max_new_tokens=200, rows=20_000, itemsize=4)
    per_row = (2 * cfg.n_layer * 220 * cfg.n_embd + 2 * cfg.vocab_size) * 4
    assert 1 <= rows < 20_000 and rows * per_row <= BATCH_MEMORY_BYTES
    assert default_batch(cfg, 20, 200, rows=3, itemsize=4) == 3  # a few prompts: all at once, as before
