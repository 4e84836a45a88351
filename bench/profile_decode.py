"""Per-kernel GPU time of one decode step, from a torch.profiler trace of CUDA-graph replays (GPU only).

For one reference-workload shape (default 1x2048), pagegen through the dispatcher (tuned table)
and the naive SDPA baseline of bench/kernels.py: each step is captured in a CUDA graph, replayed
--reps times under the profiler, and the trace gives per kernel its mean duration, and per step
the span from its first kernel's start to its last kernel's end (kernel time + the gaps between
kernels of one step). Inputs are not rotated: without --cold an 8 MB step stays in the L2 (launch
structure, not bandwidth); --cold writes a 256 MiB buffer before every replay, so each step reads
from HBM.

    python bench/profile_decode.py [--shape 1x2048] [--reps 200] [--cold] [--backend default|cudnn|flash|...]
Writes bench/results/profile-decode-<gpu>-<date>-<shape>[-cold].json (or --out) and a .log beside it.
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

from bench import kernels as K  # noqa: E402
from bench.baselines import BACKENDS  # noqa: E402
from bench.common import result_path, run_meta, tee_log, write_json  # noqa: E402


def profile_step(fn, reps: int, cold: bool = False) -> dict:
    """Kernel names and mean durations (us) and the median per-step span (us) of `fn` in a CUDA
    graph; cold: write a 256 MiB buffer before each replay (evicts the L2; its fill kernels are
    left out of the step)."""
    from torch.profiler import ProfilerActivity, profile

    from pagegen.timing import flush_l2

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
            if cold:
                flush_l2()
            graph.replay()
        torch.cuda.synchronize()
    kern = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not (cold and "FillFunctor" in e.name)),
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
    ap.add_argument("--out", default="", help="JSON path (default bench/results/profile-decode-...)")
    ap.add_argument("--cold", action="store_true", help="evict the L2 before every replay")
    ap.add_argument("--backend", default="default", choices=BACKENDS, help="SDPA backend of the naive step")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/profile_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    path = result_path("profile-decode", tag=args.shape + ("-cold" if args.cold else ""), out=args.out)
    with tee_log(path):
        inputs = K.make_inputs(args.shape)
        res = {"meta": run_meta("profile-decode", workload=f"reference decode {args.shape}"), "shape": args.shape,
               "l2": "evicted before each replay" if args.cold else "warm (inputs not rotated)"}
        for name, build in ((f"sdpa-{args.backend}", lambda: K.run_naive(inputs, args.backend)),
                            ("tuned", lambda: K.run_pagegen(inputs, None))):
            fn, extra = build()
            keep = {k: v for k, v in extra.items() if k in ("config", "source", "backend")}
            res[name] = {**profile_step(fn, args.reps, args.cold), **keep}
        print(json.dumps(res, indent=1))
        write_json(path, res)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
