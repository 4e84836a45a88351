"""Tuner faults (issue 14 item 9): workers die with their parent, RUNNING trials without a live
owner are reaped, and no lock or temp file outlives the process that made it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pagegen import table as T
from pagegen._files import remove_stale_temps
from pagegen.spec import Config, KernelSpec
from pagegen.tuner import procs
from pagegen.tuner.storage import open_storage, pid_alive, reap_dead_trials

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _run_parent(script: str) -> tuple[subprocess.Popen, int]:
    """Start a parent process running `script`; return it and the pid of the child it prints."""
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    return parent, child


@linux_only
def test_kill_9_of_the_parent_ends_a_spawned_child() -> None:
    """spawn_bound: the parent-death signal (and the child's own process group) end the child."""
    parent, child = _run_parent("""
        import sys, time
        from pagegen.tuner import procs
        p = procs.spawn_bound([sys.executable, "-c", "import time; time.sleep(120)"])
        print(p.pid, flush=True)
        time.sleep(120)
    """)
    assert pid_alive(child) and os.getpgid(child) == child  # its own process group
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    assert _gone_within(child, 5), "the child outlived its killed parent"


@linux_only
def test_watchdog_ends_a_child_without_a_parent_death_signal() -> None:
    """bind_to_parent: a child started without prctl (another platform's path) exits when its parent dies."""
    parent, child = _run_parent("""
        import os, subprocess, sys, time
        code = ("import time; from pagegen.tuner import procs; assert procs.bind_to_parent(); "
                "print('bound', flush=True); time.sleep(120)")
        env = {**os.environ, "PAGEGEN_PARENT_PID": str(os.getpid())}
        p = subprocess.Popen([sys.executable, "-c", code], env=env)
        print(p.pid, flush=True)
        time.sleep(120)
    """)
    assert parent.stdout.readline().strip() == "bound"  # the child's watchdog runs
    assert pid_alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    assert _gone_within(child, 5), "the watchdog did not end the orphaned child"


@linux_only
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="tunes on the interpreter")
def test_kill_9_of_pagegen_tune_ends_its_workers(tmp_path: Path) -> None:
    """`pagegen tune --workers 2` killed with SIGKILL: its worker processes are gone within seconds."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PAGEGEN_CACHE_DIR": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "pagegen", "tune", "--interpret", "--workers", "2", "--trials", "200",
            "--buckets", "1x20", "--no-warm-start", "--quiet", "--storage", str(tmp_path / "j.journal"),
            "--out", str(tmp_path / "t.yaml")]
    parent = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while len(kids := _children(parent.pid)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert len(kids) == 2, f"expected two workers, found {kids}"
        time.sleep(1)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
    for kid in kids:
        assert _gone_within(kid, 10), f"worker {kid} outlived its killed parent"


def test_worker_argv_appends_the_adjusted_flags() -> None:
    argv = ["tune", "--interpret", "--workers", "2", "--trials", "8", "--out", "x.yaml"]
    out = procs.worker_argv(argv, workers=1, worker_index=1, trials=4, no_write=True, out=None, quiet=False)
    assert out == [*argv, "--workers", "1", "--worker-index", "1", "--trials", "4", "--no-write"]
    from pagegen.cli import build_parser

    args = build_parser().parse_args(out)  # argparse keeps the last value: the worker's
    assert (args.workers, args.worker_index, args.trials, args.no_write, args.interpret) == (1, 1, 4, True, True)


def test_running_trials_without_a_live_owner_are_reaped(tmp_path: Path) -> None:
    """A RUNNING trial is reaped when its recorded pid is gone, or when it recorded no pid within the
    grace period; a trial of a live process, or a fresh one without a pid, is left alone."""
    import optuna

    storage = open_storage(str(tmp_path / "j.journal"), "interpret")
    study = optuna.create_study(storage=storage, study_name="s")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    no_pid = study.ask({"block_n": optuna.distributions.CategoricalDistribution([16, 32])})
    killed = study.ask({"block_n": optuna.distributions.CategoricalDistribution([16, 32])})
    killed.set_user_attr("host", os.uname().nodename)
    killed.set_user_attr("pid", dead.pid)
    alive = study.ask()
    alive.set_user_attr("host", os.uname().nodename)
    alive.set_user_attr("pid", os.getpid())
    assert reap_dead_trials(study, storage, grace_s=3600) == 1  # the dead pid only
    assert reap_dead_trials(study, storage, grace_s=0) == 1  # then the one that never recorded a pid
    trials = {t.number: t for t in study.get_trials()}
    running = optuna.trial.TrialState.RUNNING
    assert trials[alive.number].state == running
    for t in (no_pid, killed):
        assert trials[t.number].state == optuna.trial.TrialState.FAIL
        assert trials[t.number].user_attrs["reason"].startswith("worker died")
    retries = [t for t in trials.values() if t.state == optuna.trial.TrialState.WAITING]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted([no_pid.number, killed.number])


def _table() -> T.Table:
    spec = KernelSpec("decode", head_dim=64, block_size=16, group_size=2)
    e = T.Entry(spec=spec, kernel_hash="x", buckets=[T.BucketResult((1, 16), Config(block_n=16), 1.0)],
                trials=1, tuned_at=T.now_iso(), kv_heads=2)
    return T.Table("interpret", "cpu", 1, "0.0", entries={e.key: e}, toolchain={}, tuned_at=T.now_iso(),
                   interpret=True)


def test_merge_into_leaves_no_lock_file(tmp_path: Path) -> None:
    out = tmp_path / "x.yaml"
    T.merge_into(out, _table())
    T.merge_into(out, _table())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.yaml"]
    with T.file_lock(out):
        assert (tmp_path / "x.yaml.lock").exists()
    assert not (tmp_path / "x.yaml.lock").exists()


def test_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    """A writer killed during the table write leaves its temp file; the next write removes it, and
    leaves the temp files of live writers alone."""
    out = tmp_path / "x.yaml"
    code = textwrap.dedent(f"""
        import os, time
        open({str(tmp_path)!r} + f"/.x.yaml.{{os.getpid()}}.abc123.tmp", "w").write("half a ta")
        print("ready", flush=True)
        time.sleep(120)
    """)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    live = tmp_path / f".x.yaml.{os.getppid()}.zzz999.tmp"  # a running process's write in progress
    live.write_text("")
    orphan = tmp_path / ".x.yaml.q1w2e3.tmp"  # no pid in the name (an older pagegen): stale when old
    orphan.write_text("")
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))
    T.merge_into(out, _table())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x.yaml", live.name])
    assert remove_stale_temps(out) == 0
