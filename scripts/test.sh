#!/usr/bin/env bash
# Quick start 2: set up .venv, then run the test suite (Triton kernels in the interpreter on CPU).
# Extra arguments go to pytest, e.g. scripts/test.sh -k cache
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup-env.sh
if ! python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  export TRITON_INTERPRET=1  # no GPU: Triton kernels run (slowly) in the interpreter
fi
exec python -m pytest "$@"
