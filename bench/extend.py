"""Extend (prefill / chunked prefill over a paged prefix) benchmark (GPU only).

Workload (issue 6): bf16, head_dim 128, 32 query heads / 8 KV heads (group 4), block_size 16,
one sequence whose pages sit at shuffled physical blocks. A shape `Q@C` extends Q new tokens over
C cached prefix tokens (the new tokens' K/V already in the pool, as kv_write leaves them).
Implementations:
  sdpa     torch SDPA, flash backend, on the same tokens made contiguous ([1, H, n, D]), with
           lower-right causal alignment (torch.nn.attention.bias.causal_lower_right)
  flex     FlexAttention over torch's experimental PagedAttention page table (compiled; its pool
           is [1, Hkv, pages * 16, D] holding the same pages; page 16 forces its BLOCK_N to 16)
  pagegen  pagegen.paged_extend with the dispatcher's config (tuned table, else heuristic)
  default  pagegen.paged_extend with the heuristic config (what runs without a tuned table)
  best     (--tune) pagegen with the fastest config of a small grid, per shape
FLOPs count only unmasked work: pairs = Q*C + Q*(Q+1)/2 (query, key) pairs, 4 * pairs * D * Hq
(QK^T and PV). Limit: the measured bf16 matrix rate (8192^3 torch.matmul). Every implementation
is checked against SDPA (all rows) and against the float64 reference (the last 64 rows) before it
is timed. Timing: triton.testing.do_bench medians (L2 flushed before every run).
Prefix caching: 512@4096 (a cached 4096-token system prompt plus 512 new tokens) vs 4608@0 (full
causal prefill of all 4608) through the same op; target ratio <= 0.25.
Writes bench/results/extend-<gpu>-<date>.json and prints a table.

    python bench/extend.py [--shapes 2048@0,2048@4096,2048@16384,512@4096,4608@0] [--impls sdpa,flex,pagegen]
    python bench/extend.py --tune          # + a small config grid per shape (about a minute more)
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

# --cpu-smoke: run the script's logic on tiny shapes in Triton's CPU interpreter (numbers meaningless)
SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pagegen  # noqa: E402
from pagegen.reference import paged_extend_ref  # noqa: E402
from pagegen.spec import Config, KernelSpec, keep  # noqa: E402

SHAPES = ["2048@0", "2048@4096", "2048@16384", "512@4096", "4608@0"]
FLEX_SHAPES = ("2048@0", "2048@4096", "2048@16384")
HQ, HK, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16
SPEC = KernelSpec("extend", head_dim=D, block_size=BS, dtype="bf16", group_size=HQ // HK)
# stages 2 vs 5: Triton's pipeliner double-buffers the gathered K/V tiles only from num_stages=5
# (compiled for sm_90 with triton 3.6 and 3.9: 2-4 issue the next tile's loads after this tile's dots)
TUNE_GRID = [
    Config(block_m=m, block_n=n, num_warps=w, num_stages=s)
    for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 5))
    if w == 8 or (m == 64 and n <= 64)  # 4 warps spill with a 128-row tile or 128-key tiles
]
TOL = 2e-2  # bf16 relative error vs SDPA / the float64 reference
DEV = "cpu" if SMOKE else "cuda"


def parse_shape(shape: str) -> tuple[int, int]:
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
    pairs = q_len * ctx + q_len * (q_len + 1) / 2
    return 4.0 * pairs * D * HQ


def matmul_tflops() -> float:
    n = 256 if SMOKE else 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    return 2 * n**3 / bench_us(lambda: a @ b, rep=300) / 1e6


def bench_us(fn, rep: int = 200) -> float:
    """Median microseconds of fn() (triton do_bench: L2 flushed before every run)."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3


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


def run_sdpa(x: dict, tail: torch.Tensor):
    """SDPA, flash backend only, lower-right causal; native GQA if flash takes it (and is right),
    else with the KV heads repeated (same FLOPs, a little more memory traffic)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    f = torch.nn.functional.scaled_dot_product_attention
    qc, kc, vc = x["qc"], x["kc"], x["vc"]
    mask = causal_lower_right(qc.shape[2], kc.shape[2])
    backend = SDPBackend.MATH if SMOKE else SDPBackend.FLASH_ATTENTION

    def make(kk, vv, gqa):
        def fn():
            with sdpa_kernel(backend):
                o = f(qc, kk, vv, attn_mask=mask, enable_gqa=gqa)  # [1, HQ, q_len, D]
            return o[0].transpose(0, 1)  # [q_len, HQ, D]

        return fn

    try:
        fn = make(kc, vc, True)
        if rel(fn()[-tail.shape[0]:], tail) < TOL:
            return fn, f"{backend.name.lower()}, enable_gqa"
    except RuntimeError:
        pass
    rep = HQ // HK
    return make(kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1), False), \
        f"{backend.name.lower()}, KV heads repeated (no native GQA)"


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
    out = torch.empty_like(x["q"])

    def fn():
        return pagegen.paged_extend(x["q"], x["k"], x["v"], x["bt"], x["cu"], x["sl"], out=out, config=config,
                                    max_q_len=x["q_len"], max_seq_len=x["q_len"] + x["ctx"])

    return fn


def chosen_config(x: dict) -> Config:
    from pagegen.dispatch import select_config

    return select_config(SPEC, x["q_len"], x["q_len"] + x["ctx"], HK)


def tune(x: dict, base: torch.Tensor) -> tuple[Config | None, float, list]:
    """Fastest legal, correct config of TUNE_GRID for this shape: (config, us, per-config log)."""
    best: tuple[float, Config] | None = None
    log = []
    for cfg in TUNE_GRID:
        if keep(SPEC, cfg):
            continue
        try:
            fn = run_pagegen(x, cfg)
            err = rel(fn(), base)
            if not err < TOL:
                log.append((cfg.to_dict(), f"wrong: {err:.2e}"))
                continue
            us = bench_us(fn, rep=60)
        except Exception as exc:  # out of shared memory etc.: recorded, not fatal
            log.append((cfg.to_dict(), f"{type(exc).__name__}: {str(exc)[:80]}"))
            continue
        log.append((cfg.to_dict(), us))
        if best is None or us < best[0]:
            best = (us, cfg)
    return (best[1], best[0], log) if best else (None, math.inf, log)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--impls", default="sdpa,flex,pagegen")
    ap.add_argument("--tune", action="store_true", help="also try a small config grid per shape")
    ap.add_argument("--flex-all", action="store_true", help="run flex on every shape (default: 2048@*)")
    ap.add_argument("--out", default="")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu_smoke:
        args.shapes = "24@0,24@40,8@40,48@0" if args.shapes == ",".join(SHAPES) else args.shapes
        args.impls = args.impls.replace("flex", "").replace(",,", ",").strip(",")
        global TUNE_GRID
        TUNE_GRID = TUNE_GRID[:3]
    elif not torch.cuda.is_available():
        print("bench/extend.py needs a CUDA GPU", file=sys.stderr)
        return 2
    t_start = time.time()
    impls = args.impls.split(",") + (["best"] if args.tune else [])
    meta = {
        "gpu": "CPU interpreter smoke" if SMOKE else torch.cuda.get_device_name(0),
        "sm_count": 0 if SMOKE else torch.cuda.get_device_properties(0).multi_processor_count,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
        "triton": triton.__version__, "pagegen": pagegen.__version__,
        "workload": f"bf16 hd{D} {HQ}q/{HK}kv block{BS} shuffled pages, one sequence; shape = new@prefix",
    }
    meta["matmul_tflops"] = matmul_tflops()
    print(f"{meta['gpu']}: bf16 matmul {meta['matmul_tflops']:.0f} TFLOP/s", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        x = make_inputs(shape)
        flops = causal_flops(x["q_len"], x["ctx"])
        tail = ref_tail(x)
        sdpa_fn, sdpa_note = run_sdpa(x, tail)
        base = sdpa_fn()
        for impl in impls:
            if impl == "flex" and shape not in FLEX_SHAPES and not args.flex_all:
                continue  # each shape is a fresh inductor compile: only the target shapes
            row = {"shape": shape, "impl": impl, "flops": flops}
            try:
                if impl == "sdpa":
                    fn, row["note"] = sdpa_fn, sdpa_note
                elif impl == "flex":
                    fn, row["note"] = run_flex(x)
                elif impl == "pagegen":
                    cfg = chosen_config(x)
                    fn, row["config"] = run_pagegen(x, None), cfg.to_dict()
                elif impl == "default":
                    from pagegen.dispatch import heuristic_config
                    from pagegen.gpu import sm_count

                    cfg = heuristic_config(SPEC, x["q_len"], x["q_len"] + x["ctx"], HK, sm_count())
                    fn, row["config"] = run_pagegen(x, cfg), cfg.to_dict()
                elif impl == "best":
                    cfg, _, log = tune(x, base)
                    if cfg is None:
                        raise RuntimeError(f"no config of the grid ran correctly: {log[:3]}")
                    fn, row["config"], row["tune_log"] = run_pagegen(x, cfg), cfg.to_dict(), log
                else:
                    raise ValueError(f"unknown impl {impl}")
                out = fn()
                row["err_vs_sdpa"] = rel(out, base)
                row["err_vs_fp64_tail"] = rel(out[-tail.shape[0]:], tail)
                if not (row["err_vs_sdpa"] < TOL and row["err_vs_fp64_tail"] < TOL):
                    raise RuntimeError(f"wrong result: rel err {row['err_vs_sdpa']:.2e} vs sdpa, "
                                       f"{row['err_vs_fp64_tail']:.2e} vs fp64")
                us = bench_us(fn)
                row.update(us=us, tflops=flops / us / 1e6, pct_matmul=100 * flops / us / 1e6 / meta["matmul_tflops"])
            except Exception as exc:  # a failing implementation is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "tune_log"}), flush=True)
        del x, base, tail
        if not SMOKE:
            torch.cuda.empty_cache()

    by = {(r["shape"], r["impl"]): r for r in rows if "us" in r}
    summary = {}
    for shape in args.shapes.split(","):
        s = by.get((shape, "sdpa"))
        for impl in ("pagegen", "default", "best"):
            p = by.get((shape, impl))
            if s and p:
                summary[f"{shape} {impl} / sdpa TFLOP/s"] = p["tflops"] / s["tflops"]
    for impl in ("pagegen", "default", "best", "sdpa"):
        a, b = by.get(("512@4096", impl)), by.get(("4608@0", impl))
        if a and b:
            summary[f"prefix caching {impl}: 512@4096 / 4608@0 time"] = a["us"] / b["us"]
    meta["wall_s"] = round(time.time() - t_start, 1)

    gpu_key = "smoke" if SMOKE else meta["gpu"].split()[1].lower() if len(meta["gpu"].split()) > 1 else "gpu"
    results = Path("/tmp") if SMOKE else ROOT / "bench" / "results"
    path = Path(args.out or results / f"extend-{gpu_key}-{meta['date'][:10]}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))

    print(f"\n{meta['gpu']}  {meta['date']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"bf16 matmul {meta['matmul_tflops']:.0f} TFLOP/s  ({meta['wall_s']:.0f}s)")
    print(f"{'shape':<12}{'impl':<9}{'us':>10}{'TFLOP/s':>9}{'%mm':>6}{'err':>9}  note")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<12}{r['impl']:<9}{'-':>10}{'-':>9}{'-':>6}{'-':>9}  {r['error'][:80]}")
        else:
            note = r.get("note", "") or json.dumps(r.get("config", ""))
            print(f"{r['shape']:<12}{r['impl']:<9}{r['us']:>10.1f}{r['tflops']:>9.1f}{r['pct_matmul']:>6.1f}"
                  f"{r['err_vs_sdpa']:>9.1e}  {note}")
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
