#!/usr/bin/env bash
# Every GPU row that benchmarks/README.md still lacks, as one command for a lent device machine (meant to fit one
# device command of at most 10 minutes, not yet run on a GPU; 8 files come back from $OUT).
#
#   1. family_speed.py: LLaVA-NeXT-7B (672x672) and Qwen2.5-VL-7B (1008x1008), whole models, random weights
#   2. leverage_speed.py --large --device cuda: selection at 2880x1024, 2880x4096, 8192x1280
#   3. llava_speed.py: LLaVA-1.5-7B, whole model, random weights
#
# Each step runs on even if an earlier one failed; its output goes to $OUT/gpu_rows.log.
#
# The device image's transformers (5.17 when last read) is older than pyproject's ">=5.20"; bring a wheel along.
# Here, once per session (.whl/ is then git-ignored):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl transformers==5.24.0
# then call the device tool's run with carry [".whl"] and the command `bash benchmarks/gpu_rows.sh`.
#
# Smoke test on the CPU first (truncated models, one repeat; a few minutes on 2 cores):
#   PYTHON=.venv/bin/python DEVICE=cpu SMOKE=1 OUT=/tmp/gpu_smoke bash benchmarks/gpu_rows.sh
set -uo pipefail

PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-out/gpu_rows}
mkdir -p "$OUT"
LOG="$OUT/gpu_rows.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" - >>"$LOG" 2>&1 <<'EOF'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("transformers", transformers.__version__)
EOF

if [ -n "${SMOKE:-}" ]; then
    FAMILY_CUT=(--text-layers 3 --vision-layers 1 --budgets 64 --methods svd,fastv --repeats 1)  # FastV cuts after layer 2
    LLAVA_CUT=(--text-layers 1 --budgets 64 --methods svd --repeats 1)
    LARGE=(--large-repeats 1)
else
    FAMILY_CUT=(--methods svd,fastv,random)
    LLAVA_CUT=()
    LARGE=()
fi

step() {  # step NAME CMD...: run, time and log one benchmark; a failure is logged, not fatal
    local name=$1 t0=$SECONDS
    shift
    echo "=== $name: $*" >>"$LOG"
    "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0)) s" >>"$LOG"
}

step family-next "$PY" benchmarks/family_speed.py --config llava-v1.6-vicuna-7b --image 672x672 --device "$DEVICE" \
    "${FAMILY_CUT[@]}" --out "$OUT/family_speed_llava_next_cuda.md"
step family-qwen "$PY" benchmarks/family_speed.py --config qwen2.5-vl-7b --image 1008x1008 --device "$DEVICE" \
    "${FAMILY_CUT[@]}" --out "$OUT/family_speed_qwen_cuda.md"
step leverage-large "$PY" benchmarks/leverage_speed.py --large --device "$DEVICE" "${LARGE[@]}" \
    --out "$OUT/leverage_speed_large_cuda.md"
step llava "$PY" benchmarks/llava_speed.py --random-weights --config llava-1.5-7b --device "$DEVICE" \
    "${LLAVA_CUT[@]}" --out "$OUT/llava_speed_cuda.md"
grep "^===" "$LOG"
