#!/usr/bin/env bash
# Nsight Compute profiles of single attention steps (bench/ncu_cases.py), pagegen beside the baseline it
# is compared with, on the GPU this runs on. One ncu run a case, only the kernels inside the case's NVTX
# range "profile" (after its warm-up), the sections that explain a bandwidth or a matmul-rate gap:
# speed of light, memory workload, compute workload (pipe use), warp state (stall reasons), scheduler,
# occupancy, launch (registers, shared memory). Boost clocks are left alone (--clock-control none), as
# the benchmarks run; caches are flushed between replay passes (ncu's default).
#
#   CASES="decode:Llama-3-8B:128x4096:NHD extend:128:2048@0" bash bench/ncu_profile.sh
# Writes $OUT/ncu/<case>.txt (stdout: the case's own lines, ncu's ==PROF== lines and the report as CSV
# lines, ncu --csv --page details) and <case>.log (stderr); bench/ncu_summary.py turns them into one
# table. T_CASE: seconds a case (default 90); BUDGET_S: all cases (default 400); a case with under 30 s
# left is skipped.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/out}
DIR="$OUT/ncu"
mkdir -p "$DIR"
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
[ -x "$NCU" ] || { echo "no ncu on this machine" | tee "$DIR/none.log"; exit 1; }
T0=$(date +%s)
SECTIONS=(SpeedOfLight MemoryWorkloadAnalysis ComputeWorkloadAnalysis WarpStateStats SchedulerStats Occupancy
          LaunchStats)
SEC_ARGS=()
for s in "${SECTIONS[@]}"; do SEC_ARGS+=(--section "$s"); done
"$NCU" --version | tee "$DIR/ncu-version.txt"
for case in ${CASES:?set CASES}; do
  left=$(( ${BUDGET_S:-400} - ($(date +%s) - T0) ))
  [ "$left" -lt 30 ] && { echo "== $case: skipped (${left}s left)"; continue; }
  limit=${T_CASE:-90}
  [ "$limit" -gt "$left" ] && limit=$left
  name=${case//[:@]/_}
  t=$(date +%s)
  timeout "$limit" "$NCU" --nvtx --nvtx-include "profile/" --clock-control none "${SEC_ARGS[@]}" \
    --csv --page details python3 bench/ncu_cases.py "$case" >"$DIR/$name.txt" 2>"$DIR/$name.log"
  echo "== $case: rc=$? in $(( $(date +%s) - t ))s, $(grep -c '^"' "$DIR/$name.txt") csv lines"
done
