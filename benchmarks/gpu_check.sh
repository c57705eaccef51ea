#!/usr/bin/env bash
# The checks to run once on a machine with an NVIDIA GPU, from the repository root:
#
#     bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]
#
# 1. the search step on CUDA in float32 and under bf16 autocast (benchmarks/search_step.py);
# 2. a smoke launch whose two search trials ask for half a GPU each (resources.gpu=0.5), so
#    Ray runs them side by side on one device; the script then checks from Tune's results that
#    both trials ran on CUDA and overlapped in time.
#
# Figures and logs go to OUTPUT_FOLDER ($OUT, else gpu-check/). It uses .venv/bin/python when
# it exists, else python3, and stops with status 2 when torch finds no CUDA device.
# NOTE: written without a GPU machine, so this script has only run its no-CUDA exit path.
set -euo pipefail

out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
python=.venv/bin/python
[ -x "$python" ] || python=python3

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch found no CUDA device; nothing to check on this machine" >&2
    exit 2
fi
{ nvidia-smi || true; "$python" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
    > "$out/device.txt" 2>&1

echo "search step, CUDA float32" >&2
"$python" benchmarks/search_step.py --device cuda > "$out/search_step_cuda.txt"
echo "search step, CUDA bf16 autocast" >&2
"$python" benchmarks/search_step.py --device cuda --bf16 > "$out/search_step_cuda_bf16.txt"

echo "smoke launch, two search trials on half a GPU each" >&2
launch="$out/launch"
OMP_NUM_THREADS=1 "$python" runner/launch.py exp=digits budget=smoke \
    resources.gpu=0.5 resources.cpu=1 "search.seeds=[0,1]" tune.max_concurrent=2 \
    output_dir="$launch" output_root="$out/outputs" > "$out/launch_stdout.txt" 2> "$out/launch_stderr.txt"

"$python" - "$launch" <<'PYTHON' | tee "$out/fractional_gpu.txt"
import json
import sys
from pathlib import Path

trials = []
for path in sorted(Path(sys.argv[1]).glob("search/*/result.json")):
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    devices = {result.get("device") for result in results}
    # Tune's timestamp is the time of each report; time_total_s counts from the trial's start.
    start = results[0]["timestamp"] - results[0]["time_total_s"]
    end = results[-1]["timestamp"]
    trials.append((path.parent.name, devices, start, end))
    print(f"{path.parent.name}: devices {sorted(map(str, devices))}, {end - start:.1f} s")
assert len(trials) == 2, f"expected 2 search trials, found {len(trials)}"
assert all(devices == {"cuda"} for _, devices, _, _ in trials), "a trial did not run on CUDA"
(_, _, start_a, end_a), (_, _, start_b, end_b) = trials
overlap = min(end_a, end_b) - max(start_a, start_b)
assert overlap > 0, "the two half-GPU trials did not run at the same time"
print(f"fractional GPU: both trials on CUDA, side by side for {overlap:.1f} s")
PYTHON
