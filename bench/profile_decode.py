"""Per-kernel GPU time of one decode step, from a torch.profiler trace of CUDA-graph replays (GPU only).

For one reference-workload shape (default 1x2048), pagegen through the dispatcher (tuned table)
and the naive SDPA baseline of bench/kernels.py: each step is captured in a CUDA graph, replayed
--reps times under the profiler, and the trace gives per kernel its mean duration, and per step
the span from its first kernel's start to its last kernel's end (kernel time + the gaps between
kernels of one step). Inputs are not rotated: without --cold an 8 MB step stays in the L2 (launch
structure, not bandwidth); --cold writes a 256 MiB buffer before every replay, so each step reads
from HBM.

    python bench/profile_decode.py [--shape 1x2048] [--reps 200] [--cold] [--out bench/results/profile-....json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import kernels as K  # noqa: E402


def profile_step(fn, reps: int, cold: bool = False) -> dict:
    """Kernel names and mean durations (us) and the median per-step span (us) of `fn` in a CUDA
    graph; cold: write a 256 MiB buffer before each replay (evicts the L2; its fill kernels are
    left out of the step)."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda") if cold else None

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            if flush is not None:
                flush.zero_()
            graph.replay()
        torch.cuda.synchronize()
    kern = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not (flush is not None and "FillFunctor" in e.name)),
                  key=lambda e: e.time_range.start)
    per_step = len(kern) // reps
    if per_step == 0 or len(kern) % reps:
        return {"error": f"{len(kern)} kernel events for {reps} replays"}
    names: dict[str, list[float]] = {}
    spans = []
    for i in range(reps):
        step = kern[i * per_step:(i + 1) * per_step]
        spans.append(step[-1].time_range.end - step[0].time_range.start)
        for e in step:
            names.setdefault(e.name[:60], []).append(e.time_range.end - e.time_range.start)
    busy = sum(statistics.mean(v) for v in names.values())
    return {"kernels_per_step": per_step, "kernel_us": {k: statistics.mean(v) for k, v in names.items()},
            "kernel_sum_us": busy, "step_span_us": statistics.median(spans)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1x2048")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default="")
    ap.add_argument("--cold", action="store_true", help="evict the L2 before every replay")
    args = ap.parse_args()
    inputs = K.make_inputs(args.shape)
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shape": args.shape,
           "l2": "evicted before each replay" if args.cold else "warm (inputs not rotated)"}
    for name, build in (("naive", lambda: K.run_naive(inputs)), ("tuned", lambda: K.run_pagegen(inputs, None))):
        fn, extra = build()
        keep = {k: v for k, v in extra.items() if k in ("config", "source")}
        res[name] = {**profile_step(fn, args.reps, args.cold), **keep}
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
