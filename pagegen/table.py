"""The tuned table: the contract between the tuner (writer) and the dispatcher (reader).

One YAML file per GPU kind, `tuned/<gpu key>.yaml`, an untrusted input: at most MAX_TABLE_BYTES,
UTF-8, loaded with a safe loader only (a `!!python/object` tag is a load error, nothing is executed)
that also refuses duplicate keys, deep nesting and more than a few aliases (pagegen._files), and
validated against schema version 2 (version 1 tables still load) with strict types (an int is
not a bool or a float, a string is not a number: quote `triton: '3.10'`):

```yaml
version: 2
gpu: {key: h100, name: NVIDIA H100 80GB HBM3, sm_count: 132, capability: "9.0", forced: false,
      copy_gbps: 3028.0, matmul_tflops: 733.0}   # optional: the card's measured ceilings (pagegen report)
toolchain: {torch: 2.11.0, triton: 3.6.0, pagegen: 0.1.0, optuna: 4.5.0}
tuned_at: "2026-11-25T18:00:00Z"   # last write
interpret: false                    # true: timings come from the CPU interpreter, meaningless
entries:
  decode_bf16_hd128_bs16_nhd_g4:    # == KernelSpec.variant_key()
    spec: {family: decode, head_dim: 128, block_size: 16, layout: NHD, dtype: bf16, kv_dtype: bf16, group_size: 4}
    kernel_hash: 0123456789abcdef   # codegen.kernel_hash(spec) when tuned: the code this spec compiled
                                    # (comments stripped); stale when it differs. Version 1 tables
                                    # carry `template_hash` (codegen.template_hash(family)) instead.
    models: [Llama-3-8B]            # optional, informative
    kv_heads: 8                     # KV heads of the tuned workload (the dispatcher rescales batch by it)
    trials: 40                      # trials the study had finished (complete + failed)
    failed: 3                       # of which failed (compile error, wrong result, timeout, ...)
    tuned_at: "2026-11-25T18:00:00Z"
    toolchain: {...}                # as above, of the run that produced this entry
    buckets:                        # decode: shape = [batch, ctx]; extend: shape = [q_tokens, ctx]
      - shape: [32, 2048]
        config: {block_n: 64, num_warps: 4, num_stages: 2, split_size: 0, block_m: 64}
        latency_us: 41.5
        gbps: 2480.0                # decode (bytes moved / latency); extend reports tflops instead
        trials: 37                  # trials whose result on this bucket was measured (correct ones)
    held_out:                       # optional: shapes between the buckets checked after tuning
      - {shape: [16, 3000], ragged: true, table_us: 40.1, heuristic_us: 41.0}
```

Merge rule (`merge(a, b)`, used by the tuner and `pagegen merge`): both tables must name the same
GPU key. Entries present in one table only are kept. For a spec in both: if the hashes they were
tuned on differ, the entry whose hash matches the installed kernels (`is_current`) wins whole
(neither matches: the newer `tuned_at` wins whole); with equal hashes the buckets are merged, and per bucket the lower
`latency_us` wins, a tie going to the newer entry. Measured timings beat interpreter timings.
Nothing is dropped that is not replaced by a better or fresher result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pagegen._files import InputFileError, atomic_write_text, load_yaml, read_text_capped
from pagegen.gpu import valid_key
from pagegen.spec import Config, KernelSpec, illegal_reason, short_repr

SCHEMA_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # 1: entries carry template_hash (of the family's template files)
MAX_TABLE_BYTES = 2 << 20  # tuned/h100.yaml holds 10 specs in 12 KB; parsing 2 MiB takes about a second
MAX_INT = 2**62  # larger ints in a table are an error, not a shape


class TableError(ValueError):
    """A tuned table that cannot be read or does not follow the schema; the message names the
    file and the field."""


def now_iso() -> str:
    """Current UTC time as an ISO-8601 string with a trailing Z (the table's timestamp format)."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class BucketResult:
    """The winning config of one shape bucket and what it measured."""

    shape: tuple[int, int]  # decode: (batch, ctx); extend: (q_tokens, ctx)
    config: Config  # the winner
    latency_us: float  # median latency of the winner on this bucket
    gbps: float | None = None  # effective bandwidth (decode); None when not measured
    tflops: float | None = None  # achieved matrix rate (extend); None when not measured
    trials: int = 0  # correct trials measured on this bucket
    ragged: bool = False  # decode: tuned on ragged lengths (uniform in [ctx // 128, ctx]), not all ctx

    @property
    def key(self) -> tuple[int, int, bool]:
        """What names the bucket within an entry: (a, ctx, ragged)."""
        return (*self.shape, self.ragged)

    @property
    def name(self) -> str:
        """"AxCTX", "AxCTXr" for a ragged bucket (the tuner's bucket names)."""
        return f"{self.shape[0]}x{self.shape[1]}" + ("r" if self.ragged else "")


@dataclass(frozen=True, slots=True)
class HeldOut:
    """One held-out shape the tuner checked: the table's pick against the heuristic's config."""

    shape: tuple[int, int]  # decode: (batch, ctx); extend: (q_tokens, ctx)
    ragged: bool
    table_us: float  # the table's pick (its nearest bucket's winner) at tuning time
    heuristic_us: float  # dispatch.heuristic_config's pick


@dataclass(slots=True)
class Entry:
    """The tuned results of one KernelSpec."""

    spec: KernelSpec
    kernel_hash: str  # codegen.kernel_hash(spec) at tuning time ("" in a version-1 entry)
    buckets: list[BucketResult]
    trials: int = 0  # finished trials of the study (complete + failed)
    failed: int = 0  # failed trials (compile, resources, timeout, wrong result)
    tuned_at: str = ""  # ISO-8601 UTC
    kv_heads: int = 0  # KV heads of the tuned workload (0 unknown)
    models: list[str] = field(default_factory=list)  # informative model names
    toolchain: dict[str, str] = field(default_factory=dict)
    held_out: list[HeldOut] | None = None  # shapes between the buckets checked after tuning; None: not checked
    template_hash: str = ""  # version-1 entries only: codegen.template_hash(spec.family) at tuning time

    @property
    def tuned_on(self) -> str:
        """The hash of the kernel code this entry was tuned on (kernel hash, or a v1 template hash)."""
        return self.kernel_hash or self.template_hash

    @property
    def key(self) -> str:
        return self.spec.variant_key()


@dataclass(slots=True)
class Table:
    """A whole tuned table (one GPU kind)."""

    gpu_key: str  # gpu.gpu_key(gpu_name)
    gpu_name: str
    sm_count: int
    capability: str  # "major.minor"
    entries: dict[str, Entry] = field(default_factory=dict)  # variant_key -> Entry
    toolchain: dict[str, str] = field(default_factory=dict)
    tuned_at: str = ""
    forced: bool = False  # tuned with --force-gpu on a device whose key differs
    interpret: bool = False  # timings come from the Triton CPU interpreter (meaningless)
    version: int = SCHEMA_VERSION
    copy_gbps: float | None = None  # measured d2d copy bandwidth of the card (GB/s); None: not recorded
    matmul_tflops: float | None = None  # measured dense bf16 matrix rate of the card (TFLOP/s); None: not recorded


def toolchain_versions() -> dict[str, str]:
    """Versions of torch, triton, pagegen (and optuna when importable without cost)."""
    import sys

    import torch
    import triton

    import pagegen

    out = {"torch": torch.__version__.split("+")[0], "triton": triton.__version__, "pagegen": pagegen.__version__}
    optuna = sys.modules.get("optuna")
    if optuna is not None:
        out["optuna"] = optuna.__version__
    return out


# ---------------------------------------------------------------------------------------------
# validation (dict -> objects)


def _req(data: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in data:
        raise TableError(f"{where}: missing field {name!r}")
    return data[name]


def _int(value: Any, where: str, lo: int = 0) -> int:
    if type(value) is not int or not lo <= value <= MAX_INT:
        raise TableError(f"{where}: expected an integer >= {lo}, got {short_repr(value)}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise TableError(f"{where}: expected true or false, got {short_repr(value)}")
    return value


def _num(value: Any, where: str, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if type(value) is int and 0 <= value <= MAX_INT:
        return float(value)
    if type(value) is not float or not math.isfinite(value) or value < 0:
        raise TableError(f"{where}: expected a finite number >= 0, got {short_repr(value)}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TableError(f"{where}: expected a string, got {short_repr(value)}")
    return value


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TableError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _str_map(value: Any, where: str) -> dict[str, str]:
    """A mapping of strings to strings (toolchain versions: `3.10` unquoted is the float 3.1)."""
    out = {}
    for k, v in _mapping(value, where).items():
        out[_str(k, f"{where} key")] = _str(v, f"{where}.{k}")
    return out


def _bucket_from_dict(data: Any, spec: KernelSpec, where: str) -> BucketResult:
    data = _mapping(data, where)
    shape = _req(data, "shape", where)
    if not isinstance(shape, list) or len(shape) != 2:
        raise TableError(f"{where}.shape: expected [a, b] (decode: [batch, ctx]; extend: [q_tokens, ctx]), "
                         f"got {short_repr(shape)}")
    shape_t = (_int(shape[0], f"{where}.shape[0]", 1), _int(shape[1], f"{where}.shape[1]", 1))
    try:
        cfg = Config.from_dict(_mapping(_req(data, "config", where), f"{where}.config"))
    except (ValueError, TypeError) as exc:
        raise TableError(f"{where}.config: {exc}") from None
    reason = illegal_reason(spec, cfg)
    if reason:
        raise TableError(f"{where}.config: not legal for {spec.variant_key()}: {reason}")
    return BucketResult(
        shape=shape_t,
        config=cfg,
        latency_us=_num(_req(data, "latency_us", where), f"{where}.latency_us"),
        gbps=_num(data.get("gbps"), f"{where}.gbps", optional=True),
        tflops=_num(data.get("tflops"), f"{where}.tflops", optional=True),
        trials=_int(data.get("trials", 0), f"{where}.trials"),
        ragged=_bool(data.get("ragged", False), f"{where}.ragged"),
    )


def _entry_from_dict(key: str, data: Any, where: str) -> Entry:
    data = _mapping(data, where)
    try:
        spec = KernelSpec.from_dict(_mapping(_req(data, "spec", where), f"{where}.spec"))
    except (ValueError, TypeError) as exc:
        raise TableError(f"{where}.spec: {exc}") from None
    if spec.variant_key() != key:
        raise TableError(f"{where}: key {key!r} does not match its spec (variant_key {spec.variant_key()!r})")
    buckets_raw = _req(data, "buckets", where)
    if not isinstance(buckets_raw, list) or not buckets_raw:
        raise TableError(f"{where}.buckets: expected a non-empty list")
    buckets = [_bucket_from_dict(b, spec, f"{where}.buckets[{i}]") for i, b in enumerate(buckets_raw)]
    names = [b.name for b in buckets]
    if len(set(names)) != len(names):
        raise TableError(f"{where}.buckets: duplicate buckets {names}")
    models = data.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise TableError(f"{where}.models: expected a list of strings")
    held_raw = data.get("held_out")
    if held_raw is not None and not isinstance(held_raw, list):
        raise TableError(f"{where}.held_out: expected a list")
    held = None if held_raw is None else [_held_out_from_dict(h, f"{where}.held_out[{i}]")
                                          for i, h in enumerate(held_raw)]
    if ("kernel_hash" in data) == ("template_hash" in data):
        raise TableError(f"{where}: expected exactly one of kernel_hash (version 2) or template_hash (version 1)")
    return Entry(
        spec=spec,
        kernel_hash=_str(data["kernel_hash"], f"{where}.kernel_hash") if "kernel_hash" in data else "",
        template_hash=_str(data["template_hash"], f"{where}.template_hash") if "template_hash" in data else "",
        buckets=buckets,
        trials=_int(_req(data, "trials", where), f"{where}.trials"),
        failed=_int(data.get("failed", 0), f"{where}.failed"),
        tuned_at=_str(_req(data, "tuned_at", where), f"{where}.tuned_at"),
        kv_heads=_int(data.get("kv_heads", 0), f"{where}.kv_heads"),
        models=list(models),
        toolchain=_str_map(data.get("toolchain", {}), f"{where}.toolchain"),
        held_out=held,
    )


def _held_out_from_dict(data: Any, where: str) -> HeldOut:
    data = _mapping(data, where)
    shape = _req(data, "shape", where)
    if not isinstance(shape, list) or len(shape) != 2:
        raise TableError(f"{where}.shape: expected [a, ctx], got {short_repr(shape)}")
    return HeldOut(shape=(_int(shape[0], f"{where}.shape[0]", 1), _int(shape[1], f"{where}.shape[1]", 1)),
                   ragged=_bool(data.get("ragged", False), f"{where}.ragged"),
                   table_us=_num(_req(data, "table_us", where), f"{where}.table_us"),
                   heuristic_us=_num(_req(data, "heuristic_us", where), f"{where}.heuristic_us"))


def from_dict(data: Any, source: str = "<table>") -> Table:
    """Validate a parsed YAML document and build the Table; TableError names the bad field."""
    data = _mapping(data, source)
    version = _req(data, "version", source)
    if type(version) is not int or version not in SUPPORTED_VERSIONS:  # true and 1.0 equal 1
        raise TableError(
            f"{source}.version: unknown table version {short_repr(version)}; this pagegen reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))} (upgrade pagegen or re-run `pagegen tune`)"
        )
    gpu = _mapping(_req(data, "gpu", source), f"{source}.gpu")
    key = _str(_req(gpu, "key", f"{source}.gpu"), f"{source}.gpu.key")
    if not valid_key(key):
        raise TableError(f"{source}.gpu.key: {key!r} is not a gpu key (lower-case letters, digits, _)")
    entries_raw = _mapping(_req(data, "entries", source), f"{source}.entries")
    entries = {}
    for k, v in entries_raw.items():
        k = _str(k, f"{source}.entries key")
        entries[k] = _entry_from_dict(k, v, f"{source}.entries.{k}")
    capability = _str(_req(gpu, "capability", f"{source}.gpu"), f"{source}.gpu.capability")
    if not re.fullmatch(r"\d+\.\d+", capability):
        raise TableError(f"{source}.gpu.capability: expected 'major.minor' (a quoted string, e.g. '9.0'), "
                         f"got {short_repr(capability)}")
    return Table(
        gpu_key=key,
        gpu_name=_str(_req(gpu, "name", f"{source}.gpu"), f"{source}.gpu.name"),
        sm_count=_int(_req(gpu, "sm_count", f"{source}.gpu"), f"{source}.gpu.sm_count", 1),
        capability=capability,
        entries=entries,
        toolchain=_str_map(_req(data, "toolchain", source), f"{source}.toolchain"),
        tuned_at=_str(_req(data, "tuned_at", source), f"{source}.tuned_at"),
        forced=_bool(gpu.get("forced", False), f"{source}.gpu.forced"),
        interpret=_bool(data.get("interpret", False), f"{source}.interpret"),
        version=version,
        copy_gbps=_num(gpu.get("copy_gbps"), f"{source}.gpu.copy_gbps", optional=True),
        matmul_tflops=_num(gpu.get("matmul_tflops"), f"{source}.gpu.matmul_tflops", optional=True),
    )


def loads(text: str, source: str = "<string>") -> Table:
    """Parse (safe tags only, nothing executed; bounded nesting and aliases; no duplicate keys) and
    validate a table. Every failure is a TableError naming `source` and the field."""
    try:
        data = load_yaml(text, source)
    except InputFileError as exc:
        raise TableError(str(exc)) from None
    if data is None:
        raise TableError(f"{source}: empty file")
    return from_dict(data, source)


def load(path: str | os.PathLike) -> Table:
    """Read and validate the table at `path`. Every failure is a TableError naming the file and the
    field (missing, unreadable, over MAX_TABLE_BYTES, not UTF-8, bad YAML, bad schema), so the
    dispatcher's warn-and-fall-back path is the only one a bad table takes."""
    p = Path(path)
    try:
        text = read_text_capped(p, MAX_TABLE_BYTES)
    except InputFileError as exc:
        raise TableError(str(exc)) from None
    except OSError as exc:
        raise TableError(f"{p}: cannot read: {exc.strerror or exc}") from None
    return loads(text, str(p))


# ---------------------------------------------------------------------------------------------
# objects -> dict -> YAML


def _bucket_to_dict(b: BucketResult) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": list(b.shape), "config": b.config.to_dict(), "latency_us": round(b.latency_us, 3)}
    if b.gbps is not None:
        out["gbps"] = round(b.gbps, 1)
    if b.tflops is not None:
        out["tflops"] = round(b.tflops, 2)
    out["trials"] = b.trials
    if b.ragged:
        out["ragged"] = True
    return out


def to_dict(table: Table) -> dict[str, Any]:
    """The plain-data form of `table` (what save() writes)."""
    entries = {}
    for key in sorted(table.entries):
        e = table.entries[key]
        d: dict[str, Any] = {"spec": e.spec.to_dict()}
        d.update({"kernel_hash": e.kernel_hash} if e.kernel_hash else {"template_hash": e.template_hash})
        if e.models:
            d["models"] = list(e.models)
        d.update(kv_heads=e.kv_heads, trials=e.trials, failed=e.failed, tuned_at=e.tuned_at)
        if e.toolchain:
            d["toolchain"] = dict(e.toolchain)
        d["buckets"] = [_bucket_to_dict(b) for b in sorted(e.buckets, key=lambda b: b.key)]
        if e.held_out is not None:
            d["held_out"] = [{"shape": list(h.shape), "ragged": h.ragged, "table_us": round(h.table_us, 3),
                              "heuristic_us": round(h.heuristic_us, 3)} for h in e.held_out]
        entries[key] = d
    return {
        "version": table.version,
        "gpu": {"key": table.gpu_key, "name": table.gpu_name, "sm_count": table.sm_count,
                "capability": table.capability, "forced": table.forced,
                **{k: round(v, 1) for k, v in (("copy_gbps", table.copy_gbps), ("matmul_tflops", table.matmul_tflops))
                   if v is not None}},
        "toolchain": dict(table.toolchain),
        "tuned_at": table.tuned_at,
        "interpret": table.interpret,
        "entries": entries,
    }


def dumps(table: Table) -> str:
    """YAML text of `table` (block style, stable key order, header comment)."""
    head = (f"# pagegen tuned table for {table.gpu_name} ({table.gpu_key}); "
            "written by `pagegen tune`, read by the dispatcher\n")
    if table.interpret:
        head += "# interpret: timings come from the Triton CPU interpreter and mean nothing\n"
    return head + yaml.safe_dump(to_dict(table), sort_keys=False, default_flow_style=None, width=120)


def save(table: Table, path: str | os.PathLike) -> Path:
    """Write `table` atomically (temp file in the same folder, fsync, rename); returns the path."""
    text = dumps(table)
    loads(text, str(path))  # never write what we could not read back
    return atomic_write_text(path, text)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock on `<path>.lock` (fcntl; a no-op where fcntl is missing). The lock
    file is removed on release: a waiter that then holds a lock on the removed file sees that the
    path no longer names its file and locks the new one."""
    lock_path = Path(f"{path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    while True:
        fh = open(lock_path, "a")  # noqa: SIM115 - closed below on every path
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            fh.close()
            raise
        if same:
            break
        fh.close()  # the holder before us removed it: lock the current file
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        fh.close()  # releases the lock


# ---------------------------------------------------------------------------------------------
# merge


def current_hash(entry: Entry) -> str | None:
    """The installed kernels' hash in the kind `entry` was tuned with: codegen.kernel_hash(spec) for
    a kernel-hash entry, codegen.template_hash(family) for a version-1 one; None when the templates
    cannot be read. The entry is current when this equals `entry.tuned_on` (see is_current)."""
    from pagegen import codegen

    try:
        return codegen.kernel_hash(entry.spec) if entry.kernel_hash else codegen.template_hash(entry.spec.family)
    except (OSError, KeyError, ValueError):
        return None


def is_current(entry: Entry) -> bool:
    """Whether the installed kernels are the ones `entry` was tuned on (its hash still matches)."""
    return current_hash(entry) == entry.tuned_on


def _merge_entries(a: Entry, b: Entry, a_interp: bool, b_interp: bool) -> Entry:
    """Combine two entries of the same spec by the module's merge rule."""
    newer, older = (b, a) if b.tuned_at >= a.tuned_at else (a, b)
    if a.tuned_on != b.tuned_on:
        for e in (newer, older):
            if is_current(e):
                return e
        return newer
    interp = {id(a): a_interp, id(b): b_interp}
    best: dict[tuple[int, int, bool], tuple[BucketResult, Entry]] = {}
    for e in (older, newer):  # newer last: wins ties
        for bk in e.buckets:
            have = best.get(bk.key)
            if have is None:
                best[bk.key] = (bk, e)
                continue
            hb, he = have
            rank_new = (interp[id(e)], bk.latency_us)
            rank_old = (interp[id(he)], hb.latency_us)
            if rank_new <= rank_old:
                best[bk.key] = (bk, e)
    return Entry(
        spec=newer.spec,
        kernel_hash=newer.kernel_hash,
        template_hash=newer.template_hash,
        buckets=[best[s][0] for s in sorted(best)],
        trials=max(a.trials, b.trials),
        failed=max(a.failed, b.failed),
        tuned_at=newer.tuned_at,
        kv_heads=newer.kv_heads or older.kv_heads,
        models=sorted(set(a.models) | set(b.models)),
        toolchain=dict(newer.toolchain),
        held_out=newer.held_out if newer.held_out is not None else older.held_out,
    )


def merge(a: Table, b: Table) -> Table:
    """Merge two tables of the same GPU key (see the module docstring for the rule).

    File-level fields (name, SM count, toolchain) come from the newer table; `forced` is true if
    either was forced; `interpret` only if both were interpreter runs.
    """
    if a.gpu_key != b.gpu_key:
        raise TableError(
            f"cannot merge tables of different GPUs: {a.gpu_key!r} ({a.gpu_name}) vs {b.gpu_key!r} ({b.gpu_name}); "
            "a table holds results of one GPU kind"
        )
    newer = b if b.tuned_at >= a.tuned_at else a
    older = a if newer is b else b
    entries = dict(a.entries)
    for key, eb in b.entries.items():
        ea = entries.get(key)
        entries[key] = eb if ea is None else _merge_entries(ea, eb, a.interpret, b.interpret)
    return dataclasses.replace(
        newer,
        entries=entries,
        toolchain=dict(newer.toolchain),
        forced=a.forced or b.forced,
        interpret=a.interpret and b.interpret,
        copy_gbps=newer.copy_gbps if newer.copy_gbps is not None else older.copy_gbps,
        matmul_tflops=newer.matmul_tflops if newer.matmul_tflops is not None else older.matmul_tflops,
    )


def merge_into(path: str | os.PathLike, table: Table) -> Table:
    """Merge `table` into the file at `path` (created if missing) under a file lock, atomically.

    Concurrent writers (tuning workers) each call this; since the merge keeps the better result
    per bucket, the file converges whatever the order. An existing file that is invalid is an
    error (it is not overwritten silently). Returns the merged table that was written.
    """
    p = Path(path)
    with file_lock(p):
        merged = merge(load(p), table) if p.exists() else table
        save(merged, p)
    return merged
