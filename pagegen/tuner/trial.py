"""One trial: verify a config, time it on every bucket, classify what went wrong.

    evaluate(runner, cfg, buckets, timing, rng) -> {bucket name: median us}
    objective_value(times, buckets)             -> weighted geometric mean latency
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from pagegen.spec import Config
from pagegen.tuner.runners import Runner, TrialFailure, verify
from pagegen.workloads import Bucket


class TrialTimeout(TrialFailure):
    """A trial ran past --trial-timeout."""


class FatalDeviceError(RuntimeError):
    """The CUDA context is unusable (illegal address, ...): stop this worker; the storage keeps
    the failed trial and a restart resumes."""


@dataclass(frozen=True, slots=True)
class TimingOptions:
    """How each bucket is timed (pagegen.timing.bench)."""

    reps: int = 30
    warmup: int = 3
    graph: bool = True


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise TrialTimeout in the main thread after `seconds` (SIGALRM; a no-op elsewhere).
    A kernel hung inside the GPU cannot be interrupted in-process: that case is left to the
    heartbeat of RDB storages or the reaper once the worker is killed."""
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


def reason_of(exc: BaseException) -> str:
    """The one-line reason recorded on a failed trial (compile error, out of resources, ...)."""
    inner: BaseException | None = exc
    while inner is not None:  # a timeout raised inside Triton's interpreter arrives wrapped
        if isinstance(inner, TrialFailure):
            return str(inner)
        inner = inner.__cause__ or inner.__context__
    name = type(exc).__name__
    msg = (str(exc).strip().splitlines() or [""])[0][:300]
    if "OutOfResources" in name or "out of resource" in msg.lower():
        return f"out of resources: {msg}"
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"out of memory: {msg}"
    if "Compil" in name or "compil" in msg.lower():
        return f"compile error: {name}: {msg}"
    return f"error: {name}: {msg}"


def is_fatal(exc: BaseException) -> bool:
    """True when `exc` means the CUDA context is unusable (the worker must stop)."""
    msg = str(exc).lower()
    return any(s in msg for s in ("illegal memory access", "illegal address", "unspecified launch failure",
                                  "device-side assert", "misaligned address"))


def time_config(runner: Runner, cfg: Config, bucket: Bucket, timing: TimingOptions) -> float:
    """Median microseconds of `cfg` on `bucket` (host clock under the interpreter: meaningless)."""
    from pagegen.timing import bench

    interp = runner.interpret
    x = runner.inputs(bucket)
    t = bench(lambda i: runner.launch(cfg, x), warmup=0 if interp else timing.warmup,
              reps=2 if interp else timing.reps, flush=not interp, graph=timing.graph and not interp)
    return t.median_us


def evaluate(runner: Runner, cfg: Config, buckets: Sequence[Bucket], timing: TimingOptions,
             rng: random.Random) -> dict[str, float]:
    """Verify, then time `cfg` on every bucket; returns {bucket name: median us}.
    Raises TrialFailure (or another exception, classified by reason_of) when the trial fails."""
    verify(runner, cfg, rng)
    return {b.name: time_config(runner, cfg, b, timing) for b in buckets}


def objective_value(times: dict[str, float], buckets: Sequence[Bucket]) -> float:
    """Weighted geometric mean latency (us) over the buckets: scale-free, so a 10 us bucket
    counts as much as a 2 ms one (the per-bucket winners are kept separately anyway)."""
    wsum = sum(b.weight for b in buckets)
    return math.exp(sum(b.weight * math.log(max(times[b.name], 1e-3)) for b in buckets) / wsum)
