"""Extend (prefill / chunked prefill over a paged prefix) benchmark: pagegen against the fastest torch SDPA.

Workload: bf16, head_dim 128, 32 query heads / 8 KV heads (group 4), block_size 16 (--block-size), one sequence
whose pages sit at shuffled physical blocks. A shape `Q@C` extends Q new tokens over C cached
prefix tokens (the new tokens' K/V already in the pool, as kv_write leaves them); new token i sees
the prefix and new tokens 0..i: causal aligned to the lower right.
Implementations (--impls):
  sdpa     torch SDPA on the same tokens made contiguous ([1, H, n, D]) with torch's own backend
           choice and with each backend alone (cudnn, flash, efficient; math where its score
           matrix is small), rows sdpa-<backend> and sdpa-best naming the fastest. The lower-right
           mask is spelled three ways, each tried on every backend and the fastest kept: Q == C + Q
           (no prefix): is_causal=True (upper-left = lower-right when square); otherwise
           torch.nn.attention.bias.causal_lower_right (torch routes it to flash or efficient, else
           materialises it) and an explicit bool [Q, C + Q] mask. Native GQA (enable_gqa); K/V
           heads repeated only for a backend that takes no GQA form. A backend that refuses every
           form is "n/a (reason)".
  flex     FlexAttention over torch's experimental PagedAttention page table (compiled; its pool
           is [1, Hkv, pages * 16, D] holding the same pages; page 16 forces its BLOCK_N to 16)
  pagegen  pagegen.paged_extend with the dispatcher's config (tuned table, else heuristic)
  default  pagegen.paged_extend with the heuristic config (what runs without a tuned table)
  default-tma  the heuristic config with kv_tma=1 (K/V through tensor descriptors; needs --block-size >= 64)
  best     (--tune) pagegen with the fastest config of a small grid, per shape (kv_tma 0 and 1 where legal)
FLOPs count only unmasked work: pairs = Q*C + Q*(Q+1)/2 (query, key) pairs, 4 * pairs * D * Hq
(QK^T and PV), for every implementation alike (a backend that computes masked tiles gets no credit
for them). Limit: the bf16 matrix rate measured in the same run (8192^3 matmul on random data).
Every implementation is checked against the float64 reference (the last 64 rows) and pagegen also
against SDPA on all rows before it is timed. Timing: bench.common.timeit (pagegen.timing: CUDA-graph
replay, L2 flushed before every run; CUDA events where a graph cannot be captured).
Prefix caching: 512@4096 (a cached 4096-token system prompt plus 512 new tokens) vs 4608@0 (full
causal prefill of all 4608) through the same op; target ratio <= 0.25.

    python bench/extend.py [--shapes 2048@0,2048@4096,2048@16384,512@4096,4608@0] [--impls sdpa,flex,pagegen]
    python bench/extend.py --tune          # + a small config grid per shape (about a minute more)
    python bench/extend.py --cpu-smoke     # tiny shapes in Triton's CPU interpreter (dry run)
    python bench/extend.py --block-size 64 --impls sdpa,default,default-tma   # gather vs TMA K/V at pages of 64
Writes bench/results/extend-<gpu>-<date>.json and a .log beside it.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

SMOKE = "--cpu-smoke" in sys.argv  # before torch/triton are imported: the interpreter must be on first
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import pagegen  # noqa: E402
from bench import baselines  # noqa: E402
from bench.common import meta_line, result_path, run_meta, tee_log, timeit, write_json  # noqa: E402
from pagegen.reference import paged_extend_ref  # noqa: E402
from pagegen.spec import KV_TMA_VALUES, Config, KernelSpec, illegal_reason  # noqa: E402

SHAPES = ["2048@0", "2048@4096", "2048@16384", "512@4096", "4608@0"]
SMOKE_SHAPES = ["24@0", "24@40", "8@40", "48@0"]
FLEX_SHAPES = ("2048@0", "2048@4096", "2048@16384")
HQ, HK, D, BS = 32, 8, 128, 16  # BS: --block-size sets it (and SPEC) before anything runs
DTYPE = torch.bfloat16
SPEC = KernelSpec("extend", head_dim=D, block_size=BS, dtype="bf16", group_size=HQ // HK)
# stages 2 vs 5: Triton's pipeliner double-buffers the gathered K/V tiles only from num_stages=5
# (compiled for sm_90 with triton 3.6 and 3.9: 2-4 issue the next tile's loads after this tile's dots);
# stage 3 for the TMA path (it prefetches the next tile's boxes from 3 stages on: bench/NOTES.md).
# kv_tma=1 configs are legal only at pages >= 64 (illegal_reason drops them at block 16).
TUNE_GRID = [
    Config(block_m=m, block_n=n, num_warps=w, num_stages=s, kv_tma=t)
    for m, n, w, s, t in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 5), KV_TMA_VALUES)
    if (w == 8 or (m == 64 and n <= 64))  # 4 warps spill with a 128-row tile or 128-key tiles
    and (s != 3 or t)  # 3 stages only for the TMA path (the gather's 3 is its 2)
]


def set_block_size(block_size: int) -> None:
    """Run the benchmark at pages of `block_size` tokens (BS and SPEC; the shapes' tokens are the same)."""
    global BS, SPEC
    BS = block_size
    SPEC = KernelSpec("extend", head_dim=D, block_size=BS, dtype="bf16", group_size=HQ // HK)


def with_tma(cfg: Config) -> Config:
    """`cfg` with K/V through tensor descriptors (kv_tma=1), its key tile cut to one page if larger."""
    return replace(cfg, kv_tma=1, block_n=min(cfg.block_n, BS))
TOL = baselines.TOL  # bf16 relative error vs SDPA / the float64 reference
MATH_MAX_SCORES = 1 << 29  # the math backend materialises Hq x Q x (C + Q) fp32 scores: 2 GiB at most
DEV = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"  # cpu: --cpu-smoke, or imported by CPU tests


def parse_shape(shape: str) -> tuple[int, int]:
    """"Q@C" -> (Q new tokens, C prefix tokens)."""
    q, c = shape.split("@")
    return int(q), int(c)


def make_inputs(shape: str, seed: int = 0) -> dict:
    """One sequence of ctx + q tokens in a shuffled NHD pool, its queries, and the same K/V contiguous."""
    q_len, ctx = parse_shape(shape)
    n = ctx + q_len
    g = torch.Generator().manual_seed(seed)
    nb = -(-n // BS)
    k = torch.randn(nb + 8, BS, HK, D, device=DEV, dtype=DTYPE)
    v = torch.randn(nb + 8, BS, HK, D, device=DEV, dtype=DTYPE)
    bt = torch.randperm(nb + 8, generator=g)[:nb].int()[None].to(DEV)  # [1, nb]
    q = torch.randn(q_len, HQ, D, device=DEV, dtype=DTYPE)
    # contiguous copies for SDPA (not timed): [1, H, tokens, D]
    kc = k[bt[0].long()].reshape(-1, HK, D)[:n].transpose(0, 1)[None].contiguous()
    vc = v[bt[0].long()].reshape(-1, HK, D)[:n].transpose(0, 1)[None].contiguous()
    qc = q.transpose(0, 1)[None].contiguous()  # [1, HQ, q_len, D]
    return dict(q=q, k=k, v=v, bt=bt, cu=torch.tensor([0, q_len], dtype=torch.int32, device=DEV),
                sl=torch.tensor([n], dtype=torch.int32, device=DEV), qc=qc, kc=kc, vc=vc, q_len=q_len, ctx=ctx)


def causal_flops(q_len: int, ctx: int) -> float:
    """FLOPs of the unmasked (query, key) pairs only: 4 * pairs * D * Hq."""
    pairs = q_len * ctx + q_len * (q_len + 1) / 2
    return 4.0 * pairs * D * HQ


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def ref_tail(x: dict, rows: int = 64) -> torch.Tensor:
    """float64 reference of the last `rows` query tokens: [rows, HQ, D]."""
    r = min(rows, x["q_len"])
    return paged_extend_ref(x["q"][-r:], x["k"], x["v"], x["bt"], torch.tensor([0, r], dtype=torch.int32),
                            x["sl"])


# ----------------------------------------------------------------- implementations


def sdpa_forms(x: dict) -> tuple[dict, dict]:
    """(forms, fallbacks) spelling this extend for SDPA: {name: fn() -> out [q_len, HQ, D]}."""
    from torch.nn.attention.bias import causal_lower_right

    f = torch.nn.functional.scaled_dot_product_attention
    qc, kc, vc = x["qc"], x["kc"], x["vc"]
    q_len, n = qc.shape[2], kc.shape[2]

    def spell(kk, vv, gqa):
        if q_len == n:
            return {"causal": lambda: f(qc, kk, vv, is_causal=True, enable_gqa=gqa)[0].transpose(0, 1)}
        bias = causal_lower_right(q_len, n)
        mask = baselines.lower_right_mask(q_len, n, qc.device)
        return {"bias": lambda: f(qc, kk, vv, attn_mask=bias, enable_gqa=gqa)[0].transpose(0, 1),
                "mask": lambda: f(qc, kk, vv, attn_mask=mask, enable_gqa=gqa)[0].transpose(0, 1)}

    rep = HQ // HK
    kr, vr = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
    return spell(kc, vc, True), {f"{k}-repeat-kv": fn for k, fn in spell(kr, vr, False).items()}


def run_flex(x: dict):
    """FlexAttention over PagedAttention: logical lower-right causal mask, converted to pages."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    k, v, bt, q_len = x["k"], x["v"], x["bt"], x["q_len"]
    n_pages = k.shape[0]
    pa = PagedAttention(n_pages, BS, 1, device=DEV)
    kf = k.permute(2, 0, 1, 3).reshape(1, HK, n_pages * BS, D).contiguous()  # same pages, flex's layout
    vf = v.permute(2, 0, 1, 3).reshape(1, HK, n_pages * BS, D).contiguous()
    nb = bt.shape[1]
    pa.page_table[0, :nb] = bt[0].long()
    pa.capacity[:] = nb * BS
    pa.physical_to_logical[:] = -1
    pa.physical_to_logical[0, bt[0].long()] = torch.arange(nb, device=DEV)
    seq_len = x["sl"]

    def mask_mod(b, h, qi, kv):
        return (kv <= qi + (seq_len[b] - q_len)) & (kv < seq_len[b])

    logical = create_block_mask(mask_mod, 1, None, q_len, nb * BS, device=DEV, BLOCK_SIZE=(128, BS))
    physical = pa.convert_logical_block_mask(logical)
    compiled = torch.compile(flex_attention, dynamic=False)
    q4 = x["qc"]
    errors = []
    # the mask's KV block is one page (16 tokens), so flex's BLOCK_N must divide it: try spellings
    for opts in ({"BLOCK_M": 128, "BLOCK_N": BS}, {"BLOCK_N": BS}, {"FWD_BLOCK_N": BS}, {"BLOCK_M": 64, "BLOCK_N": BS}):
        def fn(opts=opts):
            o = compiled(q4, kf, vf, block_mask=physical, enable_gqa=True, kernel_options=opts)
            return o[0].transpose(0, 1)

        t0 = time.time()
        try:
            fn()
            if not SMOKE:
                torch.cuda.synchronize()
            return fn, f"kernel_options={opts}, compile {time.time() - t0:.0f}s"
        except Exception as exc:  # try the next spelling
            errors.append(f"{opts}: {type(exc).__name__}: {str(exc)[:120]}")
            torch._dynamo.reset()
    raise RuntimeError(" | ".join(errors))


def run_pagegen(x: dict, config: Config | None):
    """pagegen.paged_extend with a given config, or (None) the dispatcher's."""
    out = torch.empty_like(x["q"])

    def fn():
        return pagegen.paged_extend(x["q"], x["k"], x["v"], x["bt"], x["cu"], x["sl"], out=out, config=config,
                                    max_q_len=x["q_len"], max_seq_len=x["q_len"] + x["ctx"])

    return fn


def chosen_config(x: dict) -> Config:
    from pagegen.dispatch import select_config

    return select_config(SPEC, x["q_len"], x["q_len"] + x["ctx"], HK)


def heuristic(x: dict) -> Config:
    from pagegen.dispatch import heuristic_config
    from pagegen.gpu import sm_count

    return heuristic_config(SPEC, x["q_len"], x["q_len"] + x["ctx"], HK, sm_count())


def tune(x: dict, tail: torch.Tensor, reps: int) -> tuple[Config | None, float, list]:
    """Fastest legal, correct config of TUNE_GRID for this shape: (config, us, per-config log)."""
    best: tuple[float, Config] | None = None
    log = []
    for cfg in TUNE_GRID:
        if illegal_reason(SPEC, cfg):
            continue
        try:
            fn = run_pagegen(x, cfg)
            err = rel(fn()[-tail.shape[0]:], tail)
            if not err < TOL:
                log.append((cfg.to_dict(), f"wrong: {err:.2e}"))
                continue
            us = timeit(lambda i, fn=fn: fn(), reps=reps).median_us
        except Exception as exc:  # out of shared memory etc.: recorded, not fatal
            log.append((cfg.to_dict(), f"{type(exc).__name__}: {str(exc)[:80]}"))
            continue
        log.append((cfg.to_dict(), us))
        if best is None or us < best[0]:
            best = (us, cfg)
    return (best[1], best[0], log) if best else (None, math.inf, log)


# ----------------------------------------------------------------- driver


def bench_shape(shape: str, impls: list[str], args: argparse.Namespace, matmul: float | None) -> list[dict]:
    """Every implementation on one shape; one row each (errors and n/a reported, not raised)."""
    x = make_inputs(shape)
    flops = causal_flops(x["q_len"], x["ctx"])
    tail = ref_tail(x)
    graph = not args.events
    rows: list[dict] = []

    def finish(row: dict, us: float) -> None:
        row.update(us=us, tflops=flops / us / 1e6)
        if matmul:
            row["pct_matmul"] = 100 * row["tflops"] / matmul

    base = None  # an SDPA output over all rows, to check pagegen beyond the fp64 tail
    if "sdpa" in impls:
        forms, fallbacks = sdpa_forms(x)
        scores = HQ * x["q_len"] * (x["q_len"] + x["ctx"])
        skip = {"math": f"n/a (math skipped: {scores * 4 / 2**30:.1f} GiB of fp32 scores)"} \
            if scores > MATH_MAX_SCORES else {}
        backends = tuple(b for b in args.backends.split(",") if b)
        srows, best = baselines.sweep(forms, lambda o: rel(o[-tail.shape[0]:], tail), backends=backends,
                                      skip=skip, reps=args.reps, graph=graph, fallbacks=fallbacks)
        for r in srows + ([best] if best else []):
            row = {"shape": shape, "flops": flops, **r}
            if "us" in r:
                finish(row, r["us"])
            rows.append(row)
        for form in ("causal", "bias"):
            if form in forms:
                out, _ = baselines.call(forms[form], "default")
                base = out if out is not None and rel(out[-tail.shape[0]:], tail) < TOL else None
        del forms, fallbacks
    for impl in impls:
        if impl == "sdpa" or (impl == "flex" and shape not in args.flex_shapes.split(",") and not args.flex_all):
            continue  # flex: each shape is a fresh inductor compile, so only the target shapes
        row = {"shape": shape, "impl": impl, "flops": flops}
        try:
            if impl == "flex":
                fn, row["note"] = run_flex(x)
            elif impl == "pagegen":
                fn, row["config"] = run_pagegen(x, None), chosen_config(x).to_dict()
            elif impl == "default":
                cfg = heuristic(x)
                fn, row["config"] = run_pagegen(x, cfg), cfg.to_dict()
            elif impl == "default-tma":
                cfg = with_tma(heuristic(x))
                if illegal_reason(SPEC, cfg):
                    raise ValueError(f"{cfg}: {illegal_reason(SPEC, cfg)} (run with --block-size 64 or more)")
                fn, row["config"] = run_pagegen(x, cfg), cfg.to_dict()
            elif impl == "best":
                cfg, _, log = tune(x, tail, max(10, args.reps // 3))
                if cfg is None:
                    raise RuntimeError(f"no config of the grid ran correctly: {log[:3]}")
                fn, row["config"], row["tune_log"] = run_pagegen(x, cfg), cfg.to_dict(), log
            else:
                raise ValueError(f"unknown impl {impl!r}; expected sdpa, flex, pagegen, default, default-tma or best")
            out = fn()
            row["err_vs_fp64_tail"] = rel(out[-tail.shape[0]:], tail)
            if base is not None:
                row["err_vs_sdpa"] = rel(out, base)
            if not (row["err_vs_fp64_tail"] < TOL and row.get("err_vs_sdpa", 0.0) < TOL):
                raise RuntimeError(f"wrong result: rel err {row.get('err_vs_sdpa', float('nan')):.2e} vs sdpa, "
                                   f"{row['err_vs_fp64_tail']:.2e} vs fp64")
            finish(row, timeit(lambda i, fn=fn: fn(), reps=args.reps, graph=graph).median_us)
        except Exception as exc:  # a failing implementation is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    best = next((r for r in rows if r["impl"] == "sdpa-best" and "us" in r), None)
    for r in rows:
        if best and "us" in r and not r["impl"].startswith("sdpa"):
            r["speed_vs_sdpa_best"] = best["us"] / r["us"]
    return rows


def summarize(shapes: list[str], rows: list[dict]) -> dict:
    """pagegen / fastest SDPA TFLOP/s per shape (and which backend won), and the prefix-caching ratio."""
    by = {(r["shape"], r["impl"]): r for r in rows if "us" in r}
    summary: dict = {}
    for shape in shapes:
        s = by.get((shape, "sdpa-best"))
        if s:
            summary[f"{shape} fastest SDPA"] = f"{s['winner']}: {s['us']:.1f} us, {s['tflops']:.0f} TFLOP/s"
        for impl in ("pagegen", "default", "default-tma", "best", "flex"):
            p = by.get((shape, impl))
            if s and p:
                summary[f"{shape} {impl} / fastest SDPA (TFLOP/s)"] = round(p["tflops"] / s["tflops"], 3)
    for impl in ("pagegen", "default", "best", "sdpa-best"):
        a, b = by.get(("512@4096", impl)), by.get(("4608@0", impl))
        if a and b:
            summary[f"prefix caching {impl}: 512@4096 / 4608@0 time"] = round(a["us"] / b["us"], 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="", help="comma-separated Q@C (default: the five reference shapes)")
    ap.add_argument("--impls", default="sdpa,flex,pagegen,default")
    ap.add_argument("--backends", default=",".join(baselines.BACKENDS), help="SDPA backends to time")
    ap.add_argument("--tune", action="store_true", help="also try a small config grid per shape")
    ap.add_argument("--flex-all", action="store_true", help="run flex on every shape (default: 2048@*)")
    ap.add_argument("--flex-shapes", default=",".join(FLEX_SHAPES), help="shapes flex runs on (each compiles anew)")
    ap.add_argument("--reps", type=int, default=30, help="timed runs per implementation (median)")
    ap.add_argument("--events", action="store_true", help="time with CUDA events instead of CUDA-graph replay")
    ap.add_argument("--out", default="", help="JSON path (default bench/results/extend-<gpu>-<date>.json)")
    ap.add_argument("--tag", default="", help="suffix of the default file name")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in the Triton CPU interpreter (dry run)")
    ap.add_argument("--block-size", type=int, default=BS, choices=(16, 32, 64, 128, 256),
                    help="tokens a KV page (default 16; kv_tma=1 needs >= 64)")
    args = ap.parse_args(argv)
    set_block_size(args.block_size)
    if args.cpu_smoke:
        args.impls = ",".join(i for i in args.impls.split(",") if i != "flex")
        global TUNE_GRID
        TUNE_GRID = TUNE_GRID[:3]
    elif not torch.cuda.is_available():
        print("bench/extend.py needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    bad = [b for b in args.backends.split(",") if b and b not in baselines.BACKENDS]
    if bad:
        ap.error(f"--backends {','.join(bad)} unknown; expected some of {','.join(baselines.BACKENDS)}")
    shapes = args.shapes.split(",") if args.shapes else (SMOKE_SHAPES if SMOKE else SHAPES)
    impls = [("sdpa" if i == "naive" else i) for i in args.impls.split(",") if i] + (["best"] if args.tune else [])
    path = result_path("extend", tag=args.tag, out=args.out)
    t0 = time.time()
    with tee_log(path):
        meta = run_meta("extend", workload=f"bf16 hd{D} {HQ}q/{HK}kv block{BS} shuffled pages, one sequence; "
                        "shape = new@prefix; lower-right causal; FLOPs of unmasked pairs only", matmul=True)
        meta["timing"] = "cuda-events" if args.events else "cuda-graph replay, L2 flushed before each run"
        print(meta_line(meta), flush=True)
        rows: list[dict] = []
        for shape in shapes:
            print(f"-- {shape}", flush=True)
            got = bench_shape(shape, impls, args, meta["matmul_tflops"])
            for r in got:
                print("  " + " ".join(f"{k}={v}" for k, v in r.items() if k not in ("shape", "tune_log"))[:300],
                      flush=True)
            rows += got
            if not SMOKE:
                torch.cuda.empty_cache()
            write_json(path, {"meta": meta, "rows": rows, "summary": summarize(shapes, rows), "partial": True})
        summary = summarize(shapes, rows)
        meta["wall_s"] = round(time.time() - t0, 1)
        write_json(path, {"meta": meta, "rows": rows, "summary": summary})

        print(f"\n{meta_line(meta)}  ({meta['wall_s']:.0f}s)")
        print(f"{'shape':<12}{'impl':<16}{'us':>10}{'TFLOP/s':>9}{'%mm':>6}{'vs sdpa':>8}  note")
        for r in rows:
            lead = f"{r['shape']:<12}{r['impl']:<16}"
            if "us" not in r:
                print(f"{lead}{'-':>10}{'-':>9}{'-':>6}{'-':>8}  {r.get('error') or r.get('na', '')}"[:200])
                continue
            note = r.get("winner") or r.get("form") or r.get("note") or str(r.get("config", ""))
            pct = f"{r['pct_matmul']:>6.1f}" if "pct_matmul" in r else f"{'-':>6}"
            vs = f"{r['speed_vs_sdpa_best']:>8.2f}" if "speed_vs_sdpa_best" in r else f"{'':>8}"
            print(f"{lead}{r['us']:>10.1f}{r['tflops']:>9.1f}{pct}{vs}  {note}"[:200])
        for k, v in summary.items():
            print(f"{k}: {v}")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
