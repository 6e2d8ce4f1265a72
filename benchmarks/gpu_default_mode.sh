#!/bin/bash
# The default-mode GPU runs (vLLM 0.26 with torch.compile + CUDA graphs, prefix caching on),
# each part short enough for one device call (< 10 minutes). vLLM must be in /tmp/site
# (benchmarks/gpu_stage_site.sh install). Results go under $OUT (default /tmp/out).
#
#   bash benchmarks/gpu_default_mode.sh check     # gpu_check: inspect, control, equality (bf16)
#   bash benchmarks/gpu_default_mode.sh qwen      # TTFT grid, Qwen2.5-Coder-0.5B shape: plain, dram, epic (+ decode host profile)
#   bash benchmarks/gpu_default_mode.sh overhead  # Qwen shape: decode of plain / no-op connector / Blend engines (each twice), host profiles
#   bash benchmarks/gpu_default_mode.sh ab        # Qwen shape: TTFT of requests that run vLLM's prefill: plain, no-op connector, ucm Blend
#   bash benchmarks/gpu_default_mode.sh abmin     # the same, plain and Blend engines at 8K only
#   bash benchmarks/gpu_default_mode.sh paired    # Qwen shape: plain, no-op connector and ucm alive at once, each prompt to all (paired_ttft.py)
#   bash benchmarks/gpu_default_mode.sh hostprof  # Qwen shape: cProfile of plain-run, cold and back-to-back cold requests, plain and dram
#   bash benchmarks/gpu_default_mode.sh blendcost # Qwen shape: where a Blend step's time goes (always blend; host times, torch profile)
#   bash benchmarks/gpu_default_mode.sh llamacost # the same, Llama-3-8B shape at 4K and 8K, and Blend steps on native ops
#   bash benchmarks/gpu_default_mode.sh llama     # TTFT grid, Llama-3-8B shape: plain, plain_eager, dram (+ 32 concurrent, decode)
#   bash benchmarks/gpu_default_mode.sh epic      # Llama-3-8B shape at 4K/8K: plain, epic
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:. VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
GRID=(--mode default --chunks 2 4 8 16 --ratios 0 0.15 --reps 8 --cold-reps 3 --max-model-len 10240)

ttft() {  # name, seconds, args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PY" benchmarks/ttft_gpu.py --out-dir "$OUT/$name" --work-dir "/tmp/work_$name" --name "$name" "$@" \
    > "$OUT/$name.log" 2>&1
  echo "$name rc $?"
  tail -n 25 "$OUT/$name.log"
  rm -f "$OUT/$name"/extras.tgz
  # One file back per run (the device returns at most 8): the merged results, and each
  # engine's own result even when the run was cut off before merging.
  mkdir -p "$OUT/$name"
  cp /tmp/work_"$name"/result_*.json /tmp/work_"$name"/hostprofile_decode_*.txt "$OUT/$name"/ 2>/dev/null
  tar czf "$OUT/$name.tgz" -C "$OUT" "$name" && rm -rf "${OUT:?}/$name"
}

case "${1:-}" in
check)
  timeout "${2:-240}" "$PY" benchmarks/gpu_check.py --only inspect control equality --mode default --dtypes bfloat16 \
    --out "$OUT/gpu_check_default.json" --workdir /tmp/gpu_check > "$OUT/gpu_check.log" 2>&1
  echo "check rc $?"; grep -A3 "^SUMMARY" "$OUT/gpu_check.log"
  ;;
qwen)
  ttft ttft_qwen "${2:-330}" --shape qwen0.5b --model-dir /tmp/qwen05-shape --model-label "Qwen2.5-Coder-0.5B shape (dummy bf16)" \
    --engines plain dram epic --epic-ks 16 "${GRID[@]}" --concurrency 32 --tput-chunks 16 --decode-profile \
    --tput-max-tokens 128 --decode-batches 1 32 --decode-chunks 8 --host-times
  ;;
overhead)  # where a step's host time goes with ucm loaded: decode per engine kind, host profile of plain-decided requests
  ttft ttft_qwen_decode "${2:-300}" --shape qwen0.5b --model-dir /tmp/qwen05-shape --model-label "Qwen2.5-Coder-0.5B shape (dummy bf16)" \
    --engines plain noop dram plain_again dram_again --mode default --chunks 16 --decode-only --decode-profile --decode-batches 1 32 --decode-chunks 8 \
    --max-model-len 10240 --concurrency 0
  [ "${3:-200}" = 0 ] && exit 0  # 0: the decode part only
  ttft ttft_qwen_hostprof "${3:-200}" --shape qwen0.5b --model-dir /tmp/qwen05-shape --model-label "Qwen2.5-Coder-0.5B shape (dummy bf16)" \
    --engines dram --mode default --chunks 16 --ratios 0.15 --reps 6 --cold-reps 0 --warmup-rounds 2 --concurrency 0 \
    --max-model-len 10240 --host-profile --host-profile-reps 3
  cp /tmp/work_ttft_qwen_hostprof/hostprofile_dram_*.txt "$OUT"/ 2>/dev/null
  ;;
ab)  # what a request that runs vLLM's own prefill pays for each layer of ucm (Qwen shape, 1K and 8K)
  ttft ttft_qwen_ab "${2:-330}" --shape qwen0.5b --model-dir /tmp/qwen05-shape --model-label "Qwen2.5-Coder-0.5B shape (dummy bf16)" \
    --engines plain noop dram --mode default --chunks 2 16 --ratios 0.15 --reps 10 --cold-reps 3 --warmup-rounds 2 \
    --concurrency 0 --max-model-len 10240 --host-times --host-profile --host-profile-reps 4 --host-profile-modes blend ratio1
  cp /tmp/work_ttft_qwen_ab/hostprofile_*.txt "$OUT"/ 2>/dev/null
  ;;
abmin)  # the same, plain and Blend engines at 8K only (a short device call)
  ttft ttft_qwen_ab "${2:-240}" --shape qwen0.5b --model-dir /tmp/qwen05-shape --model-label "Qwen2.5-Coder-0.5B shape (dummy bf16)" \
    --engines plain dram --mode default --chunks 16 --ratios 0.15 --reps 10 --cold-reps 3 --warmup-rounds 2 \
    --concurrency 0 --max-model-len 10240 --host-times --host-profile --host-profile-reps 4 --host-profile-modes ratio1
  cp /tmp/work_ttft_qwen_ab/hostprofile_*.txt "$OUT"/ 2>/dev/null
  ;;
paired)  # the same prompts to plain vLLM, a no-op connector and ucm, all alive at once (host drift cancels)
  timeout "${2:-300}" "$PY" benchmarks/paired_ttft.py --pair plain noop dram --shape qwen0.5b --model-dir /tmp/qwen05-shape \
    --mode default --chunks 2 16 --reps "${3:-20}" --cold-reps 1 --warmup-rounds 2 --gpu-mem 0.25 --max-model-len 10240 \
    --decode-batches 1 32 --decode-chunks 8 --decode-tokens 64 \
    --out-dir "$OUT" --work-dir /tmp/work_paired --name paired_qwen > "$OUT/paired_qwen.log" 2>&1
  echo "paired rc $?"; tail -n 12 "$OUT/paired_qwen.log"
  ;;
hostprof)  # cProfile of plain-run, cold and back-to-back cold requests (Qwen shape, 8K): ucm's host time per function
  ttft ttft_qwen_hostprof "${2:-300}" --shape qwen0.5b --model-dir /tmp/qwen05-shape --model-label "Qwen2.5-Coder-0.5B shape (dummy bf16)" \
    --engines plain dram --mode default --chunks 16 --ratios 0.15 --reps 3 --cold-reps 3 --warmup-rounds 2 --concurrency 0 \
    --max-model-len 10240 --host-times --host-profile --host-profile-reps 3 --host-profile-modes blend cold cold_chained
  cp /tmp/work_ttft_qwen_hostprof/hostprofile_*.txt "$OUT"/ 2>/dev/null
  ;;
blendcost)  # the Blend step's cost on a host-bound model: pay policy off, ucm's host phases, a torch profile
  ttft ttft_qwen_blendcost "${2:-420}" --shape qwen0.5b --model-dir /tmp/qwen05-shape --model-label "Qwen2.5-Coder-0.5B shape (dummy bf16)" \
    --engines plain dram --mode default --chunks 2 16 --ratios 0 0.15 --reps 6 --cold-reps 2 --warmup-rounds 2 \
    --concurrency 0 --max-model-len 10240 --pay-policy always --host-times --profile
  cp /tmp/work_ttft_qwen_blendcost/profile_*.txt "$OUT"/ 2>/dev/null
  ;;
llamacost)  # the same for the Llama-3-8B shape at 4K and 8K
  ttft ttft_llama_blendcost "${2:-420}" --engines plain dram dram_nativeops --mode default --chunks 8 16 --ratios 0 0.15 --reps 6 \
    --cold-reps 0 --warmup-rounds 2 --concurrency 0 --max-model-len 10240 --pay-policy always --host-times --profile
  cp /tmp/work_ttft_llama_blendcost/profile_*.txt "$OUT"/ 2>/dev/null
  ;;
llama)
  ttft ttft_llama "${2:-580}" --engines plain dram plain_eager "${GRID[@]}" --concurrency 32 --tput-chunks 16 \
    --tput-max-tokens 128 --decode-batches 1 32 --decode-chunks 8 --host-times
  ;;
epic)
  ttft ttft_epic "${2:-400}" --engines plain epic --epic-ks 16 32 --mode default --chunks 8 16 --reps 6 \
    --cold-reps 0 --concurrency 0 --max-model-len 10240
  ;;
*)
  echo "usage: $0 check|qwen|overhead|ab|abmin|paired|hostprof|blendcost|llamacost|llama|epic [seconds]" >&2; exit 2
  ;;
esac
