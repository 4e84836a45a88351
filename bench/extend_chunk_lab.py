"""Lab: a short extend over a long prefix computed as a chunked speculative verify (issue 18 item 2).

Extend has no split-KV: one sequence with q_len new tokens over a 32768-token prefix runs
cdiv(q_len x group, BLOCK_M) query tiles x KV heads programs (8 at group 4 for q_len <= 32), each
walking the whole prefix: 671 us on the H200 for q_len 4, 13x a one-token decode step. The verify
kernel (pagegen.paged_verify: the decode template with up to 16 new tokens x group rows in one
program, and split-KV) serves q_len <= 16 at 1.0-1.33x a decode step. An extend of q_len new tokens
is ceil(q_len / C) verify "chunk rows" of at most C (= 16 where the rows fit one program) new tokens
that share their sequence's block-table row:

    chunk k of a sequence with ctx = seq_len - q_len cached tokens before its new ones holds new
    tokens [C k, min(C (k + 1), q_len)), n_q = their count, and has seq_len_k = ctx + C k + n_q
    (its last token's position + 1). Verify's rule (token i of a row with n_q new tokens sits at
    p = seq_len_k - n_q + i = ctx + C k + i and sees keys 0..p) is exactly extend's.

So one paged_verify call with q_len C over the batch of chunk rows (varlen: cu_seqlens_q over the
chunks; q and out stay extend's [total_q, Hq, D] rows, untouched) computes the extend, with split-KV
across the long prefix. The price: each chunk row reads its whole prefix, so the KV is read up to
ceil(q_len / C) times (unless the L2 catches the rows of one sequence, which the grid launches next
to each other); the win: C-token rows instead of BLOCK_M-row tiles, and split-KV.

    build_chunks (pagegen.extend_chunked, where paged_extend routes such steps) -> Chunks   the chunk rows
    extend_as_verify(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, **kw) -> out [total_q, Hq, D]

The chunk metadata is built with a few small torch ops on the device and no host sync: the number of
chunk rows is a host-side bound (from total_q, the batch and the max_q_len hint), and rows past the
last real chunk are padding (no new tokens, seq_len 0) that the verify kernel skips at once. A serving
step builds it once and reuses it for every layer (`chunks=`), so the per-layer cost is the verify
launch alone; both are timed.

    python bench/extend_chunk_lab.py              # CPU (Triton interpreter): the check matrix, fp16
    python bench/extend_chunk_lab.py --gpu [--cases 1x32768:17,8x8192:32] [--reps 50] [--out PATH]
    python bench/extend_chunk_lab.py --cpu-smoke --out /tmp   # --gpu's code on tiny fp16 shapes, interpreted

--gpu times, at bf16, head_dim 128, 32 q / 8 KV heads, block 16 (bench/verify.py's pools: shuffled
block tables, CTX counting the new tokens): paged_extend, extend_as_verify (metadata + verify),
the verify launch alone on prebuilt chunk rows, and one-token paged_decode on the same pool, each
checked against the float64 reference first; writes bench/results/extend_chunk_lab-<gpu>-<date>.json
(card, date, versions, copy bandwidth) and a .log, and prints a table with the ratios and the
prediction of `predict_us` beside each measurement. About 1-2 minutes on an H200 (mostly compiles).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__" and "--gpu" not in sys.argv:  # the interpreter must be on before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import pagegen  # noqa: E402
from pagegen._checks import check_out  # noqa: E402
from pagegen.dispatch import chunk_len as dispatch_chunk_len  # noqa: E402
from pagegen.dispatch import max_chunk_rows  # noqa: E402
from pagegen.extend import check_extend_lengths  # noqa: E402
from pagegen.extend_chunked import Chunks, build_chunks  # noqa: E402
from pagegen.reference import paged_extend_ref  # noqa: E402
from pagegen.spec import Q_LENS, Config, next_pow2  # noqa: E402

__all__ = ["Chunks", "build_chunks", "chunk_len", "extend_as_verify", "max_chunk_rows", "predict_us"]


# ----------------------------------------------------------------- the chunk rows


def chunk_len(group_size: int, head_dim: int) -> int:
    """New tokens a chunk row holds (pagegen.dispatch.chunk_len: 16 for group <= 8 at head_dim 128).
    Raises ValueError when not even 2 tokens fit one program (then extend is the only path)."""
    chunk = dispatch_chunk_len(group_size, head_dim)
    if not chunk:
        raise ValueError(f"group_size={group_size} at head_dim={head_dim}: no verify q_len of {Q_LENS[1:]} fits one "
                         "program (spec.verify_fits); use paged_extend")
    return chunk


def _kv_heads(k_cache: torch.Tensor, layout: str) -> int:
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError(f"k_cache must be a 4-dim pool tensor, got {getattr(k_cache, 'shape', type(k_cache))}")
    return k_cache.shape[2 if layout == "NHD" else 1]


def extend_as_verify(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *, chunks: Chunks | None = None,
                     max_q_len: int | None = None, layout: str = "NHD", out: torch.Tensor | None = None,
                     validate: bool = False, **kw) -> torch.Tensor:
    """paged_extend's function computed by one paged_verify call over chunk rows (build_chunks).

    Arguments as paged_extend: q [total_q, Hq, D]; cu_seqlens_q [B + 1] int32; seq_lens [B] int32
    keys cached per sequence including the new ones (their K/V in the pool); block_tables
    [B, max_blocks]; max_q_len: host-side bound of the per-sequence counts (sizes the chunk rows;
    default total_q, which may add padding rows). Returns out [total_q, Hq, D] laid out as
    paged_extend's (row t of q -> row t of out). chunks: prebuilt rows of this step (build_chunks with
    chunk_len(Hq // Hkv, D)), reused across layers; otherwise built here. Other keywords go to
    paged_verify (scale, config for its q_len-chunk kernel, max_seq_len, features, k_scale/v_scale).
    validate (and always on CPU tensors): check the extend metadata first (syncs), then verify
    checks the chunk rows. No host sync otherwise: capturable in a CUDA graph.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be [total_q, Hq, D] (paged_extend's packed form), got {getattr(q, 'shape', q)}")
    out = check_out(out, q)
    total_q = q.shape[0]
    if validate or q.device.type == "cpu":
        check_extend_lengths(cu_seqlens_q, seq_lens, total_q, total_q if max_q_len is None else max_q_len)
    if chunks is None:
        chunk = chunk_len(q.shape[1] // max(1, _kv_heads(k_cache, layout)), q.shape[2])
        chunks = build_chunks(cu_seqlens_q, seq_lens, block_tables, total_q=total_q, chunk=chunk, max_q_len=max_q_len)
    if chunks.seq_lens.shape[0] == 0:
        return out
    return pagegen.paged_verify(q, k_cache, v_cache, chunks.block_tables, chunks.seq_lens,
                                cu_seqlens_q=chunks.cu_seqlens_q, max_q_len=chunks.chunk, layout=layout, out=out,
                                validate=validate, **kw)


# ----------------------------------------------------------------- the prediction

# H200 measurements this model is built from (bench/results/verify-h200-2026-12-01-tuned.json, bf16,
# head_dim 128, 32 q / 8 KV heads, block 16, CUDA-graph replay, L2 flushed): verify of 8 x 32768
# tokens by new tokens a sequence (its throughput: the chip is full), 1 x 32768 at q_len 4 (one
# sequence: a latency floor), one-token decode of 1 x 32768, extend of 1 x 32768 at q_len 4.
H200_VERIFY_8X32768 = {1: 261.2, 2: 261.3, 4: 262.5, 8: 275.8, 16: 347.7}
H200_VERIFY_1X32768_Q4 = 54.9
H200_DECODE_1X32768 = 50.1
H200_EXTEND_1X32768_Q4 = 671.4
REF_CTX, REF_BATCH = 32768, 8


def predict_us(lens: list[int], q_len: int, chunk: int = 16) -> dict[str, float]:
    """Predicted H200 times (us) of a step of len(lens) sequences of `lens` keys (new tokens
    included), q_len new each: {"chunked": the verify launch over the chunk rows, "extend", "decode1"}.

    chunked: each chunk row reads its whole prefix; at full chip a row of n_q new tokens over CTX keys
    costs H200_VERIFY_8X32768[next_pow2(n_q)] / 8 x CTX / 32768 (no L2 reuse between the rows of a
    sequence: an upper estimate), and never less than the one-sequence floor (1 x 32768 q4) scaled by
    the longest context. extend: programs = sequences x KV heads x query tiles (<= 132 SMs here) each
    walk their sequence's keys, so the step takes the longest sequence's time: 671.4 us x CTX / 32768.
    decode1: the full-chip rate of 8 x 32768's decode (261.2 us), never less than 1 x 32768's 50.1 us
    scaled by the longest context (one sequence cannot fill the chip)."""
    rows = [chunk] * (q_len // chunk) + ([q_len % chunk] if q_len % chunk else [])  # n_q of a sequence's rows
    row_us = sum(H200_VERIFY_8X32768[next_pow2(n)] / REF_BATCH for n in rows)  # its rows over 32768 keys
    throughput = sum(row_us * ctx / REF_CTX for ctx in lens)
    longest = max(lens)
    chunked = max(throughput, H200_VERIFY_1X32768_Q4 * longest / REF_CTX)
    return {"chunked": chunked, "extend": H200_EXTEND_1X32768_Q4 * longest / REF_CTX,
            "decode1": max(H200_VERIFY_8X32768[1] * sum(lens) / (REF_BATCH * REF_CTX),
                           H200_DECODE_1X32768 * longest / REF_CTX)}


# ----------------------------------------------------------------- CPU check matrix

F16 = torch.float16
TOL_F16 = 2e-3  # tests/conftest.py's fp16 tolerance against the float64 reference
VERIFY_NO_SPLIT = Config(block_n=32)
VERIFY_SPLIT = Config(block_n=32, split_size=256)  # prefixes of 300: 2 splits
EXTEND_CFG = Config(block_m=32, block_n=16)  # small tiles: quick in the interpreter

# (name, kv_heads, group, block_size, layout, [(prefix, q_len), ...], verify config): every q_len of
# 17, 33, 48, 64, 100 over every prefix of 0, 40, 300 at group 4 and at group 1, several sequences
# of different q_len a call; page edges (chunk and prefix boundaries on and off pages of 8/16/32);
# a sequence with no new tokens and one with fewer than a chunk; split-KV on and off.
PAIRS_A = [(0, 17), (40, 33), (300, 48), (0, 64), (40, 100)]
PAIRS_B = [(300, 17), (0, 33), (40, 48), (300, 64), (0, 100)]
PAIRS_C = [(40, 17), (300, 33), (0, 48), (40, 64), (300, 100)]
CPU_CASES = [
    ("g4-a", 2, 4, 16, "NHD", PAIRS_A, VERIFY_SPLIT),
    ("g4-b", 2, 4, 16, "NHD", PAIRS_B, VERIFY_NO_SPLIT),
    ("g4-c", 1, 4, 8, "HND", PAIRS_C, VERIFY_SPLIT),
    ("g1-a", 2, 1, 16, "NHD", PAIRS_A, VERIFY_NO_SPLIT),
    ("g1-b", 2, 1, 32, "NHD", PAIRS_B, VERIFY_SPLIT),
    ("g1-c", 3, 1, 16, "HND", PAIRS_C, VERIFY_SPLIT),
    ("edges", 1, 4, 16, "NHD", [(15, 17), (30, 0), (16, 5), (47, 33)], VERIFY_SPLIT),
]


def make_case(kv_heads: int, group: int, block_size: int, layout: str, pairs: list[tuple[int, int]],
              head_dim: int = 64, seed: int = 0, device: str = "cpu") -> dict:
    """Random fp16 pools with each sequence's pages at shuffled blocks (spare table entries point at
    random blocks), and the packed query: {q [total_q, Hq, D], k, v, bt, sl, cu, max_q_len}.
    pairs: (prefix, new tokens) a sequence; seq_len = prefix + new."""
    g = torch.Generator().manual_seed(seed)
    lens = [p + n for p, n in pairs]
    nblk = [-(-n // block_size) for n in lens]
    total = sum(nblk) + 2
    shape = (total, block_size, kv_heads, head_dim) if layout == "NHD" else (total, kv_heads, block_size, head_dim)
    k = torch.randn(shape, generator=g).to(F16)
    v = torch.randn(shape, generator=g).to(F16)
    perm = torch.randperm(total, generator=g).int()
    bt = torch.randint(0, total, (len(lens), max(1, max(nblk))), generator=g, dtype=torch.int32)
    pos = 0
    for i, nb in enumerate(nblk):
        bt[i, :nb] = perm[pos:pos + nb]
        pos += nb
    q_lens = [n for _, n in pairs]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), kv_heads * group, head_dim, generator=g).to(F16)
    put = {"k": k, "v": v, "bt": bt, "sl": torch.tensor(lens, dtype=torch.int32), "cu": cu, "q": q}
    return {**{a: t.to(device) for a, t in put.items()}, "max_q_len": max(q_lens), "layout": layout}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (a non-finite a gives inf)."""
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_case(name: str, kv_heads: int, group: int, block_size: int, layout: str, pairs: list[tuple[int, int]],
               config: Config, hint: bool = True, device: str = "cpu") -> dict[str, float]:
    """extend_as_verify (NaN-poisoned out, q a strided view) on one case (CPU interpreter or `device`)
    against paged_extend_ref and paged_extend: {"ref": rel err, "extend": rel diff}. hint=False leaves
    max_q_len out (padding rows)."""
    x = make_case(kv_heads, group, block_size, layout, pairs, device=device)
    t, hq, d = x["q"].shape
    # q a strided view (rows of hq + 1 heads), last dim packed
    q = torch.empty(t, hq + 1, d, dtype=F16, device=device)[:, 1:]
    q.copy_(x["q"])
    out = torch.full_like(x["q"], float("nan"))
    extend_as_verify(q, x["k"], x["v"], x["bt"], x["cu"], x["sl"], layout=layout, out=out, config=config,
                     max_q_len=x["max_q_len"] if hint else None)
    ref = paged_extend_ref(*(x[a].cpu() for a in ("q", "k", "v", "bt", "cu", "sl")), layout=layout)
    ext = pagegen.paged_extend(x["q"], x["k"], x["v"], x["bt"], x["cu"], x["sl"], layout=layout, config=EXTEND_CFG,
                               max_q_len=x["max_q_len"])
    return {"ref": rel(out, ref), "extend": rel(out, ext)}


def cpu_main() -> int:
    """Run the check matrix in the interpreter; nonzero exit when a case misses TOL_F16."""
    bad = 0
    for case in CPU_CASES:
        for hint in (True, False) if case[0] == "edges" else (True,):
            errs = check_case(*case, hint=hint)
            ok = errs["ref"] < TOL_F16 and errs["extend"] < TOL_F16
            bad += not ok
            print(f"{case[0]:6} hint={hint!s:5} {case[5]}  vs ref {errs['ref']:.2e}  vs paged_extend "
                  f"{errs['extend']:.2e}  {'ok' if ok else 'FAILED'}", flush=True)
    return 1 if bad else 0


# ----------------------------------------------------------------- GPU timing

CASES = ["1x32768:17", "1x32768:32", "1x32768:64", "1x32768:128", "8x8192:32"]
SMOKE_CASES = ["1x80:17", "2x48:33"]  # bench/verify.py's --cpu-smoke form: fp16 on the CPU, numbers meaningless


def gpu_case(case: str, reps: int, copy: float | None) -> list[dict]:
    """decode1, extend, chunked (metadata + verify) and chunked-kernel (verify on prebuilt rows) on
    one SHAPE:Q_LEN case (bench/verify.py's pools), each checked against the float64 reference first
    (decode1 against chunked's last token of each sequence); one row each, failures reported."""
    from bench import verify as V
    from bench.common import timeit

    shape, ql = case.split(":")
    x = V.make_inputs(shape, int(ql))
    b, q_len = x["q"].shape[:2]
    q3 = x["q"].reshape(b * q_len, V.HQ, V.D)
    ref = V.reference(x)  # [len(idx), q_len, HQ, D] float64
    hints = dict(max_q_len=q_len, max_seq_len=max(x["lens"]))
    chunk = chunk_len(V.HQ // V.HK, V.D)
    chunks = build_chunks(x["cu"], x["sl"], x["bt"], total_q=b * q_len, chunk=chunk, max_q_len=q_len)
    out = torch.empty_like(q3)
    from pagegen.verify import VerifyPlan

    chunk_cfg = VerifyPlan(q3, x["k"], x["v"], chunks.block_tables, chunks.seq_lens, cu_seqlens_q=chunks.cu_seqlens_q,
                           max_q_len=chunk, max_seq_len=max(x["lens"])).config.to_dict()
    impls = {
        "decode1": (V.run_decode1(x), None),
        "extend": (V.run_extend(x), None),
        "chunked": (lambda: extend_as_verify(q3, x["k"], x["v"], x["bt"], x["cu"], x["sl"], out=out, **hints),
                    chunk_cfg),
        "chunked-kernel": (lambda: pagegen.paged_verify(q3, x["k"], x["v"], chunks.block_tables, chunks.seq_lens,
                                                        cu_seqlens_q=chunks.cu_seqlens_q, max_q_len=chunk, out=out,
                                                        max_seq_len=max(x["lens"])), chunk_cfg),
        # what a caller gets: paged_extend with no config takes the route where dispatch.extend_chunk_route says
        "paged_extend": (lambda: pagegen.paged_extend(q3, x["k"], x["v"], x["bt"], x["cu"], x["sl"], out=out, **hints),
                         None),
    }
    pred = predict_us(x["lens"], q_len, chunk)
    rows: list[dict] = []
    last: torch.Tensor | None = None
    for impl, (fn, cfg) in impls.items():
        row: dict = {"case": case, "impl": impl, "chunk_rows": int(chunks.seq_lens.shape[0])}
        if cfg:
            row["config"] = cfg
        try:
            res = fn()
            if impl == "decode1":
                row["rel_err"] = None  # checked after chunked, against its last tokens
            else:
                res = res.view(b, q_len, V.HQ, V.D)
                row["rel_err"] = V.rel(res[x["idx"]], ref)
                if impl == "chunked":
                    last = res[:, -1].clone()
                if not row["rel_err"] < V.TOL:
                    raise RuntimeError(f"wrong result: rel err {row['rel_err']:.2e}")
            t = timeit(lambda i, fn=fn: fn(), reps=reps)
            row.update(us=t.median_us, method=t.method, gbps=V.kv_bytes(x) / t.median_us / 1e3)
            if copy:
                row["pct_copy"] = 100 * row["gbps"] / copy
        except Exception as exc:  # a failing implementation is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    by = {r["impl"]: r for r in rows}
    if last is not None and "us" in by["decode1"]:
        by["decode1"]["rel_err"] = V.rel(V.run_decode1(x)(), last)
    for impl, key in (("chunked-kernel", "chunked"), ("extend", "extend"), ("decode1", "decode1")):
        by[impl]["predicted_us"] = pred[key]
    return rows


def table(cases: list[str], rows: list[dict]) -> list[str]:
    """One line a case: the four times, chunked / decode1, extend / chunked, measured / predicted, and
    paged_extend as a caller gets it (routed: chunked where dispatch.extend_chunk_route says so)."""
    head = (f"{'case':12} {'rows':>4} {'decode1':>8} {'extend':>8} {'chunked':>8} {'kernel':>8}  "
            f"{'kern/dec':>8} {'ext/chunk':>9} {'ext/kern':>8}  {'pred kern':>9} {'meas/pred':>9}  {'routed':>8}")
    lines = [head, "-" * len(head)]
    for case in cases:
        by = {r["impl"]: r for r in rows if r["case"] == case}
        us = {k: by.get(k, {}).get("us", float("nan"))
              for k in ("decode1", "extend", "chunked", "chunked-kernel", "paged_extend")}
        pred = by.get("chunked-kernel", {}).get("predicted_us", float("nan"))
        lines.append(f"{case:12} {by.get('chunked', {}).get('chunk_rows', 0):4d} {us['decode1']:8.1f} "
                     f"{us['extend']:8.1f} {us['chunked']:8.1f} {us['chunked-kernel']:8.1f}  "
                     f"{us['chunked-kernel'] / us['decode1']:8.2f} {us['extend'] / us['chunked']:9.2f} "
                     f"{us['extend'] / us['chunked-kernel']:8.2f}  {pred:9.1f} {us['chunked-kernel'] / pred:9.2f}  "
                     f"{us['paged_extend']:8.1f}")
        errors = [f"{k}: {r['error']}" for k, r in by.items() if "error" in r]
        lines += [f"  {e}" for e in errors]
    return lines


def gpu_main(args: argparse.Namespace) -> int:
    """Time every case on the live GPU; write the JSON (+ .log) and print the table."""
    from bench.common import meta_line, result_path, run_meta, tee_log, write_json

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("--gpu needs CUDA", file=sys.stderr)
        return 2
    cases = [c for c in (",".join(SMOKE_CASES) if args.cpu_smoke else args.cases).split(",") if c]
    path = result_path("extend_chunk_lab", tag="smoke" if args.cpu_smoke else "", out=args.out or None)
    with tee_log(path):
        meta = run_meta("extend_chunk_lab", workload="bf16 hd128 32q/8kv block16 NHD shuffled tables (bench/verify.py "
                                                     "pools, CTX includes the new tokens); cases " + ",".join(cases))
        print(meta_line(meta), flush=True)
        rows: list[dict] = []
        for case in cases:
            rows += gpu_case(case, args.reps, meta.get("copy_gbps"))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            for r in rows:
                if r["case"] == case:
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
            write_json(path, {"meta": meta, "rows": rows})
        lines = table(cases, rows)
        write_json(path, {"meta": meta, "rows": rows, "table": lines})
        print("\n" + meta_line(meta))
        print("\n".join(lines))
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="time on the GPU (default: the CPU check matrix)")
    ap.add_argument("--cpu-smoke", action="store_true", help="--gpu's code on tiny shapes in the interpreter "
                                                            "(bench/verify.py reads this flag too: fp16, CPU)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated SHAPE:Q_LEN (SHAPE = BxCTX)")
    ap.add_argument("--reps", type=int, default=50, help="timed runs per measurement")
    ap.add_argument("--out", default="", help="JSON path or folder (default bench/results/extend_chunk_lab-<gpu>-"
                                              "<date>.json)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.reps = 2
    return gpu_main(args) if args.gpu or args.cpu_smoke else cpu_main()


if __name__ == "__main__":
    raise SystemExit(main())
