#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv with everything logitcache needs.
# PyTorch: a CPU build where there is no CUDA GPU, the default (CUDA) build where there is one.
# Usage: source scripts/setup-env.sh   (or run it; it is idempotent)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LOGITCACHE_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
torch_version="${LOGITCACHE_TORCH:-2.13.0}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: logitcache needs Python 3.11 or newer ($python is $("$python" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

stamp="$venv/.logitcache-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "setup: CUDA GPU found: installing torch==$torch_version (CUDA build)" >&2
      "${pip[@]}" install "torch==$torch_version"
    elif [ "$(uname -s)" = "Linux" ] && timeout 10 "$venv/bin/python" - <<'PY' 2>/dev/null
import urllib.request
urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=8)
PY
    then
      echo "setup: no CUDA GPU: installing torch==$torch_version (CPU build)" >&2
      "${pip[@]}" install "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
    else
      # PyPI's macOS/Windows wheels are CPU builds; on Linux a local wheel (pip find-links) serves.
      echo "setup: no CUDA GPU: installing torch==$torch_version" >&2
      "${pip[@]}" install "torch==$torch_version"
    fi
  fi
  "${pip[@]}" install -e "$repo[dev]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
