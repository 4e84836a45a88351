"""bench/verify.py's inputs and baselines on the CPU: the paged pool holds exactly the slab's tokens,
and each SDPA spelling of a verify step (lower-right causal bias, explicit mask, the mixed batch's
padded per-sequence mask, K/V heads repeated) equals the float64 reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import verify as V  # noqa: E402
from pagegen.reference import gather_kv  # noqa: E402


@pytest.mark.parametrize("shape,q_len", [("2x40", 3), ("1x17", 1), ("mixed", 4)])
def test_bench_verify_inputs_and_sdpa_forms(monkeypatch, shape, q_len):
    monkeypatch.setattr(V, "MIXED", (3, 20, 50))
    x = V.make_inputs(shape, q_len)
    for i, n in enumerate(x["lens"]):  # the pool holds the slab's tokens, through the block table
        assert torch.equal(gather_kv(x["k"], x["bt"][i], n, "NHD").permute(1, 0, 2), x["slab_k"][i, :, :n])
        assert torch.equal(gather_kv(x["v"], x["bt"][i], n, "NHD").permute(1, 0, 2), x["slab_v"][i, :, :n])
    ref = V.reference(x)
    forms, fallbacks = V.sdpa_forms(x)
    expected = {"plain"} if q_len == 1 else {"mask"} if shape == "mixed" else {"bias", "mask"}
    assert set(forms) == expected and set(fallbacks) == {f"{f}-repeat-kv" for f in expected}
    for name, fn in {**forms, **fallbacks}.items():
        err = V.rel(fn().float()[x["idx"]], ref)
        assert err < V.TOL, (name, err)
