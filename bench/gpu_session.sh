#!/usr/bin/env bash
# Everything the GPU checks in one call (device time is scarce): GPU tests, the latency and
# capture benchmarks at full size, and full-size `parity diff` / `parity component` runs.
# Usage (on the GPU machine, from the checkout): bash bench/gpu_session.sh OUTDIR
set -u
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -m pytest -q -m gpu tests/ > "$out/pytest_gpu.log" 2>&1
echo "gpu tests rc=$?"; tail -1 "$out/pytest_gpu.log"
python3 bench/latency.py --config full --runs 30 --warmup 3 --backends pytorch,flash,flash_fp8,fast --out "$out" \
  2>&1 | grep -v -i warn > "$out/latency.log"; tail -7 "$out/latency.log"
python3 bench/capture.py --config full --runs 10 --out "$out" 2>&1 | grep -v -i warn > "$out/capture.log"
tail -5 "$out/capture.log"
for b in live stats; do  # on-device compare and stats-only capture, where present
  [ -f bench/$b.py ] || continue
  python3 bench/$b.py --config full --out "$out" 2>&1 | grep -v -i warn > "$out/$b.log"; tail -8 "$out/$b.log"
done
gate=(--min-cos 0.995 --threshold '*.mlp=0.99')
python3 -m parity.cli diff --ref pytorch --cand fast --config full "${gate[@]}" --json "$out/full_fast.json" \
  > "$out/full_fast.txt" 2>&1; echo "diff fast full rc=$?"
python3 -m parity.cli diff --ref pytorch --cand flash_fp8 --config full --inject nomask "${gate[@]}" \
  > "$out/full_nomask.txt" 2>&1; echo "diff flash_fp8+nomask full rc=$?"; grep -E "FIRST|INTRODUCED|hint" "$out/full_nomask.txt" | head -4
for part in qkv attn mlp layer; do
  python3 -m parity.cli component --ref pytorch --cand flash_fp8 --config full --layer 3 --part $part "${gate[@]}" \
    > "$out/component_$part.txt" 2>&1; echo "component flash_fp8 prefix.3.$part full rc=$?"
done
python3 -m parity.cli component --ref pytorch --cand flash --config full --stack expert --step 2 --layer 5 \
  --part attn > "$out/component_expert_attn.txt" 2>&1; echo "component flash expert.5.attn@2 full rc=$?"
