#!/usr/bin/env bash
# `make gpu-check`: the Triton kernels on any CUDA machine with torch + Triton, no vLLM.
#
# 1. Its own environment: a venv over the machine's Python that sees its torch and Triton
#    (--system-site-packages), with only this package, pytest and pytest-timeout added; torch and
#    Triton are installed into it only when the machine has none.
# 2. Every kernel test; on a CUDA machine they run on the GPU (the tensor-core paths, the
#    determinism tests, the `gpu`-marked model shapes, the compile check).
# 3. `lvlm-prune bench kernels`: select_tokens with Triton and with the torch reference, each
#    shape against its memory floor. Its table is the last thing printed.
#
#   GPU_CHECK_PYTHON=python  use that interpreter as it is: create and install nothing
#   GPU_CHECK_CPU=1          without a GPU, run the same steps with the GPU-only parts skipped
#                            (`pytest -m gpu`, all skipped; the benchmark's --smoke): a dry run
#   GPU_CHECK_OUT=folder     where the benchmark writes (default: benchmarks/results, or its
#                            git-ignored smoke/ for the dry run)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  py=$GPU_CHECK_PYTHON
else
  venv=${GPU_CHECK_VENV:-.cache/gpu-check-venv}  # .cache/: git-ignored
  [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
  py=$venv/bin/python
  pip=("$py" -m pip install -q --disable-pip-version-check)
  "$py" -c "import torch, triton" 2>/dev/null || "${pip[@]}" torch triton
  "${pip[@]}" -e . pytest pytest-timeout
fi

if "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  tests=(tests/kernels)
  bench=()
elif [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  tests=(-m gpu tests/kernels)
  bench=(--smoke)
else
  echo "gpu-check: torch sees no CUDA GPU (GPU_CHECK_CPU=1 runs the steps without one)" >&2
  exit 1
fi

tests_status=0
bench_status=0
"$py" -m pytest -q -p no:cacheprovider "${tests[@]}" || tests_status=$?
echo
"$py" -m lvlm_prune.benchmarks kernels ${bench[@]+"${bench[@]}"} ${GPU_CHECK_OUT:+--out "$GPU_CHECK_OUT"} ||
  bench_status=$?
echo "gpu-check: pytest ${tests[*]} exited $tests_status, the kernel benchmark $bench_status"
[ "$tests_status" = 0 ] && [ "$bench_status" = 0 ]
