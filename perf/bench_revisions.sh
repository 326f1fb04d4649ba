#!/usr/bin/env bash
# Same-run comparison of two revisions of Offramp: alternating runs of `offramp bench` (default
# model, 64 tokens per request, ignore EOS, 2 threads) at concurrency 1 and 16, REPEATS pairs each;
# prints every JSON line with its revision and the medians. The working tree is never touched: each
# revision is checked out into a temporary worktree and run from there with this venv.
# Usage: perf/bench_revisions.sh BEFORE_REV AFTER_REV [REPEATS] [extra bench flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
before=$1 after=$2 repeats=${3:-3}
shift $(( $# < 3 ? $# : 3 ))
extra=("$@")
PY=$PWD/.venv/bin/python
tmp=$(mktemp -d)
trap 'git worktree remove --force "$tmp/before" 2>/dev/null; git worktree remove --force "$tmp/after" 2>/dev/null; rm -rf "$tmp"' EXIT
git worktree add -q --detach "$tmp/before" "$before"
git worktree add -q --detach "$tmp/after" "$after"
run() {  # tree concurrency
  local tree=$1 c=$2 n=$(( $2 == 1 ? 8 : 32 )) cli=offramp.cli.main
  [ -f "$tree/backend/offramp/cli.py" ] && cli=offramp.cli
  (cd "$tree" && PYTHONPATH=backend:export:client "$PY" -m "$cli" bench --model default --concurrency "$c" \
     --num-requests "$n" --max-tokens 64 --ignore-eos --num-threads 2 --json "${extra[@]}" 2>/dev/null | tail -1)
}
for c in 1 16; do
  for i in $(seq "$repeats"); do
    for rev in before after; do
      line=$(run "$tmp/$rev" "$c")
      echo "{\"revision\": \"$rev\", \"rev\": \"$(git rev-parse --short "${!rev}")\", \"run\": $i, \"result\": $line}"
    done
  done
done | tee "$tmp/runs.jsonl"
"$PY" - "$tmp/runs.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for c in sorted({r["result"]["concurrency"] for r in rows}):
    med = {rev: statistics.median(r["result"]["tokens_per_s"] for r in rows
                                  if r["revision"] == rev and r["result"]["concurrency"] == c)
           for rev in ("before", "after")}
    print(json.dumps({"concurrency": c, "before_tokens_per_s": med["before"], "after_tokens_per_s": med["after"],
                      "after_over_before": round(med["after"] / med["before"], 3)}))
PY
