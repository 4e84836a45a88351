"""fp8 KV cache against bf16 in the same run (issue 16): decode speed and attention accuracy (GPU).

Workload: bf16 queries and outputs, head_dim 128, 32 query heads / 8 KV heads (group 4), block_size 16,
NHD pools (--layout HND: HND pools of the same values) with shuffled block tables. Shapes (BxCTX): 128x4096,
256x2048, 32x8192 and `mixed` (64 lengths uniform in [64, 8192], seeded; max/sum hints given, so the
dispatcher sees it ragged).

Speed, per shape, every case checked against the float64 reference on sampled sequences first:
  bf16            the bf16 pool (pagegen's config for the call: tuned table, else the heuristic)
  e4m3/tensor     the same data quantized to fp8 e4m3, one scale per tensor (absmax / 448)
  e4m3/head       one scale per KV head (absmax of the head / 448)
  e5m2/tensor     fp8 e5m2 (absmax / 57344)
  best-of-sweep   bf16 and e4m3/tensor over 11 more configs (SWEEP: block_n 16..256, 1..8 warps, 3-8 stages, the
                  call's split): what configs outside the table (deeper pipelines too) may add (--no-sweep skips)
Bytes = KV read at the pool's element size (fp8: 1, bf16: 2) + q + out (pagegen.workloads.decode_bytes);
% of the copy bandwidth measured in this run; tokens/s ratio = bf16 time / fp8 time (one token per
sequence a step). Targets (issue 16): >= 90% of copy and >= 1.8x bf16 at the three uniform shapes,
>= 1.7x bf16 on the mixed batch.
Accuracy (32 sequences x 2048 tokens; float64 attention of the unquantized fp32 K/V is the truth):
relative error of bf16 pagegen, fp8 pagegen (e4m3 / e5m2, per-tensor / per-head scales), and fp8
against bf16, on randn K/V and on keys with outlier channels (4 channels of 2 of the 8 KV heads 20x
larger: per-head scales keep the other heads' resolution).
Timing: bench.common.timeit (CUDA-graph replay, L2 flushed before each run, median). Writes
bench/results/fp8-<gpu>-<date>.json (+ .log) with the run's metadata.

    python bench/fp8.py [--no-sweep] [--out PATH]      # about 2 minutes on an H200
    python bench/fp8.py --layout HND                   # the same on HND pools (one page of a KV head contiguous)
    python bench/fp8.py --cpu-smoke                    # the script's logic on tiny shapes in the interpreter
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import zlib
from pathlib import Path

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import pagegen  # noqa: E402
from bench.common import meta_line, result_path, run_meta, tee_log, timeit, write_json  # noqa: E402
from pagegen.dispatch import explain, is_ragged  # noqa: E402
from pagegen.reference import (  # noqa: E402
    absmax_scale_ref,
    paged_decode_fp8_ref,
    paged_decode_ref,
    quantize_fp8_ref,
)
from pagegen.spec import Config, KernelSpec, illegal_reason  # noqa: E402
from pagegen.workloads import decode_bytes  # noqa: E402

HQ, HK, D, BS = 32, 8, 128, 16
# pool layout of the run (--layout, set by use_layout): NHD [blocks, BS, HK, D], or HND [blocks, HK, BS, D]
LAYOUT, HEAD_AXIS = "NHD", 2  # HEAD_AXIS: the KV-head axis of a pool (per-head scales)
DTYPE = torch.float16 if SMOKE else torch.bfloat16  # the interpreter's bf16 dot is garbage
DT_NAME = "fp16" if SMOKE else "bf16"
DEV = "cpu" if SMOKE else "cuda"
TOL = 2e-2  # kernel vs the emulating reference (bf16 rounding of p and of the output)
FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
SHAPES = ("128x4096", "256x2048", "32x8192", "mixed")
SMOKE_SHAPES = {"128x4096": "2x40", "256x2048": "3x33", "32x8192": "1x300", "mixed": "mixed"}
TARGETS = {"128x4096": (0.90, 1.8), "256x2048": (0.90, 1.8), "32x8192": (0.90, 1.8), "mixed": (None, 1.7)}
# pool cases timed at every shape: (name, kv format or None for bf16, per-head scales)
POOLS = (("bf16", None, False), ("e4m3/tensor", "fp8_e4m3", False), ("e4m3/head", "fp8_e4m3", True),
         ("e5m2/tensor", "fp8_e5m2", False))
# (block_n, num_warps, num_stages): small tiles won bf16 128x4096 on the H100 (16/1/4), fp8 halves a tile's bytes
SWEEP = ((16, 1, 4), (32, 2, 4), (64, 2, 4), (64, 4, 3), (128, 8, 3), (256, 4, 3), (256, 8, 3),
         (32, 1, 6), (32, 1, 8), (16, 1, 8), (64, 2, 8))  # the last four: deeper pipelines for fp8 tiles
ACC_SHAPE = "2x50" if SMOKE else "32x2048"
OUTLIER_HEADS, OUTLIER_CHANNELS, OUTLIER_GAIN = (1, 5), (3, 40, 77, 120), 20.0


def use_layout(layout: str) -> None:
    """Build and time `layout` pools ("NHD" or "HND") from now on."""
    global LAYOUT, HEAD_AXIS
    if layout not in ("NHD", "HND"):
        raise ValueError(f"layout must be NHD or HND, got {layout!r}")
    LAYOUT, HEAD_AXIS = layout, (2 if layout == "NHD" else 1)


def lens_of(shape: str, g: torch.Generator) -> list[int]:
    """Context length of each sequence of a shape ("BxCTX", or "mixed": 64 x U[64, 8192])."""
    if SMOKE:
        shape = SMOKE_SHAPES.get(shape, shape)
    if shape == "mixed":
        n, lo, hi = (3, 5, 100) if SMOKE else (64, 64, 8192)
        return torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    b, n = (int(x) for x in shape.split("x"))
    return [n] * b


def paged(lens: list[int], g: torch.Generator, outliers: bool = False) -> dict:
    """fp32 K/V of a LAYOUT pool with shuffled pages (+ block tables, seq_lens) on DEV (the same values for
    either layout: drawn NHD, then permuted)."""
    nblk = [-(-n // BS) for n in lens]
    total = sum(nblk)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    k = torch.randn(total, BS, HK, D, device=DEV)
    v = torch.randn(total, BS, HK, D, device=DEV)
    if outliers:
        for h in OUTLIER_HEADS:
            k[:, :, h, list(OUTLIER_CHANNELS)] *= OUTLIER_GAIN
    if LAYOUT == "HND":
        k, v = k.permute(0, 2, 1, 3).contiguous(), v.permute(0, 2, 1, 3).contiguous()
    perm = torch.randperm(total, generator=g).int()
    bt = torch.zeros(len(lens), max(nblk), dtype=torch.int32)
    pos = 0
    for i, nb in enumerate(nblk):
        bt[i, :nb] = perm[pos: pos + nb]
        pos += nb
    return {"k": k, "v": v, "bt": bt.to(DEV), "sl": torch.tensor(lens, dtype=torch.int32, device=DEV)}


def pool_of(x: dict, kv: str | None, per_head: bool) -> dict:
    """The op's pool arguments for a case: bf16 K/V, or fp8 codes + k_scale/v_scale (absmax scales)."""
    if kv is None:
        return {"k": x["k"].to(DTYPE), "v": x["v"].to(DTYPE), "scales": {}}
    fp8, axis = FP8[kv], (HEAD_AXIS if per_head else None)
    ks, vs = absmax_scale_ref(x["k"], fp8, head_axis=axis), absmax_scale_ref(x["v"], fp8, head_axis=axis)
    return {"k": quantize_fp8_ref(x["k"], ks, fp8, head_axis=HEAD_AXIS),
            "v": quantize_fp8_ref(x["v"], vs, fp8, head_axis=HEAD_AXIS),
            "scales": {"k_scale": ks, "v_scale": vs}}


def spec_of(kv: str | None) -> KernelSpec:
    return KernelSpec("decode", head_dim=D, block_size=BS, layout=LAYOUT, dtype=DT_NAME, kv_dtype=kv or "",
                      group_size=HQ // HK)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float("inf") if not torch.isfinite(out).all() else float((out - ref).norm() / ref.norm())


def time_case(x: dict, pool: dict, q: torch.Tensor, config, lens: list[int]) -> float:
    """Median microseconds of one decode step (config None: pagegen's own choice)."""
    out = torch.empty_like(q)
    hints = {"max_seq_len": max(lens), "sum_seq_lens": sum(lens)}

    def fn(i: int):
        return pagegen.paged_decode(q, pool["k"], pool["v"], x["bt"], x["sl"], layout=LAYOUT, out=out,
                                    config=config, **hints, **pool["scales"])

    return timeit(fn, graph=not SMOKE, reps=5 if SMOKE else 50).median_us


def check_case(x: dict, pool: dict, q: torch.Tensor, lens: list[int]) -> float:
    """Error of the case's kernel against the (emulating) reference on up to 3 sampled sequences."""
    idx = torch.linspace(0, len(lens) - 1, min(3, len(lens))).long().unique().to(DEV)
    out = pagegen.paged_decode(q, pool["k"], pool["v"], x["bt"], x["sl"], layout=LAYOUT, max_seq_len=max(lens),
                               sum_seq_lens=sum(lens), **pool["scales"])[idx]
    args = (q[idx], pool["k"], pool["v"], x["bt"][idx], x["sl"][idx])
    ref = (paged_decode_fp8_ref(*args, layout=LAYOUT, **pool["scales"]) if pool["scales"]
           else paged_decode_ref(*args, layout=LAYOUT))
    return rel(out, ref)


def setup(shape: str, g: torch.Generator) -> tuple[list[int], dict, torch.Tensor, bool]:
    """(lengths, fp32 pool data, q, ragged) of a shape; g seeded by the caller (the same data every time)."""
    lens = lens_of(shape, g)
    x = paged(lens, g)
    q = torch.randn(len(lens), HQ, D, device=DEV).to(DTYPE)
    return lens, x, q, is_ragged(len(lens), max(lens), sum(lens))


def speed(shape: str, copy: float | None, g: torch.Generator) -> list[dict]:
    """Every pool case at one shape with pagegen's own config, one row each."""
    lens, x, q, ragged = setup(shape, g)
    rows, base = [], None
    for name, kv, per_head in POOLS:
        pool = pool_of(x, kv, per_head)
        spec = spec_of(kv)
        cfg, source = explain(spec, len(lens), max(lens), HK, ragged)
        row = {"shape": shape, "case": name, "kv_dtype": spec.kv_dtype, "per_head": per_head,
               "batch": len(lens), "tokens": sum(lens), "config": cfg.to_dict(), "config_source": source,
               "bytes": decode_bytes(spec, HK, lens)}
        try:
            row["rel_err"] = check_case(x, pool, q, lens)
            if not row["rel_err"] < TOL:
                raise RuntimeError(f"wrong result: rel err {row['rel_err']:.3e} vs the reference")
            row["us"] = time_case(x, pool, q, None, lens)
            row["gbps"] = row["bytes"] / row["us"] / 1e3
            row["pct_copy"] = 100 * row["gbps"] / copy if copy else None
            row["tokens_per_s"] = len(lens) / (row["us"] * 1e-6)
        except Exception as exc:  # a failing case is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if name == "bf16":
            base = row
        elif "us" in row and base and "us" in base:
            pct_target, ratio_target = TARGETS[shape]
            row["speedup_vs_bf16"] = base["us"] / row["us"]
            row["target_speedup"], row["target_pct_copy"] = ratio_target, pct_target and 100 * pct_target
            if not SMOKE:  # interpreter times say nothing about the targets
                row["meets"] = bool(row["speedup_vs_bf16"] >= ratio_target and
                                    (pct_target is None or (row["pct_copy"] or 0) >= 100 * pct_target))
        rows.append(row)
        print(fmt_speed(row), flush=True)
        del pool
        if not SMOKE:
            torch.cuda.empty_cache()
    return rows


def sweep(shape: str, rows: list[dict], copy: float | None, g: torch.Generator) -> None:
    """Time SWEEP's configs for bf16 and e4m3/tensor at one shape; add the best to their rows (in place)."""
    lens, x, q, _ragged = setup(shape, g)
    by_case = {r["case"]: r for r in rows if r["shape"] == shape}
    for name, kv, per_head in POOLS:
        row = by_case.get(name)
        if name not in ("bf16", "e4m3/tensor") or row is None or "us" not in row:
            continue
        pool, spec = pool_of(x, kv, per_head), spec_of(kv)
        cfg = Config.from_dict(row["config"])
        cands = [dataclasses.replace(cfg, block_n=n, num_warps=w, num_stages=st)
                 for n, w, st in (SWEEP[3:5] if SMOKE else SWEEP)]
        try:
            timed = {c: time_case(x, pool, q, c, lens) for c in cands if illegal_reason(spec, c) is None and c != cfg}
        except Exception as exc:  # a failing config is reported, not fatal
            row["sweep_error"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        row["sweep"] = [{"config": c.to_dict(), "us": t} for c, t in timed.items()]
        timed[cfg] = row["us"]  # pagegen's own choice competes too
        best = min(timed, key=timed.get)
        row["best_us"], row["best_config"] = timed[best], best.to_dict()
        row["best_pct_copy"] = 100 * row["bytes"] / timed[best] / 1e3 / copy if copy else None
        del pool
    bf, f8 = by_case.get("bf16", {}), by_case.get("e4m3/tensor", {})
    if "best_us" in bf and "best_us" in f8:
        f8["best_speedup_vs_bf16"] = bf["best_us"] / f8["best_us"]
    for r in (bf, f8):
        if r:
            print(fmt_speed(r), flush=True)


def accuracy(g: torch.Generator) -> list[dict]:
    """fp8 and bf16 attention against float64 attention of the unquantized data, and fp8 against bf16."""
    rows = []
    lens = lens_of(ACC_SHAPE, g)
    q = torch.randn(len(lens), HQ, D, generator=g).to(DEV, DTYPE)  # from g: the same queries every run
    for data in ("randn", "outlier-keys"):
        x = paged(lens, g, outliers=data == "outlier-keys")
        truth = paged_decode_ref(q, x["k"], x["v"], x["bt"], x["sl"], layout=LAYOUT)
        bf = pool_of(x, None, False)
        out_bf = pagegen.paged_decode(q, bf["k"], bf["v"], x["bt"], x["sl"], layout=LAYOUT)
        rows.append({"data": data, "case": "bf16", "rel_err_vs_exact": rel(out_bf, truth)})
        for kv in FP8:
            for per_head in (False, True):
                pool = pool_of(x, kv, per_head)
                out = pagegen.paged_decode(q, pool["k"], pool["v"], x["bt"], x["sl"], layout=LAYOUT, **pool["scales"])
                emul = paged_decode_fp8_ref(q, pool["k"], pool["v"], x["bt"], x["sl"], layout=LAYOUT,
                                            **pool["scales"])
                o, t = out.double().cpu().reshape(len(lens), HK, -1), truth.cpu().reshape(len(lens), HK, -1)
                head_err = (o - t).norm(dim=(0, 2)) / t.norm(dim=(0, 2))  # [HK]: the outlier heads apart
                rows.append({"data": data, "case": f"{kv[4:]}/{'head' if per_head else 'tensor'}",
                             "rel_err_vs_exact": rel(out, truth), "rel_err_vs_bf16": rel(out, out_bf),
                             "kernel_err_vs_emulation": rel(out, emul),
                             "worst_kv_head_rel_err": float(head_err.max())})
        for r in rows[-5:]:
            print(fmt_acc(r), flush=True)
    return rows


def fmt_speed(r: dict) -> str:
    if "error" in r:
        return f"{r['shape']:>9} {r['case']:12} ERROR {r['error']}"
    pct = f"{r['pct_copy']:6.1f}" if r.get("pct_copy") is not None else "     -"
    sp = f"{r['speedup_vs_bf16']:5.2f}x" if "speedup_vs_bf16" in r else "      "
    best = f"  best {r['best_us']:8.1f} us" if "best_us" in r else ""
    bsp = f" ({r['best_speedup_vs_bf16']:.2f}x)" if "best_speedup_vs_bf16" in r else ""
    meets = {True: " ok", False: " MISS"}.get(r.get("meets"), "")
    return (f"{r['shape']:>9} {r['case']:12} {r['us']:9.1f} us {r['gbps']:8.1f} GB/s {pct}% copy "
            f"{sp}{meets}{best}{bsp}  [{r['config_source']}]")


def fmt_acc(r: dict) -> str:
    extra = "".join(f"  {k} {r[k]:.2e}" for k in ("rel_err_vs_bf16", "kernel_err_vs_emulation",
                                                   "worst_kv_head_rel_err") if k in r)
    return f"{r['data']:>13} {r['case']:12} vs exact {r['rel_err_vs_exact']:.2e}{extra}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-sweep", action="store_true", help="only pagegen's own config per case")
    ap.add_argument("--only", choices=("speed", "accuracy"), default=None)
    ap.add_argument("--out", default="", help="JSON path or folder (default bench/results/)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in the interpreter (numbers meaningless)")
    ap.add_argument("--layout", choices=("NHD", "HND"), default="NHD", help="pool layout")
    args = ap.parse_args()
    use_layout(args.layout)
    tag = "-".join(t for t in ("smoke" if SMOKE else "", "hnd" if LAYOUT == "HND" else "") if t)
    path = result_path("fp8", tag=tag, out=args.out or None)
    with tee_log(path):
        meta = run_meta("fp8", workload=f"{DT_NAME} q, hd{D}, {HQ}q/{HK}kv, block {BS}, {LAYOUT}, shuffled tables")
        print(meta_line(meta), flush=True)
        g = torch.Generator().manual_seed(0)
        result: dict = {"meta": meta, "speed": [], "accuracy": []}
        # accuracy, then every shape's default-config speed, then the sweep: each phase is written as it
        # ends, so a run cut short by its time limit keeps the headline numbers
        if args.only != "speed":
            g.manual_seed(1)
            result["accuracy"] = accuracy(g)
            write_json(path, result)
        if args.only != "accuracy":
            for shape in SHAPES:
                g.manual_seed(zlib.crc32(shape.encode()))  # the same lengths and data in every run
                result["speed"] += speed(shape, meta["copy_gbps"], g)
                write_json(path, result)
            for shape in SHAPES if not args.no_sweep else ():
                g.manual_seed(zlib.crc32(shape.encode()))
                sweep(shape, result["speed"], meta["copy_gbps"], g)
                write_json(path, result)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
