"""The ``gpt2-export`` command: weights from anywhere (``weights.py``) -> a Hugging Face GPT-2
directory (``hf.py``'s ``export_hf``).

    gpt2-export export --checkpoint runs/x/checkpoints --out gpt2-124m-hf [--overwrite] [--dtype bfloat16]
    python -m pretrain.model.export export --checkpoint PATH --out DIR

``--out`` is checked before anything is loaded; a refusal exits 2 with one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pretrain.model.hf import HFConversionError, check_out_dir, export_hf
from pretrain.model.weights import WeightsError, load_model, resolve


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_out_dir(Path(args.out).expanduser(), args.overwrite)  # before loading: paths first
        source = resolve(args.checkpoint)
        model = load_model(source)
        if source.note:
            print(source.note, file=sys.stderr)
        model.to(getattr(torch, args.dtype))
        out = export_hf(model, args.out, overwrite=args.overwrite)
    except (WeightsError, HFConversionError) as e:
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
