#!/usr/bin/env bash
# Run the test suite on the CPU under another torch release: by default the lent GPU machines' torch
# 2.11 and transformers 5.17, so an API that differs from the torch this project develops on
# (2.14) fails here, not in a GPU session's few minutes. The project runs from the checkout
# (PYTHONPATH), as on the GPU machine; the venv is built once and reused. Test paths are relative
# to the repository root (the script runs pytest there).
#
#   scripts/test_with_torch.sh                          # torch 2.11.0, the whole suite
#   scripts/test_with_torch.sh 2.11.0 tests/unit -x     # a version, then any pytest arguments
#   TRANSFORMERS='transformers==5.24.*' scripts/test_with_torch.sh 2.12.0
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION=${1:-2.11.0}
if [[ ! $VERSION =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]]; then
    echo "usage: $0 [TORCH_VERSION such as 2.11.0] [pytest arguments]; got version '$VERSION'" >&2
    exit 2
fi
[ $# -gt 0 ] && shift
[ $# -eq 0 ] && set -- tests
TRANSFORMERS=${TRANSFORMERS:-transformers==5.17.*}
VENV=${VENV:-${TMPDIR:-/tmp}/titan_rl-torch-$VERSION}

if [ ! -f "$VENV/.installed" ]; then  # written only after a complete install
    echo "building $VENV: torch $VERSION, $TRANSFORMERS (the Linux torch wheel and its CUDA packages: ~5 GB)" >&2
    python -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "torch==$VERSION" "$TRANSFORMERS" \
        numpy safetensors tokenizers rich pytest pytest-timeout
    touch "$VENV/.installed"
fi
"$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
cd "$ROOT"
# PATH: run_train.sh and the torchrun launches in the tests pick this venv's python too
PATH="$VENV/bin:$PATH" PYTHONPATH="$ROOT" exec python -m pytest -q -p no:cacheprovider "$@"
