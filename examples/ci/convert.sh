#!/usr/bin/env bash
# The model-conversion step of a CI pipeline: optimize, check the quality gate on held-out
# samples, export, verify the artifact against the PyTorch runtime, write the report.
#
#   examples/ci/convert.sh [MODEL] [PROFILE] [OUT]
#   (defaults: $DITOPT_MODEL or dit-digits, $DITOPT_PROFILE or balanced, $DITOPT_OUT or out/convert)
#
# Writes OUT/artifact (only when the gate passes), OUT/report.json and OUT/summary.md, appends the
# summary to $GITHUB_STEP_SUMMARY when that is set, and exits with ditopt's code:
# 0 artifact written, 1 quality gate failed (no artifact), 2 bad input.
set -uo pipefail

model="${1:-${DITOPT_MODEL:-dit-digits}}"
profile="${2:-${DITOPT_PROFILE:-balanced}}"
out="${3:-${DITOPT_OUT:-out/convert}}"
mkdir -p "$out"

ditopt export "$model" "$out/artifact" --profile "$profile" \
    --report "$out/report.json" --markdown "$out/summary.md"
code=$?

if [ -n "${GITHUB_STEP_SUMMARY:-}" ] && [ -f "$out/summary.md" ]; then
    cat "$out/summary.md" >> "$GITHUB_STEP_SUMMARY"
fi
case "$code" in
    0) echo "converted $model with $profile: $out/artifact" ;;
    1) echo "quality gate failed for $model with $profile: no artifact; see $out/report.json" >&2 ;;
    *) echo "conversion of $model with $profile failed (exit $code); see the error above" >&2 ;;
esac
exit "$code"
