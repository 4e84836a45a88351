"""The study driver: one Optuna study per (GPU, spec); verify, time, keep the per-bucket winners.

    tune(workloads, gpu, options) -> (Table of this run, [SpecResult])

For each workload (a spec, its KV-head count and shape buckets) a study searches the space of
pagegen.tuner.space (derived from spec.TUNABLES):
  1. a sampled combination that `spec.illegal_reason()` rejects is pruned before anything compiles;
     a combination already finished in the study (by any worker) is pruned as a duplicate;
  2. the candidate is verified against the float64 reference (pagegen.tuner.runners.verify);
     a wrong result fails the trial;
  3. every bucket of the workload is timed with that one compiled kernel (pagegen.timing: CUDA
     graph replay, L2 flush, median); the objective is the weighted geometric mean latency;
  4. compile errors, out-of-resources, timeouts (--trial-timeout, SIGALRM) and wrong results are
     failed trials with a `reason` user attribute; the study goes on.
After the trials the winners are read back from the storage, per bucket the fastest COMPLETE trial
(failed trials carry no timings, so they can never win), and returned as a table.Entry.

Storage (pagegen.tuner.storage): an Optuna journal file by default, or any Optuna storage URL
(`postgresql://...` for many machines, with heartbeats). At the start of each study a worker reaps
RUNNING trials that have no live owner and retries their config once. `--trials N` is what one
run (one worker) adds per spec; a re-run resumes and adds more.

Study names: `<prefix>:<variant key>:t<template hash 8>:b<bucket-set hash 6>[:s<space hash>]`,
prefix `pagegen-<gpu key>` or the --study-name given; workers that agree on the arguments share a
study; a changed template or bucket set starts a new study (old timings are not comparable).

This module never writes YAML: the CLI merges each run's Table into the output file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pagegen import codegen
from pagegen.gpu import INTERPRET_KEY, GpuInfo
from pagegen.spec import Config, KernelSpec, config_space, default_config, illegal_reason
from pagegen.table import BucketResult, Entry, Table, now_iso, toolchain_versions
from pagegen.tuner import storage as S
from pagegen.tuner.runners import Runner, RunnerFactory, TrialFailure, rate, runner_for
from pagegen.tuner.space import config_of, in_space, params_of, search_space
from pagegen.tuner.trial import (
    FatalDeviceError,
    TimingOptions,
    deadline,
    evaluate,
    is_fatal,
    objective_value,
    reason_of,
)
from pagegen.workloads import MAX_BUCKET_BYTES, Workload

BUDGETS = {"quick": 12, "full": 60}  # trials per spec of --budget presets


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
    runners: dict[str, RunnerFactory] | None = None  # per-family runner overrides (tests inject faults here)
    progress: Callable[[str], None] | None = print
    worker_index: int = 0
    heartbeat_s: int = 60  # RDB: a trial silent for 2x this is failed; any storage: the owner-less grace period
    space: dict[str, list[int]] | None = None  # restrict the search space (default: the family's)

    @property
    def timing(self) -> TimingOptions:
        return TimingOptions(reps=self.reps, warmup=self.warmup, graph=self.graph)


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
# warm start and names


def _spec_distance(a: KernelSpec, b: KernelSpec) -> float:
    if a.family != b.family:
        return math.inf
    return (abs(math.log2(a.head_dim / b.head_dim)) * 2 + abs(math.log2(a.group_size / b.group_size))
            + abs(math.log2(a.block_size / b.block_size)) + (a.layout != b.layout) * 0.5 + (a.dtype != b.dtype) * 0.25
            + abs(math.log2(a.q_len / b.q_len)))  # a verify spec warm-starts from the nearest q_len


def warm_start_configs(workload: Workload, tables: Sequence[Table], sm_count: int,
                       space: dict[str, list[int]]) -> list[Config]:
    """Configs to try first: the spec's default, the heuristic pick per bucket, and the winners
    of the nearest already-tuned spec (same family) in the given tables; legal and in-space only."""
    from pagegen.dispatch import heuristic_config

    spec = workload.spec
    cands = [default_config(spec)]
    cands += [heuristic_config(spec, *workload.table_shape(b), workload.kv_heads, sm_count, b.ragged)
              for b in workload.buckets]
    entries = [e for t in tables for e in t.entries.values() if e.spec.family == spec.family]
    if entries:
        near = min(entries, key=lambda e: _spec_distance(e.spec, spec))
        cands += [b.config for b in near.buckets]
    out: list[Config] = []
    for c in cands:
        c = config_of(params_of(c, space))
        if c not in out and illegal_reason(spec, c) is None and in_space(params_of(c, space), space):
            out.append(c)
    return out


def study_name(workload: Workload, gpu_key: str, prefix: str | None,
               space: dict[str, list[int]] | None = None) -> str:
    """`<prefix>:<variant key>:t<template hash 8>:b<bucket hash 6>[:s<space hash 6>]`; the space
    part only for a restricted search space (Optuna refuses to change a parameter's choices
    inside one study). The bucket hash also covers the feature values (window, softcap) when set:
    timings under another window are not comparable."""
    shapes: list = [[b.a, b.ctx, b.weight] + ([True] if b.ragged else []) for b in workload.buckets]
    if workload.feature_values():  # plain specs keep their names (and their journals)
        shapes.append(sorted(workload.feature_values().items()))
    bh = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:6]
    th = codegen.kernel_hash(workload.spec)[:8]
    name = f"{prefix or f'pagegen-{gpu_key}'}:{workload.spec.variant_key()}:t{th}:b{bh}"
    if space is not None:
        name += ":s" + hashlib.sha256(json.dumps(sorted(space.items())).encode()).hexdigest()[:6]
    return name


def make_sampler(options: TuneOptions, space: dict[str, list[int]], n_trials: int):
    """The Optuna sampler of a run (seeded per worker; TPE with a few random startup trials, or grid)."""
    optuna = S.optuna()
    seed = options.seed + 7919 * options.worker_index
    if options.sampler == "grid":
        return optuna.samplers.GridSampler(space, seed=seed)
    if options.sampler != "tpe":
        raise ValueError(f"sampler={options.sampler!r} is not supported; supported: tpe, grid")
    kw: dict[str, Any] = {"seed": seed, "n_startup_trials": max(3, min(10, n_trials // 3))}
    if S.optuna_major() < 5:
        kw.update(multivariate=True, constant_liar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.samplers.TPESampler(**kw)


def winners(study, workload: Workload, runner: Runner) -> tuple[list[BucketResult], int, int, list[tuple[int, str]]]:
    """Per-bucket fastest COMPLETE trial of the study (all workers), and trial/failure counts.
    Each result is recorded under workload.table_shape(bucket) (with a window: its effective context)."""
    states = S.optuna().trial.TrialState
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
        out.append(BucketResult(shape=workload.table_shape(b), config=config_of(t.params), latency_us=us, gbps=gbps,
                                tflops=tflops,
                                trials=len(timed), ragged=b.ragged))
    return out, len(trials), len(fails), fails


# ---------------------------------------------------------------------------------------------
# the study of one workload


def _open_study(workload: Workload, gpu: GpuInfo, storage, options: TuneOptions,
                space: dict[str, list[int]]):
    optuna = S.optuna()
    name = study_name(workload, gpu.key, options.study_name, options.space)
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize",
                                sampler=make_sampler(options, space, options.trials), load_if_exists=True)
    study.set_user_attr("spec", workload.spec.to_dict())
    study.set_user_attr("gpu", gpu.key)
    study.set_user_attr("kv_heads", workload.kv_heads)
    study.set_user_attr("sm_count", gpu.sm_count)
    study.set_user_attr("buckets", [[b.a, b.ctx, b.weight] for b in workload.buckets])
    if workload.feature_values():
        study.set_user_attr("features", workload.feature_values())
    return study


def tune_workload(workload: Workload, gpu: GpuInfo, storage, options: TuneOptions,
                  copy_gbps: float | None) -> SpecResult:
    """Run this worker's share of the study of one workload and return the study's winners."""
    optuna = S.optuna()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own progress lines say what happened
    spec = workload.spec
    interp = gpu.key == INTERPRET_KEY
    runner = runner_for(workload, "cpu" if interp else "cuda", interp, options.runners)
    buckets = [b for b in workload.buckets if interp or runner.fits(b)]
    skipped = [b.name for b in workload.buckets if b not in buckets]
    say = options.progress or (lambda s: None)
    key = spec.variant_key()
    if skipped:
        say(f"[{key}] skipping buckets over {MAX_BUCKET_BYTES >> 30} GiB of KV: {', '.join(skipped)}")
    workload = replace(workload, buckets=tuple(buckets))
    space = options.space or search_space(spec, interpret=interp)
    study = _open_study(workload, gpu, storage, options, space)
    if S.has_heartbeat(storage):
        S.fail_stale_trials(study)  # stale heartbeats: failed, retried by Optuna's callback
    n = S.reap_dead_trials(study, storage, grace_s=2 * options.heartbeat_s)
    if n:
        say(f"[{key}] marked {n} trial(s) of dead workers as failed")
    if options.trials > 0 and options.warm_start:
        for cfg in warm_start_configs(workload, options.warm_tables, gpu.sm_count, space):
            study.enqueue_trial(params_of(cfg, space), skip_if_exists=True)

    legal = {tuple(sorted(params_of(c, space).items())) for c in config_space(spec)
             if in_space(params_of(c, space), space)}
    rng = random.Random(options.seed * 1_000_003 + options.worker_index)
    host, pid = socket.gethostname(), os.getpid()
    state = {"evaluated": 0, "best": math.inf}
    t0 = time.time()
    states = optuna.trial.TrialState
    timing = options.timing

    def objective(trial) -> float:
        params = {k: trial.suggest_categorical(k, v) for k, v in space.items()}
        # the owner, before any work (a trial killed before this is reaped after the grace period)
        trial.set_user_attr("host", host)
        trial.set_user_attr("pid", pid)
        cfg = config_of(params)
        reason = illegal_reason(spec, cfg)
        if reason:
            trial.set_user_attr("reason", f"rejected before compiling: {reason}")
            raise optuna.TrialPruned(reason)
        for t in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL, states.RUNNING)):
            if t.number == trial.number or t.params != params:
                continue
            if t.state == states.FAIL and str(t.user_attrs.get("reason", S.WORKER_DIED)).startswith(S.WORKER_DIED):
                continue  # a killed worker's trial may run again (Optuna's retry callback does the same)
            trial.set_user_attr("reason", f"duplicate of trial {t.number}")
            raise optuna.TrialPruned("duplicate")
        state["evaluated"] += 1
        try:
            with deadline(options.trial_timeout_s):
                times = evaluate(runner, cfg, workload.buckets, timing, rng)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a failed trial with its reason
            why = reason_of(exc)
            trial.set_user_attr("reason", why)
            if is_fatal(exc):
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
        keys = {r.key for r in best_rows}
        won = [b for b in workload.buckets if (*workload.table_shape(b), b.ragged) in keys]
        tot_t = sum(r.latency_us for r in best_rows)
        per_s = sum(runner.work(b) for b in won) / (tot_t * 1e-6) if tot_t else 0.0
        if runner.metric == "gbps":  # memory-bound family: bandwidth vs the copy ceiling
            pct = f"{100 * per_s / 1e9 / copy_gbps:.0f}% of copy" if copy_gbps else "n/a of copy"
            rate_s = f"{per_s / 1e9:.1f} GB/s ({pct})"
        else:
            rate_s = f"{per_s / 1e12:.2f} TFLOP/s"
        tag = "ok" if frozen.state == states.COMPLETE else f"FAILED {frozen.user_attrs.get('reason', '')}"
        val = f" {frozen.value:.1f} us" if frozen.value is not None else ""
        note = " [interpreter: timings meaningless]" if interp else ""
        say(f"[{key}] trial {state['evaluated']}/{options.trials} (#{frozen.number}) {tag}{val} | "
            f"best {state['best']:.1f} us, {rate_s}{note}")
        if state["evaluated"] >= options.trials:
            study_.stop()
        explored = {tuple(sorted(t.params.items()))
                    for t in study_.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL))}
        if legal and legal <= explored:
            say(f"[{key}] every legal config has been tried")
            study_.stop()

    if options.trials > 0:
        study.optimize(objective, n_trials=options.trials * 30 + 50, catch=(TrialFailure,), callbacks=[after])
    best_rows, ntrials, nfailed, fails = winners(study, workload, runner)
    entry = None
    if best_rows:
        entry = Entry(spec=spec, kernel_hash=codegen.kernel_hash(spec), buckets=best_rows, trials=ntrials,
                      failed=nfailed, tuned_at=now_iso(), kv_heads=workload.kv_heads, models=list(workload.models),
                      toolchain=toolchain_versions())
    rows = _summary_rows(study, workload, best_rows, gpu.sm_count, copy_gbps)
    return SpecResult(workload, study.study_name, entry, ntrials, nfailed, fails, rows, time.time() - t0)


def _summary_rows(study, workload: Workload, best: list[BucketResult], sm_count: int,
                  copy_gbps: float | None) -> list[dict[str, Any]]:
    """Per bucket: winner, its us / GB/s / % of copy, and the heuristic config's time when measured."""
    from pagegen.dispatch import heuristic_config

    done = study.get_trials(deepcopy=False, states=(S.optuna().trial.TrialState.COMPLETE,))
    rows = []
    by_key = {(*workload.table_shape(b), b.ragged): b for b in workload.buckets}
    for r in best:
        b = by_key[r.key]
        h = heuristic_config(workload.spec, *workload.table_shape(b), workload.kv_heads, sm_count, b.ragged)
        h_us = [t.user_attrs["bucket_us"].get(b.name) for t in done if config_of(t.params) == config_of(
            {k: getattr(h, k) for k in t.params})]
        h_us = [x for x in h_us if x is not None]
        rows.append({"bucket": b.name, "config": r.config, "us": r.latency_us, "gbps": r.gbps, "tflops": r.tflops,
                     "pct_copy": (100 * r.gbps / copy_gbps) if (copy_gbps and r.gbps) else None,
                     "heuristic_us": min(h_us) if h_us else None})
    return rows


# ---------------------------------------------------------------------------------------------
# the whole run


def check_interpreter(gpu: GpuInfo) -> None:
    """Raise RuntimeError when tuning on the interpreter but Triton was imported without it."""
    if gpu.key != INTERPRET_KEY:
        return
    import triton.language.standard as tl_std

    from pagegen._checks import interpreting

    if not interpreting() or type(tl_std.sum).__name__ == "JITFunction":
        raise RuntimeError("tuning on the interpreter needs TRITON_INTERPRET=1 set before triton is imported "
                           "(`pagegen tune --interpret` arranges it)")


def tune(workloads: Sequence[Workload], gpu: GpuInfo, options: TuneOptions, *, forced_key: str | None = None) -> tuple[
        Table | None, list[SpecResult]]:
    """Tune every workload on `gpu` (the live device, or the interpreter); returns the run's Table
    (entries of the specs with at least one correct trial; None if none) and per-spec results.
    forced_key: record the table under this GPU key although the device's key differs."""
    interp = gpu.key == INTERPRET_KEY
    check_interpreter(gpu)
    storage = S.open_storage(options.storage, forced_key or gpu.key, options.heartbeat_s)
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
        opts = replace(options, warm_tables=[*options.warm_tables, run_table])
        results.append(tune_workload(w, gpu, storage, opts, copy_gbps))
        if not interp:
            torch.cuda.empty_cache()
    entries = {r.entry.key: r.entry for r in results if r.entry is not None}
    if not entries:
        return None, results
    table = Table(gpu_key=forced_key or gpu.key, gpu_name=gpu.name, sm_count=gpu.sm_count, capability=gpu.capability,
                  entries=entries, toolchain=toolchain_versions(), tuned_at=now_iso(), forced=forced_key is not None,
                  interpret=interp, copy_gbps=round(copy_gbps, 1) if copy_gbps else None)
    return table, results


def collect(workloads: Sequence[Workload], gpu: GpuInfo, options: TuneOptions, *,
            forced_key: str | None = None) -> tuple[Table | None, list[SpecResult]]:
    """Read the winners of finished studies without running trials (the --workers parent uses it)."""
    return tune(workloads, gpu, replace(options, trials=0, warm_tables=[]), forced_key=forced_key)


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
