#!/usr/bin/env bash
# One tuning sitting on an H100 (run from the repo root on the GPU machine; $OUT collects results).
# The Optuna journal travels in bench/results/studies/, so the next sitting resumes the studies.
. bench/gpu_check.sh
mkdir -p bench/results/studies
S=(--gpu h100 --storage bench/results/studies/h100.journal --out tuned/h100.yaml)
t0=$SECONDS
timeout "${T_REF:-200}" python3 -m pagegen tune "${S[@]}" --specs bench/tune/h100-reference.yaml --trials "${N_REF:-16}" \
    > "$OUT/tune-reference.log" 2>&1; echo "reference rc=$? $((SECONDS - t0))s"
timeout "${T_MODELS:-260}" python3 -m pagegen tune "${S[@]}" --specs bench/tune/h100-models.yaml --budget quick \
    > "$OUT/tune-models.log" 2>&1; echo "models rc=$? $((SECONDS - t0))s"
# write every study's winners (also those of a run cut short by its timeout)
for f in bench/tune/h100-reference.yaml bench/tune/h100-models.yaml; do
    timeout 60 python3 -m pagegen tune "${S[@]}" --specs "$f" --trials 0 >> "$OUT/tune-write.log" 2>&1
done
python3 -m pagegen check --gpu h100 tuned/h100.yaml
python3 -m pagegen show --table tuned/h100.yaml > "$OUT/show.txt" 2>&1
cp tuned/h100.yaml bench/results/studies/h100.journal "$OUT/"
tail -n 25 "$OUT/tune-reference.log"; tail -n 30 "$OUT/tune-models.log"; tail -n 40 "$OUT/show.txt"
