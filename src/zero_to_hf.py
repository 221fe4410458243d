"""A ZeRO checkpoint of a DeepSpeed run -> an HF export (model, tokenizer, diffusion.json).

    python -m src.zero_to_hf outputs/train/qwen7b/<time>/checkpoints/last.ckpt export/

CHECKPOINT is the folder Lightning's DeepSpeedStrategy writes per checkpoint; the architecture
is rebuilt from the run's saved hyperparameters (its pretrained source's config.json must still
be reachable; no pretrained weights are loaded) and the weights are gathered from the checkpoint
one parameter at a time: host memory holds the export's weights, in `--dtype`, and little more.
"""

from __future__ import annotations

import argparse
import logging

import torch

from src.training.zero_export import export_lightning_zero_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint", help="a DeepSpeed checkpoint folder, e.g. checkpoints/last.ckpt"
    )
    parser.add_argument("export_dir", help="where to write the HF export")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the `latest` file)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights of the export: float32 (the master weights, default) or 16-bit (half "
        "the host memory and disk)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    try:
        export_lightning_zero_checkpoint(
            args.checkpoint, args.export_dir, args.tag, dtype=getattr(torch, args.dtype)
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
