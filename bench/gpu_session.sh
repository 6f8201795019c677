#!/usr/bin/env bash
# Everything the GPU checks, in two calls of under 10 minutes each (device time is scarce):
#   bash bench/gpu_session.sh OUTDIR capture   the capture benchmark, eager and CUDA-graph backends
#   bash bench/gpu_session.sh OUTDIR rest      GPU tests, stats, live compare, per-tap costs
#   bash bench/gpu_session.sh OUTDIR verdicts  backend latency and full-size `parity diff` / `component` runs
# A figure counts once a second pair of calls agrees within 10 % (docs/benchmarks.md).
set -u
out=${1:-bench/results}
part=${2:-rest}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
if [ "$part" = capture ]; then
  python3 bench/capture.py --config full --rounds 5 --out "$out" 2>&1 | grep -v -i warn > "$out/capture.log"
  tail -6 "$out/capture.log"
  exit 0
fi
if [ "$part" = verdicts ]; then
  python3 bench/latency.py --config full --runs 30 --warmup 3 --backends pytorch,flash,flash_fp8,fast --out "$out" \
    2>&1 | grep -v -i warn > "$out/latency.log"; tail -7 "$out/latency.log"
  python3 -m parity.cli diff --ref pytorch --cand fast --config full --json "$out/full_fast.json" \
    > "$out/full_fast.txt" 2>&1; echo "diff fast full rc=$?"
  python3 -m parity.cli diff --ref pytorch --cand flash_fp8 --config full --inject nomask \
    > "$out/full_nomask.txt" 2>&1; echo "diff flash_fp8+nomask full rc=$?"
  grep -E "FIRST|INTRODUCED|hint" "$out/full_nomask.txt" | head -4
  for part in qkv attn mlp layer; do
    python3 -m parity.cli component --ref pytorch --cand flash_fp8 --config full --layer 3 --part $part \
      --min-cos 0.995 --threshold '*.mlp=0.99' > "$out/component_$part.txt" 2>&1
    echo "component flash_fp8 prefix.3.$part full rc=$?"
  done
  exit 0
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -m gpu tests/ -p no:cacheprovider > "$out/pytest_gpu.log" 2>&1
  echo "gpu tests rc=$?"; tail -1 "$out/pytest_gpu.log"
fi
python3 bench/stats.py --config full --runs 5 --backends pytorch --out "$out" 2>&1 | grep -v -i warn > "$out/stats.log"
tail -5 "$out/stats.log"
python3 bench/live.py --config full --device cuda --runs 5 --no-time-host --out "$out" 2>&1 | grep -v -i warn \
  > "$out/live.log"; tail -9 "$out/live.log"
python3 bench/tap_costs.py --config full --rounds 5 --out "$out" 2>&1 | grep -v -i warn > "$out/tap_costs.log"
head -12 "$out/tap_costs.log"
