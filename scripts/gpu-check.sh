#!/usr/bin/env bash
# The GPU check of issue 16, in one command from the repository root (benchmarks/gpu_check.py says
# what each part measures; docs/benchmarks.md, section "GPU", gives the device call and the budget).
#
#   bash scripts/gpu-check.sh              # GPU machine: results in $OUT/gpu-check/ (<= 8 minutes)
#   bash scripts/gpu-check.sh --dry-run    # CPU: tiny shapes under TRITON_INTERPRET=1 (CI runs it)
#   options: --out DIR, --parts abc, --budget-s S, --work DIR, --small-config PATH (see --help)
#
# Before the driver starts:
# 1. wheels carried in .whl/ (zarr, numcodecs, ..., liger-kernel, cut-cross-entropy: fetched with
#    ../shared/device/fetch-wheels.sh) are installed offline into a private --target folder put on
#    PYTHONPATH; without .whl/ the installed packages are used as they are;
# 2. this checkout is made importable as `logitcache` without installing it: the root goes on
#    PYTHONPATH, and `import logitcache` maps logitcache.<sub> to ./<sub> as pyproject.toml does
#    (logitcache/_source_tree.py).
# Python: $PYTHON, else python3. Exit status: 0 when no part failed.
set -uo pipefail
started_at="$(date +%s)"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
python="${PYTHON:-python3}"

out="${OUT:-/tmp}/gpu-check"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --out) out="${args[i + 1]:-$out}" ;;
    --out=*) out="${args[i]#--out=}" ;;
    -h | --help) exec "$python" -m benchmarks.gpu_check --help ;;
  esac
done
mkdir -p "$out" || exit 2
log="$out/gpu-check.log"
: >"$log"
say() { echo "gpu-check: $*" | tee -a "$log"; }

scratch="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-env.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT

# 1. carried wheels, offline
if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing $(ls .whl/*.whl | wc -l) carried wheels offline into $scratch/site"
  if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$scratch/site" .whl/*.whl >>"$log" 2>&1; then
    export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "WARNING: installing the wheels failed (see the log); parts that need them will fail or skip"
  fi
else
  say "no .whl/ folder: using the installed packages as they are"
fi

# 2. logitcache from this checkout, not installed
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ! "$python" -c 'import logitcache.kernels, logitcache.pipeline.cli' >>"$log" 2>&1; then
  say "WARNING: logitcache does not import (see the log); the parts will say why"
fi

"$python" -m benchmarks.gpu_check --started-at "$started_at" --out "$out" "$@"
