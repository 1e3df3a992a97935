#!/usr/bin/env bash
# The checks only a GPU can run, in one go, into one report (under 8 minutes on one H100/H200: every part has a
# time limit, and they add up to less).
#
#   scripts/gpu_check.sh [--out DIR] [--python PY] [--wheels DIR] [--arch-dir DIR] [--dry-run]
#
#   1 environment    the GPU, Python and the packages the checks import (any missing: the report says which)
#   2 gpu-tests      pytest -m gpu tests/test_gpu.py: QLoRA gradients against a dequantized reference, a bf16
#                    run, 4-bit gradients after an eval forward, packed attention = padded, ZeRO-2 in one process
#   3 mfu            the bench: LoRA SFT on the Qwen2.5-1.5B architecture, sequence 2048, bf16: MFU; and LoRA
#                    vs full fine-tune tokens/s (same rows, same step)
#   4 ours-vs-trl    the scale suite's compare part on this GPU: SFT and DPO, ours vs TRL default / best / Liger
#                    (Qwen2.5-0.5B architecture, 2 × 1,024 tokens): peak memory per process, time per token
#   5 qlora-7b       the scale suite's qlora part: QLoRA peak memory and step time on the Mistral-7B-v0.3
#                    architecture at sequence 512 (and Llama-3.2-1B QLoRA vs LoRA)
#
# A part that fails or runs out of time is reported as such and the next one runs (a failed environment part
# ends the check: without CUDA or a package the others cannot say more). --dry-run prints what would
# run and be written, and runs nothing (it needs no GPU). --wheels DIR installs the wheels in DIR first (offline,
# into DIR/../site on PYTHONPATH), for a machine whose Python lacks some of the packages.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INVOCATION="scripts/gpu_check.sh $*"
OUT_DIR="$ROOT/outputs/gpu_check"  # outputs/ is git-ignored
PYTHON="${PYTHON:-}"
WHEELS=""
ARCH_DIR="/tmp/bench-arch"
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --arch-dir) ARCH_DIR="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$PYTHON" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
REPORT="$OUT_DIR/gpu_check_report.md"
BENCH="$PYTHON -m peftlab.bench --arch-dir $ARCH_DIR"

PARTS=(environment gpu-tests mfu ours-vs-trl qlora-7b)
LIMITS=(15 110 75 130 140)  # seconds each: 470 in all
COMMANDS=(
  "$PYTHON -m peftlab.bench.environment"
  "$PYTHON -m pytest -m gpu tests/test_gpu.py -q -s -p no:cacheprovider"
  "$BENCH --model qwen2.5-1.5b --seq-len 2048 --algo sft --peft lora,none --trl '' --batch-size 4 --steps 4 --warmup 1 --out $OUT_DIR/mfu"
  "$BENCH --suite scale --parts compare --jobs 3 --out $OUT_DIR/ours-vs-trl"
  "$BENCH --suite scale --parts qlora --jobs 3 --mem-limit-gb 100 --out $OUT_DIR/qlora-7b"
)
RESULTS=(
  ""
  ""
  "$OUT_DIR/mfu/bench.md"
  "$OUT_DIR/ours-vs-trl/scale.md"
  "$OUT_DIR/qlora-7b/scale.md"
)

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check.sh --dry-run: would run, from $ROOT, with $PYTHON:"
  [ -n "$WHEELS" ] && echo "  first: pip install --no-index --no-deps --target $(dirname "$WHEELS")/site $WHEELS/*.whl"
  for i in "${!PARTS[@]}"; do
    echo "  $((i + 1)) ${PARTS[$i]} (at most ${LIMITS[$i]} s): ${COMMANDS[$i]}"
    [ -n "${RESULTS[$i]}" ] && echo "      its tables: ${RESULTS[$i]}"
  done
  echo "and write the report $REPORT (logs in $OUT_DIR/logs/)"
  exit 0
fi

mkdir -p "$OUT_DIR/logs"
cd "$ROOT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -n "$WHEELS" ]; then
  SITE="$(cd "$(dirname "$WHEELS")" && pwd)/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check.sh: installing the wheels in $WHEELS failed" >&2; exit 1; }
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi

{
  echo "# GPU check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname); \`$INVOCATION\`; commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
} > "$REPORT"

failed=0
for i in "${!PARTS[@]}"; do
  part="${PARTS[$i]}"
  log="$OUT_DIR/logs/$part.log"
  echo "== $((i + 1)) $part (at most ${LIMITS[$i]} s)"
  started=$(date +%s)
  timeout --signal=TERM --kill-after=10 "${LIMITS[$i]}" bash -c "${COMMANDS[$i]}" > "$log" 2>&1
  status=$?
  elapsed=$(( $(date +%s) - started ))
  case $status in
    0) verdict="passed" ;;
    124|137) verdict="ran out of its ${LIMITS[$i]} s"; failed=1 ;;
    *) verdict="failed (exit $status)"; failed=1 ;;
  esac
  echo "   $verdict in ${elapsed} s (log $log)"
  {
    echo
    echo "## $((i + 1)) $part: $verdict in ${elapsed} s"
    echo
    echo "\`${COMMANDS[$i]}\`"
    echo
    if [ -n "${RESULTS[$i]}" ] && [ -f "${RESULTS[$i]}" ] && [ "$status" = 0 ]; then
      cat "${RESULTS[$i]}"
    else
      echo '```'
      grep -v -i -E "warning|warn\(|^\s*$" "$log" | tail -n 40
      echo '```'
    fi
  } >> "$REPORT"
  if [ "$part" = environment ] && [ "$status" != 0 ]; then
    echo "   the environment is not ready: nothing else runs" | tee -a "$REPORT"
    break
  fi
done
echo "wrote $REPORT"
exit $failed
