"""Check an extend tile on the cases of the test suite, whether or not the config space admits it.

This runs a tile on every case of tests/test_extend.py::test_every_axis_value at the head dims given
(the test's own layout, dtype, group and ragged batch: `every_axis_case`), through `launch_extend`
(which takes the config as given, without the legality check), NaN-poisoned out, against the float64
reference; one line a case (and whether the config space admits the tile there), exit 1 on any miss.
A pass everywhere is the evidence for admitting a tile; it admitted the 128-row tile at head_dim 256
(128 / 32 / 8 warps / 5 stages) in session 6 (bench/NOTES.md, "extend at head_dim 256: 128-row tiles").

    python bench/extend_tile_check.py --tile 128,32,8,5 [--head-dims 192,256]      # on the GPU
    python bench/extend_tile_check.py --cpu ...                                     # interpreter (slow)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "conftest" not in sys.modules:  # run as a script: tests/conftest.py picks the device from this variable
    # (and turns the interpreter on for "cpu") when it is imported below, before triton is
    os.environ["PAGEGEN_TEST_DEVICE"] = "cpu" if "--cpu" in sys.argv else "cuda"

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from conftest import TOL, make_paged_kv, rel_err  # noqa: E402
from test_extend import PAIRS, cu_seqlens, every_axis_case  # noqa: E402

from pagegen._checks import check_scale  # noqa: E402
from pagegen.extend import extend_spec, launch_extend  # noqa: E402
from pagegen.reference import paged_extend_ref  # noqa: E402
from pagegen.spec import Config, KernelSpec, illegal_reason  # noqa: E402


def check(case: dict, tile: Config, device: str) -> tuple[KernelSpec, float]:
    """(spec, relative error against the float64 reference) of `tile` on one every_axis case."""
    g = torch.Generator().manual_seed(case["seed"])
    seq_lens = [c + n for c, n in zip(case["ctx_lens"], case["q_lens"], strict=True)]
    k, v, bt, lens = make_paged_kv(seq_lens, case["kv_heads"], case["head_dim"], case["block_size"], case["layout"],
                                   case["dtype"], device, generator=g)
    q = torch.randn(sum(case["q_lens"]), case["kv_heads"] * case["group"], case["head_dim"], generator=g)
    q = q.to(case["dtype"]).to(device)
    cu = cu_seqlens(case["q_lens"], device)
    spec = extend_spec(q, k, v, bt, cu, lens, case["layout"])
    out = torch.full_like(q, float("nan"))
    launch_extend(spec, tile, q, k, v, bt, cu, lens, out, check_scale(None, q.shape[2]), max(case["q_lens"]))
    ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), lens.cpu(), layout=case["layout"])
    return spec, rel_err(out, ref)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", default="128,32,8,5", help="block_m,block_n,num_warps,num_stages")
    ap.add_argument("--head-dims", default="192,256")
    ap.add_argument("--cpu", action="store_true", help="run in Triton's interpreter instead of on the GPU")
    args = ap.parse_args(argv)
    m, n, w, s = (int(x) for x in args.tile.split(","))
    tile = Config(block_m=m, block_n=n, num_warps=w, num_stages=s)
    dims = {int(x) for x in args.head_dims.split(",")}
    device = "cpu" if args.cpu else "cuda"
    bad = 0
    for block_size, head_dim in PAIRS:
        if head_dim not in dims:
            continue
        case = every_axis_case(block_size, head_dim)
        try:
            spec, err = check(case, tile, device)
            ok = err < TOL[case["dtype"]]
            why = illegal_reason(spec, tile) or "legal"
            verdict = "ok" if ok else "WRONG"
            print(f"{spec.variant_key():34} err {err:.2e}  {verdict}  (config space: {why})", flush=True)
        except Exception as exc:  # a compile or launch failure is a result too
            ok = False
            print(f"bs{block_size} hd{head_dim}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        bad += not ok
    print(f"tile {args.tile}: {bad} case(s) failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
