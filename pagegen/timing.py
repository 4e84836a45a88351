"""Timing of GPU work: warm-up, CUDA events or CUDA-graph replay, medians, L2 flush / input rotation.

    bench(fn, n_inputs=..., graph=True) -> Timing     fn(i) launches the work on input set i
    copy_bandwidth()                     -> GB/s       device-to-device copy, bytes read + written

On CUDA each timed run is bracketed by CUDA events on the current stream; the events are read
after one synchronize at the end (no per-run sync). Before each run the L2 cache is flushed by
writing a buffer larger than it (flush_l2=True) and the input set rotates (fn(i % n_inputs)), so a
small working set is not served from L2. graph=True captures fn(i) once per input set in a CUDA
graph and times replays: the host's launch overhead disappears and what remains is GPU time.

Under the Triton interpreter (or without CUDA) a host clock is used and the result is marked
meaningless (Timing.meaningful is False): good for exercising the pipeline, not for decisions.
This module knows nothing about Optuna or kernels.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagegen._checks import interpreting

L2_FLUSH_BYTES = 256 << 20  # larger than the L2 of any current GPU (H100 50 MB, B200 126 MB)


@dataclass(frozen=True, slots=True)
class Timing:
    """Result of one bench(): times in microseconds over `runs` timed runs."""

    median_us: float
    min_us: float
    max_us: float
    runs: int
    method: str  # "cuda-graph" | "cuda-events" | "host-clock"
    meaningful: bool  # False under the interpreter (host clock of emulated kernels)


@functools.cache
def _flush_buffer(device_index: int) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=f"cuda:{device_index}")


def flush_l2() -> None:
    """Overwrite a buffer larger than L2 on the current CUDA device (evicts cached inputs)."""
    _flush_buffer(torch.cuda.current_device()).zero_()


def _host_bench(fn: Callable[[int], object], n_inputs: int, warmup: int, reps: int) -> Timing:
    for i in range(warmup):
        fn(i % n_inputs)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i % n_inputs)
        times.append((time.perf_counter() - t0) * 1e6)
    return Timing(statistics.median(times), min(times), max(times), reps, "host-clock", False)


def bench(
    fn: Callable[[int], object],
    *,
    n_inputs: int = 1,
    warmup: int = 5,
    reps: int = 50,
    flush: bool = True,
    graph: bool = False,
    device: torch.device | str | None = None,
) -> Timing:
    """Median time of `fn(i)` (input set i = run % n_inputs), after `warmup` untimed runs.

    fn must only enqueue GPU work (no host sync) when graph=True, since it is captured. The
    median is over `reps` runs; min and max are reported beside it.
    """
    if n_inputs < 1 or reps < 1 or warmup < 0:
        raise ValueError(f"need n_inputs >= 1, reps >= 1, warmup >= 0; got {n_inputs}, {reps}, {warmup}")
    dev = torch.device(device) if device is not None else None
    if interpreting() or not torch.cuda.is_available() or (dev is not None and dev.type != "cuda"):
        return _host_bench(fn, n_inputs, max(1, min(warmup, 1)), reps)
    if dev is not None and dev.index is not None:
        torch.cuda.set_device(dev)
    for i in range(max(warmup, n_inputs if graph else 0)):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    method = "cuda-events"
    run: Callable[[int], object] = fn
    graphs: list[torch.cuda.CUDAGraph] = []
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(n_inputs):  # warm the side stream (allocator, lazy init) before capture
                fn(i)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for i in range(n_inputs):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(i)
            graphs.append(g)
        for g in graphs:
            g.replay()
        torch.cuda.synchronize()
        method = "cuda-graph"
        run = lambda i: graphs[i].replay()  # noqa: E731
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        if flush:
            flush_l2()
        start.record()
        run(i % n_inputs)
        end.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e3 for s, e in events]
    return Timing(statistics.median(times), min(times), max(times), reps, method, True)


_copy_bw: dict[int, float] = {}


def copy_bandwidth(nbytes: int = 4 << 30, reps: int = 10, device: int | None = None) -> float | None:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes/s): bytes read + written / median time.

    Copies an `nbytes` buffer (default 4 GiB; halved until it fits in free memory, down to
    1 GiB). Cached per device. None under the interpreter or without CUDA.
    """
    if interpreting() or not torch.cuda.is_available():
        return None
    idx = torch.cuda.current_device() if device is None else device
    if idx in _copy_bw:
        return _copy_bw[idx]
    size = nbytes
    while True:
        try:
            src = torch.empty(size, dtype=torch.uint8, device=f"cuda:{idx}")
            dst = torch.empty_like(src)
            break
        except torch.cuda.OutOfMemoryError:
            size //= 2
            if size < (1 << 30):
                raise
    src.random_(0, 255)
    pair = [src, dst]

    def copy(i: int) -> None:
        pair[1].copy_(pair[0])

    t = bench(copy, warmup=2, reps=reps, flush=False, device=f"cuda:{idx}")
    pair.clear()
    del src, dst
    torch.cuda.empty_cache()
    gbps = 2 * size / (t.median_us * 1e-6) / 1e9
    _copy_bw[idx] = gbps
    return gbps
