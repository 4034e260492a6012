#!/usr/bin/env bash
# What to run first on the lent GPU (sm_90a) after a session that had none: correctness of every kernel that
# has not run on a GPU yet, then the benchmarks. Each stage fits one device call (10 minutes); logs go to $OUT.
#   bash scripts/gpu_session.sh tests     # kernel-level GPU tests + engines on the GPU vs the CPU reference
#   bash scripts/gpu_session.sh kernels   # per-kernel times: attention (SIMT vs tensor-core), GEMV, GEMM sweep
#   bash scripts/gpu_session.sh bench     # the three workloads vs PyTorch at bf16 / fp8 / nvfp4 -> RESULTS.md
#   bash scripts/gpu_session.sh loops     # the pi0 expert chunk and the VLA chunk vs PyTorch (issue 6)
#   bash scripts/gpu_session.sh verify    # tests of new attention/elementwise code, wgmma probe, expert + VLA rows
#   bash scripts/gpu_session.sh sanitize  # compute-sanitizer memcheck on the three workloads and the samples
#   bash scripts/gpu_session.sh next      # what the 2026-12-07 sessions left unmeasured (benchmarks/NOTES.md v12, v13)
#   bash scripts/gpu_session.sh v14       # decode fusions' tests, decode with each off / on, the L2 weight prefetch swept
#   bash scripts/gpu_session.sh v15       # nvfp4 weights in wgmma (NOTES v15): GPU cases, expert / ViT vs torch at 3 precisions
#   bash scripts/gpu_session.sh compare   # pi0 chunk vs a compiled static step; decode 512 / 4096 vs torch.compile
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/flashrt-gpu}
mkdir -p "$OUT"
stage=${1:-tests}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
case "$stage" in
  tests)
    timeout 560 python3 -m pytest -q -rf tests/test_gpu_gemm.py tests/test_gpu_attention.py tests/test_gpu_gemv.py \
      tests/test_gpu.py tests/test_state.py tests/test_decoder_sample.py tests/test_vla.py 2>&1 | tee "$OUT/tests.log" | tail -40
    ;;
  kernels)
    timeout 280 python3 benchmarks/kernel_bench.py --attention --configs --out "$OUT" 2>&1 | tee "$OUT/kernels.log" | tail -30
    timeout 120 python3 benchmarks/kernel_bench.py --gemv --out "$OUT" 2>&1 | tee -a "$OUT/kernels.log" | tail -20
    timeout 150 python3 benchmarks/gemm_sweep.py --quick --quant "" fp8 --out "$OUT" 2>&1 | tee -a "$OUT/kernels.log" | tail -20
    ;;
  bench)
    timeout 570 python3 benchmarks/bench.py --precisions bf16 fp8 nvfp4 --profile --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40
    ;;
  loops)  # issue 6: the pi0 expert's chunk (full size, from safetensors) and the VLA chunk, vs torch.compile
    timeout 280 python3 benchmarks/pi0_bench.py --scale full --precisions bf16 fp8 --out "$OUT" 2>&1 | tee "$OUT/pi0.log" | tail -8
    timeout 280 python3 benchmarks/vla_bench.py --scale full --layers 4 --vocab 16384 --precisions bf16 --out "$OUT" \
      2>&1 | tee "$OUT/vla.log" | tail -8
    ;;
  verify)  # after attention / elementwise / planner changes: their GPU tests, the wgmma probe, the expert and VLA
    timeout 250 python3 -m pytest -q -rf -n 8 tests/test_gpu_attention.py tests/test_kv_concat.py \
      tests/test_pi0_expert.py tests/test_vla.py tests/test_gpu.py > "$OUT/tests.log" 2>&1
    echo "tests rc=$?"; tail -6 "$OUT/tests.log"
    timeout 90 python3 benchmarks/wgmma_probe.py --out "$OUT" > "$OUT/wgmma_probe.log" 2>&1
    echo "probe rc=$?"; grep '^#' "$OUT/wgmma_probe.log" | head -12
    timeout 80 python3 benchmarks/bench.py --no-torch --workloads expert --precisions bf16 --profile --out "$OUT" \
      > "$OUT/bench.log" 2>&1; echo "bench rc=$?"; tail -4 "$OUT/bench.log"
    timeout 60 python3 benchmarks/kernel_bench.py --attention --out "$OUT" > "$OUT/kernels.log" 2>&1
    echo "kernels rc=$?"
    timeout 150 python3 benchmarks/vla_bench.py --scale full --layers 4 --vocab 16384 --precisions bf16 \
      --out "$OUT" > "$OUT/vla.log" 2>&1; echo "vla rc=$?"; tail -8 "$OUT/vla.log"
    ;;
  sanitize)  # memcheck on the three benchmark workloads, then on the samples
    timeout 380 compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize_workloads.py \
      2>&1 | tee "$OUT/sanitize.log" | tail -12
    timeout 180 compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/run_samples_cuda.py 2>&1 \
      | tee -a "$OUT/sanitize.log" | tail -8
    ;;
  next)  # what the 2026-12-07 sessions left unmeasured (benchmarks/NOTES.md v12, v13): the fused decode cache writes,
         # norm + RoPE launches and MLP (gated GEMV + down projection) on the GPU; decode with and without the MLP
         # fusion; the in-graph cost of each kernel kind (--ablate)
    timeout 230 python3 -m pytest -q -rf -n 8 tests/test_gpu_gemv.py tests/test_state.py tests/test_decoder_sample.py \
      tests/test_pdl.py tests/test_gpu.py > "$OUT/tests.log" 2>&1; echo "tests rc=$?"; tail -3 "$OUT/tests.log"
    mkdir -p "$OUT/fused" "$OUT/unfused"
    timeout 150 python3 benchmarks/bench.py --no-torch --workloads decode --precisions bf16 fp8 --ablate \
      --out "$OUT/fused" > "$OUT/bench.log" 2>&1; echo "fused rc=$?"; grep '^| ' "$OUT/bench.log"
    FLASHRT_FUSE_MLP=0 timeout 100 python3 benchmarks/bench.py --no-torch --workloads decode --precisions bf16 fp8 \
      --out "$OUT/unfused" >> "$OUT/bench.log" 2>&1; echo "unfused rc=$?"; grep '^| ' "$OUT/unfused/RESULTS.md"
    rm -f "$OUT/fused/RESULTS.md" "$OUT/unfused/RESULTS.md"
    ;;
  v14)  # benchmarks/NOTES.md v13 + v14: the decode fusions' GPU tests, decode with each fusion off and the L2
        # weight prefetch (opt-in) swept, fp8 too (~8 minutes on a machine whose cubin cache is cold)
    timeout 150 python3 -m pytest -q -rf -n 8 tests/test_gpu_attention.py tests/test_gpu_gemv.py tests/test_state.py \
      tests/test_pdl.py -k "oproj or decode_dynamic or fused_down or mirror or gpu_matches or gpu_pdl" \
      > "$OUT/tests.log" 2>&1
    echo "tests rc=$?"; tail -3 "$OUT/tests.log"
    bench() {  # bench DIR WORKLOADS... (the environment as the caller sets it)
      local dir=$1; shift; mkdir -p "$OUT/$dir"
      timeout 150 python3 benchmarks/bench.py --no-torch --workloads "$@" --precisions bf16 fp8 --out "$OUT/$dir" \
        >> "$OUT/bench.log" 2>&1
      echo "$dir rc=$?"; grep '^| decode' "$OUT/$dir/RESULTS.md"; rm -f "$OUT/$dir/RESULTS.md"
    }
    bench default decode decode4k
    FLASHRT_FUSE_OPROJ=0 bench no_oproj decode
    FLASHRT_ATTN_PREFETCH=0 bench no_prefetch decode decode4k
    for mb in 8 16; do FLASHRT_L2_PREFETCH_MB=$mb bench l2_$mb decode; done
    FLASHRT_L2_PREFETCH_MB=24 FLASHRT_L2_PREFETCH_HOSTS=attention bench l2_attention decode
    FLASHRT_MLP_R=4 bench r4 decode
    for f in "$OUT"/*/*.json; do echo "== $f"; cat "$f"; done > "$OUT/v14_results.txt"
    ;;
  v15)  # benchmarks/NOTES.md v15: the opt-in nvfp4 wgmma GEMM's GPU cases, then the expert and ViT against torch at
        # bf16 / fp8 / nvfp4 (nvfp4 on wgmma). Hand the device a warm cubin cache: here, first
        #   FLASHRT_CACHE_DIR=$PWD/.cubin_cache FLASHRT_WGMMA_NVFP4=1 python3 benchmarks/bench.py --build-only \
        #     --workloads expert vit --precisions bf16 fp8 nvfp4
        # then run this stage with carry [".cubin_cache"] and FLASHRT_CACHE_DIR=$PWD/.cubin_cache
    export FLASHRT_WGMMA_NVFP4=1
    timeout 150 python3 -m pytest -q -rf -n 8 tests/test_gpu_gemm_wgmma.py -k "nvfp4 or fp8" > "$OUT/tests.log" 2>&1
    echo "tests rc=$?"; tail -3 "$OUT/tests.log"
    timeout 400 python3 benchmarks/bench.py --workloads expert vit --precisions bf16 fp8 nvfp4 --out "$OUT" \
      > "$OUT/bench.log" 2>&1; echo "bench rc=$?"; grep '^| ' "$OUT/bench.log"
    ;;
  compare)  # the pi0 chunk against a compiled static-shape step; decode at 512 and 4096 against torch.compile
    timeout 280 python3 benchmarks/pi0_bench.py --scale full --precisions bf16 --out "$OUT" 2>&1 \
      | tee "$OUT/pi0.log" | grep '^{"impl\|^|'
    timeout 250 python3 benchmarks/bench.py --workloads decode decode4k --precisions bf16 fp8 --out "$OUT" 2>&1 \
      | tee "$OUT/bench_decode.log" | grep '^| '
    ;;
  *) echo "usage: $0 tests|kernels|bench|loops|verify|sanitize|next|v14|v15|compare" >&2; exit 2 ;;
esac
