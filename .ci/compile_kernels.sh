#!/usr/bin/env bash
# Compile checks for csrc/ that need no GPU:
#   1. every csrc/*_kernel.cu is compiled by nvcc for sm_80 (A100), sm_86 (A10/3090),
#      sm_89 (L4/Ada) and sm_90a (H100, arch-specific features), with the half/bf16 macros that
#      torch.utils.cpp_extension passes, so implicit conversions are caught here; a ptxas
#      "Potential Performance Loss" note (e.g. wgmma serialized) fails the check too;
#   2. every csrc/*.cpp (the torch bindings) is syntax-checked with g++ against the installed torch's
#      headers. It uses only device-generic torch headers, so a CPU-only torch
#      wheel is enough; torch's headers are -isystem so only our warnings count.
# Run from the repository root with the project's python on PATH.
set -euo pipefail

cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
command -v "$NVCC" >/dev/null || { echo "compile_kernels: nvcc not found (set NVCC or PATH)" >&2; exit 1; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

ARCHS=("compute_80,sm_80" "compute_86,sm_86" "compute_89,sm_89" "compute_90a,sm_90a")
TORCH_NVCC_DEFINES=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
                    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)

shopt -s nullglob
kernels=(csrc/*_kernel.cu)
[ ${#kernels[@]} -gt 0 ] || { echo "compile_kernels: no csrc/*_kernel.cu found" >&2; exit 1; }

# One nvcc per (file, arch), run in parallel; each logs to its own file.
pids=(); jobs_desc=()
for src in "${kernels[@]}"; do
  for arch in "${ARCHS[@]}"; do
    tag="$(basename "$src" .cu).${arch#*,}"
    "$NVCC" -c "$src" -o "$TMP/$tag.o" -std=c++17 -O2 -lineinfo -Icsrc \
      -gencode "arch=${arch%,*},code=${arch#*,}" "${TORCH_NVCC_DEFINES[@]}" -Xptxas -v \
      -Xcompiler -Wall,-Wno-unknown-pragmas -Werror all-warnings >"$TMP/$tag.log" 2>&1 &
    pids+=($!); jobs_desc+=("$src|${arch#*,}|$tag")
  done
done

# Syntax check of the bindings while nvcc runs.
PY="${PYTHON:-python}"
TORCH_INC="$("$PY" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))')"
PY_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
isystem=()
for d in $TORCH_INC "$PY_INC"; do isystem+=(-isystem "$d"); done
for src in csrc/*.cpp; do
  tag="$(basename "$src" .cpp).host"
  "${CXX:-g++}" -fsyntax-only -std=c++17 -Wall -Wextra -Werror -Icsrc "${isystem[@]}" \
    "$src" >"$TMP/$tag.log" 2>&1 &
  pids+=($!); jobs_desc+=("$src|g++ -fsyntax-only|$tag")
done

failed=0
for i in "${!pids[@]}"; do
  IFS='|' read -r src arch tag <<<"${jobs_desc[$i]}"
  if wait "${pids[$i]}" && ! grep -q "Performance Loss" "$TMP/$tag.log"; then
    echo "ok    $src ($arch)"
  else
    echo "FAIL  $src ($arch)" >&2
    sed 's/^/    /' "$TMP/$tag.log" >&2
    failed=1
  fi
done
exit $failed
