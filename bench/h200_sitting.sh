#!/usr/bin/env bash
# One GPU sitting (written for the H200 machine; any CUDA card works): the GPU test suite, then the
# decode, extend and named-model benchmarks, each under its own `timeout`, most valuable first, all
# inside one overall budget; everything ends up under $OUT as two files (the device returns at most
# 8): sitting-<key>-<date>.tar.gz (every JSON and log) and summary.txt (what ran, exit codes, the
# final tables; also printed last).
#
#   bash bench/h200_sitting.sh                      # from the repository root; ~9 minutes
#   PHASES=decode,models bash bench/h200_sitting.sh
#
# Knobs (environment):
#   PHASES         comma list, run in this order (default tests,decode,extend,models; also prefill (the
#                  chunked-prefill batch and head dims 64/256 of bench/extend.py), fp8serving (the serving
#                  benchmark on bf16 and fp8 pools of the same bytes), chunklab (bench/extend_chunk_lab.py),
#                  fp8lab (bench/fp8_lab/), tilecheck (bench/extend_tile_check.py with TILE, default
#                  128,32,8,5), tune (finish the model set and tune bench/tune/features.yaml; TUNE_PHASES=" "
#                  with TUNE_WRITE_SPECS only writes studies out),
#                  features, verify, fp8, hf; `sanitize` adds
#                  bench/sanitize.sh, limit T_SANITIZE (default 220), e.g. PHASES=sanitize alone)
#   BUDGET_S       seconds for the whole sitting (default 530); a phase gets min(its limit, what is left
#                  - 15 s) and is skipped with under 30 s left
#   T_TESTS T_DECODE T_EXTEND T_MODELS   per-phase limits in seconds (default 180, 130, 110, 100)
#   TEST_WORKERS   pytest-xdist workers (default 8: half the 16 cores; GPU tests are mostly compile-bound)
#   TEST_ARGS      extra pytest arguments (default --maxfail=25: one sitting should list every failure)
#   DECODE_ARGS EXTEND_ARGS MODELS_ARGS FP8_ARGS  extra arguments of bench/kernels.py / extend.py /
#                  kernels.py --models / fp8.py
#   DECODE_FLEX_SHAPES  decode shapes FlexAttention runs on (each is a fresh compile; default 32x8192,mixed)
#   EXTEND_FLEX_SHAPES  extend shapes FlexAttention runs on (default 2048@4096)
# Each benchmark rewrites its JSON after every shape ("partial": true until it ends), so a phase cut
# by its timeout still leaves the shapes it finished.
#   SITTING_COMMIT the commit being measured, written into summary.txt (the device copy has no .git)
# Carried wheels in .whl/ (optuna for the tuner tests) are installed by bench/gpu_check.sh.
set -u
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
OUT=${OUT:-/tmp/out}
export OUT
# shellcheck source=bench/gpu_check.sh
. bench/gpu_check.sh >/dev/null
RES="$OUT/results"
mkdir -p "$RES"
export PAGEGEN_BENCH_RESULTS="$RES" PYTHONUNBUFFERED=1
mv "$OUT/env.txt" "$RES/env.txt" 2>/dev/null

PHASES=${PHASES:-tests,decode,extend,models}
BUDGET_S=${BUDGET_S:-530}
KEY=$(python3 -c "from pagegen.gpu import detect; d = detect(); print(d.key if d else 'cpu')" 2>/dev/null || echo gpu)
DAY=$(date -u +%F)
SUMMARY="$OUT/summary.txt"
{
  echo "pagegen GPU sitting: $KEY $DAY, commit ${SITTING_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  cat "$RES/env.txt" 2>/dev/null
  echo "phases: $PHASES; budget ${BUDGET_S}s"
} >"$SUMMARY"

left() { echo $((BUDGET_S - ($(date +%s) - T0))); }

# run_phase NAME LIMIT LOG TAIL_LINES COMMAND...: under timeout, output to LOG; summary gets rc + tail
run_phase() {
  local name=$1 limit=$2 log=$3 tail_n=$4
  shift 4
  local avail=$(( $(left) - 15 ))
  if [ "$avail" -lt 30 ]; then
    echo "== $name: skipped ($(left) s of the budget left)" | tee -a "$SUMMARY"
    return
  fi
  [ "$limit" -gt "$avail" ] && limit=$avail
  echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
  local t
  t=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local note=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (TIMED OUT)"
  echo "-- $name: rc=$rc$note in $(( $(date +%s) - t ))s; log $(basename "$log"); last lines:" | tee -a "$SUMMARY"
  tail -n "$tail_n" "$log" | cut -c1-200 | tee -a "$SUMMARY"
}

IFS=',' read -ra LIST <<<"$PHASES"
for phase in "${LIST[@]}"; do
  case "$phase" in
    tests)
      # shellcheck disable=SC2086
      run_phase tests "${T_TESTS:-180}" "$RES/gpu-tests-$KEY-$DAY.log" 25 \
        env PAGEGEN_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" \
        --durations=10 ${TEST_ARGS:---maxfail=25} ;;
    decode)
      # shellcheck disable=SC2086
      run_phase decode "${T_DECODE:-130}" "$RES/decode-$KEY-$DAY.stdout" 14 \
        python3 bench/kernels.py --impls sdpa,default,tuned,flex \
        --flex-shapes "${DECODE_FLEX_SHAPES:-32x8192,mixed}" ${DECODE_ARGS:-} ;;
    extend)
      # shellcheck disable=SC2086
      run_phase extend "${T_EXTEND:-110}" "$RES/extend-$KEY-$DAY.stdout" 36 \
        python3 bench/extend.py --impls sdpa,pagegen,default,flex \
        --flex-shapes "${EXTEND_FLEX_SHAPES:-2048@4096}" ${EXTEND_ARGS:-} ;;
    prefill)  # issue 18's other targets: the chunked-prefill batch (blocks 16 and 64), head_dim 64 and 256
      # shellcheck disable=SC2016  # $B expands in the inner shell
      run_phase prefill "${T_PREFILL:-200}" "$RES/extend-prefill-$KEY-$DAY.stdout" 40 bash -c '
        B=default,cudnn,flash,efficient
        timeout 75 python3 bench/extend.py --shapes batch16 --impls sdpa,flex,pagegen,default --backends $B --reps 20 --tag batch-bs16
        timeout 45 python3 bench/extend.py --shapes batch16 --block-size 64 --impls pagegen,default,default-tma --reps 20 --tag batch-bs64
        timeout 35 python3 bench/extend.py --head-dim 64 --shapes 2048@0,4608@0 --impls sdpa,pagegen,default --backends $B --tag hd64
        timeout 35 python3 bench/extend.py --head-dim 256 --shapes 2048@0,4608@0 --impls sdpa,pagegen,default --backends $B --tag hd256' ;;
    models)
      # shellcheck disable=SC2086
      run_phase models "${T_MODELS:-100}" "$RES/decode-models-$KEY-$DAY.stdout" 18 \
        python3 bench/kernels.py --models --backends default,cudnn,flash,efficient ${MODELS_ARGS:-} ;;
    sanitize)
      run_phase sanitize "${T_SANITIZE:-220}" "$RES/sanitize-$KEY-$DAY.stdout" 8 \
        env OUT="$RES" SAN_LIMIT="$(( ${T_SANITIZE:-220} - 20 ))" bash bench/sanitize.sh ;;
    tune)  # finish the model set and tune the feature models into tuned/<key>.yaml (held-out checked)
      run_phase tune "${T_TUNE:-300}" "$RES/tune-$KEY-$DAY.stdout" 40 \
        env OUT="$RES" PHASES="${TUNE_PHASES:-models features}" T_MODELS="${T_TUNE_MODELS:-90}" \
        T_FEATURES="${T_TUNE_FEATURES:-120}" T_WRITE="${T_TUNE_WRITE:-40}" PHASE_ARGS=--no-held-out \
        WRITE_SPECS="${TUNE_WRITE_SPECS:-bench/tune/models.yaml bench/tune/features.yaml}" \
        bash bench/tune/run.sh ;;
    features)
      run_phase features "${T_FEATURES:-120}" "$RES/features-$KEY-$DAY.stdout" 30 python3 bench/features.py ;;
    verify)
      run_phase verify "${T_VERIFY:-130}" "$RES/verify-$KEY-$DAY.stdout" 30 python3 bench/verify.py ;;
    fp8)
      # shellcheck disable=SC2086
      run_phase fp8 "${T_FP8:-130}" "$RES/fp8-$KEY-$DAY.stdout" 30 python3 bench/fp8.py ${FP8_ARGS:-} ;;
    chunklab)  # issue 18 item 2: short extends over long prefixes as chunked verify (bench/extend_chunk_lab.py)
      run_phase chunklab "${T_CHUNKLAB:-150}" "$RES/extend-chunk-lab-$KEY-$DAY.stdout" 20 \
        python3 bench/extend_chunk_lab.py --gpu --out "$RES" ;;
    fp8lab)  # issue 16: fp8 decode with V transposed against today's fp8 kernel (bench/fp8_lab/)
      # shellcheck disable=SC2016  # expands in the inner shell
      run_phase fp8lab "${T_FP8LAB:-200}" "$RES/fp8-lab-$KEY-$DAY.stdout" 30 bash -c \
        'python3 bench/fp8_lab/lab.py --gpu && python3 bench/fp8_lab/lab.py --inspect --json "$PAGEGEN_BENCH_RESULTS/fp8-vt-lab-inspect.json"' ;;
    tilecheck)  # issue 18: an extend tile on the test suite's cases, admitted or not (bench/extend_tile_check.py)
      run_phase tilecheck "${T_TILECHECK:-90}" "$RES/extend-tile-check-$KEY-$DAY.stdout" 20 \
        python3 bench/extend_tile_check.py --tile "${TILE:-128,32,8,5}" --head-dims 192,256 ;;
    fp8serving)  # issue 16: the serving benchmark on a bf16 and an fp8 pool of the same bytes
      # shellcheck disable=SC2086
      run_phase fp8serving "${T_FP8SERVING:-170}" "$RES/serving-fp8-$KEY-$DAY.stdout" 25 \
        python3 -m bench.serving --kv-dtype fp8_e4m3 ${FP8SERVING_ARGS:---kv-gib 1 --requests 1000 --max-model-len 2048 --time-cap 40 --total-budget 150} ;;
    hf)
      # shellcheck disable=SC2086
      run_phase hf "${T_HF:-150}" "$RES/hf-serving-$KEY-$DAY.stdout" 20 \
        python3 bench/hf_serving.py ${HF_ARGS:---requests 200 --time-cap 50} ;;
    *)
      echo "== unknown phase '$phase' (expected tests, decode, extend, prefill, models, sanitize, tune, features, verify, fp8serving, chunklab, fp8lab, tilecheck," \
        "fp8, hf): skipped" \
        | tee -a "$SUMMARY" ;;
  esac
done

# pack: one tar of everything but the summary (the device returns at most 8 files, 2 folders deep)
echo "total $(( $(date +%s) - T0 ))s" >>"$SUMMARY"
TAR="sitting-$KEY-$DAY.tar.gz"
(cd "$OUT" && tar czf "$TAR" --exclude="$TAR" --exclude=summary.txt results && rm -rf results)
ls -la "$OUT" >>"$SUMMARY"
echo
cat "$SUMMARY"
