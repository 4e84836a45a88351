"""Config selection for the public ops: the live GPU's tuned table, else a shape-aware heuristic.

    select_config(spec, batch, max_ctx, kv_heads, ragged=False) -> Config

Shape buckets are family-aware (the same call serves every family):
  decode: `batch` = sequences in the step, `max_ctx` = longest context (tokens); bucket (batch, ctx).
  extend: `batch` = new query tokens in the step (q_tokens), `max_ctx` = longest context the new
          tokens attend to; bucket (q_tokens, ctx).
`kv_heads` is the number of KV heads of the call (decode programs = batch x kv_heads).
`ragged` (decode): the batch's lengths are far from uniform (see `is_ragged`). A ragged batch is
looked up among the buckets tuned on ragged lengths (`AxCTXr`), a uniform one among the others:
with equal (batch, longest context) the two want different splits, because a ragged batch without
split-KV leaves SMs idle while its longest sequences finish.

The table, the live GPU and the caches belong to `pagegen.runtime.RUNTIME` (where the table is
found, when it is stale, how a table change drops every cache); this module holds the rules.

Lookup rules (`lookup_config`):
  1. the entry of exactly this spec (none, or stale -> the heuristic, after one warning);
  2. among the entry's buckets of the call's kind (ragged or uniform), the one nearest to the call's
     shape in log2 space (so a batch of 2 gets the batch-1 winner, not the batch-256 one); for
     decode the call's batch is first rescaled by kv_heads / the entry's tuned kv_heads, so a model
     with fewer KV heads maps to the bucket with the same number of programs;
  3. an entry with no bucket of the call's kind -> the heuristic of that kind (a ragged batch gets
     the heuristic's ragged rule, never a uniform winner tuned on full-length batches, and a
     uniform batch never gets a ragged winner): a table must never make a shape slower than none;
  4. a call farther than NEAR_LOG2 from every bucket of its kind, or equally near to buckets whose
     winners differ -> the heuristic too: a winner
     does not carry over to a shape it was never near (measured on the H200: the 8x4096 winner ran
     3x2896 1.4x slower than the heuristic, the 64x8192r winner 1x8192r 1.7x slower). Shapes
     within NEAR_LOG2 are what `pagegen tune`'s held-out check times, adding a bucket where the
     table's pick loses, so every shape a table answers for is checked against the heuristic.

The hot path is one dict lookup keyed by (spec, batch, max_ctx, kv_heads, ragged): the table is read once,
each new key is resolved once; nothing here reads device tensors (no sync) or renders a template.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import TYPE_CHECKING

from pagegen.runtime import ENV_TABLE, RUNTIME, TunedTableWarning, stale_reason, table_path, tuned_dir
from pagegen.spec import (
    Q_LENS,
    SPLIT_SIZE_VALUES,
    Config,
    KernelSpec,
    default_config,
    illegal_reason,
    large_batch_config,
    next_pow2,
    verify_fits,
)

if TYPE_CHECKING:
    from pagegen.table import BucketResult, Entry, Table

__all__ = [
    "ENV_TABLE", "MIN_SPLIT_CTX", "RAGGED_CHUNKS", "RAGGED_FILL", "TunedTableWarning", "attention_path", "chunk_len",
    "explain", "extend_chunk_route", "heuristic_config", "is_ragged", "lookup_config", "max_chunk_rows",
    "nearest_bucket", "reset", "select_config", "stale_reason", "table_path", "tuned_dir", "use_table",
]

MIN_SPLIT_CTX = 512  # contexts shorter than this are never split by the heuristic
RAGGED_FILL = 0.75  # a decode batch whose tokens fill less than this of batch x longest is ragged
RAGGED_CHUNKS = 4  # the heuristic splits a ragged batch's longest sequence into at least this many
NEAR_LOG2 = 1.5  # a bucket answers for calls within this distance in (log2 a, log2 ctx); farther: heuristic


def is_ragged(batch: int, max_ctx: int, sum_ctx: int | None) -> bool:
    """Whether a decode batch of `batch` sequences, the longest `max_ctx` tokens and `sum_ctx` tokens
    in all, counts as ragged: sum_ctx < RAGGED_FILL x batch x max_ctx. None (unknown) -> False."""
    if sum_ctx is None or batch <= 1 or max_ctx <= 0:
        return False
    return sum_ctx < RAGGED_FILL * batch * max_ctx


def nearest_bucket(entry: Entry, a: int, ctx: int, kv_heads: int = 0, ragged: bool = False,
                   max_dist: float = NEAR_LOG2) -> BucketResult | None:
    """The entry's bucket nearest to shape (a, ctx) in log2 space (decode: a = batch, rescaled by
    kv_heads / entry.kv_heads when both are known; extend: a = q_tokens) among the buckets whose
    `ragged` flag equals `ragged`; None when the entry has no bucket of that kind within `max_dist`
    (Euclidean distance in (log2 a, log2 ctx)), or when equally near buckets disagree on the config
    (128x2048 between 128x1024, 128x4096 and 256x2048: the heuristic decides, measured faster there)."""
    a_eff = float(max(1, a))
    if entry.spec.family == "decode" and kv_heads and entry.kv_heads:
        a_eff = a_eff * kv_heads / entry.kv_heads
    la, lc = math.log2(a_eff), math.log2(max(1, ctx))

    def dist(b) -> tuple[float, int, int]:
        return ((math.log2(b.shape[0]) - la) ** 2 + (math.log2(b.shape[1]) - lc) ** 2, b.shape[0], b.shape[1])

    same_kind = [b for b in entry.buckets if b.ragged == ragged]
    best = min(same_kind, key=dist) if same_kind else None
    if best is None or math.sqrt(dist(best)[0]) > max_dist:
        return None
    tied = {b.config for b in same_kind if dist(b)[0] <= dist(best)[0] + 1e-9}
    return best if len(tied) == 1 else None  # equally near buckets that disagree: no evidence for either


def heuristic_config(spec: KernelSpec, batch: int, max_ctx: int, kv_heads: int, sm_count: int,
                     ragged: bool = False) -> Config:
    """The shape-aware default when no tuned entry applies.

    decode: spec's default tiles, and split-KV (flash-decoding) when one of these rules asks for it
    and the longest context is >= MIN_SPLIT_CTX (the smallest split wins when several do):
      large:  batch x kv_heads programs fill the SMs and spec.large_batch_config(spec) names a config
              (fp8 pools at head_dim 128) -> its tiles, and its split_size if that cuts the longest
              sequence at least in two;
      fill:   batch x kv_heads programs cannot fill the SMs -> the legal split_size that brings
              programs x splits nearest to 2 x sm_count (in log space);
      ragged: the lengths are ragged -> the largest legal split_size that cuts the longest
              sequence into >= RAGGED_CHUNKS pieces, so the long sequences do not run alone at
              the end of the step while the short ones' SMs idle.
    Other families: default_config(spec).
    """
    base = default_config(spec)
    if spec.family != "decode" or max_ctx < MIN_SPLIT_CTX:
        return base
    programs = max(1, batch * max(1, kv_heads))
    picks = []
    large = large_batch_config(spec) if programs >= sm_count else None
    if large is not None:
        base = replace(large, split_size=0)
        if -(-max_ctx // large.split_size) >= 2:
            picks.append(large.split_size)
    legal = [s for s in SPLIT_SIZE_VALUES if s > 0 and s % base.block_n == 0 and -(-max_ctx // s) >= 2]
    if programs < sm_count and legal:
        target = 2.0 * sm_count
        picks.append(min(legal, key=lambda s: (abs(math.log(programs * -(-max_ctx // s) / target)), s)))
    if ragged:
        chunked = [s for s in legal if s >= MIN_SPLIT_CTX and -(-max_ctx // s) >= RAGGED_CHUNKS]
        if chunked:
            picks.append(max(chunked))
    if not picks:
        return base
    cfg = replace(base, split_size=min(picks))
    return cfg if illegal_reason(spec, cfg) is None else base


def lookup_config(entry: Entry | None, spec: KernelSpec, batch: int, max_ctx: int, kv_heads: int, ragged: bool,
           sm_count: int, where: str = "table") -> tuple[Config, str]:
    """(config, where it came from) for a call shape by the lookup rules of the module docstring:
    the nearest bucket of the call's kind in `entry`, else the heuristic for `sm_count` SMs."""
    if entry is not None:
        b = nearest_bucket(entry, batch, max_ctx, kv_heads, ragged)
        if b is not None:
            return b.config, f"table {where} bucket {b.name}"
        why = (f"heuristic ({where} has no single nearest {'ragged' if ragged else 'uniform'} bucket of "
               f"{entry.key} within {NEAR_LOG2} of {batch}x{max_ctx} in log2 space)")
    else:
        why = "heuristic"
    return heuristic_config(spec, batch, max_ctx, kv_heads, sm_count, ragged), why


def _resolve(spec: KernelSpec, batch: int, max_ctx: int, kv_heads: int, ragged: bool) -> tuple[Config, str]:
    entry = RUNTIME.entry(spec)
    return lookup_config(entry, spec, batch, max_ctx, kv_heads, ragged, RUNTIME.sm_count(), RUNTIME.table_source)


def _cached(spec: KernelSpec, batch: int, max_ctx: int, kv_heads: int, ragged: bool) -> tuple[Config, str]:
    key = (spec, batch, max_ctx, kv_heads, ragged)
    hit = RUNTIME.lookup("config", key)
    if hit is None:
        generation = RUNTIME.generation
        hit = _resolve(spec, batch, max_ctx, kv_heads, ragged)
        RUNTIME.store("config", key, hit, generation)
    return hit


def select_config(spec: KernelSpec, batch: int, max_ctx: int, kv_heads: int = 1, ragged: bool = False) -> Config:
    """Config for `spec` at a call of shape (batch, max_ctx) with `kv_heads` KV heads.

    decode: batch = sequences, max_ctx = longest context, ragged = is_ragged(...) of the batch;
    extend: batch = q_tokens, max_ctx = longest context (ragged unused). Cached by the runtime:
    after the first call per key (and table) this is one dict lookup. Never syncs.
    """
    return _cached(spec, batch, max_ctx, kv_heads, ragged)[0]


def explain(spec: KernelSpec, batch: int, max_ctx: int, kv_heads: int = 1,
            ragged: bool = False) -> tuple[Config, str]:
    """(config, where it came from: "table <path> bucket AxC[r]" or "heuristic ...") for a call shape."""
    return _cached(spec, batch, max_ctx, kv_heads, ragged)


def use_table(table: str | os.PathLike | Table | None) -> None:
    """Use this table file (or Table object) from now on; None returns to automatic lookup.
    Drops every cached config and plan (see pagegen.runtime)."""
    RUNTIME.use_table(table)


def reset() -> None:
    """Forget the loaded table, the cached configs and plans and which warnings were given."""
    RUNTIME.reset()


# --- which kernel runs a step of new tokens (issue 17) -------------------------------------------------

def attention_path(max_q_len: int, group_size: int, head_dim: int) -> int:
    """The kernel for a step whose sequences have at most `max_q_len` new query tokens each (their K/V
    already in the pool), with `group_size` query heads per KV head: the decode spec's q_len, or 0 for
    extend. The one place that picks between decode (verify) and extend by shape:

      max_q_len <= 1                   -> 1: one-token decode;
      2 <= max_q_len <= max(Q_LENS)     -> next_pow2(max_q_len) (2, 4, 8, 16): decode with the q_len x
                                          group rows of a KV head in one program and split-KV, when those
                                          rows fit the program (spec.verify_fits); a verify step reads
                                          its KV once, as decode does, instead of extend's once per
                                          query tile, and splits long contexts across programs;
      else                             -> 0: extend (long queries: its query tiling wins).
    Pure (host data only); pagegen.verify.paged_verify follows it.
    """
    if max_q_len <= 1:
        return 1
    q_len = next_pow2(max_q_len)
    if q_len > Q_LENS[-1] or not verify_fits(q_len, group_size, head_dim):
        return 0
    return q_len


# --- a short extend over a long prefix as chunked verify (issue 18 item 2) ----------------------------
# The cost model's constants, measured on the H200 (bf16, head_dim 128, 32 q / 8 KV heads, block 16;
# bench/results/extend_chunk_lab-h200-2026-12-01.json, bench/NOTES.md "Short extends as chunked verify"):
CHUNK_WALK_NS = 20.5  # ns an extend program spends per key of its sequence while programs <= SMs (671 us / 32768)
CHUNK_STREAM_BYTES_PER_US = 3.0e6  # K/V bytes a us the verify kernel streams over chunk rows (8x8192:32: 170 us)
CHUNK_SETUP_US = 50.0  # build_chunks' small launches (1x32768:17: 142 us with them, 94 us without)
CHUNK_MIN_GAIN = 1.5  # route only where the model predicts at least this speed-up (it was within 0.85-1.1x)


def chunk_len(group_size: int, head_dim: int) -> int:
    """New tokens one chunk row holds: the largest verify q_len (> 1) whose q_len x group rows fit one
    decode program (attention_path routes it to the verify kernel); 0 when not even 2 tokens fit."""
    fits = [q for q in Q_LENS if q > 1 and attention_path(q, group_size, head_dim) == q]
    return max(fits, default=0)


def max_chunk_rows(batch: int, total_q: int, max_q_len: int, chunk: int) -> int:
    """Host-side bound of the chunk rows of an extend step (no sync): sum_b ceil(q_b / chunk) is at
    most batch x ceil(max_q_len / chunk), and at most (total_q + (chunk - 1) x batch) // chunk."""
    if batch <= 0 or total_q <= 0 or max_q_len <= 0 or chunk <= 0:
        return 0
    return min(batch * -(-max_q_len // chunk), (total_q + (chunk - 1) * batch) // chunk)


def extend_chunk_route(batch: int, total_q: int, max_q_len: int, max_ctx: int, kv_heads: int, group_size: int,
                       head_dim: int, kv_bytes: int, block_m: int, sm_count: int) -> int:
    """Chunk length C when an extend step should run as ONE verify launch over chunk rows of at most C
    new tokens (pagegen.extend_chunked), else 0 (the extend kernel). Pure: host-side shapes only.

    Extend has no split-KV: its batch x kv_heads x ceil(max_q_len / (block_m / group)) programs each
    walk their sequence's whole context, so few programs over a long prefix leave most SMs idle
    (1 x 32768 with 17 new tokens: 8 programs, 668 us on the H200). A chunk row of the verify kernel
    reads its sequence's prefix with split-KV across the chip, but every row reads it again. Model:
      extend  = max_ctx x CHUNK_WALK_NS, valid only while the programs fit the SMs in one wave (the
                route is never taken otherwise: many programs keep the chip busy);
      chunked = CHUNK_SETUP_US + rows x kv_heads x max_ctx x head_dim x 2 (K and V) x kv_bytes
                / CHUNK_STREAM_BYTES_PER_US, rows = max_chunk_rows(...);
    route when extend >= CHUNK_MIN_GAIN x chunked. On the H200 lab cases it predicted 1x32768 with
    17 / 64 / 128 new tokens (measured 4.7 / 3.2 / 2.0x faster chunked) and kept 8 x 8192 with 32
    (extend 158 us, chunked 221 us) on extend.
    """
    chunk = chunk_len(group_size, head_dim)
    if chunk == 0 or batch <= 0 or max_q_len <= 1 or max_ctx <= 0:
        return 0
    tile_tokens = max(1, block_m // max(1, group_size))
    programs = batch * kv_heads * -(-max_q_len // tile_tokens)
    if programs > sm_count:
        return 0
    rows = max_chunk_rows(batch, total_q, max_q_len, chunk)
    extend_us = max_ctx * CHUNK_WALK_NS / 1000.0
    chunked_us = CHUNK_SETUP_US + rows * kv_heads * max_ctx * head_dim * 2 * kv_bytes / CHUNK_STREAM_BYTES_PER_US
    return chunk if extend_us >= CHUNK_MIN_GAIN * chunked_us else 0
