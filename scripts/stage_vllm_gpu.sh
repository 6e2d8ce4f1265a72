#!/bin/bash
# Stage vLLM 0.26.0 on the lent GPU host in parts that fit one transfer with the working tree.
#
# A transfer to the GPU host carries at most 64 MiB, the working tree (~4 MiB) included, so
# the wheel is split into 51 MiB parts; the host rebuilds it and checks its sha256 before
# installing (docs/GPU.md).
#
#   bash scripts/stage_vllm_gpu.sh split WHEEL [DIR]   # here: DIR/s0..sN (+ vllm.nparts), DIR/gpu/
#   # then one device call per part, carrying [DIR/sK, DIR/gpu]:
#   #   bash DIR/gpu/stage_vllm_gpu.sh install DIR
#   # and a last call carrying [DIR/pdeps, DIR/gpu] (the deps wheels of the shared recipe) that
#   # installs everything into /tmp/site.
set -eu
case "${1:-}" in
split)
  wheel=$2; dir=${3:-.gpuwhl}
  tmp=$(mktemp -d)
  split -b 51M -d -a 1 "$wheel" "$tmp/vllm.part"
  n=$(ls "$tmp"/vllm.part* | wc -l)
  for i in $(seq 0 $((n - 1))); do
    rm -rf "$dir/s$i"; mkdir -p "$dir/s$i"
    mv "$tmp/vllm.part$i" "$dir/s$i/"
    echo "$n" > "$dir/s$i/vllm.nparts"
    sha256sum "$wheel" | cut -d' ' -f1 > "$dir/s$i/vllm.sha256"
  done
  rmdir "$tmp"
  mkdir -p "$dir/gpu"; cp "$0" "$dir/gpu/stage_vllm_gpu.sh"
  echo "$n parts in $dir/s0..s$((n - 1))"
  ;;
install)
  src=${2:-.gpuwhl}
  mkdir -p "$HOME/gw"
  for d in "$src"/s[0-9] "$src"/pdeps; do [ -d "$d" ] && cp "$d"/* "$HOME/gw/"; done
  cd "$HOME/gw"
  ls vllm.part* 2>/dev/null | tr '\n' ' '; echo
  need=$(cat vllm.nparts)
  if ls ./*.whl >/dev/null 2>&1 && [ "$(ls vllm.part* | wc -l)" -ge "$need" ]; then
    out=vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
    for i in $(seq 0 $((need - 1))); do cat "vllm.part$i"; done > "$out"
    echo "$(cat vllm.sha256)  $out" | sha256sum -c -
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$HOME"/gw/*.whl 2>&1 | grep -v WARNING | tail -3 || true
    PYTHONPATH=/tmp/site python3 -c "import vllm; print('vllm', vllm.__version__, 'ready in /tmp/site')"
  fi
  ;;
*)
  echo "usage: $0 split WHEEL [DIR] | install [DIR]" >&2; exit 2
  ;;
esac
