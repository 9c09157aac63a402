#!/usr/bin/env bash
# The whole GPU benchmark set in one call, each step under `timeout`, Markdown tables to files.
#
#   benchmarks/gpu.sh [--smoke] [OUT_DIR]
#
# OUT_DIR defaults to $OUT, else benchmarks/results. Each step writes OUT_DIR/<step>.md (its
# tables) and OUT_DIR/<step>.log (stderr); OUT_DIR/summary.md lists each step's status and time.
# On one H200 the GPU set (LLaVA-NeXT-7B shapes in float16) takes about 5-7 minutes.
# --smoke: tiny sizes on the CPU, every code path once (a CI check, not a measurement).
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -u
cd "$(dirname "$0")/.."

smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
out_dir="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out_dir"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [ "$smoke" = 1 ]; then
  common=(--device cpu --dtype float32 --repeats 1 --warmup 1 --threads 1)
  e2e=(--vision-width 32 --llm-width 64 --llm-layers 1 --image 336x336 --budgets 0.2,0.1
       --batch-sizes 1,2 --new-tokens 1 --no-memory --llm-modes eager,cudagraph)
  strategies=(--tower-layers 1 --warmup 0 --inner 1 --only 'hired,cls_final,hired + cls_final' --batch-sizes 1,2)
  tap=(--width 64 --layers 2 --crops 1)
  relevance=(--layers 1 --text-layers 1 --crop-size 112 --crops 2 --batch 2)
  limits=(300 300 300 300 600)  # guards only: a loaded CI machine is slow
else
  common=(--device cuda --dtype float16)
  e2e=(--repeats 5 --warmup 1 --vision-width 1024 --llm-width 4096 --llm-layers 32 --budgets 0.2,0.1
       --batch-sizes 1,4,8 --llm-modes eager,cudagraph)
  strategies=(--repeats 5 --warmup 1 --inner 3 --batch-sizes 1,8)
  tap=(--repeats 20 --warmup 2)
  relevance=(--repeats 10 --warmup 2)
  limits=(200 100 45 45 240)
fi

summary="$out_dir/summary.md"
{
  echo "# benchmarks/gpu.sh$([ "$smoke" = 1 ] && echo ' --smoke')"
  echo
  echo "| step | command | status | seconds |"
  echo "|---|---|---|---:|"
} > "$summary"
failed=0

step() {  # step NAME LIMIT SCRIPT ARGS...
  local name=$1 limit=$2 script=$3
  shift 3
  local start=$SECONDS status
  timeout --kill-after=10 "$limit" "$PYTHON" -u "benchmarks/$script" "$@" > "$out_dir/$name.md" 2> "$out_dir/$name.log"
  local rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s"; failed=1 ;;
    *) status="failed (exit $rc, see $name.log)"; failed=1 ;;
  esac
  echo "| $name | \`$script $*\` | $status | $((SECONDS - start)) |" >> "$summary"
  echo "$name: $status ($((SECONDS - start)) s)"
}

step e2e "${limits[0]}" e2e.py "${common[@]}" "${e2e[@]}"
step strategies "${limits[1]}" strategies.py "${common[@]}" "${strategies[@]}"
step tap "${limits[2]}" tap.py "${common[@]}" "${tap[@]}"
step relevance "${limits[3]}" relevance.py "${common[@]}" "${relevance[@]}"
if [ "$smoke" = 1 ]; then check=(--no-tests); else check=(); fi
step check "${limits[4]}" gpu_check.py "${check[@]}"  # every strategy prepare+generate, CUDA sync tests
echo "tables in $out_dir (summary: $summary)"
exit $failed
