"""The ``gpt2-export`` command: weights from anywhere (``weights.py``) -> a Hugging Face GPT-2
directory (``hf.py``'s ``export_hf``) with its model card (``pretrain/card.py``), optionally pushed
to the Hugging Face Hub.

    gpt2-export export --checkpoint runs/x/checkpoints --out gpt2-124m-hf [--overwrite] [--dtype bfloat16]
    gpt2-export export --checkpoint runs/x/checkpoints --out DIR --push-to-hub OWNER/NAME [--private] [--revision BRANCH]
    python -m pretrain.export export --checkpoint PATH --out DIR

``--out`` is checked before anything is loaded; a refusal exits 2 with one line. The card
(``README.md``, and ``loss.png``) is written with every export and recorded in
``gpt2_export.json`` with the other files, so loading the export verifies it too. The push goes
through ``huggingface_hub`` (``HfApi.create_repo``, ``create_branch``, ``upload_folder``: one
commit, so the Hub holds all of the folder or none of it); offline or without a token it is
refused before the export starts, and a Hub that refuses it exits 2 in one line saying the local
export is complete and nothing was pushed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from data_pipeline.arguments import Parser
from pretrain.model.hf import (
    EXPORT_FILES,
    EXPORT_MARKER,
    HFConversionError,
    check_out_dir,
    export_hf,
    write_record,
)
from pretrain.model.weights import WeightsError, load_model, resolve


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gpt2-export",
        description="Convert between native checkpoints and Hugging Face GPT-2 directories.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser(
        "export",
        help="native checkpoint (or HF dir) -> HF directory with a model card",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    exp.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS,
                     help="native checkpoint directory, a run's checkpoints/ folder, HF directory or hub name")
    exp.add_argument("--out", required=True, default=argparse.SUPPRESS, help="output directory for the HF model")
    exp.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out that is not a previous export (files of the export's names are replaced, others kept)",
    )
    exp.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the written weights"
    )
    exp.add_argument("--push-to-hub", default=None, metavar="OWNER/NAME",
                     help="after the export, upload the folder to this Hugging Face Hub model repository "
                          "(created if missing; needs a token: `hf auth login`, or HF_TOKEN)")
    exp.add_argument("--private", action="store_true", help="create the Hub repository private")
    exp.add_argument("--revision", default=None, metavar="BRANCH",
                     help="push to this branch of the Hub repository (created from main if missing)")
    return parser


def login_command() -> str:
    """The Hub's login command in the installed huggingface_hub: ``hf auth login`` from 0.34 on
    (``huggingface-cli`` is gone in 1.0), ``huggingface-cli login`` before."""
    import huggingface_hub

    try:
        major, minor = (int(x) for x in huggingface_hub.__version__.split(".")[:2])
    except ValueError:
        return "hf auth login"
    return "hf auth login" if (major, minor) >= (0, 34) else "huggingface-cli login"


def check_push(args) -> str | None:
    """Before any work: the push's arguments, offline mode and the token; one line, or None."""
    if args.push_to_hub is None:
        return "--private / --revision apply to a push; pass --push-to-hub OWNER/NAME too" if (
            args.private or args.revision) else None
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", args.push_to_hub) or args.push_to_hub.startswith((".", "-")):
        return f"--push-to-hub {args.push_to_hub!r}: not a repository id; pass OWNER/NAME (e.g. me/gpt2-124m-repro)"
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        return (f"--push-to-hub {args.push_to_hub}: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE=1); "
                "unset it to push, or export without --push-to-hub")
    if not get_token():
        return (f"--push-to-hub {args.push_to_hub}: no Hugging Face token; run `{login_command()}` or set HF_TOKEN, "
                "or export without --push-to-hub")
    return None


def push(out: Path, repo_id: str, private: bool, revision: str | None) -> str:
    """Upload the export folder as one commit; returns the commit's URL. The library's own calls."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(out), repo_type="model", revision=revision,
                             commit_message=f"gpt2-export: {out.name}")
    return str(getattr(info, "commit_url", None) or info)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        problem = check_push(args)
        if problem:
            raise HFConversionError(problem)
        check_out_dir(Path(args.out).expanduser(), args.overwrite)  # before loading: paths first
        source = resolve(args.checkpoint)
        from pretrain.card import run_facts, write_card
        from pretrain.rundir.records import RecordError

        try:
            facts = run_facts(source)  # the run's records, read (and refused) before anything is written
        except RecordError as e:
            raise HFConversionError(f"{e}; the model card is made from the run's config.yaml: restore it "
                                    "(each checkpoint holds a copy)") from None
        model = load_model(source)
        if source.note:
            print(source.note, file=sys.stderr)
        model.to(getattr(torch, args.dtype))
        out = export_hf(model, args.out, overwrite=args.overwrite)
        card_files = write_card(model, out, source, repo_id=args.push_to_hub, facts=facts)
        write_record(out, [n for n in EXPORT_FILES if n != EXPORT_MARKER] + card_files)
    except (WeightsError, HFConversionError) as e:
        print(f"gpt2-export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an --out that cannot be created or written
        print(f"gpt2-export: error: {e.filename or args.out}: {e.strerror or e}; choose a writable --out",
              file=sys.stderr)
        return 2
    print(f"exported {model.num_params():,} parameters to {out} (model card: {out / card_files[0]})")
    if args.push_to_hub is None:
        return 0
    try:
        url = push(out, args.push_to_hub, args.private, args.revision)
    except Exception as e:  # noqa: BLE001 - HTTP, auth, offline, refused: one line; nothing claimed pushed
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        print(f"gpt2-export: error: push to {args.push_to_hub} failed ({type(e).__name__}: {first}); nothing was "
              f"pushed; the export in {out} is complete: retry the push, or upload it yourself", file=sys.stderr)
        return 2
    print(f"pushed {out} to https://huggingface.co/{args.push_to_hub} ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
