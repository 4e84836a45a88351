"""bench/fp8_lab: the V-transposed fp8 decode variant computes what today's kernel computes.

Both lab kernels (the frozen render of decode_bf16_kvfp8e4m3_hd128_bs16_nhd_g4 and v_transposed.py) run on a
tiny ragged batch (page edges, a partial last tile, split on and off) against the float64 reference, with every
slot no sequence owns holding a NaN code. Under the interpreter a NaN code reads as 480 (bench/NOTES.md), so the
tail zeroing is only truly exercised on the GPU (PAGEGEN_TEST_DEVICE=cuda, or `lab.py --gpu`'s ragged check).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fp8_lab import lab  # noqa: E402


def test_transpose_v_pool_moves_tokens_innermost():
    v = torch.randn(3, lab.PAGE, 2, lab.HEAD_DIM).to(lab.FP8)
    vt = lab.transpose_v_pool(v)
    assert vt.shape == (3, 2, lab.HEAD_DIM, lab.PAGE) and vt.is_contiguous()
    # element (block 2, slot 5, head 1, dim 77) lands at [2, 1, 77, 5]
    assert vt.view(torch.uint8)[2, 1, 77, 5] == v.view(torch.uint8)[2, 5, 1, 77]
    assert torch.equal(vt.view(torch.uint8).permute(0, 3, 1, 2), v.view(torch.uint8))
    with pytest.raises(ValueError, match="NHD pool"):
        lab.transpose_v_pool(vt)


@pytest.mark.parametrize("cfg", [lab.Config(32, 1, 5, 0), lab.Config(16, 1, 4, 32)], ids=lambda c: c.label())
def test_vt_matches_reference_and_base(cfg, device):
    lens = [1, 17, 45]  # one token, a page edge + 1, a partial last tile (45 = 32 + 13)
    per_head = cfg.split_size > 0
    x = lab.make_case(lens, 2, device, seed=zlib.crc32(cfg.label().encode()), per_head=per_head)
    x["q"] = torch.randn(len(lens), 2 * 2 * lab.GROUP, lab.HEAD_DIM, device=device).to(torch.bfloat16)[:, ::2]
    ref = lab.reference(x)
    base, vt = lab.run_variant("base", x, cfg), lab.run_variant("vt", x, cfg)
    err_base, err_vt = lab.rel(base, ref), lab.rel(vt, ref)
    assert err_base < lab.TOL and err_vt < lab.TOL, (err_base, err_vt)
    # the same fp16 operands in the same order: vt and base agree far below the kernels' own error
    assert lab.rel(vt, base.double()) < 1e-3


def test_vt_refuses_an_untransposed_v_pool(device):
    x = lab.make_case([5], 1, device, seed=1)
    out = torch.empty_like(x["q"])
    with pytest.raises(ValueError, match="transpos|vt"):
        lab.Launch("vt", lab.Config(32, 1, 5), x["q"], x["k"], x["v"], x["bt"], x["sl"], out, x["k_scale"],
                   x["v_scale"], ctx_bound=5)


def test_vt_compiles_without_byte_loads():
    """The lab's claim on the compiled code (sm_90 through Triton's bundled ptxas, no GPU; in a subprocess,
    since Triton imported under the interpreter cannot compile): at the tuned config the base gathers V^T one
    byte at a time (128 LDS.U8 a tile, V in 8-byte copies), the variant has no byte load, 16-byte copies only,
    and fewer instructions a tile."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(root / "bench" / "fp8_lab" / "lab.py"), "--inspect", "--config",
                        "32/1/5/4096", "--json", "/dev/stdout"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    base, vt = json.loads(r.stdout)
    assert (base["variant"], vt["variant"]) == ("base", "vt")
    assert base["sass_loop"]["LDS.U8"] == 128 and base["ptx_loop"]["cp.async 8B"] == 16, base
    assert vt["sass_loop"]["LDS.U8"] == 0 and vt["ptx_loop"]["cp.async 8B"] == 0, vt
    assert vt["ptx_loop"]["cp.async 16B"] == 16 and vt["spill_bytes"] == 0, vt  # 8 for K, 8 for V^T
    assert vt["sass_loop"]["instructions"] < 0.8 * base["sass_loop"]["instructions"], (vt, base)
    assert vt["ptx_loop"]["cvt fp8->f16x2"] == base["ptx_loop"]["cvt fp8->f16x2"] == 128  # the same conversions
