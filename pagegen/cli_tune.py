"""`pagegen tune / show / check / merge`: argument parsing, GPU gating and printing.

pagegen/cli.py calls `add_subcommands(subparsers)`; `python -m pagegen.cli_tune ...` runs these
subcommands alone. `tune` starts its workers (and its interpreter re-run) from its own command line,
`python -m pagegen <argv> --workers 1 --worker-index I ...`, bound to die with it. The logic lives in
pagegen.tuner (studies), pagegen.table (files) and pagegen.dispatch (lookup).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

from pagegen import gpu as G
from pagegen import spec as S
from pagegen.cli_errors import USAGE_EXIT, UsageError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def _strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


class Refused(UsageError):
    """The command refuses to run (a UsageError: what is wrong; what to do); exit status 2."""


# ---------------------------------------------------------------------------------------------
# tune


def resolve_gpu(requested: str | None, interpret: bool, force: bool) -> tuple[G.GpuInfo, str | None]:
    """(device to tune on, forced key or None). Refuses on no GPU, or a --gpu that is not the
    detected one (unless force)."""
    if interpret:
        if requested not in (None, G.INTERPRET_KEY):
            raise Refused(f"--interpret tunes the Triton CPU interpreter (table key {G.INTERPRET_KEY!r}), "
                          f"not --gpu {requested}", f"drop --gpu {requested} or run without --interpret on that GPU")
        return G.INTERPRETER, None
    _check_gpu_key(requested)
    live = G.cuda_gpu()
    if live is None:
        raise Refused("no CUDA GPU detected (torch.cuda.is_available() is False)",
                      "to exercise the whole pipeline on the CPU under the Triton interpreter (tiny shapes, "
                      "meaningless timings) run `pagegen tune --interpret`")
    if requested is None or requested == live.key:
        return live, None
    if not force:
        raise Refused(f"--gpu {requested} does not match the detected GPU {live.name!r} (key {live.key!r})",
                      f"run on a {requested} GPU, use `--gpu {live.key}`, or pass --force-gpu to record this "
                      f"GPU's results under {requested!r} (the table will say it was forced)")
    return live, requested


def _check_gpu_key(requested: str | None) -> None:
    if requested is not None and requested != G.INTERPRET_KEY and not G.valid_key(requested):
        raise Refused(f"--gpu {requested!r} is not a gpu key", f"use one like {', '.join(G.KNOWN_KEYS[:6])}")


def _workloads(args: argparse.Namespace, interpret: bool):
    """The workloads the flags select; UsageError for a bad value or file."""
    from pagegen import workloads as W

    try:
        return _select_workloads(args, interpret)
    except OSError as exc:
        raise UsageError(f"cannot read {exc.filename or 'a file'}: {exc.strerror or exc}",
                         "check the path given to --specs / --buckets") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc), "fix the value (`pagegen list` shows the legal values; "
                                   f"see {W.__name__}.load_specs_yaml for the --specs format)") from None


def _select_workloads(args: argparse.Namespace, interpret: bool):
    from pagegen import workloads as W

    buckets = None
    if args.buckets:
        if Path(args.buckets).is_file():
            buckets = W.load_buckets_yaml(args.buckets)
        else:
            buckets = W.parse_buckets(_strs(args.buckets), "--buckets")
    quick = args.budget == "quick"
    if interpret and buckets is None:
        buckets = W.INTERPRET_BUCKETS
    axes = (args.family, args.head_dim, args.block_size, args.layout, args.dtype, args.group_size)
    if args.spec and args.specs:  # these entries of the list, as the list gives them (model, KV heads, buckets)
        listed = W.load_specs_yaml(args.specs, buckets or (W.QUICK_DECODE_BUCKETS if quick else None))
        keys = {w.spec.variant_key(): w for w in listed}
        missing = [k for k in args.spec if k not in keys]
        if missing:
            raise ValueError(f"--spec {', '.join(missing)} not in {args.specs} (it lists {', '.join(keys)})")
        return [keys[k] for k in dict.fromkeys(args.spec)]
    if args.spec:
        specs = [W.parse_variant_key(k) for k in args.spec]
        return [W.Workload.with_defaults(s, args.kv_heads or W.default_kv_heads(s),  # features: FEATURE_DEFAULTS
                                         buckets or W.default_buckets(s.family, quick)) for s in specs]
    if args.specs:
        return W.load_specs_yaml(args.specs, buckets or (W.QUICK_DECODE_BUCKETS if quick else None))
    if any(a for a in axes):
        specs = S.enumerate_specs(
            families=args.family or ("decode",), head_dims=args.head_dim or (128,),
            block_sizes=args.block_size or (16,), layouts=args.layout or ("NHD",), dtypes=args.dtype or ("bf16",),
            group_sizes=args.group_size or (4,))
        return [W.Workload(s, args.kv_heads or W.default_kv_heads(s), buckets or W.default_buckets(s.family, quick))
                for s in specs]
    if interpret:
        return W.interpret_workloads(buckets)
    return W.default_workloads("decode", buckets, quick=quick)


def default_out(key: str) -> Path:
    """tuned/<key>.yaml (the shipped folder) for GPUs; the cache folder for the interpreter."""
    from pagegen import codegen, dispatch

    if key == G.INTERPRET_KEY:
        return codegen.cache_dir() / "tuned" / f"{key}.yaml"
    return dispatch.tuned_dir() / f"{key}.yaml"


def redact_url(text: str) -> str:
    """`text` with the password of any URL in it replaced by *** (storage URLs are printed)."""
    return re.sub(r"(://[^:/@\s]+:)\S+@", r"\1***@", text)


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line this `tune` was started with (without the program name)."""
    argv = getattr(args, "argv", None)
    return list(argv) if argv is not None else sys.argv[1:]


def _self_cmd(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "pagegen", *argv]


def _run_workers(args: argparse.Namespace, n: int, trials: int) -> int:
    """Start n worker processes (one per visible GPU, CUDA_VISIBLE_DEVICES set) from this command's
    own command line, on the shared storage, and wait for them; returns how many failed. The workers
    die with this process (pagegen.tuner.procs); on any exit of this one they are ended."""
    from pagegen.tuner import procs

    if args.interpret:
        devices: list[str | None] = [None] * n
    else:
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            ids = [x for x in visible.split(",") if x.strip()]
        else:
            ids = [str(i) for i in range(torch.cuda.device_count())]
        if n > len(ids):
            raise Refused(f"--workers {n} needs {n} GPUs but {len(ids)} are visible", f"pass --workers {len(ids)}")
        devices = ids[:n]
    per = math.ceil(trials / n)
    children = []
    try:
        for i, dev in enumerate(devices):
            env = dict(os.environ)
            if dev is not None:
                env["CUDA_VISIBLE_DEVICES"] = dev
            cmd = _self_cmd(procs.worker_argv(_argv(args), workers=1, worker_index=i, trials=per, no_write=True))
            shown = " ".join(redact_url(c) for c in cmd[3:])
            print(f"worker {i}: {shown}" + (f" (CUDA_VISIBLE_DEVICES={dev})" if dev else ""), flush=True)
            children.append(procs.spawn_bound(cmd, env))
        bad = 0
        for i, p in enumerate(children):
            if p.wait() != 0:
                print(f"worker {i} exited with status {p.returncode}", file=sys.stderr)
                bad += 1
        return bad
    finally:
        for p in children:
            procs.kill_group(p)


def _trials(args: argparse.Namespace) -> int:
    from pagegen import tuner

    return args.trials if args.trials is not None else (4 if args.interpret else tuner.BUDGETS[args.budget])


def _check_numbers(args: argparse.Namespace) -> None:
    checks = (("--trials", args.trials, 0), ("--workers", args.workers, 1), ("--worker-index", args.worker_index, 0),
              ("--reps", args.reps, 1), ("--kv-heads", args.kv_heads, 1))
    for flag, value, lo in checks:
        if value is not None and value < lo:
            raise UsageError(f"{flag} {value} is out of range", f"pass an integer >= {lo}")
    if not (args.trial_timeout >= 0 and math.isfinite(args.trial_timeout)):
        raise UsageError(f"--trial-timeout {args.trial_timeout} is out of range", "pass seconds >= 0 (0: none)")


def _space(args: argparse.Namespace, workloads) -> dict[str, list[int]] | None:
    from pagegen import tuner

    if not args.space:
        return None
    families = {w.spec.family for w in workloads}
    if len(families) != 1:
        raise UsageError(f"--space needs specs of one family, got {sorted(families)}",
                         "tune one family per run (--family decode or --family extend)")
    try:
        return tuner.parse_space(args.space, families.pop())
    except ValueError as exc:
        raise UsageError(str(exc), "name tunables of the family with values from `pagegen list`") from None


def _warm_tables(args: argparse.Namespace, key: str, out: Path) -> list:
    from pagegen import table as T

    warm: list[T.Table] = []
    if args.no_warm_start:
        return warm
    from pagegen import dispatch

    for p in {out, dispatch.tuned_dir() / f"{key}.yaml"}:
        try:
            t = T.load(p)
            if t.gpu_key == key:
                warm.append(t)
        except T.TableError:
            pass
    for p in args.warm_from or ():
        try:
            warm.append(T.load(p))  # any GPU's winners: a sibling card's are a good first guess
        except T.TableError as exc:
            raise UsageError(f"--warm-from {p}: {exc}", f"check it with `pagegen check {p}` or drop it") from None
    return warm


def _prepare(args: argparse.Namespace):
    """Everything a run validates before it starts: numbers, workloads, search space, storage,
    warm-start tables. Returns (workloads, space)."""
    from pagegen.tuner.storage import is_rdb_url

    _check_numbers(args)
    workloads = _workloads(args, args.interpret)
    space = _space(args, workloads)
    if args.storage and "://" in args.storage and not is_rdb_url(args.storage):
        raise UsageError(f"--storage {redact_url(args.storage)!r} is neither a database URL nor a journal path",
                         "pass postgresql://..., mysql://..., sqlite:///PATH, or a journal file path")
    if is_rdb_url(args.storage):
        _check_database_url(args.storage)
    return workloads, space


def _check_database_url(url: str) -> None:
    """The URL parses and its database driver is installed (no connection is made)."""
    try:
        import sqlalchemy

        sqlalchemy.engine.make_url(url).get_dialect().import_dbapi()
    except ImportError as exc:
        raise UsageError(f"--storage {redact_url(url)!r}: its database driver is missing ({exc})",
                         "install the driver (e.g. `pip install psycopg2-binary` for postgresql+psycopg2://)") from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy's URL errors have no common base worth naming
        raise UsageError(f"--storage {redact_url(url)!r} is not a valid database URL ({type(exc).__name__})",
                         "write it as dialect+driver://user:password@host:port/database") from None


def _plan(args: argparse.Namespace) -> int:
    """Print what `tune` would run (specs, buckets, trials, KV bytes per bucket) after validating
    everything a real run validates; exit."""
    from pagegen import workloads as W

    if args.interpret:
        from pagegen._checks import interpreter_problem

        resolve_gpu(args.gpu, True, args.force_gpu)
        if problem := interpreter_problem():
            raise UsageError(*problem.rsplit(": ", 1))  # what; how to fix
    else:
        _check_gpu_key(args.gpu)
    workloads, _ = _prepare(args)
    key = args.gpu or (G.INTERPRET_KEY if args.interpret else None)
    if key:
        _warm_tables(args, key, Path(args.out) if args.out else default_out(key))
    trials = _trials(args)
    for w in workloads:
        models = f" ({', '.join(w.models)})" if w.models else ""
        feats = "".join(f", {k} {v}" for k, v in w.feature_values().items())
        print(f"{w.spec.variant_key()}{models}: kv_heads {w.kv_heads}, q_heads {w.q_heads}{feats}, {trials} trials")
        for b in w.buckets:
            gib = W.bucket_kv_bytes(w.spec, w.kv_heads, b) / 2**30
            skip = "  (skipped: over the memory cap)" if gib * 2**30 > W.MAX_BUCKET_BYTES else ""
            eff = w.table_shape(b)
            as_ = f"  (table bucket {eff[0]}x{eff[1]}{'r' if b.ragged else ''})" if eff != b.shape else ""
            print(f"  {b.name:<12} weight {b.weight:g}  KV {gib:8.3f} GiB{skip}{as_}")
    total = trials * len(workloads)
    print(f"{len(workloads)} spec(s), {total} evaluated trials in all "
          f"(each: compile + verify + time {sum(len(w.buckets) for w in workloads) / max(1, len(workloads)):.0f} "
          f"buckets on average); then held-out shapes between the buckets against the heuristic")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Tune specs on the live GPU (or the interpreter), check held-out shapes against the
    heuristic, and merge the winners into the table."""
    from pagegen._checks import interpreting
    from pagegen.tuner import procs

    procs.bind_to_parent()  # a worker (or re-run) of another pagegen tune: die with it
    if args.plan:
        return _plan(args)
    if args.interpret and not interpreting():
        # Triton decides at import whether its own library functions run interpreted, and it is
        # already imported here: run the same command in a fresh process with TRITON_INTERPRET=1.
        _prepare(args)
        child = procs.spawn_bound(_self_cmd(_argv(args)), {**os.environ, "TRITON_INTERPRET": "1"})
        try:
            return child.wait()
        finally:
            procs.kill_group(child)
    from pagegen import table as T
    from pagegen import tuner
    from pagegen._checks import interpreter_problem

    if args.interpret and (problem := interpreter_problem()):
        raise UsageError(*problem.rsplit(": ", 1))  # what; how to fix
    gpu, forced = resolve_gpu(args.gpu, args.interpret, args.force_gpu)
    workloads, space = _prepare(args)
    key = forced or gpu.key
    out = Path(args.out) if args.out else default_out(key)
    trials = _trials(args)
    options = tuner.TuneOptions(
        trials=trials, sampler=args.sampler, seed=args.seed, storage=args.storage, study_name=args.study_name,
        trial_timeout_s=args.trial_timeout, reps=args.reps, graph=not args.no_graph,
        warm_tables=_warm_tables(args, key, out), warm_start=not args.no_warm_start, space=space,
        progress=None if args.quiet else (lambda s: print(s, flush=True)), worker_index=args.worker_index)
    mode = ("interpreter (timings meaningless)" if args.interpret
            else f"{gpu.name}, {gpu.sm_count} SMs, sm {gpu.capability}")
    print(f"pagegen tune: {len(workloads)} spec(s) on {mode}; table key {key!r}"
          + (" (FORCED)" if forced else "") + f"; {trials} trials per spec; sampler {args.sampler}", flush=True)
    try:
        if args.workers > 1:
            bad = _run_workers(args, args.workers, trials)
            table, results = tuner.collect(workloads, gpu, options, forced_key=forced)
        else:
            bad = 0
            table, results = tuner.tune(workloads, gpu, options, forced_key=forced)
        print(tuner.format_summary(results, args.interpret))
        if table is None:
            print("pagegen tune: no correct trial finished; nothing to write", file=sys.stderr)
            return 1
        if args.no_write:
            return 1 if bad else 0
        if not args.no_held_out:
            rows = tuner.check_held_out(table, workloads, gpu, options, say=options.progress)
            print(tuner.format_held_out(rows, args.interpret))
    except KeyboardInterrupt:
        print("pagegen tune: interrupted; finished trials are kept in the storage, run the same command to resume "
              "(nothing written)", file=sys.stderr)
        return 130
    except tuner.FatalDeviceError as exc:
        print(f"pagegen tune: the GPU context is unusable ({exc}); the failed trial is recorded, "
              "re-run the same command to resume", file=sys.stderr)
        return 3
    try:
        merged = T.merge_into(out, table)
    except T.TableError as exc:
        print(f"pagegen tune: cannot merge into {out}: {exc}. The results are kept in the study storage: fix or "
              f"move that file (`pagegen check {out}`), then re-run the same command with --trials 0 to write them",
              file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(table.entries)} spec(s) tuned now, {len(merged.entries)} in the file)")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------
# show / check / merge


def format_table(table, path: str | Path | None = None) -> str:
    """Human-readable view of a Table (one header, one block per entry)."""
    from pagegen import table as T

    flags = (" [FORCED]" if table.forced else "") + (" [interpreter: timings meaningless]" if table.interpret else "")
    tc = ", ".join(f"{k} {v}" for k, v in table.toolchain.items())
    lines = [f"{path or '<table>'}: {table.gpu_name} (key {table.gpu_key}, {table.sm_count} SMs, sm {table.capability})"
             f"{flags}", f"  tuned {table.tuned_at}; {tc}; schema v{table.version}; {len(table.entries)} entries"]
    for key in sorted(table.entries):
        e = table.entries[key]
        stale = "" if T.is_current(e) else " [STALE: the kernel it was tuned on changed]"
        models = f" ({', '.join(e.models)})" if e.models else ""
        lines.append(f"{key}{models}: kv_heads {e.kv_heads}, {e.trials} trials ({e.failed} failed), "
                     f"{'kernel' if e.kernel_hash else 'template'} {e.tuned_on}{stale}")
        unit = "TFLOP/s" if e.spec.family == "extend" else "GB/s"
        shape = "q_tok x ctx" if e.spec.family == "extend" else "batch x ctx"
        lines.append(f"  {shape:<14} {'block_n':>7} {'block_m':>7} {'warps':>5} {'stages':>6} {'split':>5} "
                     f"{'us':>10} {unit:>8}")
        for b in sorted(e.buckets, key=lambda b: b.key):
            c = b.config
            rate = b.tflops if e.spec.family == "extend" else b.gbps
            lines.append(f"  {b.name:<14} {c.block_n:>7} {c.block_m:>7} {c.num_warps:>5} "
                         f"{c.num_stages:>6} {c.split_size:>5} {b.latency_us:>10.1f} "
                         f"{(f'{rate:.1f}' if rate is not None else '-'):>8}")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    """Print the tuned table of --gpu KEY (default: the live GPU; none: every shipped table) or of
    --table PATH. A missing or invalid table is a UsageError (exit 2)."""
    from pagegen import dispatch
    from pagegen import table as T

    key = args.gpu
    if args.table:
        paths = [Path(args.table)]
    else:
        if key is not None and not G.valid_key(key):
            raise UsageError(f"--gpu {key!r} is not a gpu key",
                             f"use a key such as {', '.join(G.KNOWN_KEYS[:4])} (lower-case letters, digits, _)")
        if key is None and (live := G.live_gpu()) is not None:
            key = live.key
        if key is not None:
            paths = [dispatch.table_path(key)]
        else:
            paths = sorted(dispatch.tuned_dir().glob("*.yaml"))
            if not paths:
                raise UsageError(f"no GPU detected and no tables in {dispatch.tuned_dir()}",
                                 "pass --table PATH, or --gpu KEY of a shipped table")
    bad: list[tuple[Path, str]] = []
    for p in paths:
        if not p.is_file() and args.table:
            raise UsageError(f"no table file at {p}", "check the path")
        if not p.exists():
            raise UsageError(f"no table for GPU {key!r} at {p}", f"tune one with `pagegen tune --gpu {key}`")
        try:
            print(format_table(T.load(p), p))
        except T.TableError as exc:
            bad.append((p, str(exc)))
    if bad:
        more = f" (and {len(bad) - 1} more invalid tables)" if len(bad) > 1 else ""
        raise UsageError(bad[0][1] + more, f"`pagegen check {bad[0][0]}` says what is wrong; fix the file or re-tune")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate table files; exit 1 if any is invalid (stale entries are reported, not fatal)."""
    from pagegen import table as T

    bad = 0
    for path in args.paths:
        try:
            t = T.load(path)
        except T.TableError as exc:
            print(f"INVALID {exc}")
            bad += 1
            continue
        stale = []
        for k, e in t.entries.items():
            if not T.is_current(e):
                stale.append(k)
        if args.gpu and t.gpu_key != args.gpu:
            print(f"INVALID {path}: table is for GPU {t.gpu_key!r}, expected {args.gpu!r}")
            bad += 1
            continue
        note = f"; stale (re-tune): {', '.join(sorted(stale))}" if stale else ""
        print(f"OK {path}: {t.gpu_key}, {len(t.entries)} entries, "
              f"{sum(len(e.buckets) for e in t.entries.values())} buckets{note}")
    return 1 if bad else 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge table files of one GPU key into OUT (see pagegen.table for the rule)."""
    from pagegen import table as T

    if len(args.tables) < 2:
        raise UsageError(f"needs two or more tables, got {len(args.tables)}",
                         "pass every table to merge: `pagegen merge A.yaml B.yaml -o OUT.yaml`")
    try:
        tables = [T.load(p) for p in args.tables]
    except T.TableError as exc:
        raise UsageError(str(exc), "`pagegen check FILE` says what is wrong; fix the file or re-tune") from None
    merged = tables[0]
    try:
        for t in tables[1:]:
            merged = T.merge(merged, t)
    except T.TableError as exc:
        raise UsageError(str(exc), "merge tables of one GPU key only (`pagegen check --gpu KEY FILES`)") from None
    try:
        T.save(merged, args.out)
    except OSError as exc:
        raise UsageError(f"cannot write -o {args.out}: {exc.strerror or exc}", "pass a writable path") from None
    print(f"wrote {args.out}: {merged.gpu_key}, {len(merged.entries)} entries from {len(tables)} tables")
    return 0


def add_subcommands(subparsers) -> None:
    """Register tune, show, check and merge on an argparse subparsers object."""
    p = subparsers.add_parser("tune", help="autotune kernels on this GPU and write tuned/<gpu>.yaml",
                              description="Autotune kernel configs with Optuna on the live GPU (or --interpret).")
    g = p.add_argument_group("target")
    g.add_argument("--gpu", help="GPU key to tune for (must match the detected GPU; e.g. h100, a100, l40s)")
    g.add_argument("--force-gpu", action="store_true", help="record results under --gpu although the GPU differs")
    g.add_argument("--interpret", action="store_true",
                   help="run the pipeline on the CPU under the Triton interpreter (tiny shapes, timings meaningless)")
    g = p.add_argument_group("what to tune (default: common model shapes; --interpret: one tiny spec)")
    g.add_argument("--spec", action="append",
                   help="variant key, e.g. decode_bf16_hd128_bs16_nhd_g4 (repeatable); with --specs: only these "
                        "entries of the list")
    g.add_argument("--specs", help="YAML spec list (see pagegen.workloads.load_specs_yaml)")
    g.add_argument("--family", type=_strs, help="axes: comma lists whose product is tuned")
    g.add_argument("--head-dim", type=_ints)
    g.add_argument("--block-size", type=_ints)
    g.add_argument("--layout", type=_strs)
    g.add_argument("--dtype", type=_strs)
    g.add_argument("--group-size", type=_ints)
    g.add_argument("--kv-heads", type=int, help="KV heads of the workload (default: the model's, else 32/group)")
    g.add_argument("--buckets", help="shape buckets: '1x2048,32x8192' (decode batch x ctx; extend q_tokens x ctx) "
                                     "or a YAML file")
    g = p.add_argument_group("search")
    g.add_argument("--trials", type=int,
                   help="evaluated trials this run adds per spec (per worker with --storage; a re-run resumes "
                        "the study and adds more; 0 = just write the study's winners)")
    g.add_argument("--budget", choices=("quick", "full"), default="quick",
                   help="preset: quick = 12 trials on 4 decode buckets; full = 60 trials on the 8 reference "
                        "buckets (--trials / --buckets override)")
    g.add_argument("--sampler", choices=("tpe", "grid"), default="tpe")
    g.add_argument("--space", help="restrict the search space, e.g. 'block_n=32,64;num_warps=4,8;split_size=0,512' "
                                   "(unnamed tunables keep their full range; for --sampler grid on a budget)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--trial-timeout", type=float, default=600.0, help="seconds per trial (0: none)")
    g.add_argument("--reps", type=int, default=30, help="timed runs per bucket")
    g.add_argument("--no-graph", action="store_true", help="time launches with events instead of CUDA-graph replay")
    g.add_argument("--no-warm-start", action="store_true", help="do not seed studies from existing tables")
    g.add_argument("--warm-from", action="append", metavar="TABLE",
                   help="also seed new studies from this table's winners, of any GPU (repeatable)")
    g = p.add_argument_group("storage and workers")
    g.add_argument("--storage", help="Optuna storage URL (postgresql://...) or journal file path "
                                     "(default: <cache>/optuna/<gpu>.journal)")
    g.add_argument("--study-name", help="study name prefix shared by workers (default pagegen-<gpu>)")
    g.add_argument("--workers", type=int, default=1, help="worker processes on this host, one per visible GPU")
    g.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--no-write", action="store_true", help="do not write the table (workers of a --workers parent)")
    g.add_argument("--out", help="table to merge the results into (default tuned/<gpu>.yaml; "
                                 "--interpret: <cache>/tuned/interpret.yaml)")
    g.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    g.add_argument("--plan", action="store_true",
                   help="validate everything, print the specs, buckets and trials it would run; exit")
    g.add_argument("--no-held-out", action="store_true",
                   help="skip the final check of shapes between the buckets against the heuristic")
    p.set_defaults(func=cmd_tune)

    p = subparsers.add_parser("show", help="print a tuned table")
    p.add_argument("--gpu", help="GPU key (default: the live GPU; none: every shipped table)")
    p.add_argument("--table", help="a table file instead")
    p.set_defaults(func=cmd_show)

    p = subparsers.add_parser("check", help="validate tuned tables; exit 1 if any is invalid")
    p.add_argument("paths", nargs="+")
    p.add_argument("--gpu", help="also require this GPU key")
    p.set_defaults(func=cmd_check)

    p = subparsers.add_parser("merge", help="merge tuned tables of one GPU key")
    p.add_argument("tables", nargs="+", help="two or more table files")
    p.add_argument("-o", "--out", required=True)
    p.set_defaults(func=cmd_merge)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagegen", description="pagegen tune/show/check/merge")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(exc.line(args.command), file=sys.stderr)
        return USAGE_EXIT


if __name__ == "__main__":
    sys.exit(main())
