#!/usr/bin/env bash
# One tuning sitting on the GPU this runs on (repo root of the GPU machine; $OUT collects results).
#   PHASES="decode extend models features verify fp8" bash bench/tune/run.sh
# decode: the reference decode spec on its 9 buckets (bench/tune/decode-reference.yaml)
# extend: the reference extend spec (bench/tune/extend-reference.yaml)
# models: the other model shapes, --budget quick (bench/tune/models.yaml)
# models-hnd: Phi-3-mini and Llama-3.2-1B on HND pools (bench/tune/models-hnd.yaml), time limit T_MODELS_HND
#   (default 90 s); not in the default PHASES
# extend-models: extend for the named models (bench/tune/extend-models.yaml), 8 trials each, time limit
#   T_EXTEND_MODELS (default 240 s); not in the default PHASES
# features: the named feature models (sliding window, softcap, sinks, ALiBi: Mistral-7B, Gemma-2-9B's
#   two layer kinds, gpt-oss-20b's two kinds, MPT-7B, Mistral extend), --budget quick, time limit
#   T_FEATURES (default 90 s: the first specs of bench/tune/features.yaml, in priority order; about
#   30 s a spec, so T_FEATURES=240 covers all 7)
# verify: the reference spec at q_len 2, 4, 8 (speculative verify, issue 17: bench/tune/verify.yaml),
#   --budget quick, time limit T_VERIFY (default 150 s)
# fp8: fp8 KV pools (issue 16: bench/tune/fp8.yaml, the reference e4m3 first), --budget quick, time limit
#   T_FP8 (default 150 s); FP8_SPACE (e.g. "num_stages=4,5,6,8") searches a restricted space in its own
#   study, opt-in stage values included (spec.OPT_IN_VALUES); FP8_KEYS (variant keys, space-separated) tunes
#   and writes out only those entries of the list
# The table key comes from the live GPU (tuned/<key>.yaml). New studies are warm-started from that
# table and from every other shipped table (--warm-from: a sibling card's winners are a good first
# guess). The Optuna journal lives in bench/results/studies/<key>.journal, so a later sitting resumes.
# Every `pagegen tune` ends with its held-out check: shapes between the buckets (uniform and ragged),
# the table's pick timed against the heuristic's, printed in tune.log and recorded in the table
# (`held_out:` per entry); where the table's pick is > 3% slower near a bucket, the shape is added
# as a bucket. The write-out below runs it on every study's winners (also after a phase's timeout).
# Under $OUT: tune.log (every phase's log, the write-out and `pagegen show`), <key>.yaml, <key>.journal.
# shellcheck source=bench/gpu_check.sh
. bench/gpu_check.sh
KEY=$(python3 -c "from pagegen import gpu; print(gpu.live_gpu().key)") || exit 1
mkdir -p bench/results/studies
S=(--gpu "$KEY" --storage "bench/results/studies/$KEY.journal" --out "tuned/$KEY.yaml")
W=()
for t in tuned/*.yaml; do [ "$t" != "tuned/$KEY.yaml" ] && W+=(--warm-from "$t"); done
phase() {  # phase NAME SECONDS ARGS...: one tune run under a time limit, its log under $OUT
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "=== phase $name: pagegen tune $*" >> "$OUT/tune.log"
    # PHASE_ARGS (e.g. --no-held-out: leave the held-out check to the write-out) is split into words
    # shellcheck disable=SC2086
    timeout "$limit" python3 -m pagegen tune "${S[@]}" "${W[@]}" "$@" ${PHASE_ARGS:-} >> "$OUT/tune.log" 2>&1
    echo "=== $name rc=$? $((SECONDS - t0))s" | tee -a "$OUT/tune.log"
}
FP8_ONLY=()  # FP8_KEYS as --spec arguments: the fp8 phase and the write-out of fp8.yaml take only those entries
for k in ${FP8_KEYS:-}; do FP8_ONLY+=(--spec "$k"); done
for p in ${PHASES:-decode extend models features verify fp8}; do
    case $p in
        decode) phase decode "${T_DECODE:-150}" --specs bench/tune/decode-reference.yaml --trials "${N_DECODE:-16}" ;;
        extend) phase extend "${T_EXTEND:-240}" --specs bench/tune/extend-reference.yaml --trials "${N_EXTEND:-10}" ;;
        extend-models) phase extend-models "${T_EXTEND_MODELS:-240}" --specs bench/tune/extend-models.yaml --trials "${N_EXTEND_MODELS:-8}" ;;
        models) phase models "${T_MODELS:-260}" --specs bench/tune/models.yaml --budget quick ;;
        models-hnd) phase models-hnd "${T_MODELS_HND:-90}" --specs bench/tune/models-hnd.yaml --budget quick ;;
        features) phase features "${T_FEATURES:-90}" --specs bench/tune/features.yaml --budget quick ;;
        verify) phase verify "${T_VERIFY:-150}" --specs bench/tune/verify.yaml --budget quick ;;
        fp8) phase fp8 "${T_FP8:-150}" --specs bench/tune/fp8.yaml --budget quick "${FP8_ONLY[@]}" \
                 ${FP8_SPACE:+--space "$FP8_SPACE"} ;;
        *) echo "unknown phase $p" >&2; exit 2 ;;
    esac
done
# write every study's winners (also those of a run cut short by its timeout), then the held-out check
echo "=== write-out and held-out check" >> "$OUT/tune.log"
# WRITE_SPECS: which spec files to write out (default all eight)
for f in ${WRITE_SPECS:-bench/tune/decode-reference.yaml bench/tune/extend-reference.yaml bench/tune/models.yaml \
         bench/tune/features.yaml bench/tune/verify.yaml bench/tune/fp8.yaml bench/tune/extend-models.yaml \
         bench/tune/models-hnd.yaml}; do
    only=()
    [ "$f" = bench/tune/fp8.yaml ] && only=("${FP8_ONLY[@]}")
    timeout "${T_WRITE:-300}" python3 -m pagegen tune "${S[@]}" --specs "$f" "${only[@]}" --trials 0 --quiet \
        >> "$OUT/tune.log" 2>&1
    echo "=== write-out $f rc=$?" | tee -a "$OUT/tune.log"
done
python3 -m pagegen check --gpu "$KEY" "tuned/$KEY.yaml"
echo "=== pagegen show" >> "$OUT/tune.log"
python3 -m pagegen show --table "tuned/$KEY.yaml" >> "$OUT/tune.log" 2>&1
cp "tuned/$KEY.yaml" "bench/results/studies/$KEY.journal" "$OUT/"
