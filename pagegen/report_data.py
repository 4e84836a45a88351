"""What `pagegen report` shows, as plain data (no plotting): read from a tuned table and its study storage.

    gather(table_path, storage=None, copy_gbps=None, matmul_tflops=None) -> ReportData

Per table entry (one KernelSpec): its buckets with the tuned latency and rate, the heuristic's latency
on the same bucket where the study measured today's `dispatch.heuristic_config` (the tuner enqueues
the heuristic pick of every bucket as a warm-start trial, so a study normally has it), the held-out
check the tuner records (`held_out`: records {shape: [a, ctx], ragged, table_us, heuristic_us}; absent
in older tables), whether the entry is stale, and the Optuna studies of that spec (their names carry
the variant key: `<prefix>:<variant key>:t<template hash 8>:b...`), with trial counts by state,
failure reasons (the tuner's `reason` trial user attribute) and the GPU time the trials took.

Errors a user can fix (unreadable or invalid table, unreadable storage, a storage that holds no
finished trial of any spec in the table) raise ReportError with one line that says what to do.
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pagegen import table as T
from pagegen.spec import Config


class ReportError(ValueError):
    """Input the report cannot use (table, storage, study): what is wrong, and how to fix it."""

    def __init__(self, what: str, fix: str = "") -> None:
        super().__init__(what)
        self.what, self.fix = what, fix


@dataclass(slots=True)
class BucketRow:
    """One shape bucket of an entry: tuned result and, when measured, the heuristic's."""

    name: str  # "32x8192", "64x8192r"
    shape: tuple[int, int]
    ragged: bool
    config: Config
    tuned_us: float
    rate: float | None  # GB/s (decode, memory-bound) or TFLOP/s (extend, compute-bound)
    heuristic: Config | None = None  # today's heuristic pick for this bucket
    heuristic_us: float | None = None  # its latency in the study (None: not measured)

    @property
    def heuristic_rate(self) -> float | None:
        """The heuristic's rate on the same bucket (same bytes or FLOPs moved: rate scales as 1/latency)."""
        if self.rate is None or not self.heuristic_us:
            return None
        return self.rate * self.tuned_us / self.heuristic_us

    @property
    def gain(self) -> float | None:
        """heuristic latency / tuned latency (> 1: tuning made it faster)."""
        return self.heuristic_us / self.tuned_us if self.heuristic_us else None


@dataclass(slots=True)
class HeldOut:
    """One held-out shape of the tuner's check: the table's config against the heuristic."""

    shape: tuple[int, int]
    ragged: bool
    table_us: float
    heuristic_us: float

    @property
    def name(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}" + ("r" if self.ragged else "")

    @property
    def ratio(self) -> float:
        """table / heuristic latency (> 1: the table is slower on this shape)."""
        return self.table_us / self.heuristic_us


@dataclass(slots=True)
class StudyInfo:
    """One Optuna study of a spec: counts, failures, GPU time; the study object for the plots."""

    name: str
    states: dict[str, int]  # trial state name -> count
    failures: dict[str, int]  # failure category -> count
    failure_examples: dict[str, str]  # failure category -> one full reason
    pruned: dict[str, int]  # pruning category (rejected before compiling, duplicate) -> count
    gpu_minutes: float  # wall time of the finished (complete + failed) trials
    study: Any = None  # optuna.Study (for the optimisation history and importances)

    @property
    def finished(self) -> int:
        return self.states.get("COMPLETE", 0) + self.states.get("FAIL", 0)


@dataclass(slots=True)
class SpecReport:
    """Everything the report says about one table entry."""

    key: str
    entry: T.Entry
    rows: list[BucketRow]
    stale: bool
    current_hash: str | None
    held_out: list[HeldOut] | None  # None: the table records no held-out check for this entry
    studies: list[StudyInfo] = field(default_factory=list)

    @property
    def family(self) -> str:
        return self.entry.spec.family

    @property
    def unit(self) -> str:
        return "TFLOP/s" if self.family == "extend" else "GB/s"


@dataclass(slots=True)
class ReportData:
    """A whole report: the table, its ceilings and one SpecReport per entry."""

    path: Path
    table: T.Table
    specs: list[SpecReport]
    copy_gbps: float | None  # ceiling of memory-bound families; None: unknown
    matmul_tflops: float | None  # ceiling of compute-bound families; None: unknown
    ceiling_source: dict[str, str]  # "copy"/"matmul" -> "table" | "--copy-gbps" | ...
    storage: str | None  # what was read (None: no storage found)
    storage_note: str  # one sentence on the storage (found, not found, ...)
    heuristic_recorded: bool  # at least one bucket has a heuristic timing


# ---------------------------------------------------------------------------------------------
# owners elsewhere, imported defensively (the tuner is being split into modules)


def _tuner_attr(name: str) -> Any:
    """`name` from wherever the tuner keeps it (pagegen.tuner today; a tune/ package later)."""
    for mod in ("pagegen.tuner", "pagegen.tune.storage", "pagegen.tune", "pagegen.storage"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, name):
            return getattr(m, name)
    raise ReportError(f"pagegen's tuner has no {name}() (looked in pagegen.tuner and pagegen.tune)",
                      "reinstall pagegen")


def default_storage(gpu_key: str) -> Path:
    """The journal file `pagegen tune` writes by default for `gpu_key` (the tuner owns the rule)."""
    return Path(_tuner_attr("default_journal_path")(gpu_key))


def current_hash(entry: T.Entry) -> str | None:
    """The hash an entry must carry to be fresh (pagegen.table.current_hash); None if unknown."""
    return T.current_hash(entry)


# ---------------------------------------------------------------------------------------------
# storage and studies


def _is_url(storage: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+]*://", storage))


def open_studies(storage: str, gpu_key: str) -> list[Any]:
    """The Optuna studies in `storage` (journal file path, `journal:PATH` or a database URL), loaded."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if not _is_url(storage):
        path = Path(storage[len("journal:"):] if storage.startswith("journal:") else storage)
        if not path.is_file():
            raise ReportError(f"study storage {storage} does not exist",
                              "give --storage the journal file or database URL `pagegen tune` wrote to")
    try:
        st = _tuner_attr("open_storage")(storage, gpu_key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summaries = optuna.get_all_study_summaries(st, include_best_trial=False)
            return [optuna.load_study(study_name=s.study_name, storage=st) for s in summaries]
    except ReportError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt journal or a database error: one line, no traceback
        detail = " ".join(str(exc).split())[:200]
        raise ReportError(f"cannot read the study storage {storage}: {type(exc).__name__}: {detail}",
                          "give --storage an Optuna journal file or database URL written by `pagegen tune`") from None


def _category(reason: str) -> str:
    """"compile error: ..." -> "compile error"; "timeout after 600 s" -> "timeout"; ..."""
    head = re.split(r"[:(]", reason, maxsplit=1)[0].strip()
    head = re.sub(r"\s+after\b.*|\s+\d.*", "", head)
    return head or "unknown"


def study_info(study: Any) -> StudyInfo:
    """Counts by state, failures by reason category, pruned by cause, GPU minutes of one study."""
    states: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    pruned: Counter[str] = Counter()
    examples: dict[str, str] = {}
    seconds = 0.0
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] += 1
        reason = str(t.user_attrs.get("reason", ""))
        if t.state.name == "FAIL":
            cat = _category(reason) if reason else "no reason recorded (killed worker?)"
            failures[cat] += 1
            examples.setdefault(cat, reason)
        elif t.state.name == "PRUNED":
            pruned[_category(reason) if reason else "pruned"] += 1
        if t.state.name in ("COMPLETE", "FAIL") and t.datetime_start and t.datetime_complete:
            seconds += (t.datetime_complete - t.datetime_start).total_seconds()
    return StudyInfo(study.study_name, dict(states), dict(failures), examples, dict(pruned), seconds / 60, study)


def _spec_of_study(name: str) -> tuple[str, str] | None:
    """(variant key, template hash prefix) from `<prefix>:<key>:t<hash8>:b<...>`; None if not a pagegen name."""
    parts = name.split(":")
    if len(parts) < 4 or not parts[2].startswith("t"):
        return None
    return parts[1], parts[2][1:]


def _heuristic_us(studies: list[Any], bucket: str, cfg: Config) -> float | None:
    """Fastest time of `cfg` on `bucket` over the COMPLETE trials of `studies` (None: never measured)."""
    best = None
    for s in studies:
        for t in s.get_trials(deepcopy=False):
            if t.state.name != "COMPLETE" or not isinstance(t.user_attrs.get("bucket_us"), dict):
                continue
            if any(getattr(cfg, k, None) != v for k, v in t.params.items()):
                continue
            us = t.user_attrs["bucket_us"].get(bucket)
            if isinstance(us, (int, float)) and (best is None or us < best):
                best = float(us)
    return best


# ---------------------------------------------------------------------------------------------
# held-out records (written by the tuner; absent in older tables)


def _held_out(entry: T.Entry, raw: Any, where: str) -> list[HeldOut] | None:
    """The entry's held-out check: from the Entry when table.py keeps it, else from the raw YAML."""
    recs = getattr(entry, "held_out", None)
    if recs is None and isinstance(raw, dict):
        recs = raw.get("held_out")
    if recs is None:
        return None
    if not isinstance(recs, list):
        raise ReportError(f"{where}.held_out: expected a list of records, got {type(recs).__name__}",
                          "fix or re-write the table with `pagegen tune`")
    out = []
    for i, r in enumerate(recs):
        get = r.get if isinstance(r, dict) else lambda k, r=r: getattr(r, k, None)
        shape, ragged, t_us, h_us = get("shape"), get("ragged") or False, get("table_us"), get("heuristic_us")
        ok = (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(x, int) for x in shape)
              and isinstance(ragged, bool) and all(isinstance(x, (int, float)) and x > 0 for x in (t_us, h_us)))
        if not ok:
            raise ReportError(f"{where}.held_out[{i}]: expected {{shape: [a, ctx], ragged: bool, table_us: >0, "
                              f"heuristic_us: >0}}, got {r!r}", "fix or re-write the table with `pagegen tune`")
        out.append(HeldOut((int(shape[0]), int(shape[1])), ragged, float(t_us), float(h_us)))
    return out


# ---------------------------------------------------------------------------------------------
# the whole report


def load_table(path: str | Path) -> tuple[T.Table, dict[str, Any]]:
    """The validated table and its raw entries mapping (for fields table.py does not keep)."""
    try:
        table = T.load(path)
    except T.TableError as exc:
        raise ReportError(str(exc), "give --table a table written by `pagegen tune` (`pagegen check FILE`)") from None
    raw = yaml.safe_load(Path(path).read_text())  # valid: T.load parsed it
    return table, dict(raw.get("entries") or {})


def gather(table_path: str | Path, storage: str | None = None, *, copy_gbps: float | None = None,
           matmul_tflops: float | None = None, storage_given: bool = False) -> ReportData:
    """Read the table at `table_path` and (when not None) the study storage, and build the report data.

    storage_given: the user named the storage; then it must hold a finished trial of a spec in the
    table (an empty or unrelated study is an error rather than a report without studies).
    """
    from pagegen.dispatch import heuristic_config

    table, raw_entries = load_table(table_path)
    if not table.entries:
        raise ReportError(f"{table_path}: the table has no entries", "tune first (`pagegen tune`)")
    studies_by_key: dict[str, list[Any]] = {}
    note = "no study storage given or found: the study sections are empty"
    if storage is not None:
        all_studies = open_studies(storage, table.gpu_key)
        for s in all_studies:
            parsed = _spec_of_study(s.study_name)
            gpu = s.user_attrs.get("gpu")
            if parsed and (gpu is None or gpu == table.gpu_key):
                studies_by_key.setdefault(parsed[0], []).append(s)
        n = sum(len(v) for k, v in studies_by_key.items() if k in table.entries)
        finished = sum(study_info(s).finished for k, v in studies_by_key.items() if k in table.entries for s in v)
        if storage_given and finished == 0:
            raise ReportError(f"the study storage {storage} holds {len(all_studies)} studies but no finished trial "
                              f"of a spec in {table_path}", "give --storage the storage this table was tuned with")
        note = f"{n} studies of this table's specs read from {storage}"
    specs = []
    for key in sorted(table.entries, key=lambda k: (table.entries[k].spec.family, k)):
        e = table.entries[key]
        mine = [s for s in studies_by_key.get(key, []) if (_spec_of_study(s.study_name) or ("", ""))[1]
                == e.tuned_on[:8]] or studies_by_key.get(key, [])
        rows = []
        for b in sorted(e.buckets, key=lambda b: b.key):
            h = heuristic_config(e.spec, b.shape[0], b.shape[1], e.kv_heads or 1, table.sm_count, b.ragged)
            rows.append(BucketRow(b.name, b.shape, b.ragged, b.config, b.latency_us,
                                  b.tflops if e.spec.family == "extend" else b.gbps, h,
                                  _heuristic_us(mine, b.name, h) if mine else None))
        cur = current_hash(e)
        specs.append(SpecReport(key, e, rows, cur is not None and cur != e.tuned_on, cur,
                                _held_out(e, raw_entries.get(key), f"{table_path}.entries.{key}"),
                                [study_info(s) for s in mine]))
    src = {}
    copy, mm = table.copy_gbps, table.matmul_tflops
    src["copy"] = "recorded in the table" if copy else "not recorded"
    src["matmul"] = "recorded in the table" if mm else "not recorded"
    if copy_gbps is not None:
        copy, src["copy"] = copy_gbps, "given with --copy-gbps"
    if matmul_tflops is not None:
        mm, src["matmul"] = matmul_tflops, "given with --matmul-tflops"
    return ReportData(Path(table_path), table, specs, copy, mm, src, storage, note,
                      any(r.heuristic_us for s in specs for r in s.rows))
