"""Distributed tuning end to end: real `pagegen tune --interpret` worker processes sharing one
Optuna study through a real storage, and the table gate (`pagegen check` / `pagegen merge`) that
the tune workflow relies on.

- journal file: two independent workers on one explicit journal file, and `--workers 2` on the
  default journal file; these always run.
- PostgreSQL: two independent workers on one study through RDBStorage, in a new database of the
  server (empty, as on a fleet's first run, and with Optuna's schema already created); runs when
  PAGEGEN_TEST_PG_URL is set (`.ci/run` starts a throw-away server and sets it). With
  PAGEGEN_REQUIRE_PG=1 (set by `.ci/run`) a missing URL fails instead of skipping.

Checked for each: every worker exits 0; the study's evaluated trials are exactly the sum of the
workers' trials (per worker pid); trial numbers are unique and contiguous; no config is evaluated
twice; nothing is left running; `pagegen check` accepts the table and it records that trial count.

Every run is tiny: the interpreter spec, two small buckets, two evaluated trials per worker.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from pagegen import cli
from pagegen import table as T
from pagegen._checks import interpreter_problem

# the workers run `pagegen tune --interpret`: they need a working Triton CPU interpreter (on a GPU
# image with an older Triton it may not be; see interpreter_problem)
_INTERPRETER_PROBLEM = interpreter_problem()
needs_interpreter = pytest.mark.skipif(_INTERPRETER_PROBLEM is not None, reason=str(_INTERPRETER_PROBLEM))

TRIALS = 2  # evaluated trials per worker (the interpreter space has 16 configs)
BUCKETS = "1x20,2x33"  # decode batch x ctx: two tiny buckets, second one ragged
TIMEOUT_S = 300
PG_URL = os.environ.get("PAGEGEN_TEST_PG_URL", "")


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PAGEGEN_CACHE_DIR"] = str(cache)  # fresh kernel cache and default journal for this test
    env["TRITON_INTERPRET"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _tune_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "pagegen", "tune", "--interpret", "--buckets", BUCKETS, "--no-warm-start",
            "--trial-timeout", "120", *extra]


def _finish(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for every worker; on any failure show each worker's output."""
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=TIMEOUT_S))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    if any(codes):
        out = "\n".join(f"--- worker {i} (exit {c}) ---\n{log.read_text()}"
                        for i, (c, log) in enumerate(zip(codes, logs, strict=True)))
        pytest.fail(f"tuning worker(s) failed: exit codes {codes}\n{out}")


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:  # the child keeps its own handle
        return subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _open_storage(url: str):
    import optuna

    if "://" in url:
        return optuna.storages.RDBStorage(url)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(url))


def _studies(storage, prefix: str):
    import optuna

    names = [n for n in optuna.study.get_all_study_names(storage) if n.startswith(prefix)]
    return [optuna.load_study(study_name=n, storage=storage) for n in sorted(names)]


def _check_study(study, expected_per_worker: dict[int, int]) -> int:
    """Assert the shared study's bookkeeping; returns the number of evaluated trials.

    Evaluated trials (COMPLETE or FAIL: compiled, verified, timed or failed with a reason) carry
    the pid of the worker that ran them; PRUNED ones were rejected before running (illegal or a
    duplicate of a trial another worker already has).
    """
    import optuna

    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers), f"trial numbers repeat: {sorted(numbers)}"
    assert sorted(numbers) == list(range(len(trials))), f"trial numbers have gaps: {sorted(numbers)}"
    assert not [t.number for t in trials if t.state in (states.RUNNING, states.WAITING)], "trials left running"
    evaluated = [t for t in trials if t.state in (states.COMPLETE, states.FAIL)]
    by_pid = collections.Counter(t.user_attrs.get("pid") for t in evaluated)
    assert dict(by_pid) == expected_per_worker, f"evaluated trials per worker pid: {dict(by_pid)}"
    complete = [t for t in evaluated if t.state == states.COMPLETE]
    assert complete, "no trial of the study completed: " + "; ".join(
        f"#{t.number}: {t.user_attrs.get('reason')}" for t in evaluated)
    configs = [tuple(sorted(t.params.items())) for t in evaluated]
    assert len(set(configs)) == len(configs), f"a config was evaluated twice: {configs}"
    return len(evaluated)


def _check_table(path: Path, spec_key: str, trials: int, capsys) -> None:
    """`pagegen check` accepts the table, and it holds the study's result for the spec."""
    assert path.is_file(), f"no table written at {path}"
    capsys.readouterr()
    assert cli.main(["check", str(path), "--gpu", "interpret"]) == 0, capsys.readouterr().out
    assert "OK " in capsys.readouterr().out
    table = T.load(path)
    assert table.gpu_key == "interpret" and table.interpret
    entry = table.entries[spec_key]
    assert entry.trials == trials, f"table says {entry.trials} trials, the study has {trials}"
    tuned = {(1, 20), (2, 33)}
    shapes = {b.shape for b in entry.buckets}
    # the final held-out check may add a shape between the buckets (interpreter timings are noise)
    assert tuned <= shapes and shapes - tuned <= {h.shape for h in entry.held_out}, (shapes, entry.held_out)


def _spec_key(study) -> str:
    return study.study_name.split(":")[1]


def _two_workers(storage_url: str, tmp_path: Path, capsys) -> None:
    """Two independent `pagegen tune` processes with the same arguments on one shared study."""
    name = f"ci-{uuid.uuid4().hex[:10]}"
    out = tmp_path / "interpret.yaml"
    env = _env(tmp_path / "cache")
    argv = _tune_argv("--storage", storage_url, "--study-name", name, "--trials", str(TRIALS), "--out", str(out))
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [_start(argv, env, log) for log in logs]
    _finish(procs, logs)

    studies = _studies(_open_storage(storage_url), name + ":")
    assert len(studies) == 1, [s.study_name for s in studies]
    n = _check_study(studies[0], {p.pid: TRIALS for p in procs})
    assert n == 2 * TRIALS
    _check_table(out, _spec_key(studies[0]), n, capsys)


@needs_interpreter
def test_two_workers_share_journal_file(tmp_path, capsys):
    _two_workers(str(tmp_path / "study.journal"), tmp_path, capsys)


@pytest.fixture
def fresh_pg_database():
    """A new, empty database on the server of PAGEGEN_TEST_PG_URL (dropped afterwards), so the
    workers meet an uninitialised schema as a fleet's first run does; the given database itself
    when the role may not create databases."""
    assert PG_URL, "PAGEGEN_REQUIRE_PG is set but PAGEGEN_TEST_PG_URL is not"
    import sqlalchemy

    url = sqlalchemy.engine.make_url(PG_URL)
    name = f"pagegen_ci_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.DBAPIError:  # no CREATEDB privilege: share the given database
        admin.dispose()
        yield PG_URL
        return
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@needs_interpreter
@pytest.mark.skipif(not PG_URL and not os.environ.get("PAGEGEN_REQUIRE_PG"),
                    reason="set PAGEGEN_TEST_PG_URL=postgresql+psycopg2://... (.ci/run starts a server)")
@pytest.mark.parametrize("schema", ["fresh", "initialised"])
def test_two_workers_share_postgres_study(fresh_pg_database, schema, tmp_path, capsys):
    """fresh: both workers meet an empty database at once (a fleet's first run: creating Optuna's
    schema must not fail either of them); initialised: the schema exists already."""
    if schema == "initialised":
        _open_storage(fresh_pg_database).engine.dispose()
    _two_workers(fresh_pg_database, tmp_path, capsys)


@needs_interpreter
def test_workers_flag_shares_default_journal(tmp_path, capsys):
    """`--workers 2`: the parent starts two worker processes on the default journal file, splits
    the trials between them and alone writes the table."""
    cache = tmp_path / "cache"
    out = tmp_path / "interpret.yaml"
    log = tmp_path / "parent.log"
    proc = _start(_tune_argv("--workers", "2", "--trials", str(2 * TRIALS), "--out", str(out)), _env(cache), log)
    _finish([proc], [log])

    journal = cache / "optuna" / "interpret.journal"
    assert journal.is_file(), f"no default journal at {journal}:\n{log.read_text()}"
    studies = _studies(_open_storage(str(journal)), "pagegen-interpret:")
    assert len(studies) == 1, [s.study_name for s in studies]
    study = studies[0]
    pids = {t.user_attrs.get("pid") for t in study.get_trials(deepcopy=False) if "pid" in t.user_attrs}
    assert len(pids) == 2 and proc.pid not in pids, f"expected two worker processes, got pids {pids}"
    n = _check_study(study, {pid: TRIALS for pid in pids})
    assert n == 2 * TRIALS
    _check_table(out, _spec_key(study), n, capsys)


# ---------------------------------------------------------------------------------------------
# the table gate of the tune workflow: `pagegen check` and `pagegen merge` refuse broken files
# (mismatched GPU keys are covered in tests/test_table.py::test_cli_check_and_merge)


def _table(key: str, name: str, latency_us: float) -> T.Table:
    from pagegen.spec import KernelSpec, default_config

    spec = KernelSpec("decode", head_dim=128, block_size=16, layout="NHD", dtype="bf16", group_size=4)
    bucket = T.BucketResult(shape=(8, 2048), config=default_config(spec), latency_us=latency_us, gbps=900.0, trials=5)
    entry = T.Entry(spec=spec, kernel_hash="0123456789abcdef", buckets=[bucket], trials=6, failed=1,
                    tuned_at="2026-11-25T18:00:00Z", kv_heads=8)
    return T.Table(gpu_key=key, gpu_name=name, sm_count=132, capability="9.0", entries={entry.key: entry},
                   toolchain={"torch": "2.11.0", "triton": "3.6.0", "pagegen": "0.1.0"},
                   tuned_at="2026-11-25T18:00:00Z")


@pytest.fixture
def tables(tmp_path) -> dict[str, Path]:
    paths = {"h100": tmp_path / "h100.yaml"}
    T.save(_table("h100", "NVIDIA H100 80GB HBM3", 50.0), paths["h100"])
    return paths


@pytest.mark.parametrize(
    "breakage",
    ["not yaml", "empty", "python tag", "bad version", "bad gpu key", "missing entries", "negative latency"],
)
def test_check_and_merge_reject_invalid_files(tables, tmp_path, capsys, breakage):
    good = yaml.safe_load(tables["h100"].read_text())
    bad = tmp_path / "bad.yaml"
    key = next(iter(good["entries"]))
    if breakage == "not yaml":
        bad.write_text("version: 1\ngpu: {key: h100\n")
    elif breakage == "empty":
        bad.write_text("")
    elif breakage == "python tag":
        bad.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    else:
        if breakage == "bad version":
            good["version"] = 99
        elif breakage == "bad gpu key":
            good["gpu"]["key"] = "H100 80GB!"
        elif breakage == "missing entries":
            del good["entries"]
        elif breakage == "negative latency":
            good["entries"][key]["buckets"][0]["latency_us"] = -1.0
        bad.write_text(yaml.safe_dump(good))
    capsys.readouterr()
    assert cli.main(["check", str(bad)]) == 1
    assert f"INVALID {bad}" in capsys.readouterr().out
    out = tmp_path / "merged.yaml"
    assert cli.main(["merge", str(tables["h100"]), str(bad), "-o", str(out)]) == 2  # a bad input table is a usage error
    assert str(bad) in capsys.readouterr().err
    assert not out.exists()


def test_check_rejects_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert cli.main(["check", str(missing)]) == 1
    assert "cannot read" in capsys.readouterr().out
