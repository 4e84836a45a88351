"""kv_write and copy_blocks on the GPU: latency and effective bandwidth against plain torch.

    python bench/kv_ops.py [--out PATH.json or FOLDER]   # on a CUDA machine
    TRITON_INTERPRET=1 python bench/kv_ops.py --smoke   # tiny shapes on the CPU, times meaningless
Writes bench/results/kv_ops-<gpu>-<date>.json and a .log beside it.

Bytes moved: kv_write reads T x Hkv x D elements of K and of V and writes as many (x2 for
read + write); copy_blocks reads and writes P blocks of block_size x Hkv x D elements of K and V.
Effective GB/s = bytes / median time (CUDA-graph replay, L2 flushed between runs); the ceiling is
the measured device-to-device copy bandwidth (pagegen.timing.copy_bandwidth).
Baselines: kv_write vs torch index_copy_ (NHD) / index_put (HND) of the same rows; copy_blocks vs
index_select + index_copy_.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import meta_line, result_path, run_meta, tee_log, timeit, write_json  # noqa: E402
from pagegen import copy_blocks, kv_write  # noqa: E402


def pools(nb: int, bs: int, hk: int, d: int, layout: str, dtype: torch.dtype, dev: str):
    shape = (nb, bs, hk, d) if layout == "NHD" else (nb, hk, bs, d)
    return torch.randn(shape, dtype=dtype, device=dev), torch.randn(shape, dtype=dtype, device=dev)


def timed(fn, n_inputs: int, dev: str):
    """CUDA-graph replay, or plain events if the op cannot be captured (Timing.method says which)."""
    return timeit(fn, n_inputs=n_inputs, graph=dev == "cuda")


def run_kv_write(t: int, layout: str, nb: int, bs: int, hk: int, d: int, dtype, dev: str, n_inputs: int) -> dict:
    k, v = pools(nb, bs, hk, d, layout, dtype, dev)
    sets = []
    for _ in range(n_inputs):
        slots = torch.randperm(nb * bs, device=dev)[:t]
        sets.append((torch.randn(t, hk, d, dtype=dtype, device=dev), torch.randn(t, hk, d, dtype=dtype, device=dev),
                     slots, slots // bs, slots % bs))

    def ours(i):
        kn, vn, s, _, _ = sets[i]
        kv_write(kn, vn, k, v, s, layout=layout)

    def torch_ref(i):
        kn, vn, s, blk, off = sets[i]
        if layout == "NHD":
            k.view(-1, hk, d).index_copy_(0, s, kn)
            v.view(-1, hk, d).index_copy_(0, s, vn)
        else:
            k[blk, :, off] = kn
            v[blk, :, off] = vn

    nbytes = 2 * 2 * t * hk * d * k.element_size()
    a = timed(ours, n_inputs, dev)
    b = timed(torch_ref, n_inputs, dev)
    return {"op": "kv_write", "layout": layout, "tokens": t, "bytes": nbytes,
            "pagegen_us": a.median_us, "torch_us": b.median_us, "pagegen_gbps": nbytes / a.median_us / 1e3,
            "torch_gbps": nbytes / b.median_us / 1e3, "meaningful": a.meaningful,
            "pagegen_method": a.method, "torch_method": b.method}


def run_copy_blocks(p: int, layout: str, nb: int, bs: int, hk: int, d: int, dtype, dev: str, n_inputs: int) -> dict:
    k, v = pools(nb, bs, hk, d, layout, dtype, dev)
    sets = []
    for _ in range(n_inputs):
        perm = torch.randperm(nb, device=dev)
        sets.append(torch.stack([perm[:p], perm[p: 2 * p]], 1).to(torch.int32).contiguous())

    def ours(i):
        copy_blocks(k, v, sets[i], layout=layout)

    def torch_ref(i):
        src, dst = sets[i][:, 0].long(), sets[i][:, 1].long()
        k.index_copy_(0, dst, k.index_select(0, src))
        v.index_copy_(0, dst, v.index_select(0, src))

    nbytes = 2 * 2 * p * bs * hk * d * k.element_size()
    a = timed(ours, n_inputs, dev)
    b = timed(torch_ref, n_inputs, dev)
    return {"op": "copy_blocks", "layout": layout, "pairs": p, "bytes": nbytes,
            "pagegen_us": a.median_us, "torch_us": b.median_us, "pagegen_gbps": nbytes / a.median_us / 1e3,
            "torch_gbps": nbytes / b.median_us / 1e3, "meaningful": a.meaningful,
            "pagegen_method": a.method, "torch_method": b.method}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    ap.add_argument("--out", default="", help="JSON path or folder (default bench/results/kv_ops-<gpu>-<date>.json)")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype, bs, hk, d = torch.bfloat16, 16, 8, 128
    if args.smoke:
        nb, tokens, pairs, n_inputs = 64, (16,), (4,), 1
    else:
        nb, tokens, pairs, n_inputs = 65536, (256, 1024, 8192, 32768), (64, 1024), 4
    path = result_path("kv_ops", out=args.out)
    with tee_log(path):
        meta = run_meta("kv_ops", workload=f"bf16, block_size {bs}, {hk} KV heads, head_dim {d}", matmul=True)
        print(meta_line(meta), flush=True)
        rows = []
        for layout in ("NHD", "HND"):
            rows += [run_kv_write(t, layout, nb, bs, hk, d, dtype, dev, n_inputs) for t in tokens]
            rows += [run_copy_blocks(p, layout, nb, bs, hk, d, dtype, dev, n_inputs) for p in pairs]
        ceiling = meta["copy_gbps"]
        print(f"{'op':<12}{'layout':<7}{'size':>8}{'pagegen us':>12}{'GB/s':>8}{'%ceil':>7}{'torch us':>11}"
              f"{'GB/s':>8}")
        for r in rows:
            size = r.get("tokens", r.get("pairs"))
            pct = f"{100 * r['pagegen_gbps'] / ceiling:.0f}" if ceiling else "-"
            print(f"{r['op']:<12}{r['layout']:<7}{size:>8}{r['pagegen_us']:>12.1f}{r['pagegen_gbps']:>8.0f}{pct:>7}"
                  f"{r['torch_us']:>11.1f}{r['torch_gbps']:>8.0f}")
        write_json(path, {"meta": meta, "rows": rows})
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
