#!/bin/bash
# Quality with real weights on the offline GPU host: Qwen2.5-Coder-0.5B-Instruct,
# 200 HotpotQA questions, modes full_prefill, blend_0, blend_0.15, blend_1.
#
# Staged here with `python benchmarks/qwen_model.py stage` into .gpuwhl/qwen/: q0 ... q7 (GGUF
# pieces, <= 60 MiB each, each with the manifest) and qdeps (gguf wheel, hotpotqa_subset.json).
# vLLM must already be in /tmp/site (docs/GPU.md, scripts/stage_vllm_gpu.sh). Run in the repo root:
#
#   bash benchmarks/quality_gpu.sh part      # one call per carried q<i>/qdeps: copies them to ~/qwen_parts (fast)
#   bash benchmarks/quality_gpu.sh prepare   # part + join + sha256 + gguf on PYTHONPATH + bf16 folder /tmp/qwen
#   bash benchmarks/quality_gpu.sh run [example args...]   # the measurement -> $OUT/quality.json, $OUT/quality/
#   bash benchmarks/quality_gpu.sh all [example args...]   # prepare + run
#   bash benchmarks/quality_gpu.sh methods [quality.py args...]  # every method at equal budgets
#       (benchmarks/quality.py) on the HotpotQA subset and qdeps/squad_multidoc.jsonl
#       (written here by `python -c "...write_squad_multidoc(...)"`, see quality_data.py)
#
# The host forgets ~/qwen_parts and /tmp when it is released (~30 s idle), so the calls must
# follow each other closely. Env: OUT (default /tmp/out), NUM_SAMPLES (200), QWEN_PARTS
# (~/qwen_parts), QWEN_MODEL (/tmp/qwen), QWEN_DTYPE (bfloat16), SITE (/tmp/site), PYTHON (python3).
set -euo pipefail

MODE=${1:-part}
shift || true
REPO=$(cd "$(dirname "$0")/.." && pwd)
STAGE=${QWEN_STAGE:-$REPO/.gpuwhl/qwen}
PARTS=${QWEN_PARTS:-$HOME/qwen_parts}
DEPS=${QWEN_DEPS:-$HOME/qwen_deps}
MODEL=${QWEN_MODEL:-/tmp/qwen}
DTYPE=${QWEN_DTYPE:-bfloat16}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/out}
NUM_SAMPLES=${NUM_SAMPLES:-200}
GGUF=$PARTS/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
SUBSET=$PARTS/hotpotqa_subset.json
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

collect() {
    mkdir -p "$PARTS"
    local moved=0 d
    for d in "$STAGE"/q[0-9]* "$STAGE"/qdeps; do
        [ -d "$d" ] || continue
        if compgen -G "$d/*" >/dev/null; then cp -f "$d"/* "$PARTS"/; moved=1; fi
    done
    [ "$moved" = 1 ] || echo "nothing staged under $STAGE"
    local have want
    have=$(ls "$PARTS" | grep -c '^part[0-9][0-9][0-9]$' || true)
    want=$([ -f "$PARTS/manifest.json" ] && "$PY" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['parts']))" "$PARTS/manifest.json" || echo '?')
    echo "$PARTS: $have of $want GGUF parts;" \
        "$(ls "$PARTS" | grep -E '\.whl$|\.json$' | grep -v manifest | tr '\n' ' ')"
}

prepare() {
    collect
    if [ ! -f "$MODEL/.ucm_converted.json" ] || ! "$PY" -c "import json,sys; sys.exit(json.load(open(sys.argv[1])).get('dtype') != sys.argv[2])" "$MODEL/.ucm_converted.json" "$DTYPE"; then
        "$PY" "$REPO/benchmarks/qwen_model.py" join --parts "$PARTS" --out "$GGUF"
        local wheel
        wheel=$(ls "$PARTS"/gguf-*-py3-none-any.whl | head -1)
        [ -d "$DEPS/gguf" ] || "$PY" -m zipfile -e "$wheel" "$DEPS"
        PYTHONPATH="$DEPS:$REPO" "$PY" -c "import gguf, transformers; print('gguf', gguf.__file__, 'transformers', transformers.__version__)"
        PYTHONPATH="$DEPS:$REPO" "$PY" "$REPO/benchmarks/qwen_model.py" convert --gguf "$GGUF" --out "$MODEL" --dtype "$DTYPE"
    else
        echo "$MODEL: already converted ($DTYPE)"
    fi
    ls -la "$MODEL"
    [ -f "$SUBSET" ] || { echo "missing $SUBSET (carry .gpuwhl/qwen/qdeps)"; exit 2; }
}

run() {
    [ -f "$MODEL/.ucm_converted.json" ] || { echo "no converted model in $MODEL: run prepare first"; exit 2; }
    [ -f "$SUBSET" ] || { echo "missing $SUBSET"; exit 2; }
    [ -d "$SITE/vllm" ] || { echo "vLLM is not staged in $SITE"; exit 2; }
    mkdir -p "$OUT"
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
    cd "$REPO"
    PYTHONPATH="$SITE:$REPO" VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0 \
        "$PY" examples/offline_inference_blend.py --model "$MODEL" --dataset "$SUBSET" \
        --num-samples "$NUM_SAMPLES" --ratios 0 0.15 1.0 --dtype "$DTYPE" --max-tokens 32 \
        --output-json "$OUT/quality.json" --output-dir "$OUT/quality" "$@" 2>&1 | tee "$OUT/quality.log"
}

methods() {
    [ -f "$MODEL/.ucm_converted.json" ] || { echo "no converted model in $MODEL: run prepare first"; exit 2; }
    [ -f "$PARTS/squad_multidoc.jsonl" ] || { echo "missing $PARTS/squad_multidoc.jsonl (carry qdeps)"; exit 2; }
    mkdir -p "$OUT"
    cd "$REPO"
    PYTHONPATH="$SITE:$REPO" VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0 \
        "$PY" benchmarks/quality.py --model "$MODEL" --dtype "$DTYPE" --max-tokens 32 \
        --datasets "$SUBSET:$NUM_SAMPLES" "$PARTS/squad_multidoc.jsonl:100" \
        --out-dir "$OUT/quality_methods" --work-dir /tmp/quality_methods "$@" 2>&1 | tail -n 60
}

case "$MODE" in
    part) collect ;;
    prepare) prepare ;;
    run) run "$@" ;;
    all) prepare; run "$@" ;;
    methods) methods "$@" ;;
    *) echo "usage: $0 part|prepare|run|all|methods [args...]"; exit 2 ;;
esac
