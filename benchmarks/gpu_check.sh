#!/usr/bin/env bash
# The GPU checks of docs/scaling-out.md#checking-the-gpu-paths in one go, for a machine with a CUDA GPU that cannot
# download anything (as a lent GPU machine often cannot). Two steps:
#
#   bash benchmarks/gpu_check.sh prepare   # here, with bdvae installed and MNIST fetched: writes
#                                          # .gpu/ (MNIST as IDX files, the tomli-w wheel; 11 MB,
#                                          # in .gitignore), to be copied along to the GPU machine
#   bash benchmarks/gpu_check.sh run       # there, from the repository root, with .gpu/ copied along:
#                                          # python3 with a CUDA build of torch and bdvae's other
#                                          # dependencies but tomli-w
#
# `run` puts its logs and JSON into $OUT (or gpu-check/), with one exit status per check in
# status.txt: tests/test_cuda.py, the training throughput of benchmarks/distributed.py (with its
# single-GPU fp32 and bf16 rows), a short training on the GPU and benchmarks/evaluate.py with the
# IWAE there. BDVAE_TEST_DEVICE=cpu runs it all with the CPU in the GPU's place: a check of this
# script, not of CUDA.
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
  du -sh .gpu
}

step() {  # step NAME COMMAND...: its output into $out/NAME.log, its exit status into $out/status.txt
  local name=$1
  shift
  "$@" 2>&1 | tee "$out/$name.log"
  echo "$name: exit ${PIPESTATUS[0]}" | tee -a "$out/status.txt"
}

run() {
  out=${OUT:-gpu-check}
  mkdir -p "$out" /tmp/bdvae-site
  rm -f "$out/status.txt"
  python3 -m pip install -q --no-index --no-deps --target /tmp/bdvae-site .gpu/whl/*.whl
  export PYTHONPATH="$PWD/src:/tmp/bdvae-site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  export BDVAE_TEST_MNIST_SOURCE="$PWD/.gpu/mnist" BDVAE_DATA_DIR=/tmp/bdvae-data
  local device=cuda run_dir=/tmp/bdvae-gpu-check-run
  if [ "${BDVAE_TEST_DEVICE:-cuda}" = cpu ]; then device=cpu; fi
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
  step distributed python3 benchmarks/distributed.py --json "$out/distributed.json"
  rm -rf "$run_dir"
  step train python3 -m bdvae train --device "$device" --out "$run_dir" --set train.epochs=2 --quiet
  step evaluate python3 benchmarks/evaluate.py "$run_dir" --device "$device" --max-batch 20000 \
    --json "$out/evaluate.json"
  ! grep -v ": exit 0$" "$out/status.txt"  # the exit status: 0 when every check passed
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
