#!/usr/bin/env bash
# Train on a lent GPU for MIN minutes, then benchmark the shipped default model there.
#
# Usage (repository root, on the GPU machine; no napari needed):
#     OUT=/some/dir MIN=6.5 bash benchmarks/gpu_train.sh
# The whole script takes about 60 * MIN + 40 s, plus BENCH_S (default 110; 0 skips the benchmark):
# give the machine's call a limit above that, or the archive below is never written.
#
# Two runs share the GPU, each with its own simulator processes (the simulator, not the GPU,
# limits a small network's training speed):
#   scratch: shared2x from random weights, paper lr, cosine schedule ending at MIN minutes;
#   warm:    shared2x from the shipped model2x, lr 3e-4, the same kind of schedule.
# Each writes a model directory (best/last safetensors + json, optimizer.pt), packed in $OUT/models.tgz, that
# `cdinn train --resume --out DIR` continues and `python -m napari_cdinn.nn.ship DIR` ships.
# An "epoch" is 1.8M fresh examples here so that the full validation (20,000) stays a small part.
set -u
OUT=${OUT:-runs/gpu}
MIN=${MIN:-6.5}
WORKERS=${WORKERS:-7}
RUNS=${RUNS:-scratch warm}
mkdir -p "$OUT"
export PYTHONPATH=src
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"; } \
  > "$OUT/machine.txt" 2>&1
common=(--preset paper --arch shared2x --fresh-data --shift 1 --phase-weight 4 --data-weight 1 --schedule cosine
        --train-size 1800000 --epochs 1000 --time-limit "$MIN" --checkpoint-minutes 2 --device cuda
        --data-workers "$WORKERS")
case " $RUNS " in *" scratch "*)
  python3 -m napari_cdinn.cli train --out "$OUT/scratch" "${common[@]}" --seed 21 > "$OUT/scratch.log" 2>&1 & ;;
esac
case " $RUNS " in *" warm "*)
  python3 -m napari_cdinn.cli train --out "$OUT/warm" "${common[@]}" --init-from model2x --lr 3e-4 --seed 23 \
    > "$OUT/warm.log" 2>&1 & ;;
esac
wait
# few files come back from the machine: one archive of the model directories (optimizer state too)
runs=$(cd "$OUT" && ls -d scratch warm 2>/dev/null)
[ -n "$runs" ] && tar czf "$OUT/models.tgz" -C "$OUT" $runs && (cd "$OUT" && rm -rf $runs)
[ "${BENCH_S:-110}" -gt 0 ] || exit 0
timeout "${BENCH_S:-110}" python3 benchmarks/bench_nn.py --device cuda --numpy-count 1 --min-seconds 0.5 \
  --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1
echo "bench rc $?" >> "$OUT/bench_gpu.log"
tail -n 3 "$OUT"/*.log
