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

Where the table comes from (first match):
  1. `use_table(path_or_table)` (an API call; `use_table(None)` returns to automatic lookup),
  2. $PAGEGEN_TUNED_TABLE: a YAML file, or a folder holding `<gpu key>.yaml`,
  3. the shipped `tuned/<gpu key>.yaml`: `pagegen/tuned` inside an installed wheel, the repository's
     top-level `tuned/` in an editable install (found the way codegen finds its templates).
The live GPU's key comes from pagegen.gpu (`interpret` under TRITON_INTERPRET=1).

Lookup: the entry of exactly this spec, then the bucket nearest to the call's shape in log2 space
(so a batch of 2 gets the batch-1 winner, not the batch-256 one), among the buckets of the call's
kind (ragged or uniform) when the entry has any of that kind, else among all. For decode the call's batch is
first rescaled by kv_heads / the entry's tuned kv_heads, so a model with fewer KV heads maps to the
bucket with the same number of programs.

Fallback: no table, an invalid table, a table of another GPU, no entry for the spec, or a stale
entry (template hash changed) -> a warning (TunedTableWarning), once per cause, naming the
`pagegen tune ...` command that fixes it, then `heuristic_config()`. Under the interpreter a missing
table is silent (nobody ships one).

The hot path is one dict lookup keyed by (spec, batch, max_ctx, kv_heads, ragged): the table is read once,
each new key is resolved once; nothing here reads device tensors (no sync) or renders a template.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pagegen import gpu as _gpu
from pagegen.spec import Q_LENS, SPLIT_SIZE_VALUES, Config, KernelSpec, default_config, keep, next_pow2, verify_fits

if TYPE_CHECKING:
    from pagegen.table import Entry, Table

ENV_TABLE = "PAGEGEN_TUNED_TABLE"
_CACHE_MAX = 16384  # distinct (spec, shape) keys kept before the cache is cleared
MIN_SPLIT_CTX = 512  # contexts shorter than this are never split by the heuristic
RAGGED_FILL = 0.75  # a decode batch whose tokens fill less than this of batch x longest is ragged
RAGGED_CHUNKS = 4  # the heuristic splits a ragged batch's longest sequence into at least this many


def is_ragged(batch: int, max_ctx: int, sum_ctx: int | None) -> bool:
    """Whether a decode batch of `batch` sequences, the longest `max_ctx` tokens and `sum_ctx` tokens
    in all, counts as ragged: sum_ctx < RAGGED_FILL x batch x max_ctx. None (unknown) -> False."""
    if sum_ctx is None or batch <= 1 or max_ctx <= 0:
        return False
    return sum_ctx < RAGGED_FILL * batch * max_ctx


class TunedTableWarning(UserWarning):
    """The tuned table could not be used for a call; pagegen falls back to heuristic configs."""


def tuned_dir() -> Path:
    """Folder of the shipped tables: `pagegen/tuned` in a wheel, else the repository's `tuned/`."""
    here = Path(__file__).resolve().parent
    for cand in (here / "tuned", here.parent / "tuned"):
        if cand.is_dir():
            return cand
    return here.parent / "tuned"


# --- state (table loaded once; per-shape configs cached) ------------------------------------------
_configs: dict[tuple[KernelSpec, int, int, int, bool], Config] = {}
_sources: dict[tuple[KernelSpec, int, int, int, bool], str] = {}
_lock = threading.Lock()
_override: object = None  # None, a Path, or a Table
_table: Table | None = None
_table_path: Path | None = None
_table_loaded = False
_warned: set[str] = set()


def reset() -> None:
    """Forget the loaded table, the cached configs and which warnings were given."""
    global _table, _table_path, _table_loaded
    with _lock:
        _configs.clear()
        _sources.clear()
        _warned.clear()
        _table, _table_path, _table_loaded = None, None, False


def use_table(table: str | os.PathLike | Table | None) -> None:
    """Use this table file (or Table object) from now on; None returns to automatic lookup."""
    global _override
    from pagegen.table import Table

    if table is not None and not isinstance(table, Table):
        table = Path(table)
    reset()
    _override = table


def _warn(tag: str, message: str) -> None:
    if tag in _warned:
        return
    _warned.add(tag)
    warnings.warn(message, TunedTableWarning, stacklevel=4)


def table_path(gpu_key: str) -> Path:
    """Where the table of `gpu_key` is looked for ($PAGEGEN_TUNED_TABLE, else tuned/<key>.yaml)."""
    env = os.environ.get(ENV_TABLE)
    if env:
        p = Path(env)
        return p / f"{gpu_key}.yaml" if p.is_dir() else p
    return tuned_dir() / f"{gpu_key}.yaml"


def _tune_cmd(key: str, spec: KernelSpec | None = None, out: Path | None = None) -> str:
    cmd = "pagegen tune --interpret" if key == _gpu.INTERPRET_KEY else f"pagegen tune --gpu {key}"
    if spec is not None:
        cmd += f" --spec {spec.variant_key()}"
    if out is not None:
        cmd += f" --out {out}"
    return cmd


def _load_table() -> Table | None:
    """The live GPU's table, loaded once (None, after one warning, when it cannot be used)."""
    global _table, _table_path, _table_loaded
    if _table_loaded:
        return _table
    from pagegen.table import Table, TableError, load

    _table_loaded = True
    live = _gpu.live_gpu()
    if live is None:
        return None
    explicit = _override is not None or bool(os.environ.get(ENV_TABLE))
    if isinstance(_override, Table):
        table, path = _override, None
    else:
        path = _override if isinstance(_override, Path) else table_path(live.key)
        if not path.exists():
            if explicit or not live.interpret:
                _warn("missing", f"pagegen: no tuned table for this GPU ({live.name}, key {live.key!r}) at {path}; "
                                 f"using heuristic configs. Fix: `{_tune_cmd(live.key, out=path)}`")
            return None
        try:
            table = load(path)
        except TableError as exc:
            _warn("invalid", f"pagegen: tuned table {path} is invalid, using heuristic configs: {exc}. "
                             f"Fix: `pagegen check {path}`, then `{_tune_cmd(live.key, out=path)}`")
            return None
    if table.gpu_key != live.key:
        _warn("gpu", f"pagegen: tuned table {path or '<object>'} is for GPU {table.gpu_key!r} but this GPU is "
                     f"{live.key!r} ({live.name}); using heuristic configs. Fix: `{_tune_cmd(live.key, out=path)}`")
        return None
    _table, _table_path = table, path
    return table


def _entry(spec: KernelSpec) -> Entry | None:
    table = _load_table()
    if table is None:
        return None
    key = spec.variant_key()
    where = _table_path or "<table object>"
    entry = table.entries.get(key)
    live_key = table.gpu_key
    if entry is None:
        _warn(f"entry:{key}", f"pagegen: no tuned entry for {key} in {where}; using heuristic configs. "
                              f"Fix: `{_tune_cmd(live_key, spec, _table_path)}`")
        return None
    from pagegen.codegen import template_hash

    try:
        current = template_hash(spec.family)
    except (OSError, KeyError):
        current = entry.template_hash
    if entry.template_hash != current:
        _warn(f"stale:{key}", f"pagegen: tuned entry {key} in {where} is stale (tuned for template hash "
                              f"{entry.template_hash}, templates are now {current}); using heuristic configs. "
                              f"Fix: `{_tune_cmd(live_key, spec, _table_path)}`")
        return None
    return entry


def nearest_bucket(entry: Entry, a: int, ctx: int, kv_heads: int = 0, ragged: bool = False):
    """The entry's bucket nearest to shape (a, ctx) in log2 space (decode: a = batch, rescaled by
    kv_heads / entry.kv_heads when both are known; extend: a = q_tokens), among the buckets whose
    `ragged` flag equals `ragged` when there are any, else among all."""
    a_eff = float(max(1, a))
    if entry.spec.family == "decode" and kv_heads and entry.kv_heads:
        a_eff = a_eff * kv_heads / entry.kv_heads
    la, lc = math.log2(a_eff), math.log2(max(1, ctx))

    def dist(b) -> tuple[float, int, int]:
        return ((math.log2(b.shape[0]) - la) ** 2 + (math.log2(b.shape[1]) - lc) ** 2, b.shape[0], b.shape[1])

    same_kind = [b for b in entry.buckets if b.ragged == ragged]
    return min(same_kind or entry.buckets, key=dist)


def heuristic_config(spec: KernelSpec, batch: int, max_ctx: int, kv_heads: int, sm_count: int,
                     ragged: bool = False) -> Config:
    """The shape-aware default when no tuned entry applies.

    decode: spec's default tiles, and split-KV (flash-decoding) when one of two rules asks for it
    and the longest context is >= MIN_SPLIT_CTX (the smaller split wins when both do):
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
    legal = [s for s in SPLIT_SIZE_VALUES if s > 0 and s % base.block_n == 0 and -(-max_ctx // s) >= 2]
    programs = max(1, batch * max(1, kv_heads))
    picks = []
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
    return cfg if keep(spec, cfg) is None else base


def _resolve(spec: KernelSpec, batch: int, max_ctx: int, kv_heads: int, ragged: bool) -> tuple[Config, str]:
    entry = _entry(spec)
    if entry is not None:
        b = nearest_bucket(entry, batch, max_ctx, kv_heads, ragged)
        return b.config, f"table {_table_path or '<object>'} bucket {b.name}"
    return heuristic_config(spec, batch, max_ctx, kv_heads, _gpu.sm_count(), ragged), "heuristic"


def select_config(spec: KernelSpec, batch: int, max_ctx: int, kv_heads: int = 1, ragged: bool = False) -> Config:
    """Config for `spec` at a call of shape (batch, max_ctx) with `kv_heads` KV heads.

    decode: batch = sequences, max_ctx = longest context, ragged = is_ragged(...) of the batch;
    extend: batch = q_tokens, max_ctx = longest context (ragged unused). Cached: after the first
    call per key this is one dict lookup. Never syncs.
    """
    key = (spec, batch, max_ctx, kv_heads, ragged)
    cfg = _configs.get(key)
    if cfg is not None:
        return cfg
    with _lock:
        cfg, source = _resolve(spec, batch, max_ctx, kv_heads, ragged)
        if len(_configs) >= _CACHE_MAX:
            _configs.clear()
            _sources.clear()
        _configs[key] = cfg
        _sources[key] = source
    return cfg


def explain(spec: KernelSpec, batch: int, max_ctx: int, kv_heads: int = 1,
            ragged: bool = False) -> tuple[Config, str]:
    """(config, where it came from: "table <path> bucket AxC[r]" or "heuristic") for a call shape."""
    cfg = select_config(spec, batch, max_ctx, kv_heads, ragged)
    return cfg, _sources.get((spec, batch, max_ctx, kv_heads, ragged), "heuristic")


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
