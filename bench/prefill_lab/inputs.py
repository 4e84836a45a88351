"""The prefill lab's inputs and checks (run.py times them): shapes, deterministic inputs, paged pools,
float64 references and the error check. --dry-run (in sys.argv, as run.py reads it) selects the CPU
interpreter's fp16 and small head counts.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from common import GROUP, HEAD_DIM

DRY = "--dry-run" in sys.argv

SHAPES = ["2048@0", "4608@0", "2048@4096", "2048@16384", "512@8192", "512@32768"]
# tiny shapes for the interpreter; '+' joins sequences into one batch (ragged q and prefix lengths)
DRY_SHAPES = ["40@0", "40@300", "24@0+9@50+17@3"]
HQ = 32
TOL = 2e-2  # rel err (L2) of a bf16/fp16 result against SDPA and the float64 reference
REF_ROWS = 64


def device() -> str:
    return "cpu" if DRY else "cuda"


def dtype() -> torch.dtype:
    return torch.float16 if DRY else torch.bfloat16


def heads() -> tuple[int, int]:
    """(query heads, KV heads): 32 / 8 on the GPU, 8 / 2 in the dry run."""
    hq = 8 if DRY else HQ
    return hq, hq // GROUP


def parse_shape(shape: str) -> list[tuple[int, int]]:
    """'Q@C[+Q@C...]' -> [(q_len, ctx), ...], one pair a sequence."""
    return [(int(a), int(b)) for a, b in (part.split("@") for part in shape.split("+"))]


def causal_flops(seqs: list[tuple[int, int]]) -> float:
    """FLOPs of the unmasked (query, key) pairs: 4 * pairs * D * Hq (QK^T and PV)."""
    hq, _ = heads()
    return sum(4.0 * (q * c + q * (q + 1) / 2) * HEAD_DIM * hq for q, c in seqs)


# ----------------------------------------------------------------------------- inputs


def make_inputs(shape: str, seed: int = 0) -> dict[str, Any]:
    """Deterministic inputs (the same in every process): q [total_q, Hq, D], contiguous K/V of each
    sequence ([n, Hk, D]), lengths; pools are built per page size by pool()."""
    seqs = parse_shape(shape)
    hq, hk = heads()
    g = torch.Generator(device=device()).manual_seed(seed)
    total_q = sum(q for q, _ in seqs)
    q = torch.randn(total_q, hq, HEAD_DIM, device=device(), dtype=dtype(), generator=g)
    ks = [torch.randn(q_ + c, hk, HEAD_DIM, device=device(), dtype=dtype(), generator=g) for q_, c in seqs]
    vs = [torch.randn(q_ + c, hk, HEAD_DIM, device=device(), dtype=dtype(), generator=g) for q_, c in seqs]
    cu = [0]
    for q_, _ in seqs:
        cu.append(cu[-1] + q_)
    return {"shape": shape, "seqs": seqs, "q": q, "ks": ks, "vs": vs,
            "cu": torch.tensor(cu, dtype=torch.int32, device=device()),
            "sl": torch.tensor([q_ + c for q_, c in seqs], dtype=torch.int32, device=device()),
            "max_q": max(q_ for q_, _ in seqs), "flops": causal_flops(seqs), "pools": {}}


def pool(x: dict[str, Any], page: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache, block_tables) of x's sequences in NHD pools of `page` tokens, at shuffled
    physical pages, 4 spare pages; unwritten slots are NaN (a kernel that reads them shows it)."""
    if page in x["pools"]:
        return x["pools"][page]
    _, hk = heads()
    nbs = [-(-k.shape[0] // page) for k in x["ks"]]
    n_pages = sum(nbs) + 4
    g = torch.Generator().manual_seed(page)
    perm = torch.randperm(n_pages, generator=g).to(device())
    kc = torch.full((n_pages, page, hk, HEAD_DIM), float("nan"), device=device(), dtype=dtype())
    vc = torch.full_like(kc, float("nan"))
    bt = torch.zeros(len(nbs), max(nbs), dtype=torch.int32, device=device())
    used = 0
    for i, (k, v, nb) in enumerate(zip(x["ks"], x["vs"], nbs, strict=True)):
        phys = perm[used:used + nb]
        used += nb
        bt[i, :nb] = phys.int()
        n = k.shape[0]
        kp = torch.full((nb * page, hk, HEAD_DIM), float("nan"), device=device(), dtype=dtype())
        vp = torch.full_like(kp, float("nan"))
        kp[:n], vp[:n] = k, v
        kc[phys] = kp.view(nb, page, hk, HEAD_DIM)
        vc[phys] = vp.view(nb, page, hk, HEAD_DIM)
    x["pools"][page] = (kc, vc, bt)
    return kc, vc, bt


def references(x: dict[str, Any]) -> dict[str, torch.Tensor]:
    """float64 reference of the first and last REF_ROWS query tokens of every sequence."""
    from pagegen.reference import paged_extend_ref

    kc, vc, bt = pool(x, 16)
    refs = {}
    cu = x["cu"].tolist()
    for i, (q_len, ctx) in enumerate(x["seqs"]):
        r = min(REF_ROWS, q_len)
        lo = cu[i]
        one = torch.tensor([0, r], dtype=torch.int32)
        # first r rows: the sequence as if it ended after them; last r rows: the whole sequence
        refs[f"{i}:head"] = paged_extend_ref(x["q"][lo:lo + r], kc, vc, bt[i:i + 1], one,
                                             torch.tensor([ctx + r], dtype=torch.int32))
        refs[f"{i}:tail"] = paged_extend_ref(x["q"][cu[i + 1] - r:cu[i + 1]], kc, vc, bt[i:i + 1], one,
                                             x["sl"][i:i + 1].cpu())
    return refs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).norm() / b.norm())


def check(out: torch.Tensor, x: dict[str, Any], base: torch.Tensor | None, refs: dict[str, torch.Tensor]) -> dict:
    """rel errs of `out` against SDPA's default output (all rows) and the float64 reference rows."""
    cu = x["cu"].tolist()
    errs = []
    for i, (q_len, _) in enumerate(x["seqs"]):
        r = min(REF_ROWS, q_len)
        errs.append(rel(out[cu[i]:cu[i] + r], refs[f"{i}:head"]))
        errs.append(rel(out[cu[i + 1] - r:cu[i + 1]], refs[f"{i}:tail"]))
    res = {"err_ref": max(errs)}
    if base is not None:
        res["err_sdpa"] = rel(out, base)
    return res
