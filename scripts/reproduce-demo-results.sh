#!/usr/bin/env bash
# Regenerates the demo-scale tables of docs/results.md (one seed): teachers, the distilled student
# (ghost tail, the default), the same student with renormalised top-k, live-teacher (online)
# distillation and the cross-entropy twin, all evaluated on the test split and BLiMP.
# Usage: scripts/reproduce-demo-results.sh [RUN_DIR] [--set ...]   (after scripts/demo.sh set up .venv)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
run="${1:-runs/results-demo}"; shift || true
export PATH="$PWD/.venv/bin:$PATH"
pipe run configs/demo.toml --run-dir "$run" --set 'run.students=["cache","ce","online"]' "$@"
pipe train-student configs/demo.toml --run-dir "$run" --name cache-renormalize \
  --set student.distill.tail=renormalize "$@"
pipe evaluate --run-dir "$run" --blimp data/blimp-dev
pipe report "$run"
python - "$run" <<'PY'
import json, sys
results = json.load(open(f"{sys.argv[1]}/eval/results.json"))
fields = sorted(results["models"][0]["blimp"]["fields"])
print("| model | parameters | test perplexity | test loss | ECE | BLiMP overall | " + " | ".join(fields) + " |")
print("|---" * (6 + len(fields)) + "|")
for m in results["models"]:
    h, b = m["held_out"], m["blimp"]
    fields = " | ".join(f"{100 * b['fields'][f]:.1f}" for f in sorted(b["fields"]))
    print(f"| {m['name']} | {m['parameters']:,} | {h['perplexity']:.1f} | {h['loss']:.4f} | {h['ece']:.4f} | "
          f"{100 * b['overall']:.1f} | {fields} |")
PY
