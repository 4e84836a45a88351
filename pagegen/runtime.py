"""The runtime: the live device, its tuned table, and every cache derived from them, in one object.

`RUNTIME` (one per process) owns
  - the live GPU (`pagegen.gpu.live_gpu()`: a CUDA card, or the interpreter under TRITON_INTERPRET=1),
  - the tuned table in use and where it came from (`table_path()` is the one naming rule),
  - the config cache of `dispatch.select_config`, and the decode, extend and verify plan caches of the ops
    (validated spec and config per metadata signature, so a serving loop skips the checks).
Changing the table drops all of them in one place (`Runtime._drop`): `use_table()`, `reset()`, or a new
value of $PAGEGEN_TUNED_TABLE or TRITON_INTERPRET, seen on the next lookup. So no cached config or
plan outlives the table (or device) it came from. A `DecodePlan` / `ExtendPlan` object is not a
cache: it keeps the config it was built with; build a new one after changing the table.

Where the table comes from (first match):
  1. `use_table(path_or_table)` (an API call; `use_table(None)` returns to automatic lookup),
  2. $PAGEGEN_TUNED_TABLE: a YAML file, or a folder holding `<gpu key>.yaml`,
  3. the shipped `tuned/<gpu key>.yaml`: `pagegen/tuned` inside an installed wheel, the repository's
     top-level `tuned/` in an editable install (found the way codegen finds its templates).

Fallback: no table, an invalid table, a table of another GPU, no entry for the spec, or a stale
entry (`stale_reason`) -> a `TunedTableWarning`, once per cause, naming the `pagegen tune ...`
command that fixes it; the caller then uses the heuristic. Under the interpreter a missing table is
silent (nobody ships one). Lookups never read device tensors (no sync).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagegen import gpu as _gpu
from pagegen.spec import KernelSpec

if TYPE_CHECKING:
    from pagegen.table import Entry, Table

ENV_TABLE = "PAGEGEN_TUNED_TABLE"
ENV_INTERPRET = "TRITON_INTERPRET"
CACHE_MAX = 16384  # entries a cache keeps before it is cleared (a bound, not an LRU)
CACHES = ("config", "decode", "extend", "verify")  # what the runtime caches; all dropped together


def _env_context() -> tuple[str | None, str | None]:
    """The (table, interpreter) environment the caches depend on."""
    return os.environ.get(ENV_TABLE), os.environ.get(ENV_INTERPRET)


class TunedTableWarning(UserWarning):
    """The tuned table could not be used for a call; pagegen falls back to heuristic configs."""


def tuned_dir() -> Path:
    """Folder of the shipped tables: `pagegen/tuned` in a wheel, else the repository's `tuned/`."""
    here = Path(__file__).resolve().parent
    for cand in (here / "tuned", here.parent / "tuned"):
        if cand.is_dir():
            return cand
    return here.parent / "tuned"


def table_path(gpu_key: str) -> Path:
    """Where the table of `gpu_key` is looked for ($PAGEGEN_TUNED_TABLE, else tuned/<key>.yaml)."""
    env = os.environ.get(ENV_TABLE)
    if env:
        p = Path(env)
        return p / f"{gpu_key}.yaml" if p.is_dir() else p
    return tuned_dir() / f"{gpu_key}.yaml"


def tune_cmd(key: str, spec: KernelSpec | None = None, out: Path | None = None) -> str:
    """The `pagegen tune ...` command that (re)tunes `spec` (or everything) for GPU `key` into `out`."""
    cmd = "pagegen tune --interpret" if key == _gpu.INTERPRET_KEY else f"pagegen tune --gpu {key}"
    if spec is not None:
        cmd += f" --spec {spec.variant_key()}"
    if out is not None:
        cmd += f" --out {out}"
    return cmd


def _major_minor(version: str) -> tuple[int, ...]:
    parts = version.split("+")[0].split(".")[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def stale_reason(entry: Entry, spec: KernelSpec, toolchain: Mapping[str, str] | None = None) -> str | None:
    """Why `entry` (tuned for `spec`) must not be used with the installed kernels and toolchain, or None.

    Stale when the kernel code it was tuned on changed (table.current_hash: the spec's kernel hash,
    or for a version-1 entry the family's template hash), or
    when it was tuned under another Triton major.minor than the running one (stage and warp
    semantics change between releases). `toolchain` is the table's own, used when the entry does
    not record one. An entry with no Triton version recorded is not judged on it. The one place
    the staleness decision is made.
    """
    from pagegen.table import current_hash

    current = current_hash(entry)
    if current is not None and current != entry.tuned_on:
        kind = "kernel" if entry.kernel_hash else "template"
        return f"tuned for {kind} hash {entry.tuned_on}, the installed kernels hash to {current}"
    tuned = (entry.toolchain or toolchain or {}).get("triton")
    if tuned:
        import triton

        if _major_minor(str(tuned)) != _major_minor(triton.__version__):
            return f"tuned under Triton {tuned}, running Triton {triton.__version__}"
    return None


class Runtime:
    """The live device, its tuned table and the caches derived from them (see the module docstring).

    Caches ("config", "decode", "extend") map a call's host-side signature to what was derived for
    it; `lookup`/`store` reach them, and a value derived before a table change is never stored
    after it (`generation`). Thread-safe: reads are plain dict lookups, changes hold the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._override: Path | Table | None = None  # use_table()'s argument
        self._context: tuple[object, object] | None = None  # (table env, interpret env) of the caches
        self._caches: dict[str, dict[Any, Any]] = {name: {} for name in CACHES}
        self._warned: set[str] = set()
        self._gpu: _gpu.GpuInfo | None = None
        self._table: Table | None = None
        self._source: str | None = None  # where the table came from: a path, or "<table object>"
        self._loaded = False  # gpu and table resolved for this generation
        self.generation = 0  # bumped by every drop

    # -- change --------------------------------------------------------------------------------
    def _drop(self) -> None:
        """Forget the table, the live GPU, every cache and which warnings were given. Hold the lock."""
        for cache in self._caches.values():
            cache.clear()
        self._warned.clear()
        self._gpu, self._table, self._source, self._loaded = None, None, None, False
        self.generation += 1

    def reset(self) -> None:
        """Forget the loaded table and everything derived from it (re-read on the next lookup)."""
        with self._lock:
            self._drop()

    def use_table(self, table: str | os.PathLike | Table | None) -> None:
        """Use this table file (or Table object) from now on; None returns to automatic lookup."""
        from pagegen.table import Table

        with self._lock:
            self._override = table if table is None or isinstance(table, Table) else Path(table)
            self._drop()

    def sync(self) -> None:
        """Drop everything if $PAGEGEN_TUNED_TABLE or TRITON_INTERPRET changed since the caches were
        filled (two environment reads; called by every lookup)."""
        context = _env_context()
        if context != self._context:
            with self._lock:
                if context != self._context:
                    self._drop()
                    self._context = context

    # -- caches ----------------------------------------------------------------------------------
    def lookup(self, cache: str, key: Any) -> Any:
        """The value cached under `key` in `cache` ("config", "decode", "extend"), or None."""
        self.sync()
        return self._caches[cache].get(key)

    def store(self, cache: str, key: Any, value: Any, generation: int) -> None:
        """Cache `value`, derived when `self.generation` was `generation`; dropped if the table has
        changed since (so a value computed from an old table is never kept)."""
        with self._lock:
            if generation != self.generation:
                return
            entries = self._caches[cache]
            if len(entries) >= CACHE_MAX:
                entries.clear()
            entries[key] = value

    def cache_size(self, cache: str) -> int:
        """How many values `cache` holds (for tests and diagnostics)."""
        return len(self._caches[cache])

    # -- device and table ------------------------------------------------------------------------
    @property
    def gpu(self) -> _gpu.GpuInfo | None:
        """The live device (None with no GPU and no interpreter)."""
        self._load()
        return self._gpu

    def sm_count(self) -> int:
        """SMs of the live device; 1 with none."""
        info = self.gpu
        return info.sm_count if info is not None else 1

    @property
    def table(self) -> Table | None:
        """The live GPU's usable table (None, after one warning, when there is none or it is unusable)."""
        self._load()
        return self._table

    @property
    def table_source(self) -> str:
        """Where the table in use came from: its path, "<table object>", or "" with no table."""
        self._load()
        return self._source or ""

    def warn(self, tag: str, message: str) -> None:
        """Emit a TunedTableWarning once per `tag` until the table changes."""
        if tag in self._warned:
            return
        self._warned.add(tag)
        warnings.warn(message, TunedTableWarning, stacklevel=5)

    def _load(self) -> None:
        self.sync()
        if self._loaded:
            return
        with self._lock:
            if not self._loaded:
                self._gpu = _gpu.live_gpu()
                self._table, self._source = self._read_table(self._gpu)
                self._loaded = True

    def _read_table(self, live: _gpu.GpuInfo | None) -> tuple[Table | None, str | None]:
        from pagegen.table import Table, TableError, load

        if live is None:
            return None, None
        explicit = self._override is not None or bool(os.environ.get(ENV_TABLE))
        path: Path | None = None
        if isinstance(self._override, Table):
            table = self._override
        else:
            path = self._override if isinstance(self._override, Path) else table_path(live.key)
            if not path.exists():
                if explicit or not live.interpret:
                    self.warn("missing", f"pagegen: no tuned table for this GPU ({live.name}, key {live.key!r}) at "
                                         f"{path}; using heuristic configs. Fix: `{tune_cmd(live.key, out=path)}`")
                return None, None
            try:
                table = load(path)
            except TableError as exc:
                self.warn("invalid", f"pagegen: tuned table {path} is invalid, using heuristic configs: {exc}. "
                                     f"Fix: `pagegen check {path}`, then `{tune_cmd(live.key, out=path)}`")
                return None, None
        if table.gpu_key != live.key:
            self.warn("gpu", f"pagegen: tuned table {path or '<table object>'} is for GPU {table.gpu_key!r} but this "
                             f"GPU is {live.key!r} ({live.name}); using heuristic configs. "
                             f"Fix: `{tune_cmd(live.key, out=path)}`")
            return None, None
        return table, str(path) if path is not None else "<table object>"

    def entry(self, spec: KernelSpec) -> Entry | None:
        """The table's usable entry for `spec`: None (after one warning) when the table has none or
        it is stale (`stale_reason`)."""
        table = self.table
        if table is None:
            return None
        key = spec.variant_key()
        path = None if self._source == "<table object>" else Path(self._source or "")
        entry = table.entries.get(key)
        if entry is None:
            self.warn(f"entry:{key}", f"pagegen: no tuned entry for {key} in {self._source}; using heuristic "
                                      f"configs. Fix: `{tune_cmd(table.gpu_key, spec, path)}`")
            return None
        reason = stale_reason(entry, spec, table.toolchain)
        if reason:
            self.warn(f"stale:{key}", f"pagegen: tuned entry {key} in {self._source} is stale ({reason}); using "
                                      f"heuristic configs. Fix: `{tune_cmd(table.gpu_key, spec, path)}`")
            return None
        return entry


RUNTIME = Runtime()
"""The process's runtime: what `pagegen.dispatch` and the ops use."""
