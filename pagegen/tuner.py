"""The autotuner: one Optuna study per (GPU, spec); verify, time, keep the per-bucket winners.

    tune(workloads, gpu, options) -> (Table of this run, [SpecResult])

For each workload (a spec, its KV-head count and shape buckets) a study searches the legal
configs of `spec.config_space` (block_n, num_warps, num_stages and, for decode, split_size):
  1. a sampled combination that `spec.keep()` rejects is pruned before anything compiles;
     a combination already finished in the study (by any worker) is pruned as a duplicate;
  2. the candidate is compiled and verified on fresh random inputs against pagegen.reference
     (poisoned output, fp64 reference, relative-error tolerance); a wrong result fails the trial;
  3. every bucket of the workload is timed with that one compiled kernel (pagegen.timing: CUDA
     graph replay, L2 flush, median); the objective is the weighted geometric mean latency;
  4. compile errors, out-of-resources, timeouts (--trial-timeout, SIGALRM) and wrong results are
     failed trials with a `reason` user attribute; the study goes on.
After the trials the winners are read back from the storage, per bucket the fastest COMPLETE trial
(failed trials carry no timings, so they can never win), and returned as a table.Entry.

Storage: an Optuna journal file by default (`<cache>/optuna/<gpu key>.journal`, one host, any
number of processes; a killed run resumes with every finished trial), or any Optuna storage URL
(`postgresql://...` for many machines; RDB storages get a heartbeat and Optuna's retry callback,
so a killed worker's trial is marked failed and its config retried once; schema creation on a
fresh database is serialised). Journal storages have no heartbeat: at the start of each study a
worker reaps RUNNING trials whose process (same host) is gone, marks them failed and retries
their config once (on RDB this also catches a worker killed before its first heartbeat).
`--trials N` is what one run (one worker) adds per spec; a re-run resumes and adds more.

Study names: `<prefix>:<variant key>:t<template hash 8>:b<bucket-set hash 6>[:s<space hash>]`,
prefix `pagegen-<gpu key>` or the --study-name given; workers that agree on the arguments share a
study; a changed template or bucket set starts a new study (old timings are not comparable).

Who writes the table: this module never writes YAML. The CLI merges each run's Entry set into the
output file with `table.merge_into` (file lock + atomic rename). With `--workers N` the parent
process alone writes, after its workers finish; independent workers on a shared storage each
merge the study's winners (all workers' trials), so the file converges to the same result.

Optuna is imported lazily here and nowhere else; works with optuna 4.x and 5.x.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pagegen import codegen
from pagegen.gpu import INTERPRET_KEY, GpuInfo
from pagegen.spec import (
    BLOCK_M_VALUES,
    BLOCK_N_VALUES,
    NUM_STAGES_VALUES,
    NUM_WARPS_VALUES,
    SPLIT_SIZE_VALUES,
    Config,
    KernelSpec,
    config_space,
    default_config,
    keep,
)
from pagegen.table import BucketResult, Entry, Table, now_iso, toolchain_versions
from pagegen.workloads import MAX_BUCKET_BYTES, Bucket, Workload, bucket_kv_bytes, decode_bytes

ENV_FAULTS = "PAGEGEN_TUNER_FAULTS"
TOL = {"fp16": 2e-3, "bf16": 1.5e-2}  # relative error vs the fp64 reference
BUDGETS = {"quick": 12, "full": 60}  # trials per spec of --budget presets


class TrialFailure(Exception):
    """A trial that must be recorded as failed (its message is the reason)."""


class TrialTimeout(TrialFailure):
    """A trial ran past --trial-timeout."""


class FatalDeviceError(RuntimeError):
    """The CUDA context is unusable (illegal address, ...): stop this worker; the storage keeps
    the failed trial and a restart resumes."""


def _optuna():
    import optuna

    return optuna


def optuna_major() -> int:
    return int(_optuna().__version__.split(".")[0])


# ---------------------------------------------------------------------------------------------
# options and results


@dataclass
class TuneOptions:
    """How a tuning run behaves (the CLI fills this from its flags)."""

    trials: int = BUDGETS["quick"]  # evaluated trials per spec for this worker (pruned ones not counted)
    sampler: str = "tpe"  # tpe | grid
    seed: int = 0
    storage: str | None = None  # Optuna storage URL or journal file path; None: default journal file
    study_name: str | None = None  # study name prefix (default pagegen-<gpu key>)
    trial_timeout_s: float = 600.0  # per trial (compile + verify + timing); 0 disables
    reps: int = 30  # timed runs per bucket
    warmup: int = 3
    graph: bool = True  # time CUDA-graph replays (else events around launches)
    warm_start: bool = True  # enqueue the default, heuristic and nearest-spec winner configs first
    warm_tables: list[Table] = field(default_factory=list)  # tables whose winners seed new studies
    faults: list[dict[str, Any]] = field(default_factory=list)  # test hook (also $PAGEGEN_TUNER_FAULTS)
    progress: Callable[[str], None] | None = print
    worker_index: int = 0
    heartbeat_s: int = 60  # RDB storages only: a trial silent for 2x this is failed (and retried once)
    space: dict[str, list[int]] | None = None  # restrict the search space (default: the family's)


@dataclass
class SpecResult:
    """The outcome of one workload's study."""

    workload: Workload
    study_name: str
    entry: Entry | None  # None when no trial completed
    trials: int  # finished trials in the study (all workers)
    failed: int
    failures: list[tuple[int, str]]  # (trial number, reason) of failed trials
    rows: list[dict[str, Any]]  # summary rows per bucket
    seconds: float  # wall time of this worker on the spec


# ---------------------------------------------------------------------------------------------
# storage


def default_journal_path(gpu_key: str) -> Path:
    return codegen.cache_dir() / "optuna" / f"{gpu_key}.journal"


_RDB_PREFIXES = ("postgresql", "postgres", "mysql", "sqlite", "oracle", "mssql")


def open_storage(url: str | None, gpu_key: str, heartbeat_s: int = 60):
    """An Optuna storage: RDB for database URLs (with heartbeat + retry of killed workers' trials),
    else a journal file (a path, `journal:PATH`, or None for the default file under the cache)."""
    if url and url.split(":", 1)[0].split("+", 1)[0] in _RDB_PREFIXES:
        return _rdb_storage(url, heartbeat_s)
    path = Path(url[len("journal:"):] if url and url.startswith("journal:") else url or default_journal_path(gpu_key))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from optuna.storages.journal import JournalFileBackend, JournalStorage  # optuna >= 4.0
    except ImportError:  # pragma: no cover - optuna 3.x
        from optuna.storages import JournalFileStorage as JournalFileBackend
        from optuna.storages import JournalStorage
    return JournalStorage(JournalFileBackend(str(path)))


_SCHEMA_LOCK = 0x7061_6765  # PostgreSQL advisory lock id serialising Optuna's schema creation


def _rdb_storage(url: str, heartbeat_s: int):
    """RDBStorage with heartbeat and one retry of a dead worker's trial.

    Workers of a fleet's first run meet an empty database at the same moment and would race to
    create Optuna's tables: on PostgreSQL they take an advisory lock around the creation; on any
    database a failed creation is retried (the next attempt finds the schema in place).
    Optuna >= 4.9 names the retry hook `heartbeat_stale_trial_callback` / RetryHeartbeatStaleTrialCallback;
    older versions `failed_trial_callback` / RetryFailedTrialCallback.
    """
    optuna = _optuna()
    storages = optuna.storages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" notices
        if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
            hook = {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
        else:
            hook = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=1)}

    def make():
        return storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s, **hook)

    import sqlalchemy

    lock_conn = None
    engine = None
    if url.startswith("postgres"):
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        lock_conn = engine.connect()
        lock_conn.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({_SCHEMA_LOCK})"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature notices of heartbeat arguments
            for attempt in range(6):
                try:
                    return make()
                except sqlalchemy.exc.SQLAlchemyError:
                    if attempt == 5:
                        raise
                    time.sleep(0.2 + random.random() * (attempt + 1))
    finally:
        if lock_conn is not None:
            lock_conn.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({_SCHEMA_LOCK})"))
            lock_conn.close()
            engine.dispose()


def _has_heartbeat(storage) -> bool:
    return hasattr(storage, "record_heartbeat") and getattr(storage, "heartbeat_interval", None) is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_trials(study) -> int:
    """Mark RUNNING trials whose worker process (on this host) is gone as FAIL and enqueue their
    config once more (as Optuna's retry callback does). Journal storages have no heartbeat: this
    keeps a killed worker from leaving a trial running forever; on RDB storages it also catches a
    worker killed before its first heartbeat, which Optuna never considers stale."""
    optuna = _optuna()
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or pid == os.getpid() or _pid_alive(pid):
            continue
        try:  # another worker may reap it first: then this raises and we leave it
            study._storage.set_trial_user_attr(t._trial_id, "reason", f"worker died (pid {pid} on {host})")
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        except Exception:  # noqa: BLE001
            continue
        n += 1
        if "retry_of" not in t.user_attrs:  # retry once
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return n


# ---------------------------------------------------------------------------------------------
# the search space


def search_space(spec: KernelSpec) -> dict[str, list[int]]:
    """Categorical choices per tunable of the family (invalid combos are pruned by keep())."""
    if spec.family == "decode":
        return {"block_n": list(BLOCK_N_VALUES), "num_warps": list(NUM_WARPS_VALUES),
                "num_stages": list(NUM_STAGES_VALUES), "split_size": list(SPLIT_SIZE_VALUES)}
    if spec.family == "extend":
        return {"block_m": list(BLOCK_M_VALUES), "block_n": list(BLOCK_N_VALUES),
                "num_warps": list(NUM_WARPS_VALUES), "num_stages": list(NUM_STAGES_VALUES)}
    return {"block_n": list(BLOCK_N_VALUES), "num_warps": list(NUM_WARPS_VALUES)}


def parse_space(text: str, spec_family: str = "decode") -> dict[str, list[int]]:
    """A restricted search space from "block_n=32,64;num_warps=4,8;split_size=0,512": the named
    tunables take the listed values, the others the family's full range."""
    from pagegen.spec import KernelSpec as _KS

    full = search_space(_KS(spec_family, head_dim=128, block_size=16))
    out = dict(full)
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in full:
            raise ValueError(f"--space: unknown tunable {name!r} for {spec_family}; expected one of {', '.join(full)}")
        try:
            vals = sorted({int(v) for v in values.split(",") if v.strip()})
        except ValueError:
            raise ValueError(f"--space: {part!r} must be name=int,int,...") from None
        bad = [v for v in vals if v not in full[name]]
        if not vals or bad:
            raise ValueError(f"--space: {name} values {bad or vals} not in the legal {full[name]}")
        out[name] = vals
    return out


def interpret_space(spec: KernelSpec) -> dict[str, list[int]]:
    """A small space for the interpreter (warps/stages mean nothing there; tiles stay small)."""
    space = search_space(spec)
    space["block_n"] = [16, 32, 64]
    space["num_warps"] = [1, 4]
    space["num_stages"] = [1, 2]
    if "split_size" in space:
        space["split_size"] = [0, 256]
    if "block_m" in space:
        space["block_m"] = [16, 32]
    return space


def params_of(cfg: Config, space: dict[str, list[int]]) -> dict[str, int]:
    return {k: getattr(cfg, k) for k in space}


def config_of(params: dict[str, Any]) -> Config:
    return Config(**{k: int(v) for k, v in params.items()})


def _in_space(params: dict[str, int], space: dict[str, list[int]]) -> bool:
    return all(params.get(k) in v for k, v in space.items())


# ---------------------------------------------------------------------------------------------
# faults (test hook): [{"match": {"block_n": 32}, "fault": "compile" | "wrong" | "hang" | "resources"}]


def _faults(options: TuneOptions) -> list[dict[str, Any]]:
    env = os.environ.get(ENV_FAULTS)
    return list(options.faults) + (json.loads(env) if env else [])


def _fault_for(cfg: Config, faults: list[dict[str, Any]]) -> str | None:
    for f in faults:
        if all(getattr(cfg, k) == v for k, v in f.get("match", {}).items()):
            return str(f["fault"])
    return None


# ---------------------------------------------------------------------------------------------
# per-family runners: build inputs, launch, verify


def _paged_inputs(spec: KernelSpec, kv_heads: int, lens: Sequence[int], device: str,
                  gen: torch.Generator) -> dict[str, Any]:
    """Random q and paged K/V pools (pages at shuffled physical blocks) for sequences of `lens`.

    q: [B, kv_heads*G, D]; k, v: pools in spec.layout; block_tables: [B, max_blocks] int32;
    seq_lens: [B] int32; out: [B, Hq, D] poisoned with NaN; scales: {} or, for an fp8 spec, the
    k_scale/v_scale keywords of the ops (the pools then hold quantized randn).
    """
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[spec.dtype]
    bs, d, hq = spec.block_size, spec.head_dim, kv_heads * spec.group_size
    nblk = [-(-n // bs) for n in lens]
    width, total = max(1, max(nblk)), sum(nblk) + 1
    shape = (total, bs, kv_heads, d) if spec.layout == "NHD" else (total, kv_heads, bs, d)
    k = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if device == "cpu" else dt).to(dt)
    v = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if device == "cpu" else dt).to(dt)
    perm = torch.randperm(total, generator=gen, device=device).to(torch.int32)
    tables = torch.zeros(len(lens), width, dtype=torch.int32, device=device)
    pos = 0
    for i, nb in enumerate(nblk):
        tables[i, :nb] = perm[pos:pos + nb]
        tables[i, nb:] = perm[-1]
        pos += nb
    q = torch.randn(len(lens), hq, d, generator=gen, device=device, dtype=torch.float32).to(dt)
    scales: dict[str, torch.Tensor] = {}
    if spec.is_fp8:  # quantize K/V as kv_write does, per-tensor scales from the data's absmax
        from pagegen._checks import TORCH_KV_DTYPES
        from pagegen.reference import absmax_scale_ref, quantize_fp8_ref

        fp8 = next(t for t, name in TORCH_KV_DTYPES.items() if name == spec.kv_dtype)
        scales = {"k_scale": absmax_scale_ref(k, fp8), "v_scale": absmax_scale_ref(v, fp8)}
        k, v = quantize_fp8_ref(k, scales["k_scale"], fp8), quantize_fp8_ref(v, scales["v_scale"], fp8)
    return {"q": q, "k": k, "v": v, "block_tables": tables,
            "seq_lens": torch.tensor(list(lens), dtype=torch.int32, device=device),
            "out": torch.full_like(q, float("nan")), "max_seq_len": max(lens), "scales": scales}


def _dequantized(x: dict[str, Any], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The K/V pools of _paged_inputs as the reference reads them (fp8: code * scale, exactly)."""
    if not x["scales"]:
        return x["k"], x["v"]
    from pagegen.reference import dequantize_pool_ref

    return (dequantize_pool_ref(x["k"], x["scales"]["k_scale"], layout=layout),
            dequantize_pool_ref(x["v"], x["scales"]["v_scale"], layout=layout))


class DecodeRunner:
    """Tuning glue of the decode family (pagegen.decode.paged_decode with an explicit config)."""

    family = "decode"

    def __init__(self, workload: Workload, device: str, interpret: bool) -> None:
        self.w, self.device, self.interpret = workload, device, interpret
        self._inputs: dict[tuple[int, int, bool], dict[str, Any]] = {}

    def inputs(self, bucket: Bucket) -> dict[str, Any]:
        key = (*bucket.shape, bucket.ragged)  # ints and a bool: the same seed in every worker
        if key not in self._inputs:
            gen = torch.Generator(device=self.device).manual_seed(hash(key) & 0xFFFF)
            self._inputs[key] = _paged_inputs(self.w.spec, self.w.kv_heads, bucket.lengths(), self.device, gen)
        return self._inputs[key]

    def launch(self, cfg: Config, x: dict[str, Any]) -> torch.Tensor:
        from pagegen.decode import paged_decode

        return paged_decode(x["q"], x["k"], x["v"], x["block_tables"], x["seq_lens"], layout=self.w.spec.layout,
                            out=x["out"], config=cfg, max_seq_len=x["max_seq_len"], **x["scales"])

    def verify(self, cfg: Config, rng: random.Random, wrong: bool = False) -> None:
        """Raise TrialFailure unless cfg matches the fp64 reference on fresh random inputs."""
        from pagegen.reference import paged_decode_ref

        spec = self.w.spec
        if self.interpret:
            lens, hk = [rng.randint(1, 20), rng.randint(21, 90), rng.randint(257, 300)], min(self.w.kv_heads, 2)
        else:
            lens = [rng.randint(1, 64), rng.randint(65, 1500), rng.randint(1500, 6000), rng.randint(6000, 20000)]
            hk = self.w.kv_heads
        gen = torch.Generator(device=self.device).manual_seed(rng.randrange(1 << 31))
        x = _paged_inputs(spec, hk, lens, self.device, gen)
        out = self.launch(cfg, x)
        if wrong:  # injected fault: a kernel that computes garbage
            out.mul_(-1.0)
        ref = paged_decode_ref(x["q"], *_dequantized(x, spec.layout), x["block_tables"], x["seq_lens"],
                               layout=spec.layout)
        out64 = out.double()
        if not torch.isfinite(out64).all():
            raise TrialFailure(f"wrong result: non-finite output (lens {lens})")
        err = float((out64 - ref).norm() / ref.norm().clamp_min(1e-30))
        if not err <= TOL[spec.dtype]:
            raise TrialFailure(f"wrong result: relative error {err:.3g} > {TOL[spec.dtype]} (lens {lens})")

    def bucket_bytes(self, bucket: Bucket) -> int:
        return decode_bytes(self.w.spec, self.w.kv_heads, bucket.lengths())

    def fits(self, bucket: Bucket) -> bool:
        return bucket_kv_bytes(self.w.spec, self.w.kv_heads, bucket) <= MAX_BUCKET_BYTES


def extend_layout(bucket: Bucket) -> tuple[int, int, int]:
    """(sequences, new tokens each, context each) of an extend bucket (q_tokens, ctx): every
    sequence appends q_len = min(q_tokens, ctx) tokens at the end of a ctx-token context."""
    q_len = min(bucket.a, bucket.ctx)
    return -(-bucket.a // q_len), q_len, bucket.ctx


class ExtendRunner(DecodeRunner):
    """Tuning glue of the extend family (pagegen.extend.paged_extend with an explicit config).
    Buckets are (q_tokens, ctx), laid out by extend_layout(); the rate reported is TFLOP/s."""

    family = "extend"

    def _make(self, spec: KernelSpec, kv_heads: int, seqs: Sequence[tuple[int, int]], gen) -> dict[str, Any]:
        x = _paged_inputs(spec, kv_heads, [n for _, n in seqs], self.device, gen)
        dt = x["q"].dtype
        total = sum(q for q, _ in seqs)
        cu = [0]
        for q, _ in seqs:
            cu.append(cu[-1] + q)
        x["q"] = torch.randn(total, kv_heads * spec.group_size, spec.head_dim, generator=gen, device=self.device,
                             dtype=torch.float32).to(dt)
        x["out"] = torch.full_like(x["q"], float("nan"))
        x["cu"] = torch.tensor(cu, dtype=torch.int32, device=self.device)
        x["max_q_len"] = max(q for q, _ in seqs)
        return x

    def inputs(self, bucket: Bucket) -> dict[str, Any]:
        key = bucket.shape
        if key not in self._inputs:
            n_seq, q_len, ctx = extend_layout(bucket)
            gen = torch.Generator(device=self.device).manual_seed(hash(key) & 0xFFFF)
            self._inputs[key] = self._make(self.w.spec, self.w.kv_heads, [(q_len, ctx)] * n_seq, gen)
        return self._inputs[key]

    def launch(self, cfg: Config, x: dict[str, Any]) -> torch.Tensor:
        from pagegen.extend import paged_extend

        return paged_extend(x["q"], x["k"], x["v"], x["block_tables"], x["cu"], x["seq_lens"],
                            layout=self.w.spec.layout, out=x["out"], config=cfg, max_q_len=x["max_q_len"],
                            max_seq_len=x["max_seq_len"], **x["scales"])

    def verify(self, cfg: Config, rng: random.Random, wrong: bool = False) -> None:
        from pagegen.reference import paged_extend_ref

        spec = self.w.spec
        if self.interpret:
            qs = [rng.randint(1, 8), rng.randint(9, 40)]
            seqs, hk = [(q, q + rng.randint(0, 30)) for q in qs], min(self.w.kv_heads, 2)
        else:
            qs = [rng.randint(1, 16), rng.randint(17, 300), rng.randint(300, 1200)]
            seqs, hk = [(q, q + rng.randint(0, 3000)) for q in qs], self.w.kv_heads
        gen = torch.Generator(device=self.device).manual_seed(rng.randrange(1 << 31))
        x = self._make(spec, hk, seqs, gen)
        out = self.launch(cfg, x)
        if wrong:
            out.mul_(-1.0)
        ref = paged_extend_ref(x["q"], *_dequantized(x, spec.layout), x["block_tables"], x["cu"], x["seq_lens"],
                               layout=spec.layout)
        out64 = out.double()
        if not torch.isfinite(out64).all():
            raise TrialFailure(f"wrong result: non-finite output (q_len, seq_len {seqs})")
        err = float((out64 - ref).norm() / ref.norm().clamp_min(1e-30))
        if not err <= TOL[spec.dtype]:
            raise TrialFailure(f"wrong result: relative error {err:.3g} > {TOL[spec.dtype]} (q_len, seq_len {seqs})")

    def bucket_flops(self, bucket: Bucket) -> int:
        """Matrix FLOPs of a bucket: 4 x Hq x D per (query, visible key) pair (QK^T and PV)."""
        n_seq, q_len, ctx = extend_layout(bucket)
        pairs = sum(p + 1 for p in range(ctx - q_len, ctx))
        return 4 * self.w.q_heads * self.w.spec.head_dim * pairs * n_seq

    def fits(self, bucket: Bucket) -> bool:
        n_seq, _, ctx = extend_layout(bucket)
        return n_seq * ctx * self.w.kv_heads * self.w.spec.head_dim * 4 <= MAX_BUCKET_BYTES


RUNNERS: dict[str, type] = {"decode": DecodeRunner, "extend": ExtendRunner}


def rate(runner, bucket: Bucket, us: float) -> tuple[float | None, float | None]:
    """(GB/s, TFLOP/s) of a bucket run in `us` microseconds (whichever the family measures)."""
    if hasattr(runner, "bucket_flops"):  # compute-bound family
        return None, runner.bucket_flops(bucket) / (us * 1e-6) / 1e12
    return runner.bucket_bytes(bucket) / (us * 1e-6) / 1e9, None


def register_runner(family: str, runner: type) -> None:
    """Let another family (extend, ...) plug its inputs/launch/verify into the tuner. A runner has
    the DecodeRunner interface: __init__(workload, device, interpret), inputs(bucket),
    launch(cfg, inputs), verify(cfg, rng, wrong=False), bucket_bytes(bucket) (or bucket_flops),
    fits(bucket)."""
    RUNNERS[family] = runner


# ---------------------------------------------------------------------------------------------
# one trial


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise TrialTimeout in the main thread after `seconds` (SIGALRM; a no-op elsewhere).
    A kernel hung inside the GPU cannot be interrupted in-process: that case is left to the
    heartbeat of RDB storages or the journal reaper once the worker is killed."""
    usable = seconds > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise TrialTimeout(f"timeout after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _reason(exc: BaseException) -> str:
    inner: BaseException | None = exc
    while inner is not None:  # a timeout raised inside Triton's interpreter arrives wrapped
        if isinstance(inner, TrialFailure):
            return str(inner)
        inner = inner.__cause__ or inner.__context__
    name = type(exc).__name__
    msg = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, TrialFailure):
        return str(exc)
    if "OutOfResources" in name or "out of resource" in msg.lower():
        return f"out of resources: {msg}"
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"out of memory: {msg}"
    if "Compil" in name or "compil" in msg.lower():
        return f"compile error: {name}: {msg}"
    return f"error: {name}: {msg}"


def _fatal(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return any(s in msg for s in ("illegal memory access", "illegal address", "unspecified launch failure",
                                  "device-side assert", "misaligned address"))


def evaluate(runner, cfg: Config, buckets: Sequence[Bucket], options: TuneOptions, rng: random.Random,
             fault: str | None) -> dict[str, float]:
    """Compile, verify, and time `cfg` on every bucket; returns {bucket name: median us}.
    Raises TrialFailure (or another exception, classified by _reason) when the trial fails."""
    from pagegen.timing import bench

    if fault == "compile":
        raise TrialFailure("compile error: injected fault")
    if fault == "resources":
        raise TrialFailure("out of resources: injected fault (shared memory)")
    if fault == "hang":
        time.sleep(3600)
    runner.verify(cfg, rng, wrong=(fault == "wrong"))
    interp = runner.interpret
    times: dict[str, float] = {}
    for b in buckets:
        x = runner.inputs(b)
        t = bench(lambda i, x=x: runner.launch(cfg, x), warmup=0 if interp else options.warmup,
                  reps=2 if interp else options.reps, flush=not interp, graph=options.graph and not interp)
        times[b.name] = t.median_us
    return times


def objective_value(times: dict[str, float], buckets: Sequence[Bucket]) -> float:
    """Weighted geometric mean latency (us) over the buckets: scale-free, so a 10 us bucket
    counts as much as a 2 ms one (the per-bucket winners are kept separately anyway)."""
    wsum = sum(b.weight for b in buckets)
    return math.exp(sum(b.weight * math.log(max(times[b.name], 1e-3)) for b in buckets) / wsum)


# ---------------------------------------------------------------------------------------------
# warm start


def _spec_distance(a: KernelSpec, b: KernelSpec) -> float:
    if a.family != b.family:
        return math.inf
    return (abs(math.log2(a.head_dim / b.head_dim)) * 2 + abs(math.log2(a.group_size / b.group_size))
            + abs(math.log2(a.block_size / b.block_size)) + (a.layout != b.layout) * 0.5 + (a.dtype != b.dtype) * 0.25)


def warm_start_configs(workload: Workload, tables: Sequence[Table], sm_count: int,
                       space: dict[str, list[int]]) -> list[Config]:
    """Configs to try first: the spec's default, the heuristic pick per bucket, and the winners
    of the nearest already-tuned spec (same family) in the given tables; legal and in-space only."""
    from pagegen.dispatch import heuristic_config

    spec = workload.spec
    cands = [default_config(spec)]
    cands += [heuristic_config(spec, b.a, b.ctx, workload.kv_heads, sm_count, b.ragged) for b in workload.buckets]
    entries = [e for t in tables for e in t.entries.values() if e.spec.family == spec.family]
    if entries:
        near = min(entries, key=lambda e: _spec_distance(e.spec, spec))
        cands += [b.config for b in near.buckets]
    out: list[Config] = []
    for c in cands:
        c = config_of(params_of(c, space))
        if c not in out and keep(spec, c) is None and _in_space(params_of(c, space), space):
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# the study of one workload


def study_name(workload: Workload, gpu_key: str, prefix: str | None,
               space: dict[str, list[int]] | None = None) -> str:
    """`<prefix>:<variant key>:t<template hash 8>:b<bucket hash 6>[:s<space hash 6>]`; the space
    part only for a restricted search space (Optuna refuses to change a parameter's choices
    inside one study)."""
    bh = hashlib.sha256(json.dumps([[b.a, b.ctx, b.weight] + ([True] if b.ragged else [])
                                    for b in workload.buckets]).encode()).hexdigest()[:6]
    th = codegen.template_hash(workload.spec.family)[:8]
    name = f"{prefix or f'pagegen-{gpu_key}'}:{workload.spec.variant_key()}:t{th}:b{bh}"
    if space is not None:
        name += ":s" + hashlib.sha256(json.dumps(sorted(space.items())).encode()).hexdigest()[:6]
    return name


def _make_sampler(options: TuneOptions, space: dict[str, list[int]], n_trials: int):
    optuna = _optuna()
    seed = options.seed + 7919 * options.worker_index
    if options.sampler == "grid":
        return optuna.samplers.GridSampler(space, seed=seed)
    if options.sampler != "tpe":
        raise ValueError(f"sampler={options.sampler!r} is not supported; supported: tpe, grid")
    kw: dict[str, Any] = {"seed": seed, "n_startup_trials": max(3, min(10, n_trials // 3))}
    if optuna_major() < 5:
        kw.update(multivariate=True, constant_liar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.samplers.TPESampler(**kw)


def winners(study, workload: Workload, runner) -> tuple[list[BucketResult], int, int, list[tuple[int, str]]]:
    """Per-bucket fastest COMPLETE trial of the study (all workers), and trial/failure counts."""
    optuna = _optuna()
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL))
    done = [t for t in trials if t.state == states.COMPLETE and "bucket_us" in t.user_attrs]
    fails = [(t.number, str(t.user_attrs.get("reason", "failed (no reason recorded: killed worker?)")))
             for t in trials if t.state == states.FAIL]
    out = []
    for b in workload.buckets:
        timed = [(t.user_attrs["bucket_us"][b.name], t.number, t) for t in done if b.name in t.user_attrs["bucket_us"]]
        if not timed:
            continue
        us, _, t = min(timed, key=lambda x: (x[0], x[1]))
        gbps, tflops = rate(runner, b, us)
        out.append(BucketResult(shape=b.shape, config=config_of(t.params), latency_us=us, gbps=gbps, tflops=tflops,
                                trials=len(timed), ragged=b.ragged))
    return out, len(trials), len(fails), fails


def tune_workload(workload: Workload, gpu: GpuInfo, storage, options: TuneOptions,
                  copy_gbps: float | None) -> SpecResult:
    """Run this worker's share of the study of one workload and return the study's winners."""
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own progress lines say what happened
    spec = workload.spec
    interp = gpu.key == INTERPRET_KEY
    if spec.family not in RUNNERS:
        raise ValueError(f"tuning family {spec.family!r} is not supported yet (supported: {', '.join(RUNNERS)}); "
                         "a family registers its runner with pagegen.tuner.register_runner")
    device = "cpu" if interp else "cuda"
    runner = RUNNERS[spec.family](workload, device, interp)
    buckets = [b for b in workload.buckets if interp or runner.fits(b)]
    skipped = [b.name for b in workload.buckets if b not in buckets]
    say = options.progress or (lambda s: None)
    key = spec.variant_key()
    if skipped:
        say(f"[{key}] skipping buckets over {MAX_BUCKET_BYTES >> 30} GiB of KV: {', '.join(skipped)}")
    workload = Workload(spec, workload.kv_heads, tuple(buckets), workload.models)
    space = options.space or (interpret_space(spec) if interp else search_space(spec))
    name = study_name(workload, gpu.key, options.study_name, options.space)
    sampler = _make_sampler(options, space, options.trials)
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler,
                                load_if_exists=True)
    study.set_user_attr("spec", spec.to_dict())
    study.set_user_attr("gpu", gpu.key)
    study.set_user_attr("kv_heads", workload.kv_heads)
    study.set_user_attr("sm_count", gpu.sm_count)
    study.set_user_attr("buckets", [[b.a, b.ctx, b.weight] for b in workload.buckets])
    # journal storages have no heartbeat; on RDB this also catches a worker killed before its
    # first heartbeat (Optuna never considers such a trial stale)
    if _has_heartbeat(storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" notice
            optuna.storages.fail_stale_trials(study)  # stale heartbeats: failed, retried by the callback
    n = reap_dead_trials(study)
    if n:
        say(f"[{key}] marked {n} trial(s) of dead workers on this host as failed")
    if options.trials > 0 and options.warm_start:
        for cfg in warm_start_configs(workload, options.warm_tables, gpu.sm_count, space):
            study.enqueue_trial(params_of(cfg, space), skip_if_exists=True)

    faults = _faults(options)
    legal = {tuple(sorted(params_of(c, space).items())) for c in config_space(spec)
             if _in_space(params_of(c, space), space)}
    rng = random.Random(options.seed * 1_000_003 + options.worker_index)
    host, pid = socket.gethostname(), os.getpid()
    state = {"evaluated": 0, "best": math.inf, "asked": 0}
    t0 = time.time()
    states = optuna.trial.TrialState

    def objective(trial) -> float:
        state["asked"] += 1
        params = {k: trial.suggest_categorical(k, v) for k, v in space.items()}
        cfg = config_of(params)
        reason = keep(spec, cfg)
        if reason:
            trial.set_user_attr("reason", f"rejected before compiling: {reason}")
            raise optuna.TrialPruned(reason)
        for t in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL, states.RUNNING)):
            if t.number == trial.number or t.params != params:
                continue
            if t.state == states.FAIL and str(t.user_attrs.get("reason", "worker died")).startswith("worker died"):
                continue  # a killed worker's trial may run again (RetryFailedTrialCallback does the same)
            trial.set_user_attr("reason", f"duplicate of trial {t.number}")
            raise optuna.TrialPruned("duplicate")
        trial.set_user_attr("host", host)
        trial.set_user_attr("pid", pid)
        state["evaluated"] += 1
        try:
            with _deadline(options.trial_timeout_s):
                times = evaluate(runner, cfg, workload.buckets, options, rng, _fault_for(cfg, faults))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a failed trial with its reason
            why = _reason(exc)
            trial.set_user_attr("reason", why)
            if _fatal(exc):
                raise FatalDeviceError(why) from exc
            raise TrialFailure(why) from None
        trial.set_user_attr("bucket_us", times)
        value = objective_value(times, workload.buckets)
        state["best"] = min(state["best"], value)
        return value

    def after(study_, frozen) -> None:
        if frozen.state == states.PRUNED:
            return
        best_rows, _, _, _ = winners(study_, workload, runner)
        won = [b for b in workload.buckets if any(r.name == b.name for r in best_rows)]
        tot_t = sum(r.latency_us for r in best_rows)
        if not hasattr(runner, "bucket_flops"):  # memory-bound family: bandwidth vs the copy ceiling
            gbps = sum(runner.bucket_bytes(b) for b in won) / (tot_t * 1e-6) / 1e9 if tot_t else 0.0
            pct = f"{100 * gbps / copy_gbps:.0f}% of copy" if copy_gbps else "n/a of copy"
            rate_s = f"{gbps:.1f} GB/s ({pct})"
        else:
            tf = sum(runner.bucket_flops(b) for b in won) / (tot_t * 1e-6) / 1e12 if tot_t else 0.0
            rate_s = f"{tf:.2f} TFLOP/s"
        tag = "ok" if frozen.state == states.COMPLETE else f"FAILED {frozen.user_attrs.get('reason', '')}"
        val = f" {frozen.value:.1f} us" if frozen.value is not None else ""
        note = " [interpreter: timings meaningless]" if interp else ""
        say(f"[{key}] trial {state['evaluated']}/{options.trials} (#{frozen.number}) {tag}{val} | "
            f"best {state['best']:.1f} us, {rate_s}{note}")
        if state["evaluated"] >= options.trials:
            study_.stop()
        explored = {tuple(sorted(t.params.items())) for t in study_.get_trials(deepcopy=False, states=(states.COMPLETE,
                                                                                                       states.FAIL))}
        if legal and legal <= explored:
            say(f"[{key}] every legal config has been tried")
            study_.stop()

    if options.trials > 0:
        study.optimize(objective, n_trials=options.trials * 30 + 50, catch=(TrialFailure,), callbacks=[after])
    best_rows, ntrials, nfailed, fails = winners(study, workload, runner)
    entry = None
    if best_rows:
        entry = Entry(spec=spec, template_hash=codegen.template_hash(spec.family), buckets=best_rows, trials=ntrials,
                      failed=nfailed, tuned_at=now_iso(), kv_heads=workload.kv_heads, models=list(workload.models),
                      toolchain=toolchain_versions())
    rows = _summary_rows(study, workload, runner, best_rows, gpu.sm_count, copy_gbps)
    return SpecResult(workload, name, entry, ntrials, nfailed, fails, rows, time.time() - t0)


def _summary_rows(study, workload: Workload, runner, best: list[BucketResult], sm_count: int,
                  copy_gbps: float | None) -> list[dict[str, Any]]:
    """Per bucket: winner, its us / GB/s / % of copy, and the heuristic config's time when measured."""
    from pagegen.dispatch import heuristic_config

    optuna = _optuna()
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    rows = []
    for r in best:
        b = next(x for x in workload.buckets if x.name == r.name)
        h = heuristic_config(workload.spec, b.a, b.ctx, workload.kv_heads, sm_count, b.ragged)
        h_us = [t.user_attrs["bucket_us"].get(b.name) for t in done if config_of(t.params) == config_of(
            {k: getattr(h, k) for k in t.params})]
        h_us = [x for x in h_us if x is not None]
        rows.append({"bucket": b.name, "config": r.config, "us": r.latency_us, "gbps": r.gbps, "tflops": r.tflops,
                     "pct_copy": (100 * r.gbps / copy_gbps) if (copy_gbps and r.gbps) else None,
                     "heuristic_us": min(h_us) if h_us else None})
    return rows


# ---------------------------------------------------------------------------------------------
# the whole run


def tune(workloads: Sequence[Workload], gpu: GpuInfo, options: TuneOptions, *, forced_key: str | None = None) -> tuple[
        Table | None, list[SpecResult]]:
    """Tune every workload on `gpu` (the live device, or the interpreter); returns the run's Table
    (entries of the specs with at least one correct trial; None if none) and per-spec results.
    forced_key: record the table under this GPU key although the device's key differs."""
    interp = gpu.key == INTERPRET_KEY
    if interp:
        import triton.language.standard as tl_std

        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") or type(tl_std.sum).__name__ == "JITFunction":
            raise RuntimeError("tuning on the interpreter needs TRITON_INTERPRET=1 set before triton is imported "
                               "(`pagegen tune --interpret` arranges it)")
    storage = open_storage(options.storage, forced_key or gpu.key, options.heartbeat_s)
    from pagegen.timing import copy_bandwidth

    copy_gbps = None if interp else copy_bandwidth()
    say = options.progress or (lambda s: None)
    if copy_gbps:
        say(f"copy bandwidth on {gpu.name}: {copy_gbps:.0f} GB/s (4 GiB d2d, read + write)")
    results: list[SpecResult] = []
    for w in workloads:
        # warm start from the given tables and from the specs this run has tuned so far
        done = {r.entry.key: r.entry for r in results if r.entry is not None}
        run_table = Table(gpu.key, gpu.name, gpu.sm_count, gpu.capability, done, {}, now_iso())
        opts = TuneOptions(**{**options.__dict__, "warm_tables": [*options.warm_tables, run_table]})
        results.append(tune_workload(w, gpu, storage, opts, copy_gbps))
        if not interp:
            torch.cuda.empty_cache()
    entries = {r.entry.key: r.entry for r in results if r.entry is not None}
    if not entries:
        return None, results
    table = Table(gpu_key=forced_key or gpu.key, gpu_name=gpu.name, sm_count=gpu.sm_count, capability=gpu.capability,
                  entries=entries, toolchain=toolchain_versions(), tuned_at=now_iso(), forced=forced_key is not None,
                  interpret=interp)
    return table, results


def collect(workloads: Sequence[Workload], gpu: GpuInfo, options: TuneOptions, *,
            forced_key: str | None = None) -> tuple[Table | None, list[SpecResult]]:
    """Read the winners of finished studies without running trials (the --workers parent uses it)."""
    opts = TuneOptions(**{**options.__dict__, "trials": 0, "warm_tables": []})
    return tune(workloads, gpu, opts, forced_key=forced_key)


def format_summary(results: Sequence[SpecResult], interpret: bool) -> str:
    """The end-of-run table: per spec and bucket the winner, us, GB/s (decode; TFLOP/s for extend),
    % of the copy bandwidth, and the gain over the heuristic config (when it was measured)."""
    lines = []
    hdr = (f"{'spec / bucket':<34} {'block_n':>7} {'block_m':>7} {'warps':>5} {'stages':>6} {'split':>5} {'us':>10} "
           f"{'rate':>14} {'%copy':>6} {'vs heur':>8}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for r in results:
        models = f" ({', '.join(r.workload.models)})" if r.workload.models else ""
        lines.append(f"{r.workload.spec.variant_key()}{models}: {r.trials} trials, {r.failed} failed, "
                     f"{r.seconds:.0f} s this worker")
        for row in r.rows:
            c = row["config"]
            gain = f"{row['heuristic_us'] / row['us']:.2f}x" if row["heuristic_us"] else "-"
            pct = f"{row['pct_copy']:.0f}" if row["pct_copy"] is not None else "-"
            if row["gbps"] is not None:
                rt = f"{row['gbps']:.1f} GB/s"
            elif row.get("tflops") is not None:
                rt = f"{row['tflops']:.2f} TF/s"
            else:
                rt = "-"
            lines.append(f"  {row['bucket']:<32} {c.block_n:>7} {c.block_m:>7} {c.num_warps:>5} {c.num_stages:>6} "
                         f"{c.split_size:>5} {row['us']:>10.1f} {rt:>14} {pct:>6} {gain:>8}")
        for num, why in r.failures[:5]:
            lines.append(f"  failed trial #{num}: {why}")
        if len(r.failures) > 5:
            lines.append(f"  ... {len(r.failures) - 5} more failed trials")
    if interpret:
        lines.append("(interpreter run: timings are host-clock times of emulated kernels and mean nothing)")
    return "\n".join(lines)
