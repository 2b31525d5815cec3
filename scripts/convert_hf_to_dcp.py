#!/usr/bin/env python
"""Convert a Hugging Face GPT-OSS folder (bf16 or MXFP4 experts) into a model-only DCP folder.

The DCP folder holds {"model": state_dict} written by torch.distributed.checkpoint plus the HF
config.json: torch's DCP tools read it with any sharding, and convert_dcp_to_hf.py goes back.
Training does not need it: it reads the HF folder itself (--model.hf_path, each rank its shards).

    python scripts/convert_hf_to_dcp.py /models/gpt-oss-20b /ckpt/gpt-oss-20b-dcp
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from titan_rl.checkpoint.hf import CheckpointError
from titan_rl.checkpoint.manager import convert_hf_to_dcp

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("hf_dir", type=Path, help="HF folder with config.json and safetensors shards")
    parser.add_argument("dcp_dir", type=Path, help="output folder (created)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the DCP tensors")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = parser.parse_args(argv)
    replacing = (args.dcp_dir / ".metadata").is_file()
    try:
        convert_hf_to_dcp(args.hf_dir, args.dcp_dir, dtype=DTYPES[args.dtype], progress=True)
    except (CheckpointError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dcp_dir}" + (" (replacing the DCP checkpoint that was there)" if replacing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
