#!/usr/bin/env bash
# Issue 16's GPU figures in one command on the lent GPU machine (its python3 holds PyTorch with
# CUDA; the rest travels as wheels, made here first by bench/gpu/wheels.py):
#
#   .venv/bin/python bench/gpu/wheels.py                       # here: .whl/ (~30 MiB, git-ignored)
#   device run: command "bash bench/gpu/run.sh", carry [".whl"], timeout_s 590
#
# About 8 minutes on an H100: the planned U-Net with a lesion class on the demo's synthetic
# archive (60 patients; 180 s of training after a timed first epoch: lesion Dice, samples/s,
# data-wait share, GPU utilisation and peak memory), the plan's memory estimate against CUDA's
# peak, the data-loader benchmark's CUDA rows (workers, bf16, cuDNN autotuning, channels-last),
# and 1 against 2 ranks where two GPUs exist. Each step has its own time limit, so one that
# runs long still leaves the others their figures. Results: $OUT (the device tool's folder) or
# bench-output/gpu.
#
#   PY=.venv/bin/python SMOKE=1 bash bench/gpu/run.sh        # here, on a CPU: every step, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-bench-output/gpu}
mkdir -p "$out"
py=${PY:-python3}
if [ -z "${PY:-}" ]; then  # the machine's python3: the wheels beside it
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels did not install: make them with bench/gpu/wheels.py and carry .whl" >&2; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
if [ -n "${SMOKE:-}" ]; then
  lesion=(--patients 8 --epochs 1 --steps 2 --workdir bench-output/gpu-smoke/lesion)
  memory=(--patches 16,32,32 --channels 8,16,32)
  train_work=bench-output/gpu-smoke/train
  train=(--steps 2 --model-steps 2 --workdir $train_work)  # 8 patients: with 4, a volume is thinner than a patch
  ranks=(--epochs 1 --steps 2 --patients 4 --workdir bench-output/gpu-smoke/ranks)
else
  lesion=(--seconds 180)  # + ~25 s building the 60-patient store, a timed first epoch, the test
  memory=(--patches 64,128,128 96,160,160 128,192,192 --batch 2)
  train_work=bench-output/train
  train=(--steps 20 --model-steps 100 --workdir $train_work)
  ranks=(--epochs 3 --steps 20)
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, say how it ended
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)"
  tail -n 12 "$out/$name.log"
}

step lesion 330 $py bench/lesion.py "${lesion[@]}" --json "$out/lesion.json"
step plan_memory 90 $py bench/plan_memory.py "${memory[@]}"
step train 120 $py bench/train.py "${train[@]}"
cp "$train_work/results.json" "$out/train.json" 2>/dev/null
if [ "$($py -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ] || [ -n "${SMOKE:-}" ]; then
  step ranks 120 $py bench/ranks.py "${ranks[@]}" --json "$out/ranks.json"
else
  echo "== ranks: one GPU here; 1 against 2 ranks needs two"
fi
