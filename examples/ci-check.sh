#!/usr/bin/env bash
# A generic CI step: compress (or take a prebuilt file), check it against the repository's budgets
# and a baseline report, and leave a Markdown verdict to post on the pull request.
#
#   MODEL=path/to/model-dir CALIB=calib.txt EVAL=eval.txt examples/ci-check.sh
#
# Budgets live in pyproject.toml under [tool.vlora] (or pass --budgets FILE); a baseline report
# (baseline.json, from an earlier run on the main branch) catches growth and accuracy drops.
# Exit code: 0 all budgets hold, 1 a budget is exceeded, 2 unusable input.
set -euo pipefail
MODEL=${MODEL:?set MODEL to the model folder}
OUT=${OUT:-build}
mkdir -p "$OUT"
if [ ! -f "$OUT/model.vlora.safetensors" ]; then
  vlora-compress "$MODEL" --target-size "${TARGET:-0.5}" --target-of stack \
      ${CALIB:+--calib "$CALIB"} ${EVAL:+--eval "$EVAL" --eval-samples 300} \
      -o "$OUT/model.vlora.safetensors" --report "$OUT/report.json" --force -q > /dev/null
fi
status=0
vlora-inspect check "$OUT/report.json" ${BASELINE:+--baseline "$BASELINE"} --markdown > "$OUT/check.md" || status=$?
cat "$OUT/check.md"
exit $status
