#!/usr/bin/env bash
# The committed report images: `pagegen report` of every shipped table (tuned/h100.yaml, tuned/h200.yaml
# when present) with its committed study (bench/results/studies/<key>.journal when present), into
# docs/report/<key>/. By default only the summary images the README shows (rooflines, gain over the
# heuristic, held-out check); --all also copies each study's history and parameter importances.
#
#   bash bench/report_all.sh [--all]          # needs matplotlib: pip install -e ".[report]"
#
# Ceilings: a table records the card's measured copy bandwidth / matrix rate (gpu.copy_gbps,
# gpu.matmul_tflops) when the tuner wrote them; tuned/h100.yaml predates those fields and can never be
# re-tuned (no H100 is lent any more), so its figures are passed here, as measured on that card on
# 2026-11-25 (README: copy bandwidth 3028 GB/s in the decode benchmark run; bf16 matmul 733 TFLOP/s).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
all=0
[ "${1:-}" = "--all" ] && all=1

ceilings() {
    case "$1" in
        h100) echo "--copy-gbps 3028 --matmul-tflops 733" ;;
        h200) echo "--matmul-tflops 801" ;;  # measured in the 2026-12-01 sitting (the table records copy_gbps)
        *) echo "" ;;  # the table's own (add --copy-gbps/--matmul-tflops here if a table lacks them)
    esac
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
done_any=0
for key in h100 h200; do
    table="tuned/$key.yaml"
    [ -f "$table" ] || { echo "skip $key: no $table"; continue; }
    args=(report --gpu "$key" --table "$table" --out "$tmp/$key")
    study="bench/results/studies/$key.journal"
    if [ -f "$study" ]; then args+=(--storage "$study"); else echo "$key: no $study (report without studies)"; fi
    # shellcheck disable=SC2207  # the ceilings are flag words without spaces
    extra=($(ceilings "$key"))
    "$python" -m pagegen "${args[@]}" "${extra[@]}"
    dest="docs/report/$key"
    rm -rf "$dest"
    mkdir -p "$dest"
    if [ "$all" = 1 ]; then
        cp "$tmp/$key"/*.png "$dest/"
    else
        for f in "$tmp/$key"/roofline_*.png "$tmp/$key/gain.png" "$tmp/$key/held_out.png"; do
            [ -f "$f" ] && cp "$f" "$dest/"
        done
    fi
    echo "$dest: $(find "$dest" -name '*.png' | wc -l) images"
    done_any=1
done
[ "$done_any" = 1 ] || { echo "no table in tuned/ to report" >&2; exit 1; }
