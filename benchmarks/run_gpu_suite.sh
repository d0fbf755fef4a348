#!/usr/bin/env bash
# The GPU evidence for issues 3, 5 and 6, in one call on a 2-GPU machine (see benchmarks/RESULTS.md):
#   bash benchmarks/run_gpu_suite.sh [transfer] [engine] [hf] [smoke] [disagg] [ucxdisagg]  (default: transfer engine smoke)
#   ucxdisagg: the UCX probe ladder (benchmarks/ucx_gpu_probe.py), one UCX KV transfer, then 1P1D vs 2 colocated over UCX
#   ipc: the GPU tests of the one-sided CUDA IPC path (SPLITSERVE_SHARED_DIR must hold models/stories260K), then
#        bench transfer over cuda_ipc, zmq and ucx between cuda:0 and cuda:1 (llama3-8b shape, 2048 tokens)
#   fair: benchmarks/bench_disagg_gpu.py (WORKLOADS, RATES, TOPOS, SECONDS_PER_RATE)
# Logs go to ${OUT:-/tmp/gpu_suite}.
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
LOG=${OUT:-/tmp/gpu_suite}; mkdir -p "$LOG"
steps=${*:-transfer engine smoke}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cd /tmp
for step in $steps; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    transfer)
      for b in zmq ucx; do
        timeout 240 python3 -m splitserve.cli --log-level WARNING bench transfer --backend $b --device cuda \
          --model-shape llama3-8b --tokens 2048 --json 2>>"$LOG/transfer.err" | tee -a "$LOG/transfer.json"
      done ;;
    ipc)
      timeout 300 python3 -m pytest -q -p no:cacheprovider "$SPLITSERVE_REPO/tests/test_gpu_transfer.py" \
        "$SPLITSERVE_REPO/tests/test_kernels.py" -k "gpu_transfer or copy_slots" 2>&1 | tee "$LOG/ipc_tests.txt"
      for b in cuda_ipc zmq ucx; do
        timeout 120 python3 -m splitserve.cli --log-level WARNING bench transfer --backend $b --device cuda \
          --model-shape llama3-8b --tokens 2048 --json 2>>"$LOG/transfer.err" | tee -a "$LOG/transfer.json"
      done ;;
    fair)
      timeout ${FAIR_TIMEOUT:-560} python3 -m splitserve.benchmarks.bench_disagg_gpu --model dummy:llama3-8b \
        --workloads ${WORKLOADS:-4096/256} --rates ${RATES:-1,4,8} --topologies "${TOPOS:-1P1D,2col-c2048}" \
        --seconds-per-rate ${SECONDS_PER_RATE:-15} --log-dir "$LOG" 2>&1 | tee "$LOG/fair.md" ;;
    engine)
      timeout 420 python3 -m splitserve.benchmarks.bench_engine_gpu ${ENGINE_ARGS:-} 2>"$LOG/engine.err" | tee "$LOG/engine.md" ;;
    ucxdisagg)  # UCX check first; the disaggregated sweep over UCX only if a verified transfer went through
      timeout 240 python3 -m splitserve.benchmarks.ucx_gpu_probe --device cuda 2>"$LOG/probe.err" | tee "$LOG/probe.md"
      timeout 60 python3 -m splitserve.cli --log-level WARNING bench transfer --backend ucx --device cuda \
        --model-shape llama3-8b --tokens 2048 --json 2>"$LOG/ucx.err" | tee "$LOG/ucx.json"
      if grep -q '"verified": true' "$LOG/ucx.json"; then
        timeout 540 python3 -m splitserve.benchmarks.bench_disagg_gpu --model dummy:llama3-8b --rates ${RATES:-4,8,12,16} \
          --seconds-per-rate ${SECONDS_PER_RATE:-8} --transfer ucx --topologies "${TOPOS:-1P1D,2 colocated}" \
          --log-dir "$LOG" 2>&1 | tee "$LOG/disagg_ucx.md"
      fi ;;
    hf)
      timeout 240 python3 -m splitserve.benchmarks.bench_engine_gpu --only-hf --quick 2>"$LOG/hf.err" | tee "$LOG/hf.md"
      timeout 240 python3 -m splitserve.benchmarks.bench_engine_gpu --only-hf --quick --dtype float32 --num-pages 64 \
        --hf-pages 64 2>"$LOG/hf32.err" | tee "$LOG/hf32.md" ;;
    smoke)
      timeout 300 python3 -m splitserve.benchmarks.bench_disagg_gpu --model dummy:llama3.2-1b --rates 4 \
        --input-len 512 --output-len 32 --seconds-per-rate 4 --log-dir "$LOG" 2>&1 | tee "$LOG/smoke.md" ;;
    disagg)
      timeout 480 python3 -m splitserve.benchmarks.bench_disagg_gpu --model dummy:llama3-8b --rates ${RATES:-1,2,4} \
        --seconds-per-rate ${SECONDS_PER_RATE:-12} --transfer ${TRANSFER:-ucx} --log-dir "$LOG" 2>&1 | tee "$LOG/disagg.md" ;;
  esac
done
