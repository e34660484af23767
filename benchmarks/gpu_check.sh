#!/usr/bin/env bash
# Everything a GPU machine should check, in one run: build the CUDA extension
# against the installed CUDA torch, run the test suite (GPU tests included),
# run the CUDA kernel tests under compute-sanitizer memcheck, time the
# kernels, then profile one layer's weight-only kernels with Nsight Compute.
# Each phase is time-boxed and logged to OUTDIR, and a failing phase does not
# stop the later ones. Last, promote.md says per opt-in kernel how its tests
# went and how it timed against the default kernel (promote_report.py).
#
#   bash benchmarks/gpu_check.sh OUTDIR [TESTS] [BENCH_ARGS...]
#
# TESTS: pytest targets (default: tests). BENCH_ARGS go to bench_linear.py.
# Environment: ARCH (default 9.0a), BUILD_S / TEST_S / SANITIZE_S / SANITIZE_FULL_S /
# BENCH_S / DECODE_S / HOST_S / SWEEP_S / TRITON_SWEEP_S / PROFILE_S / CPP_CHECKS_S /
# ERROR_PATH_S phase limits in seconds (0 skips that phase; the build is skipped when the
# extension there was built from the same csrc/, setup.py and ARCH, and a failed
# build is followed by a Python-only install so the Triton phases still run;
# SANITIZE_S bounds the memcheck smoke run, SANITIZE_FULL_S (default SANITIZE_S) the
# full one, PROFILE_S each ncu run, so keep the sum under the machine's per-command
# limit); TEST_TIMEOUT: seconds one test may take (pytest-timeout, where
# installed; default 90: a hanging kernel ends its test, not the phase); MARK: pytest -m expression of the test phase (default "not
# cpp_checks": the tests that hand an op bad arguments run in their own phase
# at the end, with a diagnosis of how a C++ exception reaches Python there,
# since on one machine such calls crashed the process); SKIP_PASSED: a file of
# test node ids to leave out (tests that already passed on a GPU with the same
# kernels); ARCHIVE: also pack OUTDIR into this .tgz after every phase (for a
# runner that brings back only a few files, also when the run is cut short);
# DECODE_ENABLE: opt-in kernels for the whole-decoder run; SWEEP_ARGS go to
# sweep_weight_only.py (the work-split sweep), TRITON_SWEEP_ARGS to
# sweep_triton_int_act.py (Triton W8A8 tile configs) and PROFILE_ARGS to the
# weight-only profile_linear.py run (default: gate/up, M = 1, W4 g128, the
# default kernel and the two opt-in decodes), both split on spaces (so no
# shape or format names there).
# More runs profile the qkv layer at M = 1, W8A8 at M = 4096 (mma.sync and
# wgmma GEMMs) and at M = 1 and 16 (spread and plain reads), binary at M = 1
# and 16 (lookup-table, then the plane GEMM) and the dequantize
# kernel W4 prefill runs in front of cuBLAS next to the Hopper weight-only
# kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUTDIR [TESTS] [BENCH_ARGS...]}
tests=${2:-tests}
shift $(( $# >= 2 ? 2 : $# ))
mkdir -p "$out"
out=$(cd "$out" && pwd)   # absolute: later phases run from benchmarks/
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
pack() {  # through a temporary file: a run killed while packing keeps the last archive
  [ -n "${ARCHIVE:-}" ] && tar czf "$ARCHIVE.tmp" -C "$(dirname "$out")" "$(basename "$out")" \
    && mv "$ARCHIVE.tmp" "$ARCHIVE"
  return 0
}
phase() { echo "== $1: rc=$2 after $(( $(date +%s) - $3 )) s"; pack; }
# timeout stops compute-sanitizer, not the process it watches, which would go on
# running kernels through the timings: end every test process a phase leaves
settle() { pkill -9 -f "pytest -q|exec\(eval\(sys.stdin" 2>/dev/null; sleep 1; }  # + xdist workers

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
# does a failed C++ check in torch itself raise here, or crash the process?
# (the kernels' bad-input tests depend on it)
for dev in cpu cuda; do
  "$py" -c "import torch
try:
    torch.empty(2, 3, device='$dev').view(7)
except RuntimeError:
    print('torch error check on $dev: raises')" 2>/dev/null || echo "torch error check on $dev: crashed (rc=$?)"
done

t=$(date +%s)
# a copied tree gets new file times, so ninja would rebuild everything: compare contents
sources=$(cat setup.py csrc/* | sha1sum | cut -c1-16)-${ARCH:-9.0a}
if ls vlmkern/_C*.so >/dev/null 2>&1 && [ "$(cat build/vlmkern_sources 2>/dev/null)" = "$sources" ]; then
  echo "== build: skipped, the extension there was built from the same sources"
else
  TORCH_CUDA_ARCH_LIST=${ARCH:-9.0a} MAX_JOBS=${MAX_JOBS:-16} timeout "${BUILD_S:-300}" \
    "$py" -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$out/build.log" 2>&1
  rc=$?; phase build $rc "$t"; [ $rc -ne 0 ] && tail -30 "$out/build.log"
  [ $rc -eq 0 ] && mkdir -p build && echo "$sources" >build/vlmkern_sources
  if [ $rc -ne 0 ]; then   # the package without its extension: Triton and torch still run
    VLMKERN_SKIP_CUDA=1 timeout 120 "$py" -m pip install -q --no-build-isolation --no-deps \
      --no-index -e . >"$out/build_python_only.log" 2>&1
    echo "== python-only install: rc=$?"
  fi
fi
"$py" -c 'import vlmkern; from vlmkern.ext import load_extension; print(load_extension()[1]); print(vlmkern.available_backends())'

mark=${MARK:-not cpp_checks}
# parallel test workers where pytest-xdist is installed, one process otherwise
workers() { "$py" -c "import xdist" 2>/dev/null && echo "-n $1"; }
# a per-test limit where pytest-timeout is installed
per_test() { "$py" -c "import pytest_timeout" 2>/dev/null && echo "--timeout ${TEST_TIMEOUT:-90}"; }
skip=()
if [ -n "${SKIP_PASSED:-}" ]; then
  while read -r id; do [ -n "$id" ] && [ "${id#\#}" = "$id" ] && skip+=(--deselect "$id"); done <"$SKIP_PASSED"
fi
if [ "${TEST_S:-300}" -gt 0 ]; then
  t=$(date +%s)
  # the tests this phase should run, so promote_report.py can tell which never did
  "$py" -m pytest -q --collect-only -p no:cacheprovider -m "$mark" "${skip[@]}" $tests \
    2>/dev/null | grep "::" >"$out/collected.txt"
  # SIGINT at the limit: pytest still lists the failures so far and writes the XML
  timeout -s INT -k 30 "${TEST_S:-300}" "$py" -m pytest -q $(workers 8) $(per_test) -p no:cacheprovider \
    -m "$mark" "${skip[@]}" $tests -o junit_family=xunit2 --junitxml="$out/tests.xml" \
    >"$out/tests.log" 2>&1
  rc=$?; phase tests $rc "$t"; grep -E "passed|failed|error" "$out/tests.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -40
fi

# memcheck: first a small run of every kernel family (ragged rows, columns
# and tokens; the tests' sanitizer_smoke), then the kernels' full tests
# (reference equality on awkward shapes) while time remains; one process (the
# sanitizer follows a single process), bad-input tests left out (they exercise
# the host-side checks, not device memory)
if [ "${SANITIZE_S:-300}" -gt 0 ] && command -v compute-sanitizer >/dev/null; then
  t=$(date +%s)
  VLMKERN_SANITIZE=1 timeout "${SANITIZE_S:-300}" compute-sanitizer --tool memcheck \
    --error-exitcode 9 "$py" -m pytest -q -p no:cacheprovider -k "sanitizer_smoke or fast_dequant_matches" \
    tests/test_cuda_weight_only.py tests/test_cuda_weight_only_sm90.py tests/test_cuda_int_act.py \
    tests/test_cuda_binary.py tests/test_cuda_weight_only_dequant.py tests/test_cuda_weight_only_tma.py \
    tests/test_cuda_binary_lut_tma.py tests/test_cuda_weight_only_tma_decode.py \
    tests/test_cuda_binary_lut_tma_decode.py tests/test_cuda_binary_dequant.py \
    tests/test_cuda_binary_lut_dequant.py tests/test_cuda_binary_lut_staged.py \
    tests/test_cuda_int_act_staged.py tests/test_cuda_weight_only_m64.py \
    tests/test_cuda_binary_lut_kernel.py tests/test_ext.py >"$out/sanitize_smoke.log" 2>&1
  rc=$?; phase memcheck_smoke $rc "$t"; grep -E "ERROR SUMMARY|passed|failed|skipped" \
    "$out/sanitize_smoke.log" | tail -3
fi
if [ "${SANITIZE_FULL_S:-${SANITIZE_S:-300}}" -gt 0 ] && command -v compute-sanitizer >/dev/null; then
  t=$(date +%s)
  timeout "${SANITIZE_FULL_S:-${SANITIZE_S:-300}}" compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$py" -m pytest -q -p no:cacheprovider -k "not bad_input" \
    tests/test_cuda_weight_only.py tests/test_cuda_int_act.py tests/test_cuda_binary.py \
    tests/test_cuda_weight_only_dequant.py tests/test_cuda_binary_lut_kernel.py >"$out/sanitize.log" 2>&1
  rc=$?; phase memcheck $rc "$t"; grep -E "ERROR SUMMARY|passed|failed" "$out/sanitize.log" | tail -3
fi

settle
if [ "${BENCH_S:-300}" -gt 0 ]; then
  t=$(date +%s)
  # nothing else should run on the GPU while it is timed
  nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader \
    | sed 's/^/GPU process before timing: /'
  timeout "${BENCH_S:-300}" "$py" benchmarks/bench_linear.py --out "$out" "$@" >"$out/bench.log" 2>&1
  rc=$?; phase bench $rc "$t"; tail -5 "$out/bench.log"
fi

# a whole decoder (7B widths, random weights): prefill and decode through
# QuantLinear and ops.linear, next to fp16, default and opt-in kernels
if [ "${DECODE_S:-240}" -gt 0 ]; then
  t=$(date +%s)
  (cd benchmarks && timeout "${DECODE_S:-240}" "$py" decode_model.py --out "$out" \
    --enable "${DECODE_ENABLE:-cuda.weight_only_wgmma,cuda.dequant_layout_cublas,cuda.int_act_wgmma,cuda.binary_lut_staged,cuda.binary_dequant_cublas,cuda.binary_lut_dequant_cublas,cuda.int_act_staged,cuda.weight_only_post_scale_m64,cuda.weight_only_tma,cuda.int_act_tma,cuda.binary_lut_tma,cuda.weight_only_tma_decode,cuda.binary_lut_tma_decode,cuda.weight_only_post_scale_acq_rel,cuda.weight_only_post_scale_3cta}") \
    >"$out/decode.log" 2>&1
  rc=$?; phase decode $rc "$t"; grep -E "^\|" "$out/decode.log" | tail -16
fi

# the host's time per eager layer call (an eager decode step pays it per
# linear): the whole call with its launch, then vlmkern's Python alone
if [ "${HOST_S:-30}" -gt 0 ]; then
  t=$(date +%s)
  (timeout "${HOST_S:-30}" "$py" benchmarks/host_overhead.py \
     && timeout "${HOST_S:-30}" "$py" benchmarks/host_overhead.py --stub) >"$out/host.log" 2>&1
  rc=$?; phase host $rc "$t"; grep -E "^\|" "$out/host.log"
fi

# the weight-only kernel's work split: time by thread blocks per SM
if [ "${SWEEP_S:-120}" -gt 0 ]; then
  t=$(date +%s)
  (cd benchmarks && timeout "${SWEEP_S:-120}" "$py" sweep_weight_only.py --out "$out" ${SWEEP_ARGS:-}) \
    >"$out/sweep.log" 2>&1
  rc=$?; phase sweep $rc "$t"; tail -4 "$out/sweep.log"
fi

# the Triton integer-activation GEMM's tiles at prefill sizes
if [ "${TRITON_SWEEP_S:-90}" -gt 0 ]; then
  t=$(date +%s)
  (cd benchmarks && timeout "${TRITON_SWEEP_S:-90}" "$py" sweep_triton_int_act.py --out "$out" \
    ${TRITON_SWEEP_ARGS:-}) >"$out/sweep_triton.log" 2>&1
  rc=$?; phase sweep_triton $rc "$t"; tail -4 "$out/sweep_triton.log"
fi

# where the weight-only kernels spend their time: issue stalls, memory
# throughput and occupancy of the default and opt-in kernels on one layer
if [ "${PROFILE_S:-120}" -gt 0 ] && command -v ncu >/dev/null; then
  # the default decode next to its two opt-in rivals (the Hopper decode path;
  # the post-scale decode publishing split row blocks without per-thread fences)
  decode_ab=cuda.weight_only_tma_decode,cuda.weight_only_post_scale_acq_rel
  t=$(date +%s)
  (cd benchmarks && timeout "${PROFILE_S:-120}" ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
    --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis \
    -k regex:weight_only --launch-count 12 \
    "$py" profile_linear.py ${PROFILE_ARGS:---enable $decode_ab}) \
    >"$out/profile.log" 2>&1
  rc=$?; phase profile $rc "$t"; grep -E "Duration|Memory Throughput|Issue Slots Busy|Warp Cycles Per Issued" \
    "$out/profile.log" | head -24
  # the small qkv layer, where a fixed cost dominates (1.06x of cuBLAS at M = 1)
  t=$(date +%s)
  (cd benchmarks && timeout "${PROFILE_S:-120}" ncu --clock-control none --section SpeedOfLight \
    --section WarpStateStats --section SchedulerStats --section LaunchStats -k regex:weight_only \
    --launch-count 12 "$py" profile_linear.py --shape "qwen2vl-7b qkv" --enable "$decode_ab") \
    >"$out/profile_qkv.log" 2>&1
  rc=$?; phase profile_qkv $rc "$t"; grep -E "Duration|Memory Throughput|Issue Slots Busy" \
    "$out/profile_qkv.log" | head -12
  # the integer-activation GEMMs at prefill size: mma.sync and, where built, wgmma
  t=$(date +%s)
  (cd benchmarks && timeout "${PROFILE_S:-120}" ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
    --section Occupancy -k "regex:gemm_kernel|wgmma_kernel|tma_kernel" --launch-count 6 \
    "$py" profile_linear.py --format W8A8 --m 4096 --reps 1 --enable cuda.int_act_wgmma,cuda.int_act_tma) \
    >"$out/profile_int_act.log" 2>&1
  rc=$?; phase profile_int_act $rc "$t"; grep -E "Duration|Compute \(SM\) Throughput" \
    "$out/profile_int_act.log" | head -8
  # ... and at decode size, with the activation-quantizing pre-kernel: W8A8
  # measured 2x slower at M = 1 than at M = 16 with the same GEMM tiles (the
  # default GEMM, then the one with spread activation reads)
  t=$(date +%s)
  (cd benchmarks && for m in 1 16; do
     echo "== M = $m"
     timeout "${PROFILE_S:-120}" ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
       --section Occupancy -k "regex:quantize|gemm_kernel" --launch-count 8 \
       "$py" profile_linear.py --format W8A8 --m $m --reps 1
   done) >"$out/profile_int_act_decode.log" 2>&1
  rc=$?; phase profile_int_act_decode $rc "$t"
  grep -E "^== M|quantize|gemm_kernel|Duration|Memory Throughput" "$out/profile_int_act_decode.log" | head -24
  # the binary GEMM at decode sizes, lookup-table and plain:
  # the plane GEMM measured 0.77x of cuBLAS at M = 1 and 0.44x at M = 16
  t=$(date +%s)
  (cd benchmarks && for m in 1 16; do
     echo "== M = $m"
     timeout "${PROFILE_S:-120}" ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
       --section ComputeWorkloadAnalysis -k "regex:stage_kernel|gemm_kernel|reduce_kernel|lut" \
       --launch-count 16 "$py" profile_linear.py --format binary --m $m
   done) >"$out/profile_binary.log" 2>&1
  rc=$?; phase profile_binary $rc "$t"; grep -E "^== M|_kernel|Duration|Memory Throughput|Issue Slots" \
    "$out/profile_binary.log" | head -30
  # W4 at prefill size: the (fast) dequantize kernel in front of cuBLAS, then
  # the Hopper weight-only kernels (cp.async and the warp-specialized TMA
  # one), which need no dequantized copy
  t=$(date +%s)
  (cd benchmarks && timeout "${PROFILE_S:-120}" ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
    -k "regex:dequant|weight_only_wgmma|weight_only_tma" --launch-count 10 "$py" profile_linear.py --format "W4 g128" \
    --m 4096 --reps 1 --enable cuda.weight_only_wgmma,cuda.weight_only_tma) \
    >"$out/profile_dequant.log" 2>&1
  rc=$?; phase profile_dequant $rc "$t"; grep -E "dequant_|wgmma|tma|Duration|Memory Throughput|Compute \(SM\)" \
    "$out/profile_dequant.log" | head -24
fi

# ops handed bad arguments must raise, not crash: their tests (a crash takes
# its worker down), then how a C++ exception from a fresh extension fares here
if [ "${CPP_CHECKS_S:-120}" -gt 0 ]; then
  t=$(date +%s)
  timeout -s INT -k 30 "${CPP_CHECKS_S:-120}" "$py" -m pytest -q $(workers 4) -p no:cacheprovider \
    -m cpp_checks $tests -o junit_family=xunit2 --junitxml="$out/cpp_checks.xml" \
    >"$out/cpp_checks.log" 2>&1
  rc=$?; phase cpp_checks $rc "$t"; grep -E "passed|failed|error|crashed" "$out/cpp_checks.log" | tail -12
fi
if [ "${ERROR_PATH_S:-${CPP_CHECKS_S:-120}}" -gt 0 ]; then
  t=$(date +%s)
  timeout "${ERROR_PATH_S:-${CPP_CHECKS_S:-120}}" "$py" benchmarks/check_error_path.py \
    >"$out/error_path.log" 2>&1
  rc=$?; phase error_path $rc "$t"; grep -v "^      #" "$out/error_path.log" | head -20
fi

# which opt-in kernels this run supports making default (tests and timings)
"$py" benchmarks/promote_report.py "$out" >"$out/promote.md" 2>&1 && cat "$out/promote.md"
pack && [ -n "${ARCHIVE:-}" ] && echo "packed $out into $ARCHIVE"
