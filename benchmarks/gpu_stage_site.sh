#!/bin/bash
# Stage vLLM 0.26.0 and the packages it imports on the GPU host in two transfers, not six.
#
# scripts/stage_vllm_gpu.sh ships the wheel as it is (289 MiB: six 51 MiB parts plus the
# dependency wheels, seven device calls). Most of it is kernels a dense model on Hopper
# never loads: FlashAttention 2 (vLLM picks FA3 on SM90; the FA2 import is optional), the
# MoE kernels (an optional import) and the Rust frontend binary (`vllm serve` only). This
# script unpacks the wheel and the dependency wheels into one tree without those three
# files, packs it as tar.xz (95 MiB) and cuts it into two parts; on the host the parts are
# joined, checked (sha256) and unpacked into /tmp/site, which is what
# `pip install --target /tmp/site` of the same wheels gives for importing.
#
#   bash benchmarks/gpu_stage_site.sh build VLLM_WHEEL DEPS_DIR [DIR]  # here: DIR/t0, DIR/t1
#   # then on the host, one device call per part, carrying DIR/tK (back to back: the host
#   # keeps the parts in ~/gw only while it stays warm):
#   #   bash benchmarks/gpu_stage_site.sh install DIR
# DEPS_DIR: the dependency wheels of ../shared/gpu/stage_wheels.sh (its DEST/pdeps), plus isal.
set -eu
case "${1:-}" in
build)
  wheel=$2; deps=$3; dir=${4:-.gpuwhl}
  tmp=$(mktemp -d)
  mkdir -p "$tmp/site"
  unzip -q "$wheel" -d "$tmp/site"
  rm -f "$tmp/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$tmp/site/vllm/_moe_C_stable_libtorch.abi3.so" \
    "$tmp/site/vllm/vllm-rs"
  for w in "$deps"/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
  tar -C "$tmp/site" -cf - . | xz -T0 -6 > "$tmp/site.tar.xz"
  rm -rf "$dir"/t[0-9]
  split -n 2 -d -a 1 "$tmp/site.tar.xz" "$tmp/site.part"
  for i in 0 1; do
    mkdir -p "$dir/t$i"
    mv "$tmp/site.part$i" "$dir/t$i/"
    sha256sum "$tmp/site.tar.xz" | cut -d' ' -f1 > "$dir/t$i/site.sha256"
  done
  rm -rf "$tmp"
  du -sh "$dir"/t[0-9]
  ;;
install)
  src=${2:-.gpuwhl}
  mkdir -p "$HOME/gw"
  for d in "$src"/t[0-9]; do [ -d "$d" ] && cp "$d"/* "$HOME/gw/"; done
  cd "$HOME/gw"
  ls site.part* | tr '\n' ' '; echo
  if [ -f site.part0 ] && [ -f site.part1 ]; then
    cat site.part0 site.part1 > site.tar.xz
    echo "$(cat site.sha256)  site.tar.xz" | sha256sum -c -
    mkdir -p /tmp/site
    if command -v xz >/dev/null; then xz -d -T0 < site.tar.xz | tar -C /tmp/site -xf -
    else python3 -c "import tarfile; tarfile.open('site.tar.xz').extractall('/tmp/site')"; fi
    PYTHONPATH=/tmp/site python3 -c "import vllm; print('vllm', vllm.__version__, 'ready in /tmp/site')"
  fi
  ;;
*)
  echo "usage: $0 build VLLM_WHEEL DEPS_DIR [DIR] | install [DIR]" >&2; exit 2
  ;;
esac
