"""Decode kernel benchmark on the reference workload (GPU only).

bf16, head_dim 128, 32 query heads / 8 KV heads (group 4), block_size 16, shuffled block tables,
one query token per sequence. Implementations:
  naive    torch SDPA on a contiguous KV slab padded to the longest sequence (plus its memory)
  flex     FlexAttention over torch's experimental paged-attention helper (compiled)
  default  pagegen with the heuristic config (no tuned table)
  tuned    pagegen through the dispatcher and the shipped tuned table for this GPU
  sweep    pagegen over a grid of configs; reports the best per shape (exploration, not tuning)
Each implementation is checked against the float64 reference (sampled sequences) before timing.
Timing: triton.testing.do_bench medians (L2 flushed before every run). Bytes = KV read + q + out.
Writes bench/results/<gpu>-<date>.json and prints a table.

    python bench/kernels.py [--shapes 1x2048,32x8192,mixed] [--impls naive,flex,default,tuned]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pagegen  # noqa: E402
from pagegen.reference import paged_decode_ref  # noqa: E402
from pagegen.spec import Config, KernelSpec, keep  # noqa: E402

SHAPES = ["1x2048", "1x32768", "8x4096", "32x2048", "32x8192", "128x1024", "128x4096", "256x2048", "mixed"]
HQ, HK, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16


def make_inputs(shape: str, seed: int = 0):
    """(q, k_cache, v_cache, block_tables, seq_lens, lens list) for one shape; pages shuffled."""
    g = torch.Generator().manual_seed(seed)
    if shape == "mixed":
        lens = torch.randint(64, 8193, (64,), generator=g).tolist()
    else:
        b, n = (int(x) for x in shape.split("x"))
        lens = [n] * b
    nblk = [-(-n // BS) for n in lens]
    width = max(nblk)
    total = sum(nblk)
    k = torch.randn(total, BS, HK, D, device="cuda", dtype=DTYPE)
    v = torch.randn(total, BS, HK, D, device="cuda", dtype=DTYPE)
    perm = torch.randperm(total, generator=g).int()
    bt = torch.zeros(len(lens), width, dtype=torch.int32)
    pos = 0
    for i, nb in enumerate(nblk):
        bt[i, :nb] = perm[pos : pos + nb]
        pos += nb
    q = torch.randn(len(lens), HQ, D, device="cuda", dtype=DTYPE)
    return q, k, v, bt.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda"), lens


def bytes_moved(lens: list[int]) -> int:
    kv = sum(lens) * HK * D * 2 * 2  # K and V, bf16
    return kv + 2 * len(lens) * HQ * D * 2  # + q + out


def check(out: torch.Tensor, inputs, n_check: int = 4) -> float:
    """Relative error vs the float64 reference on a sample of sequences."""
    q, k, v, bt, sl, lens = inputs
    idx = torch.linspace(0, len(lens) - 1, min(n_check, len(lens))).long().unique()
    ref = paged_decode_ref(q[idx], k, v, bt[idx], sl[idx])
    o = out[idx].double()
    return float((o - ref).norm() / ref.norm())


def copy_bandwidth() -> float:
    """GB/s of a 4 GiB device-to-device copy (bytes read + written)."""
    n = 4 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * n / ms / 1e6


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def bench(fn) -> float:
    """Median microseconds of fn() with the L2 flushed before every run (launch cost included
    whenever the host is slower than the kernel)."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def graph_us(fns: list) -> float:
    """Median microseconds per call of CUDA-graph replay of fns (one per rotated input copy, so the
    copies together overflow the L2 and each call reads from HBM): the GPU time of the whole step
    without host launch overhead."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return sorted(times)[len(times) // 2]


def rotation(shape: str, inputs, budget: int = 256 << 20) -> list:
    """Input sets for graph timing: enough copies of a small shape to overflow the L2."""
    kv = bytes_moved(inputs[5])
    copies = min(32, max(1, -(-budget // kv)))
    return [inputs] + [make_inputs(shape, seed=i) for i in range(1, copies)]


# ----------------------------------------------------------------- implementations


def run_naive(inputs):
    """SDPA over a contiguous slab padded to the longest sequence (what a non-paged server does)."""
    q, k, v, bt, sl, lens = inputs
    b, lmax = len(lens), max(lens)
    # build the slab once (not timed): [B, Hkv, Lmax, D]
    kc = torch.zeros(b, HK, lmax, D, device="cuda", dtype=DTYPE)
    vc = torch.zeros_like(kc)
    for i, n in enumerate(lens):
        nb = -(-n // BS)
        blocks = bt[i, :nb].long()
        kc[i, :, :n] = k[blocks].reshape(-1, HK, D)[:n].transpose(0, 1)
        vc[i, :, :n] = v[blocks].reshape(-1, HK, D)[:n].transpose(0, 1)
    q4 = q[:, :, None, :]
    mask = None
    if min(lens) != lmax:
        mask = (torch.arange(lmax, device="cuda")[None, :] < sl[:, None])[:, None, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fn():
        return sdpa(q4, kc, vc, attn_mask=mask, enable_gqa=True)[:, :, 0]

    return fn, {"slab_bytes": 2 * kc.numel() * kc.element_size()}


def run_flex(inputs):
    """FlexAttention decode over torch's experimental PagedAttention page table (compiled)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v, bt, sl, lens = inputs
    b, lmax = len(lens), max(lens)
    n_pages = k.shape[0]
    pa = PagedAttention(n_pages, BS, b, device="cuda")
    # flex's pool: [1, Hkv, n_pages * page, D]; same physical pages as ours
    kf = k.permute(2, 0, 1, 3).reshape(1, HK, n_pages * BS, D).contiguous()
    vf = v.permute(2, 0, 1, 3).reshape(1, HK, n_pages * BS, D).contiguous()
    width = bt.shape[1]
    pa.page_table[:, :width] = bt.long()
    pa.capacity[:] = width * BS
    pa.physical_to_logical[:] = -1
    for i, n in enumerate(lens):
        nb = -(-n // BS)
        pa.physical_to_logical[i, bt[i, :nb].long()] = torch.arange(nb, device="cuda")
    seq_lens = sl

    def mask_mod(bi, h, qi, kv):
        return kv < seq_lens[bi]

    lmax_pad = -(-lmax // 128) * 128
    logical = create_block_mask(mask_mod, b, None, 1, lmax_pad, device="cuda", BLOCK_SIZE=(128, BS))
    physical = pa.convert_logical_block_mask(logical)
    compiled = torch.compile(flex_attention)
    q4 = q[:, :, None, :]
    errors = []
    # flex needs its KV tile to divide the page (16 tokens): try the option spellings torch accepts
    for opts in ({}, {"BLOCK_N": BS}, {"FWD_BLOCK_N": BS}, {"BLOCK_N": BS, "BLOCK_M": 16}):
        def fn(opts=opts):
            return compiled(q4, kf, vf, block_mask=physical, enable_gqa=True, kernel_options=opts)[:, :, 0]

        try:
            fn()
            return fn, {"kernel_options": opts}
        except Exception as exc:  # try the next spelling
            errors.append(f"{opts}: {type(exc).__name__}: {str(exc)[:120]}")
            torch._dynamo.reset()
    raise RuntimeError(" | ".join(errors))


def run_pagegen(inputs, config: Config | None):
    q, k, v, bt, sl, lens = inputs
    out = torch.empty_like(q)

    max_len, sum_len = max(lens), sum(lens)  # host-side length hints, as a serving engine has them

    def fn():
        return pagegen.paged_decode(q, k, v, bt, sl, out=out, config=config, max_seq_len=max_len,
                                    sum_seq_lens=sum_len)

    if config is not None:
        return fn, {"config": config.to_dict()}
    # through the dispatcher: say which bucket (or the heuristic) chose the config
    from pagegen.dispatch import explain, is_ragged

    cfg, source = explain(SPEC, len(lens), max_len, HK, is_ragged(len(lens), max_len, sum_len))
    return fn, {"config": cfg.to_dict(), "source": source}


def heuristic(inputs) -> Config | None:
    """The dispatcher's no-table fallback for these shapes (None: let paged_decode choose)."""
    from pagegen.dispatch import heuristic_config, is_ragged
    from pagegen.gpu import sm_count

    lens = inputs[5]
    ragged = is_ragged(len(lens), max(lens), sum(lens))
    return heuristic_config(SPEC, len(lens), max(lens), HK, sm_count(), ragged)


BUILDERS = {
    "naive": lambda inp, cfg: run_naive(inp),
    "flex": lambda inp, cfg: run_flex(inp),
    "default": lambda inp, cfg: run_pagegen(inp, heuristic(inp)),
    "tuned": lambda inp, cfg: run_pagegen(inp, None),
    "sweep": lambda inp, cfg: run_pagegen(inp, cfg),
}
SPEC = KernelSpec("decode", head_dim=D, block_size=BS, dtype="bf16", group_size=HQ // HK)

SWEEP = [
    Config(block_n=bn, num_warps=w, num_stages=s, split_size=sp)
    for bn in (32, 64, 128)
    for w in (4, 8)
    for s in (2, 3)
    for sp in (0, 512, 1024, 2048)
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--impls", default="naive,flex,default,tuned")
    ap.add_argument("--out", default="")
    ap.add_argument("--graphs", action="store_true", help="also time CUDA-graph replay over rotated inputs")
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    impls = args.impls.split(",")
    props = torch.cuda.get_device_properties(0)
    meta = {
        "gpu": torch.cuda.get_device_name(0), "sm_count": props.multi_processor_count,
        "date": dt.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
        "pagegen": pagegen.__version__, "workload": f"bf16 hd{D} {HQ}q/{HK}kv block{BS} shuffled tables",
    }
    meta["copy_gbps"] = copy_bandwidth()
    torch.cuda.empty_cache()
    print(f"{meta['gpu']}: copy bandwidth {meta['copy_gbps']:.0f} GB/s", flush=True)
    rows = []
    spec = KernelSpec("decode", head_dim=D, block_size=BS, dtype="bf16", group_size=HQ // HK)
    for shape in shapes:
        inputs = make_inputs(shape)
        nbytes = bytes_moved(inputs[5])
        for impl in impls:
            row = {"shape": shape, "impl": impl, "bytes": nbytes}
            try:
                if impl == "naive":
                    fn, extra = run_naive(inputs)
                elif impl == "flex":
                    fn, extra = run_flex(inputs)
                elif impl == "default":
                    fn, extra = run_pagegen(inputs, heuristic(inputs))
                elif impl == "tuned":
                    fn, extra = run_pagegen(inputs, None)
                elif impl == "sweep":
                    best = None
                    for cfg in SWEEP:
                        if keep(spec, cfg):
                            continue
                        f, _ = run_pagegen(inputs, cfg)
                        err = check(f(), inputs, 2)
                        if not err < 2e-2:
                            continue
                        us = bench(f)
                        if best is None or us < best[0]:
                            best = (us, cfg)
                    fn, extra = run_pagegen(inputs, best[1])
                    row["config"] = best[1].to_dict()
                else:
                    raise ValueError(f"unknown impl {impl}")
                row.update(extra)
                out = fn()
                row["rel_err"] = check(out, inputs)
                if not row["rel_err"] < 2e-2:
                    raise RuntimeError(f"wrong result: rel err {row['rel_err']:.3e}")
                us = bench(fn)
                row.update(us=us, gbps=nbytes / us / 1e3, pct_copy=100 * nbytes / us / 1e3 / meta["copy_gbps"])
                if args.graphs:
                    try:
                        sets = rotation(shape, inputs) if impl != "flex" else [inputs]
                        build = BUILDERS[impl]
                        cfg = Config(**row["config"]) if "config" in row else None
                        fns = [fn] + [build(s, cfg)[0] for s in sets[1:]]
                        gus = graph_us(fns)
                        row.update(graph_us=gus, graph_pct_copy=100 * nbytes / gus / 1e3 / meta["copy_gbps"],
                                   graph_copies=len(fns))
                    except Exception as exc:
                        row["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
            except Exception as exc:  # a failing baseline is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del inputs
        torch.cuda.empty_cache()
    key = meta["gpu"].split()[1].lower() if len(meta["gpu"].split()) > 1 else "gpu"
    path = Path(args.out or ROOT / "bench" / "results" / f"decode-{key}-{meta['date']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n{meta['gpu']}  {meta['date']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"copy {meta['copy_gbps']:.0f} GB/s")
    print(f"{'shape':<10}{'impl':<9}{'us':>9}{'GB/s':>8}{'%copy':>7}{'graph us':>10}{'%copy':>7}  note")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<10}{r['impl']:<9}{'-':>9}{'-':>8}{'-':>7}  {r['error'][:70]}")
        else:
            note = json.dumps(r.get("config", "")) if "config" in r else ""
            g = f"{r['graph_us']:>10.1f}{r['graph_pct_copy']:>7.1f}" if "graph_us" in r else f"{'-':>10}{'-':>7}"
            print(f"{r['shape']:<10}{r['impl']:<9}{r['us']:>9.1f}{r['gbps']:>8.0f}{r['pct_copy']:>7.1f}{g}  {note}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
