#!/usr/bin/env bash
# Quick start 1: set up .venv, then run the whole pipeline on the embedded corpus (configs/demo.toml).
# Extra arguments go to `pipe run`, e.g. scripts/demo.sh --run-dir /tmp/demo
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup-env.sh
exec pipe run configs/demo.toml "$@"
