"""The model card of an export: ``README.md`` (and ``loss.png``) next to the weights, written with
``huggingface_hub``'s ``ModelCard`` / ``ModelCardData``, from the training run's own records.

    names = write_card(model, out_dir, source)      # gpt2-export calls it after export_hf

What it reads, when the exported weights are a checkpoint of a run (``RUN_DIR/checkpoints/step_N``),
through ``pretrain/rundir/``: the config of each start up to the exported step (the recipe), the
metrics log (tokens and steps, the in-training evaluations, throughput, wall time, the loss plot),
the environment record of those starts (hardware, torch, commit), gpt2-eval's final evaluation (``gpt2-eval --out RUN_DIR/eval.json``, preferred
over the in-training values) and the data directory's ``manifest.json`` (the dataset). The ``model-index`` holds every
figure (validation loss and perplexity, HellaSwag, each ``tasks/<task>/<metric>``), so the Hub
shows them and ``ModelCard.load(...).data.eval_results`` reads them back. Weights from elsewhere
(a Hugging Face directory, a hub name) get a card without training facts.

Like ``pretrain/report.py`` this composes the training side and ``evals`` (for GPT-2 124M's
reference figures); the model package never imports it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_FILE, PLOT_FILE = "README.md", "loss.png"
HELLASWAG_DATASET = "Rowan/hellaswag"


@dataclass
class RunFacts:
    """What a run directory says about the checkpoint that was exported."""

    run_dir: Path | None = None
    step: int | None = None
    config: dict = field(default_factory=dict)
    configs: list[tuple[int, dict]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    figures_from: str = ""
    environment: list[dict] = field(default_factory=list)
    data_source: dict = field(default_factory=dict)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def run_facts(source) -> RunFacts:
    """The run a ``weights.WeightsSource`` belongs to (a checkpoint under ``RUN_DIR/checkpoints``),
    and its records; empty facts for weights from elsewhere."""
    from pretrain.report import settings_by_start, starts_upto
    from pretrain.rundir.layout import CHECKPOINTS
    from pretrain.rundir.metrics_log import run_records
    from pretrain.rundir.records import read_config, read_environment, read_eval

    path = getattr(source, "path", None)
    if getattr(source, "kind", None) != "checkpoint" or path is None or path.parent.name != CHECKPOINTS:
        return RunFacts()
    run_dir = path.parent.parent
    m = re.fullmatch(r"step_(\d+)", path.name)
    facts = RunFacts(run_dir=run_dir, step=int(m.group(1)) if m else None)
    # what the starts that trained up to this checkpoint ran with (config.yaml is the last start's,
    # which may have resumed after this step with other settings), and what they ran on
    facts.environment = starts_upto(read_environment(run_dir), facts.step)
    facts.configs = settings_by_start(facts.environment, read_config(run_dir))
    facts.config = facts.configs[-1][1]
    facts.records = [r for r in run_records(run_dir) if facts.step is None or r["step"] <= facts.step]
    for r in facts.records:  # the last in-training value of each evaluation key
        facts.figures.update({k: float(v) for k, v in r.items() if "/" in k and not k.startswith(("time/", "sample/"))
                              and isinstance(v, (int, float)) and not isinstance(v, bool)})
    facts.figures_from = f"in training (last evaluation at or before step {facts.step})" if facts.figures else ""
    final = read_eval(run_dir)
    if isinstance(final, dict) and isinstance(final.get("results"), dict):
        facts.figures.update({k: float(v) for k, v in final["results"].items() if isinstance(v, (int, float))})
        facts.figures_from = "gpt2-eval (RUN_DIR/eval.json), then the in-training values"
    data_dir = (facts.config.get("data") or {}).get("dir")
    manifest = _json(Path(data_dir) / "manifest.json") if data_dir else None
    facts.data_source = (manifest or {}).get("source") or {}
    return facts


def _dataset_id(facts: RunFacts) -> str | None:
    """The Hub dataset the run trained on (``owner/name``), when it was one."""
    path = facts.data_source.get("path") if isinstance(facts.data_source, dict) else None
    return path if isinstance(path, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", path) else None


def eval_results(facts: RunFacts) -> list:
    """``huggingface_hub.EvalResult`` of every figure (standard errors and counts left out)."""
    from huggingface_hub import EvalResult

    data = _dataset_id(facts) or "local"
    data_name = _describe_data(facts)
    out = []
    for key, value in facts.figures.items():
        if key.endswith(("_stderr", "num_examples")) or key == "val/tokens":
            continue
        parts = key.split("/")
        if parts[0] == "val":
            out.append(EvalResult(task_type="text-generation", dataset_type=data, dataset_name=f"{data_name} (validation)",
                                  dataset_split="validation", metric_type=parts[1], metric_value=round(value, 6),
                                  metric_name=f"validation {parts[1]}"))
        elif parts[0] == "hellaswag":
            out.append(EvalResult(task_type="text-generation", dataset_type=HELLASWAG_DATASET, dataset_name="HellaSwag",
                                  dataset_split="validation", dataset_args={"num_few_shot": 0}, metric_type=parts[1],
                                  metric_value=round(value, 6)))
        elif parts[0] == "core":  # DCLM CORE (evals/core.py): the mean, and each task's acc / centered
            out.append(EvalResult(task_type="text-generation", dataset_type="core", metric_type=parts[-1],
                                  dataset_name="DCLM CORE" + (f": {parts[1]}" if len(parts) == 3 else ""),
                                  metric_value=round(value, 6)))
        elif parts[0] == "tasks" and len(parts) == 3:
            out.append(EvalResult(task_type="text-generation", dataset_type=parts[1], dataset_name=parts[1],
                                  metric_type=parts[2], metric_value=round(value, 6),
                                  metric_name=f"{parts[2]} (lm-evaluation-harness)"))
    return out


def _describe_data(facts: RunFacts) -> str:
    src = facts.data_source
    if not isinstance(src, dict) or not src:
        return "the run's token shards"
    return " ".join(str(src[k]) for k in ("spec", "name") if src.get(k)) or "the run's token shards"


def _recipe(facts: RunFacts) -> list[str]:
    """The recipe's rows, each from what every start up to the exported step ran with: one value,
    or each start's where a resume changed it."""
    from pretrain.report import changes, describe_changes

    def rows(c: dict) -> list[tuple[str, str]]:
        o, s, t, d = (c.get(k) or {} for k in ("optim", "schedule", "train", "data"))
        return [("optimizer", f"{o.get('name')} (lr {o.get('lr')}, betas {o.get('betas')}, weight decay "
                              f"{o.get('weight_decay')}, grad clip {o.get('grad_clip')})"),
                ("schedule", f"{s.get('name')}: warmup {s.get('warmup_steps')} steps, {s.get('max_steps')} steps, "
                             f"min lr ratio {s.get('min_lr_ratio')}"),
                ("batch", f"{t.get('global_batch_tokens')} tokens per step, sequences of {d.get('seq_len')} tokens"),
                ("precision", f"{t.get('dtype')}, compile {t.get('compile')}"),
                ("seed", str(t.get("seed")))]

    per_start = [(step, rows(c)) for step, c in (facts.configs or [(0, facts.config)])]
    out = ["| | |", "|---|---|"]
    for i, (name, _) in enumerate(per_start[0][1]):
        said = describe_changes(changes([(step, r[i][1]) for step, r in per_start]))
        if "None" not in said:
            out.append(f"| {name} | {said} |")
    return out


def body(model, facts: RunFacts, name: str, repo_id: str | None) -> str:
    """The card's Markdown below its metadata."""
    from evals.tasks import REFERENCE
    from pretrain.report import core_notes, duration, init_record, starting_weights, throughput

    g = model.config
    where = repo_id or "PATH_TO_THIS_DIRECTORY"
    lines = [f"# {name}", "",
             f"A GPT-2 language model ({g.n_layer} layers, {g.n_embd} wide, {g.n_head} heads, context {g.block_size} "
             f"tokens, {model.num_params() / 1e6:.1f}M parameters, GPT-2 tokenizer) "
             + (f"{starting_weights(init_record(facts.environment, facts.config))} with gpt2-pretrain" if facts.run_dir is not None
                else "exported with gpt2-pretrain") + ". It loads as `GPT2LMHeadModel` in `transformers`.", ""]
    if facts.run_dir is not None:
        t = throughput(facts.records)
        env = facts.environment[-1] if facts.environment else {}
        lines += ["## Training", "",
                  f"- {facts.step} optimizer steps, {t['tokens'] or 0:,} tokens of {_describe_data(facts)}",
                  f"- hardware: {env.get('world_size', '?')} x {env.get('device_name') or env.get('device', '?')}, "
                  f"torch {env.get('torch', '?')}; wall time {duration(t['wall_s'])}"
                  + (f", {t['tokens_per_s']:,.0f} tokens/s" if t["tokens_per_s"] else ""),
                  f"- code: gpt2-pretrain commit `{env.get('commit') or 'unknown'}`", "", "Recipe:", ""]
        lines += _recipe(facts)
    else:
        lines += ["No training run was found next to these weights (exported from a Hugging Face directory or "
                  "hub name), so the card has no training facts or evaluations.", ""]
    if facts.figures:
        lines += ["", "## Evaluation", "", f"Figures from {facts.figures_from}; OpenAI GPT-2 124M's published "
                  "zero-shot figures beside them where the task and metric match.", "",
                  "| metric | this model | GPT-2 124M |", "|---|---|---|"]
        for key, value in facts.figures.items():
            if key.endswith(("_stderr", "num_examples")) or key == "val/tokens":
                continue
            parts = key.split("/")
            task, metric = (parts[1], parts[2]) if parts[0] == "tasks" and len(parts) == 3 else (parts[0], parts[-1])
            ref = REFERENCE.get((task, metric, 0))
            lines.append(f"| `{key}` | {value:.4f} | {f'{ref[0]:.4f}' if ref else ''} |")
        lines += core_notes(list(facts.figures))
    if (facts.run_dir is not None) and facts.records:
        lines += ["", "## Loss curves", "", f"![loss curves]({PLOT_FILE})"]
    lines += ["", "## Usage", "", "Offline, with `transformers`:", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline", "",
              f'model = AutoModelForCausalLM.from_pretrained("{where}", local_files_only=True)',
              f'tokenizer = AutoTokenizer.from_pretrained("{where}", local_files_only=True)',
              'generate = pipeline("text-generation", model=model, tokenizer=tokenizer)',
              'print(generate("Hello, I\'m a language model,", max_new_tokens=30, do_sample=True, top_k=50)'
              '[0]["generated_text"])', "```", "",
              "## Limitations", "",
              "A small base model trained on web or documentation text: it continues text; it does not follow "
              "instructions, and it repeats the biases and errors of its training data.", ""]
    return "\n".join(lines)


def build_card(model, facts: RunFacts, name: str, repo_id: str | None = None):
    """The ``huggingface_hub.ModelCard``: metadata (license, datasets, tags, model-index) and body."""
    from huggingface_hub import ModelCard, ModelCardData

    from pretrain.report import base_model, init_record

    dataset = _dataset_id(facts)
    data = ModelCardData(language="en", license="mit", library_name="transformers", pipeline_tag="text-generation",
                         tags=["gpt2", "text-generation", "pytorch", "gpt2-pretrain"],
                         datasets=[dataset] if dataset else None, model_name=name,
                         base_model=base_model(init_record(facts.environment, facts.config)),
                         eval_results=eval_results(facts) or None)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body(model, facts, name, repo_id)}")


def write_card(model, out: Path, source, repo_id: str | None = None, facts: RunFacts | None = None) -> list[str]:
    """README.md (and loss.png when the run has metrics) into the export ``out``; returns the names
    written, for ``hf.write_record``. ``facts``: :func:`run_facts` read before the export (so a run
    whose records cannot be read is refused before anything is written)."""
    from pretrain.plot import load_runs, plot_runs

    out = Path(out)
    facts = run_facts(source) if facts is None else facts
    name = repo_id.split("/")[-1] if repo_id else (facts.run_dir.name if facts.run_dir else out.name)
    written = []
    if facts.run_dir is not None and facts.records:
        runs = load_runs([facts.run_dir])
        runs[0].records = facts.records  # up to the exported step
        plot_runs(runs, out / PLOT_FILE)
        written.append(PLOT_FILE)
    build_card(model, facts, name, repo_id).save(out / CARD_FILE)
    return [CARD_FILE, *written]
