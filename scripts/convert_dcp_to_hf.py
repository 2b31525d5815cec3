#!/usr/bin/env python
"""Convert a model-only DCP folder (or a training checkpoint step folder) into a HF GPT-OSS folder.

The DCP folder needs the config.json that convert_hf_to_dcp.py writes; a training checkpoint
carries its model's in model_config.json (older ones: pass --config with the model's HF
config.json or its HF folder). Tensors are saved in
--dtype (bf16 by default); --mxfp4 stores the expert weights as MXFP4 blocks/scales like the
released checkpoints; --source copies the tokenizer and generation files from a HF folder.

    python scripts/convert_dcp_to_hf.py /ckpt/step-000100 /models/mine --mxfp4 --source /models/gpt-oss-20b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from titan_rl.checkpoint.hf import DEFAULT_MAX_SHARD_BYTES, TOKENIZER_FILES, CheckpointError
from titan_rl.checkpoint.manager import convert_dcp_to_hf
from titan_rl.rl.tokenizer import build_tiny_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dcp_dir", type=Path, help="DCP folder with .metadata and config.json")
    parser.add_argument("hf_dir", type=Path, help="output HF folder (created)")
    parser.add_argument("--mxfp4", action="store_true", help="store expert weights as MXFP4")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the other tensors"
    )
    parser.add_argument("--source", type=Path, help="HF folder to copy tokenizer/generation files from")
    parser.add_argument(
        "--config",
        type=Path,
        help="HF config.json (or folder): a training checkpoint without model_config.json",
    )
    parser.add_argument(
        "--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES, help="shard size limit"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = parser.parse_args(argv)
    try:
        convert_dcp_to_hf(
            args.dcp_dir,
            args.hf_dir,
            mxfp4=args.mxfp4,
            dtype=DTYPES[args.dtype],
            source=args.source,
            max_shard_bytes=args.max_shard_bytes,
            progress=True,
            hf_config=args.config,
        )
    except (CheckpointError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    experts = ", experts MXFP4" if args.mxfp4 else ""
    default = " (the default; --dtype float32 keeps fp32)" if args.dtype == "bfloat16" else ""
    print(f"wrote {args.hf_dir}: {args.dtype}{experts}{default}")
    if args.source is not None and not any((args.source / name).is_file() for name in TOKENIZER_FILES):
        print(f"warning: --source {args.source} holds none of {', '.join(TOKENIZER_FILES)}: nothing copied")
    if not (args.hf_dir / "tokenizer.json").is_file():
        vocab = json.loads((args.hf_dir / "config.json").read_text())["vocab_size"]
        if vocab == build_tiny_tokenizer().vocab_size:  # the debug preset: its tokenizer is built in
            build_tiny_tokenizer().save(args.hf_dir)
            print(f"wrote the built-in {vocab}-token tokenizer.json (the debug preset's)")
        else:
            print("note: no tokenizer.json: copy the base model's (--source its HF folder) to train from it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
