"""Worker processes that die with their parent: no orphan keeps tuning after its command is killed.

    spawn_bound(cmd, env) -> Popen    parent side: own process group, parent-death signal (Linux),
                                      and PAGEGEN_PARENT_PID for the child's watchdog
    bind_to_parent()                  child side: exit when the parent named there is gone
    kill_group(proc)                  end a child and everything it started
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

ENV_PARENT = "PAGEGEN_PARENT_PID"
WATCHDOG_PERIOD_S = 0.5
_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal() -> None:
    """In the child before exec: the kernel sends SIGTERM when the parent dies (Linux only; the
    signal interrupts a worker's main thread, and its watchdog ends it if that does not unwind)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def spawn_bound(cmd: list[str], env: dict[str, str] | None = None, **popen_kw) -> subprocess.Popen:
    """Start `cmd` as a child bound to this process: in its own process group (a terminal's Ctrl-C
    reaches the parent, which ends the group), with a parent-death signal where the platform has one,
    and with PAGEGEN_PARENT_PID set so that the child's watchdog (bind_to_parent) ends it otherwise."""
    env = dict(os.environ if env is None else env)
    env[ENV_PARENT] = str(os.getpid())
    return subprocess.Popen(cmd, env=env, process_group=0, preexec_fn=_set_parent_death_signal, **popen_kw)


def kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after `grace_s` seconds; wait for the child."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


EXIT_GRACE_S = 3.0  # after the parent is gone, a worker whose main thread does not unwind is ended this late


def _interrupt_on_term(signum, frame) -> None:
    # unwinds as Ctrl-C does: Optuna records the running trial as failed, finally blocks remove
    # temp files and locks, `pagegen tune` exits 130
    raise KeyboardInterrupt(f"signal {signum}")


def bind_to_parent() -> bool:
    """In a worker started by spawn_bound: exit when the parent is gone (its pid is no longer our
    parent's), checked every WATCHDOG_PERIOD_S by a daemon thread. SIGTERM (the parent-death signal,
    the parent ending its workers, or the watchdog) interrupts the main thread as Ctrl-C does; a
    main thread stuck in native code (a hung kernel) is ended EXIT_GRACE_S later. Returns False when
    this process was not started by spawn_bound (nothing done)."""
    text = os.environ.get(ENV_PARENT, "")
    if not text.isdigit():
        return False
    parent = int(text)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt_on_term)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCHDOG_PERIOD_S)
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread (clean exit)
        time.sleep(EXIT_GRACE_S)
        os._exit(128 + signal.SIGTERM)  # the main thread is stuck (a hung kernel): leave now

    threading.Thread(target=watch, name="pagegen-parent-watchdog", daemon=True).start()
    return True


def worker_argv(argv: list[str], **flags: object) -> list[str]:
    """The original command line `argv` (without the program) with `flags` set: argparse keeps the
    last value of a repeated option, so each flag is appended (`--name value`; True appends a bare
    `--name`; None and False leave the command line as it was)."""
    out = list(argv)
    for name, value in flags.items():
        if value is None or value is False:
            continue
        out.append("--" + name.replace("_", "-"))
        if value is not True:
            out.append(str(value))
    return out
