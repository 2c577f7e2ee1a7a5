#!/usr/bin/env bash
# Every GPU figure of issue 24 in one call of a lent GPU machine (at most 9.5 minutes: give the call timeout_s 600).
#
# Usage (repository root, on the GPU machine; no napari needed):
#     OUT=/some/dir bash benchmarks/gpu_bench.sh
# DEVICE=cpu QUICK=1 OUT=/tmp/g bash benchmarks/gpu_bench.sh is a local smoke run of this script.
#
# Each step has its own time limit so that one slow step cannot take the others' results with it;
# every JSON and log lands in $OUT (name them benchmarks/results/*_h100.json when bringing them home,
# then `python benchmarks/tables.py --write`):
#   bench_gpu.json        predict end to end against the network alone, streamed h5 -> h5 against
#                         in-memory (bench_gpu.py; targets >= 0.5 and >= 0.8);
#   bench_retrieval.json  the batched protocol on the device: rate, one iteration against its FFT
#                         pair, the achieved memory bandwidth against the GPU's peak (the roofline
#                         figure), the NumPy loop on the host beside it; cohere-core's torch back end
#                         on the same patterns where cohere-core is importable (it is not on the lent
#                         machines: the JSON says so);
#   bench_nn.json         the networks by batch size and precision, and the whole `cdinn predict`.
set -u
OUT=${OUT:-runs/gpu_bench}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=src
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"; } \
  > "$OUT/machine.txt" 2>&1
if [ -n "${QUICK:-}" ]; then
  gpu=(--quick); retrieval=(--count 32 --numpy-count 2); nn=(--quick --numpy-count 1 --min-seconds 0.1)
else
  gpu=(); retrieval=(--count 4096 --numpy-count 8); nn=(--numpy-count 1 --min-seconds 0.5)
fi
step() {  # step NAME LIMIT_S COMMAND...: run it, log it, record its exit status
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc $?" >> "$OUT/status.txt"
}
step bench_gpu 330 python3 benchmarks/bench_gpu.py --device "$DEVICE" "${gpu[@]}" --json "$OUT/bench_gpu.json"
step bench_retrieval 120 python3 benchmarks/bench_retrieval.py --device "$DEVICE" "${retrieval[@]}" \
  --json "$OUT/bench_retrieval.json"
step bench_nn 110 python3 benchmarks/bench_nn.py --device "$DEVICE" "${nn[@]}" --json "$OUT/bench_nn.json"
cat "$OUT/status.txt"
tail -n 4 "$OUT"/*.log
