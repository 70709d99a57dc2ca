"""Harness task fixtures for the tests: lm-evaluation-harness's own task definitions (copied
from the installed ``lm_eval/tasks``), pointed at small local files written here in each real
dataset's schema, so they run offline. One task per request type:

    arc_easy_local        multiple_choice          (allenai/ai2_arc: question, choices{text,label}, answerKey)
    lambada_openai_local  loglikelihood            (EleutherAI/lambada_openai: text)
    wikitext_local        loglikelihood_rolling    (EleutherAI/wikitext_document_level: page; the harness's
                                                    detokenizer and word/byte perplexity)
    nq_open_local         generate_until           (google-research-datasets/nq_open: question, answer)

The texts are made of common English words so that a tiny model's tokens are GPT-2 tokens of
every length, some pages longer than a tiny model's context (several rolling windows).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

TASKS = ("arc_easy_local", "lambada_openai_local", "wikitext_local", "nq_open_local")
WORDS = ("the a man woman dog he she they it runs holds puts takes water ball field grill brush table car "
         "quickly slowly again then while café naïve camera crowd stage hair towel rope Paris London river "
         "city king queen day night red blue green big small 1984 @-@ , . ; :").split()


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _task_yaml(name: str, new_name: str, data_files: dict[str, str]) -> str:
    """The installed harness's YAML of task ``name``, renamed and reading local json files."""
    import lm_eval

    src = Path(lm_eval.__file__).parent / "tasks"
    text = next(src.rglob(f"{name}.yaml")).read_text()
    text = re.sub(r"(?m)^tag:\n(  - .*\n)+", "", text)
    text = re.sub(r"(?m)^task: .*$", f"task: {new_name}", text)
    text = re.sub(r"(?m)^dataset_name: .*\n", "", text)
    files = "".join(f"    {split}: {path}\n" for split, path in data_files.items())
    return re.sub(r"(?m)^dataset_path: .*$", f"dataset_path: json\ndataset_kwargs:\n  data_files:\n{files}".rstrip(),
                  text)


def write_tasks(root: Path, n: int = 12, seed: int = 0) -> Path:
    """Write the four tasks and their data under ``root``; returns the include path."""
    import lm_eval

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    data.mkdir(exist_ok=True)

    def arc_rows(k):
        rows = []
        for i in range(k):
            labels = ["A", "B", "C", "D"] if i % 3 else ["1", "2", "3"]
            rows.append({"id": f"q{i}", "question": _words(rng, 4, 14).capitalize() + "?",
                         "choices": {"text": [_words(rng, 1, 6) for _ in labels], "label": labels},
                         "answerKey": rng.choice(labels)})
        return rows

    arc = {s: _jsonl(data / f"arc_{s}.jsonl", arc_rows(n)) for s in ("train", "validation", "test")}
    (root / "arc_easy_local.yaml").write_text(_task_yaml("arc_easy", "arc_easy_local", arc))

    lam = {"test": _jsonl(data / "lambada.jsonl", [{"text": _words(rng, 6, 40)} for _ in range(n)])}
    (root / "lambada_openai_local.yaml").write_text(_task_yaml("lambada_openai", "lambada_openai_local", lam))

    pages = [{"page": " \n = " + _words(rng, 2, 4) + " = \n " + _words(rng, 10, 160) + " \n"} for _ in range(n)]
    wiki = {s: _jsonl(data / f"wiki_{s}.jsonl", pages) for s in ("train", "validation", "test")}
    (root / "wikitext_local.yaml").write_text(_task_yaml("wikitext", "wikitext_local", wiki))
    shutil.copy(Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "preprocess_wikitext.py", root)

    nq = [{"question": _words(rng, 3, 10), "answer": [_words(rng, 1, 2)]} for _ in range(n)]
    nq_files = {s: _jsonl(data / f"nq_{s}.jsonl", nq) for s in ("train", "validation")}
    text = _task_yaml("nq_open", "nq_open_local", nq_files)
    # A tiny model's context is 64 tokens: ask for 8 new ones (the harness's default is 256).
    text = text.replace("  do_sample: false\n", "  do_sample: false\n  max_gen_toks: 8\n")
    (root / "nq_open_local.yaml").write_text(text)
    return root


def tiny_model(seed: int = 0, block_size: int = 64):
    """A tiny random GPT-2 with sharpened token embeddings (decisive argmaxes, no near ties)."""
    import torch

    from pretrain.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("tiny", block_size=block_size))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(8.0)
    return model.eval()
