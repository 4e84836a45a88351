"""The dispatcher's CPU cost: per-call overhead beyond a bare Triton launch, and first call vs warm.

Reference decode spec (bf16, head_dim 128, group 4, 8 KV heads, block 16, NHD), batch 1, context
2048, with a one-entry in-memory table whose config does not split (so every path below launches
exactly one kernel, the same compiled one).

Per-call host time (median of --rounds rounds of --calls back-to-back calls, no sync inside a
round; the GPU work of one call is a few microseconds, so the host is the bottleneck):
  bare      mod.decode_kernel[grid](...)                 Triton's own launch path, nothing else
  launch    decode.launch_decode(spec, cfg, ...)         pagegen's launch wrapper (grid, strides)
  explicit  paged_decode(..., config=cfg)                 validation + launch, no dispatcher
  dispatch  paged_decode(...)                             validation + dispatcher + launch
  plan      DecodePlan(...).run(...)                      checks and dispatch done once, then launch
  select    dispatch.select_config(spec, b, ctx, hk)      the dispatcher lookup alone
overhead of the dispatcher = dispatch - explicit; of the whole op = dispatch - bare (target < 5 us).

First call: in a fresh process with empty kernel and Triton caches (render + write + import +
compile + launch, synchronized), then a second fresh process with warm on-disk caches, then warm
calls in-process.

    python bench/dispatch.py [--calls 2000] [--rounds 7]     (CUDA; writes bench/results/dispatch-<gpu>-<date>.json)
Host time is read with time.perf_counter (the quantity measured is CPU time per call, not GPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

B, CTX, HK, G, D, BS = 1, 2048, 8, 4, 128, 16


def _inputs():
    import torch

    nblk = CTX // BS
    k = torch.randn(nblk * B + 1, BS, HK, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    bt = torch.randperm(nblk * B + 1, device="cuda")[: nblk * B].view(B, nblk).to(torch.int32).contiguous()
    sl = torch.full((B,), CTX, dtype=torch.int32, device="cuda")
    q = torch.randn(B, HK * G, D, device="cuda", dtype=torch.bfloat16)
    return q, k, v, bt, sl, torch.empty_like(q)


def first_call() -> dict[str, float]:
    """Time the first paged_decode of this process (synchronized), then one warm call."""
    import torch

    t0 = time.perf_counter()
    import pagegen
    from pagegen import dispatch

    t_import = time.perf_counter() - t0
    dispatch.use_table(_table())
    q, k, v, bt, sl, out = _inputs()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pagegen.paged_decode(q, k, v, bt, sl, out=out)
    torch.cuda.synchronize()
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    pagegen.paged_decode(q, k, v, bt, sl, out=out)
    torch.cuda.synchronize()
    t_second = time.perf_counter() - t0
    return {"import_pagegen_ms": t_import * 1e3, "first_call_ms": t_first * 1e3, "second_call_us": t_second * 1e6}


def _table():
    from pagegen import codegen, table
    from pagegen.gpu import live_gpu
    from pagegen.spec import Config, KernelSpec

    spec = KernelSpec("decode", head_dim=D, block_size=BS, group_size=G)
    e = table.Entry(spec=spec, kernel_hash=codegen.kernel_hash(spec),
                    buckets=[table.BucketResult((B, CTX), Config(block_n=64, num_warps=4, num_stages=2), 1.0)],
                    trials=1, tuned_at=table.now_iso(), kv_heads=HK)
    gpu = live_gpu()
    return table.Table(gpu.key, gpu.name, gpu.sm_count, gpu.capability, {e.key: e}, {}, table.now_iso())


def per_call(calls: int, rounds: int) -> dict[str, float]:
    import torch

    import pagegen
    from pagegen import codegen, decode, dispatch
    from pagegen.spec import KernelSpec

    dispatch.use_table(_table())
    spec = KernelSpec("decode", head_dim=D, block_size=BS, group_size=G)
    cfg = dispatch.select_config(spec, B, CTX, HK)
    assert cfg.split_size == 0, cfg
    q, k, v, bt, sl, out = _inputs()
    mod = codegen.load(spec)
    scale = D ** -0.5

    # record the exact arguments launch_decode passes (robust to kernel signature changes), then
    # replay them straight into Triton: the bare launch of the same compiled kernel
    real = mod.decode_kernel
    seen: dict = {}

    class Recorder:
        def __getitem__(self, grid):
            def rec(*a, **kw):
                seen.update(grid=grid, args=a, kwargs=kw)
            return rec

    mod.decode_kernel = Recorder()
    try:
        decode.launch_decode(spec, cfg, q, k, v, bt, sl, out, scale, CTX)
    finally:
        mod.decode_kernel = real
    grid, bargs, bkw = seen["grid"], seen["args"], seen["kwargs"]

    def bare() -> None:
        real[grid](*bargs, **bkw)

    paths = {
        "bare": bare,
        "launch": lambda: decode.launch_decode(spec, cfg, q, k, v, bt, sl, out, scale, CTX),
        "explicit": lambda: pagegen.paged_decode(q, k, v, bt, sl, out=out, config=cfg),
        "dispatch": lambda: pagegen.paged_decode(q, k, v, bt, sl, out=out),
        "select": lambda: dispatch.select_config(spec, B, CTX, HK),
        "plan": lambda: plan.run(q, k, v, bt, sl, out),
    }
    plan = pagegen.DecodePlan(q, k, v, bt, sl)
    assert plan.config == cfg, (plan.config, cfg)
    ref = pagegen.paged_decode(q, k, v, bt, sl, config=cfg)
    bare()
    torch.cuda.synchronize()
    assert torch.equal(out, ref), "bare launch and paged_decode disagree"
    res: dict[str, float] = {}
    for name, fn in paths.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - t0) / calls * 1e6)
            torch.cuda.synchronize()
        res[f"{name}_us"] = statistics.median(samples)
    res["dispatcher_overhead_us"] = res["dispatch_us"] - res["explicit_us"]
    res["op_overhead_vs_bare_us"] = res["dispatch_us"] - res["bare_us"]
    res["plan_overhead_vs_bare_us"] = res["plan_us"] - res["bare_us"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--first-call-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help="JSON path (default bench/results/dispatch-<gpu>-<date>.json)")
    args = ap.parse_args()
    import torch

    if args.first_call_only:
        print(json.dumps(first_call()))
        return 0
    if not torch.cuda.is_available():
        print("bench/dispatch.py needs a CUDA GPU", file=sys.stderr)
        return 2
    # imported here, not at the top: the --first-call-only child times `import pagegen` from scratch
    from bench.common import meta_line, result_path, run_meta, tee_log, write_json

    path = result_path("dispatch", out=args.out)
    with tee_log(path):
        meta = run_meta("dispatch", workload=f"decode bf16 hd{D} g{G}, {HK} KV heads, {B}x{CTX}", matmul=True)
        print(meta_line(meta), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "PAGEGEN_CACHE_DIR": f"{tmp}/pagegen", "TRITON_CACHE_DIR": f"{tmp}/triton"}
            cmd = [sys.executable, __file__, "--first-call-only"]
            cold = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            disk = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
        calls = per_call(args.calls, args.rounds)
        rows = [
            ("bare Triton launch", calls["bare_us"], "us/call"),
            ("pagegen launch_decode", calls["launch_us"], "us/call"),
            ("paged_decode(config=...)", calls["explicit_us"], "us/call"),
            ("paged_decode (dispatcher)", calls["dispatch_us"], "us/call"),
            ("select_config alone", calls["select_us"], "us/call"),
            ("dispatcher overhead", calls["dispatcher_overhead_us"], "us/call"),
            ("op overhead vs bare launch", calls["op_overhead_vs_bare_us"], "us/call (target < 5)"),
            ("DecodePlan.run", calls["plan_us"], "us/call"),
            ("DecodePlan.run overhead vs bare", calls["plan_overhead_vs_bare_us"], "us/call"),
            ("first call, cold caches", cold["first_call_ms"], "ms (render+compile+launch)"),
            ("first call, warm disk caches", disk["first_call_ms"], "ms (import+load+launch)"),
            ("second call", cold["second_call_us"], "us (synchronized)"),
            ("import pagegen", cold["import_pagegen_ms"], "ms"),
        ]
        print(f"dispatcher cost, decode bf16 hd{D} g{G}, {HK} KV heads, {B}x{CTX}")
        for name, value, unit in rows:
            print(f"  {name:<32} {value:>10.2f} {unit}")
        write_json(path, {
            "meta": meta,
            "shape": {"batch": B, "ctx": CTX, "kv_heads": HK, "group": G, "head_dim": D, "block_size": BS},
            "per_call": calls, "first_call_cold": cold, "first_call_warm_disk": disk,
            "calls_per_round": args.calls, "rounds": args.rounds,
        })
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
