#!/usr/bin/env bash
# The GPU checks of docs/scaling-out.md#checking-the-gpu-paths in one go, for a machine with a CUDA GPU that cannot
# download anything (as a lent GPU machine often cannot). Two steps:
#
#   bash benchmarks/gpu_check.sh prepare   # here, with bdvae installed and MNIST fetched: writes
#                                          # .gpu/ (MNIST as IDX files, the tomli-w wheel, and in
#                                          # .gpu/whl/pythae pythae 0.1.2 with the wheels it needs;
#                                          # 23 MB, in .gitignore), to be copied along to the GPU machine
#   bash benchmarks/gpu_check.sh run       # there, from the repository root, with .gpu/ copied along:
#                                          # python3 with a CUDA build of torch and bdvae's other
#                                          # dependencies but tomli-w; about 5 minutes
#
# `run` puts its logs and JSON into $OUT (or gpu-check/), with one exit status per check in
# status.txt and its wall time in seconds.txt: tests/test_cuda.py, the training throughput of
# benchmarks/distributed.py (with its single-GPU fp32 and bf16 rows), the default 10-epoch training
# on the GPU, benchmarks/evaluate.py with the IWAE there, the training throughput of bdvae, pythae,
# a minimal loop and its CUDA-graph capture side by side (benchmarks/performance.py --device cuda),
# one epoch of the quality preset and `bdvae evaluate -k 5000`; then benchmarks/gpu_figures.py
# prints them in one table and writes gpu-figures.json. BDVAE_TEST_DEVICE=cpu runs it all with the
# CPU in the GPU's place and tiny sizes (a few minutes): a check of this script, not of CUDA, and
# its figures mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

prepare() {
  mkdir -p .gpu/mnist .gpu/whl
  python - <<'PY'
"""The verified MNIST arrays of the data cache as the four gzipped IDX files `data fetch` reads."""
import gzip
import struct
from pathlib import Path

from bdvae.data import IDX_NAMES, KNOWN, fetch, read_cache

arrays, _ = read_cache(KNOWN["mnist"], fetch("mnist"))  # read_cache verifies every array
for split, name in IDX_NAMES.items():
    a = arrays[split]
    header = struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)  # uint8, big-endian sizes
    Path(f".gpu/mnist/{name}.gz").write_bytes(gzip.compress(header + a.tobytes(), compresslevel=6))
print("wrote .gpu/mnist")
PY
  python -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl "tomli-w>=1.0"
  pythae_wheels || echo "gpu_check: pythae's wheels could not all be downloaded: on the GPU the throughput table will lack pythae" >&2
  du -sh .gpu
}

# pythae 0.1.2's requirements that a machine with torch, numpy, scipy, scikit-learn and tqdm may
# lack, with pydantic's own: all pure Python but pydantic-core, fetched for CPython 3.10-3.14 on
# x86-64 Linux (torch 2.11's range). imageio, also required, is imported by no module pythae's
# trainer loads, and its newest release refuses Python 3.10: it is left out.
PYTHAE_PACKAGES=(pythae pydantic pydantic-core annotated-types typing-inspection typing-extensions cloudpickle)

pythae_wheels() {
  rm -rf .gpu/whl/pythae
  mkdir -p .gpu/whl/pythae
  python -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl/pythae pythae==0.1.2 "pydantic>=2,<3" \
    annotated-types typing-inspection typing-extensions cloudpickle || return 1
  local core  # the pydantic-core release that this pydantic pins (Requires-Dist: pydantic-core==X)
  core=$(python - .gpu/whl/pythae/pydantic-2*.whl <<'PY'
import sys
import zipfile

wheel = zipfile.ZipFile(sys.argv[1])
metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
print(next(line.split(":", 1)[1].split(";")[0].strip().replace(" ", "")
           for line in wheel.read(metadata).decode().splitlines() if line.startswith("Requires-Dist: pydantic-core")))
PY
)
  [ -n "$core" ] || return 1
  for version in 3.10 3.11 3.12 3.13 3.14; do
    python -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
      --platform manylinux2014_x86_64 -d .gpu/whl/pythae "$core" || return 1
  done
}

step() {  # step NAME COMMAND...: its output into $out/NAME.log, its exit status into $out/status.txt
  local name=$1 start=$SECONDS  # and its wall time into $out/seconds.txt
  shift
  "$@" 2>&1 | tee "$out/$name.log"
  echo "$name: exit ${PIPESTATUS[0]}" | tee -a "$out/status.txt"
  echo "$name $((SECONDS - start))" >>"$out/seconds.txt"
}

run() {
  out=${OUT:-gpu-check}
  mkdir -p "$out" /tmp/bdvae-site
  rm -f "$out/status.txt" "$out/seconds.txt"
  python3 -m pip install -q --no-index --no-deps --target /tmp/bdvae-site .gpu/whl/*.whl
  export PYTHONPATH="$PWD/src:/tmp/bdvae-site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  export BDVAE_TEST_MNIST_SOURCE="$PWD/.gpu/mnist" BDVAE_DATA_DIR=/tmp/bdvae-data
  local device=cuda run_dir=/tmp/bdvae-gpu-check-run quality_dir=/tmp/bdvae-gpu-check-quality
  local pythae_site=/tmp/bdvae-pythae-site  # apart: pydantic & co. must not reach the other checks
  # The sizes: the real ones on the GPU; tiny ones where the CPU stands in, to check the script.
  local distributed_args=() train_args=() evaluate_args=(--max-batch 20000) quality_args=()
  local throughput_args=(--windows 3 --batches 80 --warmup 15) k5000_args=(--evaluate-k 5000)
  if [ "${BDVAE_TEST_DEVICE:-cuda}" = cpu ]; then
    device=cpu
    distributed_args=(--rounds 1 --images 1024)
    train_args=(--set train.epochs=1 --set data.train_size=1024 --set data.test_size=256)
    evaluate_args=(--images 16 --samples 256 --test-size 64)
    quality_args=(--set data.train_size=512 --set data.test_size=128)
    throughput_args=(--windows 2 --batches 3 --warmup 1)
    k5000_args=(--evaluate-k 10 --evaluate-test-size 64 --evaluate-arg=--samples=256)
  fi
  python3 - "$device" <<'PY' | tee "$out/machine.txt"
import sys

import torch

if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU (a CPU build of torch?)")
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"torch {torch.__version__}; GPUs: {gpus or 'none'}")
PY
  python3 -m bdvae data fetch mnist --source-dir .gpu/mnist
  set +e  # every check runs and reports, whatever the one before it did
  step test_cuda python3 -m pytest tests/test_cuda.py -v -p no:cacheprovider
  step distributed python3 benchmarks/distributed.py "${distributed_args[@]}" --json "$out/distributed.json"
  rm -rf "$run_dir" "$quality_dir" "$pythae_site"
  # The default config (10 epochs, all 60,000 images): run.json's seconds are its training time.
  step train python3 -m bdvae train --device "$device" --out "$run_dir" "${train_args[@]}" --quiet
  step evaluate python3 benchmarks/evaluate.py "$run_dir" --device "$device" "${evaluate_args[@]}" \
    --json "$out/evaluate.json"
  local contenders=bdvae,bdvae:fp32,bdvae:device,bdvae:host,pythae,minimal,minimal:bf16,captured,captured:bf16
  step pythae_install python3 -m pip install -q --no-index --no-deps --find-links .gpu/whl/pythae \
    --target "$pythae_site" "${PYTHAE_PACKAGES[@]}"
  if ! PYTHONPATH="$pythae_site:$PYTHONPATH" python3 -c "import pythae.trainers" >>"$out/pythae_install.log" 2>&1; then
    echo "pythae: not importable here (see pythae_install.log): the throughput table goes on without it" \
      | tee -a "$out/status.txt"
    contenders=${contenders/,pythae/}
  fi
  step throughput env PYTHONPATH="$pythae_site:$PYTHONPATH" python3 benchmarks/performance.py --device "$device" \
    --contenders "$contenders" --skip-likelihood --skip-evaluate --rss-batches 0 "${throughput_args[@]}" \
    --json "$out/throughput.json"
  step quality python3 -m bdvae train --preset quality --set train.epochs=1 "${quality_args[@]}" \
    --device "$device" --out "$quality_dir" --quiet
  # `bdvae evaluate RUN -k 5000` with its default options, on a copy of the run, timed whole.
  step evaluate_k5000 python3 benchmarks/performance.py --skip-training --skip-likelihood --run "$run_dir" \
    "${k5000_args[@]}" --json "$out/evaluate-k5000.json"
  python3 benchmarks/gpu_figures.py "$out" "$run_dir" "$quality_dir" | tee "$out/figures.txt"
  ! grep -v ": exit 0$" "$out/status.txt"  # the exit status: 0 when every check passed
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
