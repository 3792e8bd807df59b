#!/usr/bin/env bash
# The GPU run: on a machine with a GPU, CuPy, NumPy (and, if present, pytest and an MPI launcher with mpi4py),
# from the repository root, in a few minutes:
#
#   bash benchmarks/gpu/run.sh                  # results into benchmarks/results/gpu/
#   bash benchmarks/gpu/run.sh --rehearse       # on a CPU, against the tests' strict CuPy stand-in, into out/gpu/
#
# 1. the GPU tests (tests/core/test_backend.py, test_device.py, tests/tp/test_tp.py), if pytest is there;
# 2. parity of GPU and CPU and the GPU benchmarks (benchmarks/gpu/gpu_run.py: tiny and synthetic-smollm2, which
#    need no weights to fetch);
# 3. `mpiexec -n 2 reffuse tp --device gpu` (both ranks may share one GPU), if a launcher and mpi4py are there.
# What the machine lacks is skipped and said so in the summary; reffuse needs no install (PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
python=${PYTHON:-python3}
out=benchmarks/results/gpu
quick=()
if [ "${1:-}" = "--rehearse" ]; then
  export REFFUSE_GPU_MODULE=strict_cupy
  export PYTHONPATH="$root/tests/support:${PYTHONPATH:-}"
  out=${REFFUSE_GPU_OUT:-out/gpu}
  quick=(--quick)
fi
export PYTHONPATH="$root:${PYTHONPATH:-}"
export MPLBACKEND=Agg
if ! "$python" -c "import reffuse, sys; sys.exit(0 if reffuse.gpu_available() else 1)"; then
  echo "no usable GPU here (CuPy and a CUDA device): run this on a GPU machine, or rehearse with --rehearse" >&2
  exit 2
fi
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
status=0

say "reffuse GPU run, $(date -u +%Y-%m-%dT%H:%MZ), $("$python" -c 'import reffuse.core.backend as b; print(b.gpu_module_name())')"

if "$python" -c "import pytest" 2>/dev/null; then
  if "$python" -m pytest -q -p no:cacheprovider tests/core/test_backend.py tests/core/test_device.py tests/tp/test_tp.py \
      > "$out/tests.txt" 2>&1; then
    say "GPU tests: passed ($(tail -1 "$out/tests.txt"))"
  else
    say "GPU tests: FAILED (see $out/tests.txt)"; status=1
  fi
else
  say "GPU tests: skipped, pytest is not installed here"
fi

if "$python" benchmarks/gpu/gpu_run.py --out "$out" "${quick[@]}" 2> "$out/gpu_run.log"; then
  say "parity and benchmarks: written to $out/gpu.md"
else
  say "parity and benchmarks: FAILED or a target not met (see $out/gpu_run.log and $out/gpu.md)"; status=1
fi

beside=$(dirname "$(command -v "$python")")/mpiexec   # a virtual environment's own launcher first
launcher=$( [ -x "$beside" ] && echo "$beside" || command -v mpiexec || command -v mpirun || true)
if [ -n "$launcher" ] && "$python" -c "from mpi4py import MPI" 2>/dev/null; then
  if timeout 300 "$launcher" -n 2 "$python" -m reffuse tp --model tiny --groups 4-8 --device gpu --json \
      > "$out/tp_tiny_n2_gpu.json" 2> "$out/tp.log"; then
    say "mpiexec -n 2 reffuse tp --device gpu: $("$python" -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"parity {r['parity']}, max rel error {r['max_rel_error']:.1e}, {r['allreduce_path']} ({r['cuda_aware_source']})\")" "$out/tp_tiny_n2_gpu.json")"
  else
    say "mpiexec -n 2 reffuse tp --device gpu: FAILED (see $out/tp.log)"; status=1
  fi
else
  say "tensor parallelism: skipped, no MPI launcher or mpi4py here"
fi
exit $status
