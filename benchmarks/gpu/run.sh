#!/usr/bin/env bash
# The GPU run, from the repository root, in a few minutes (docs/gpu.md says what it records and how to prepare it):
#
#   PYTHON=$(command -v python3) bash benchmarks/gpu/run.sh --out "$OUT"   # on a GPU machine
#   bash benchmarks/gpu/run.sh --rehearse      # on a CPU, against the tests' strict CuPy stand-in, into out/gpu/
#
# Options: --out DIR (else $OUT, else benchmarks/results/gpu/, or out/gpu/ for a rehearsal); --wheels DIR, where a
# prepared mpich wheel is looked for (default .gpu-wheels/); --fail-section NAME, to make one section of
# gpu_run.py raise (the rehearsal test's forced failure). The interpreter is $PYTHON, else .venv/bin/python.
#
# Steps, each under a time limit, its seconds in the summary and the tail of its log on stdout if it fails:
# 1. MPI: mpi4py with an MPI library as found, else the mpich wheel from --wheels unpacked (PATH, LD_LIBRARY_PATH);
# 2. benchmarks/gpu/gpu_run.py: parity, speed against PyTorch eager, the FFN run, a training step;
# 3. `reffuse tp --device gpu` on 2 ranks of tiny and 3 ranks of synthetic-smollm2, sharing the GPU;
# 4. the GPU tests (tests/core/test_backend.py, test_device.py, tests/tp/test_tp.py), if pytest is there.
# At most 8 files, all directly in the output folder: summary.txt, gpu.json, gpu.md, gpu_run.log, tp.json, tp.log,
# tests.log. What the machine lacks is skipped and said so; reffuse needs no install (PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
TAIL_LINES=40
# Seconds: hang guards, far above what a step should take on a GPU, and together (240 + 2 x 60 + 120, with the
# MPI setup and the kill grace) well under 10 minutes, a common limit on one command of a batch GPU machine. A
# rehearsal on a loaded CPU gets three times as long.
LIMIT_GPU_RUN=240 LIMIT_TP=60 LIMIT_TESTS=120

rehearse=0 out=${OUT:-} wheels=.gpu-wheels fail_section=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) rehearse=1 ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    --wheels) wheels=${2:?--wheels needs a folder}; shift ;;
    --fail-section) fail_section=(--fail-section "${2:?--fail-section needs a section name}"); shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1: use --rehearse, --out DIR, --wheels DIR or --fail-section NAME" >&2; exit 2 ;;
  esac
  shift
done

python=${PYTHON:-$root/.venv/bin/python}
if ! python=$(command -v "$python"); then
  echo "run.sh: no Python at ${PYTHON:-.venv/bin/python}: set PYTHON to the interpreter that has NumPy and CuPy" >&2
  exit 2
fi
if [ $rehearse = 1 ]; then
  export REFFUSE_GPU_MODULE=strict_cupy
  export PYTHONPATH="$root/tests/support:${PYTHONPATH:-}"
  # Device-like: the GPU machine's mpi4py finds no MPI library, as one that looks for libmpi.so.12 only on the
  # loader's path does here (a virtual environment's own lib/ left out).
  export MPI4PY_LIBMPI=${MPI4PY_LIBMPI:-libmpi.so.12}
  out=${out:-out/gpu}
  rehearse_flag=(--rehearse)
  LIMIT_GPU_RUN=$((3 * LIMIT_GPU_RUN)) LIMIT_TP=$((3 * LIMIT_TP)) LIMIT_TESTS=$((3 * LIMIT_TESTS))
else
  out=${out:-benchmarks/results/gpu}
  rehearse_flag=()
fi
export PYTHONPATH="$root:${PYTHONPATH:-}"
export MPLBACKEND=Agg
if ! "$python" -c "import reffuse, sys; sys.exit(0 if reffuse.gpu_available() else 1)"; then
  echo "run.sh: no usable GPU for $python (CuPy and a CUDA device): run this on a GPU machine," \
    "or rehearse with --rehearse" >&2
  exit 2
fi
command -v timeout > /dev/null || { echo "run.sh: no \`timeout\` (coreutils) here: every step runs under one" >&2; exit 2; }
mkdir -p "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
rm -f "$out"/{summary.txt,gpu.json,gpu.md,gpu_run.log,tp.json,tp.log,tests.log}   # this script's files only
summary="$out/summary.txt"
say() { echo "$*" | tee -a "$summary"; }
status=0

# step NAME LIMIT LOG [--stdout FILE] COMMAND...: run COMMAND under `timeout LIMIT`, its output appended to LOG as
# it comes (its stdout to FILE instead, where given); sets $elapsed and $last (the last line it wrote to LOG) and
# returns COMMAND's exit status. On failure, the tail of this step's own part of LOG goes to stdout.
step() {
  local name=$1 limit=$2 log=$3 stdout=$3 rc before start
  shift 3
  if [ "$1" = --stdout ]; then stdout=$2; shift 2; fi
  echo "== $name: $* (limit ${limit} s)" >> "$log"
  before=$(wc -c < "$log")
  start=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >> "$stdout" 2>> "$log"
  rc=$?
  elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  last=$(tail -c +$((before + 1)) "$log" | tail -n 1)
  echo "== $name: exit $rc after $elapsed s" >> "$log"
  if [ $rc -ne 0 ]; then
    local why="exit $rc"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then why="timed out after $limit s"; fi
    say "$name: FAILED ($why, $elapsed s); the last $TAIL_LINES lines of its log ($log):"
    tail -c +$((before + 1)) "$log" | tail -n $TAIL_LINES | sed 's/^/    | /' | tee -a "$summary"
  fi
  return $rc
}

module=$("$python" -c 'import reffuse.core.backend as b; print(b.gpu_module_name())')
say "reffuse GPU run, $(date -u +%Y-%m-%dT%H:%MZ), $module, $python$([ $rehearse = 1 ] && echo ', a rehearsal')"

# 1. MPI: as found, else the prepared mpich wheel
launcher=
mpi_error() { "$python" -c "from mpi4py import MPI" 2>&1 | tail -n 1; }
if ! "$python" -c "import mpi4py" 2>/dev/null; then
  say "MPI: mpi4py is not installed for $python: tensor parallelism skipped"
elif [ -z "$(mpi_error)" ]; then
  beside=$(dirname "$python")/mpiexec   # a virtual environment's own launcher first
  launcher=$( [ -x "$beside" ] && echo "$beside" || command -v mpiexec || command -v mpirun || true)
  [ -n "$launcher" ] || say "MPI: mpi4py has its library, but there is no mpiexec or mpirun: tensor parallelism skipped"
else
  say "MPI: no MPI library: \`from mpi4py import MPI\` fails ($(mpi_error))"
  wheel=$(ls "$wheels"/mpich-*.whl 2>/dev/null | head -n 1)
  if [ -z "$wheel" ]; then
    say "MPI: no prepared mpich wheel in $wheels/ (docs/gpu.md: pip download --no-deps mpich -d $wheels/):" \
      "tensor parallelism skipped"
  else
    "$python" -c "
import sys, zipfile
from pathlib import Path
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:  # the wheel's <name>.data/data/ holds bin/, lib/ and include/
    for info in z.infolist():
        inside = info.filename.partition('.data/data/')[2]
        if inside and not info.is_dir():
            target = Path(dest, inside)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
" "$wheel" "$scratch/mpich" && chmod +x "$scratch"/mpich/bin/*
    export PATH="$scratch/mpich/bin:$PATH" LD_LIBRARY_PATH="$scratch/mpich/lib:${LD_LIBRARY_PATH:-}"
    if [ -z "$(mpi_error)" ]; then
      launcher=$scratch/mpich/bin/mpiexec
      version=$("$python" -c 'from mpi4py import MPI; print(" ".join(MPI.Get_library_version().split()[:3]))')
      say "MPI: using $(basename "$wheel"), unpacked: $version"
    else
      say "MPI: $(basename "$wheel") unpacked, and still \`from mpi4py import MPI\` fails ($(mpi_error)):" \
        "tensor parallelism skipped"
    fi
  fi
fi
launch=()
if [ -n "$launcher" ]; then
  launch=("$launcher")
  if "$launcher" --version 2>&1 | grep -q -i -e "open mpi" -e "open-rte" -e openrte; then
    launch+=(--oversubscribe)   # Open MPI: more ranks than cores, and as root only when told
    [ "$(id -u)" = 0 ] && launch+=(--allow-run-as-root)
  fi
fi

# 2. parity and the measurements
if step "gpu_run.py" $LIMIT_GPU_RUN "$out/gpu_run.log" \
    "$python" benchmarks/gpu/gpu_run.py --out "$out" "${rehearse_flag[@]}" "${fail_section[@]}"; then
  say "gpu_run.py: passed ($elapsed s), written to $out/gpu.md:"
else
  status=1
  [ -f "$out/gpu.json" ] && say "gpu_run.py: what it recorded, in $out/gpu.md:"
fi
[ -f "$out/gpu.json" ] && "$python" -c "import json, sys; print('\n'.join('  ' + line for line in json.load(
    open(sys.argv[1]))['summary']))" "$out/gpu.json" | tee -a "$summary"

# 3. tensor parallelism on ranks that share the GPU
if [ ${#launch[@]} -gt 0 ]; then
  echo "{}" > "$out/tp.json"
  small=(--prefill-tokens 16 --decode-tokens 2 --repeats 1)   # correctness and counts: the smallest sizes do
  for run in "tiny 2" "synthetic-smollm2 3"; do
    read -r model ranks <<< "$run"
    : > "$scratch/stdout"
    if step "tp, $ranks ranks of $model" $LIMIT_TP "$out/tp.log" --stdout "$scratch/stdout" \
        "${launch[@]}" -n "$ranks" "$python" -m reffuse tp \
        --model "$model" --device gpu "${small[@]}" --json; then
      "$python" -c "
import json, sys
path, key, text = sys.argv[1], sys.argv[2], open(sys.argv[3]).read()
record = json.loads(text[text.index('{'):])
runs = json.load(open(path)); runs[key] = record; json.dump(runs, open(path, 'w'), indent=1)
s, f = record['sequential'], record['fused']
print(f\"parity {record['parity']}, max rel error {record['max_rel_error']:.1e}; all-reduces per prefill: sequential \"
      f\"{s['allreduce_count']} (expected {s['expected_allreduce_count']}), fused {f['allreduce_count']} (expected \"
      f\"{f['expected_allreduce_count']}); {record['allreduce_path']} ({record['cuda_aware_source']})\")
" "$out/tp.json" "$model, $ranks ranks" "$scratch/stdout" > "$scratch/tp_line" 2>> "$out/tp.log"
      say "tp, $ranks ranks of $model: passed ($elapsed s): $(cat "$scratch/tp_line")"
    else
      status=1
    fi
  done
  say "tp: the ranks share one GPU, so these times say nothing about speed; parity and all-reduce counts are the result"
fi

# 4. the GPU tests
if "$python" -c "import pytest" 2>/dev/null; then
  if step "GPU tests" $LIMIT_TESTS "$out/tests.log" "$python" -m pytest -q -p no:cacheprovider \
      tests/core/test_backend.py tests/core/test_device.py tests/tp/test_tp.py; then
    say "GPU tests: passed ($elapsed s): $last"
  else
    status=1
  fi
else
  say "GPU tests: skipped, pytest is not installed for $python"
fi
say "files in $out: $(ls "$out" | tr '\n' ' ')"
exit $status
