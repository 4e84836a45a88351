#!/usr/bin/env bash
# The kernel tests under compute-sanitizer's memcheck (out-of-bounds and misaligned accesses, in every
# kernel: decode, extend, kv_write, copy_blocks), on a subset chosen to finish in about 3 minutes:
#   decode     every block size x head_dim 64/96/128/256 (NHD, bf16; lengths 1, block + 1, 37: page
#              edges), ragged lengths (1, block, block + 1, 9 blocks + 5) and split-KV on/off in both
#              layouts, tiles spanning pages
#   extend     every block size x head_dim 64/96/128/256, ragged batches (empty prefix, q_len 1, q_len
#              not a tile multiple) and chunked prefill in both layouts
#   kv_write, copy_blocks   the reference-equality cases (bf16), strided inputs, padded pools, and the
#              realistic-size sweep at head_dim 64/96/128/256
# PYTORCH_NO_CUDA_MEMORY_CACHING=1: torch's caching allocator hands out pieces of large blocks, so an
# out-of-bounds access inside one would go unseen; without it every tensor is its own allocation.
#
#   bash bench/sanitize.sh          # from the repository root, on a GPU machine (Firecracker: memcheck works)
# Knobs: SAN_WORKERS (pytest-xdist workers, default 6), SAN_LIMIT (seconds, default 200), SAN_K (the
# pytest -k expression), SAN_TOOL (default memcheck), SAN_ARGS (extra pytest arguments).
# Writes $OUT/sanitize-<key>-<date>.log (default OUT=bench/results); exit 0 only if pytest passed and
# the sanitizer reported no error.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
[ -d .whl ] && . bench/gpu_check.sh >/dev/null
command -v compute-sanitizer >/dev/null || export PATH="$PATH:/usr/local/cuda/bin"
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 PAGEGEN_TEST_DEVICE=cuda PYTORCH_NO_CUDA_MEMORY_CACHING=1
KEY=$(python3 -c "from pagegen.gpu import detect; d = detect(); print(d.key if d else 'cpu')" 2>/dev/null || echo gpu)
LOG="$OUT/sanitize-$KEY-$(date -u +%F).log"
HD='(-64- or -96- or -128- or -256-)'
HDX='(-64] or -96] or -128] or -256])'
DEFAULT_K="(test_decode.py and ((test_every_axis_value and NHD and bf16 and $HD) or test_ragged_lengths"
DEFAULT_K+=" or test_split_kv_on_and_off or test_tiles_spanning_pages))"
DEFAULT_K+=" or (test_extend.py and ((test_every_axis_value and $HDX) or test_ragged_batch"
DEFAULT_K+=" or test_chunked_prefill_equals_full))"
DEFAULT_K+=" or (test_kv_ops.py and (((test_kv_write_matches_reference or test_copy_blocks_matches_reference) and bf16)"
DEFAULT_K+=" or strided or padded or (test_kv_ops_gpu_sweep and $HD)))"
K=${SAN_K:-$DEFAULT_K}
TOOL=${SAN_TOOL:-memcheck}
{
  echo "compute-sanitizer --tool $TOOL on $KEY, $(date -u +%FT%TZ); PYTORCH_NO_CUDA_MEMORY_CACHING=1"
  compute-sanitizer --version 2>&1 | tail -n 1
  echo "pytest -k: $K"
} | tee "$LOG"
set -o pipefail
# shellcheck disable=SC2086
timeout --signal=TERM --kill-after=15 "${SAN_LIMIT:-200}" \
  compute-sanitizer --tool "$TOOL" --target-processes all --error-exitcode 86 --print-limit 50 \
  python3 -m pytest -q -p no:cacheprovider -n "${SAN_WORKERS:-6}" --durations=5 \
  tests/test_decode.py tests/test_extend.py tests/test_kv_ops.py -k "$K" ${SAN_ARGS:-} 2>&1 | tee -a "$LOG"
rc=$?
errors=$(grep -c "========= Invalid\|========= Program hit\|========= Error" "$LOG")
summaries=$(grep "ERROR SUMMARY" "$LOG" | sort | uniq -c | tr '\n' ';')
{
  echo "---"
  echo "exit $rc (86: the sanitizer found errors; 124/137: timed out); sanitizer error lines: $errors"
  echo "sanitizer summaries (one per process): $summaries"
  if [ "$rc" -eq 0 ] && [ "$errors" -eq 0 ]; then echo "CLEAN"; else echo "NOT CLEAN"; fi
} | tee -a "$LOG"
[ "$rc" -eq 0 ] && [ "$errors" -eq 0 ]
