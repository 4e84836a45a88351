"""Where studies live: Optuna storages (journal file or RDB), reaping trials of dead workers, and
the Optuna version differences the tuner meets.

    open_storage(url, gpu_key, heartbeat_s) -> storage
    reap_dead_trials(study, storage, grace_s) -> trials marked failed

Optuna is imported lazily here (and in the study driver); works with optuna 4.x and 5.x.
"""

from __future__ import annotations

import datetime as _dt
import os
import random
import socket
import time
import warnings
from pathlib import Path

from pagegen import codegen

# the reason recorded on a reaped trial starts with this (the driver lets such a config run again)
WORKER_DIED = "worker died"


def optuna():
    """The optuna module (imported on first use)."""
    import optuna as _optuna

    return _optuna


def optuna_major() -> int:
    """Optuna's major version (4 or 5)."""
    return int(optuna().__version__.split(".")[0])


def default_journal_path(gpu_key: str) -> Path:
    """`<cache>/optuna/<gpu key>.journal`: the default storage of one host."""
    return codegen.cache_dir() / "optuna" / f"{gpu_key}.journal"


_RDB_PREFIXES = ("postgresql", "postgres", "mysql", "sqlite", "oracle", "mssql")


def is_rdb_url(url: str | None) -> bool:
    """True when `url` names a database (an RDB storage), not a journal file."""
    return bool(url) and url.split(":", 1)[0].split("+", 1)[0] in _RDB_PREFIXES


def open_storage(url: str | None, gpu_key: str, heartbeat_s: int = 60):
    """An Optuna storage: RDB for database URLs (with heartbeat + retry of killed workers' trials),
    else a journal file (a path, `journal:PATH`, or None for the default file under the cache)."""
    if is_rdb_url(url):
        return _rdb_storage(url, heartbeat_s)
    path = Path(url[len("journal:"):] if url and url.startswith("journal:") else url or default_journal_path(gpu_key))
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend, JournalStorage  # optuna >= 4.0

    return JournalStorage(JournalFileBackend(str(path)))


_SCHEMA_LOCK = 0x7061_6765  # PostgreSQL advisory lock id serialising Optuna's schema creation


def _retry_hook() -> dict:
    """Optuna >= 4.9 names the retry hook `heartbeat_stale_trial_callback` /
    RetryHeartbeatStaleTrialCallback; older versions `failed_trial_callback` / RetryFailedTrialCallback."""
    storages = optuna().storages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" notices
        if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
            return {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
        return {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=1)}


def _rdb_storage(url: str, heartbeat_s: int):
    """RDBStorage with heartbeat and one retry of a dead worker's trial.

    Workers of a fleet's first run meet an empty database at the same moment and would race to
    create Optuna's tables: on PostgreSQL they take an advisory lock around the creation; on any
    database a failed creation is retried (the next attempt finds the schema in place).
    """
    import sqlalchemy

    storages = optuna().storages
    hook = _retry_hook()

    def make():
        return storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s, **hook)

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


def has_heartbeat(storage) -> bool:
    """True for storages that record trial heartbeats (RDB with heartbeat_interval set)."""
    return isinstance(storage, optuna().storages.RDBStorage) and storage.heartbeat_interval is not None


def fail_stale_trials(study) -> None:
    """Optuna's own stale-heartbeat check (RDB only): stale trials fail and its callback retries them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" notice
        optuna().storages.fail_stale_trials(study)


def pid_alive(pid: int) -> bool:
    """True when process `pid` on this host exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not waited for yet is a zombie: it runs nothing
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _owner_dead(t, host: str, grace_s: float, now: _dt.datetime) -> str | None:
    """Why RUNNING trial `t` has no live owner (the reason to record), or None if it may have one."""
    pid, t_host = t.user_attrs.get("pid"), t.user_attrs.get("host")
    if isinstance(pid, int) and t_host == host:
        if pid == os.getpid() or pid_alive(pid):
            return None
        return f"{WORKER_DIED} (pid {pid} on {host})"
    if "pid" in t.user_attrs:  # another host's worker: its heartbeat (RDB) says whether it lives
        return None
    # no owner recorded: a worker sets it first thing in a trial, so a trial this old without one
    # was started by a worker killed in between
    start = t.datetime_start
    if start is None:
        return None
    if start.tzinfo is None:
        start = start.astimezone()
    age = (now - start).total_seconds()
    if age <= grace_s:
        return None
    return f"{WORKER_DIED} before it recorded its pid ({age:.0f} s without an owner)"


def reap_dead_trials(study, storage, grace_s: float) -> int:
    """Mark RUNNING trials that have no live owner as FAIL and enqueue their config once more (as
    Optuna's retry callback does). A trial's owner is dead when its recorded pid (on this host) is
    gone, or when it recorded no pid within `grace_s` seconds of its start (a worker killed
    before its first line of work). Journal storages have no heartbeat: this keeps a killed
    worker's trial from staying RUNNING forever; on RDB it also catches a worker killed before
    its first heartbeat, which Optuna never considers stale. Returns the number reaped."""
    states = optuna().trial.TrialState
    host, n = socket.gethostname(), 0
    now = _dt.datetime.now().astimezone()
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        why = _owner_dead(t, host, grace_s, now)
        if why is None:
            continue
        try:  # another worker may reap it first: then this raises and we leave it
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, "reason", why)
            storage.set_trial_state_values(trial_id, states.FAIL)
        except Exception:  # noqa: BLE001
            continue
        n += 1
        if "retry_of" not in t.user_attrs and t.params:  # retry once
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return n
