"""Bad op input, as a careless or hostile caller passes it (issue 14 items 2, 3, 4, 8): strided
metadata views, an understated max_seq_len, a non-finite scale, plans run on tensors they were not
built for, a plan's output for a strided q. Each case here failed on the main branch of 2026-12-01:
a wrong result, a crash, or an error where the input is legal."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TOL, make_paged_kv, rel_err

import pagegen
from pagegen._checks import IllegalConfigError, interpreter_problem
from pagegen.reference import paged_decode_ref, paged_extend_ref
from pagegen.spec import Config

F16 = torch.float16


def _strided(values: list[int], device: str) -> torch.Tensor:
    """`values` as an int32 view with stride 2 (every other entry of a buffer holding junk between)."""
    buf = torch.tensor([x for v in values for x in (v, 1)], dtype=torch.int32)
    return buf.to(device)[::2]


def _decode_case(device: str, lens: list[int], group: int = 2, kv_heads: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k, v, bt, sl = make_paged_kv(lens, kv_heads, 64, 16, "NHD", F16, device, generator=g)
    q = torch.randn(len(lens), kv_heads * group, 64, generator=g).half().to(device)
    return q, k, v, bt, sl


# ---------------------------------------------------------------- strided metadata


@pytest.mark.parametrize("validate", [False, True])
def test_decode_reads_strided_seq_lens_and_tables_right(device: str, validate: bool) -> None:
    """seq_lens = x[::2] (issue 14's reproduction: relative error 2 on main) and a block table whose
    last dim is strided (refused on main) give the reference result."""
    q, k, v, bt, _ = _decode_case(device, [40, 64, 17])
    lens = _strided([40, 64, 17], device)
    assert lens.stride(0) == 2
    tables = torch.stack([bt, torch.full_like(bt, -7)], dim=-1)[..., 0]  # a column of a wider tensor
    assert tables.stride(1) == 2
    out = torch.full_like(q, float("nan"))
    pagegen.paged_decode(q, k, v, tables, lens, out=out, validate=validate, config=Config(block_n=16, split_size=0))
    ref = paged_decode_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), lens.cpu())
    assert rel_err(out, ref) < TOL[F16]


def test_extend_reads_strided_seq_lens_and_offsets_right(device: str) -> None:
    """seq_lens = x[::2] (relative error 2 on main) and cu_seqlens_q = x[::2] give the reference result."""
    g = torch.Generator().manual_seed(1)
    k, v, bt, _ = make_paged_kv([40, 64, 17], 2, 64, 16, "NHD", F16, device, generator=g)
    q = torch.randn(10, 4, 64, generator=g).half().to(device)
    lens = _strided([40, 64, 17], device)
    cu = _strided([0, 3, 8, 10], device)
    out = torch.full_like(q, float("nan"))
    pagegen.paged_extend(q, k, v, bt, cu, lens, out=out, validate=True)
    ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu().contiguous(), lens.cpu())
    assert rel_err(out, ref) < TOL[F16]


@pytest.mark.skipif(interpreter_problem() is not None, reason="the child runs the kernel in the interpreter")
def test_strided_cu_seqlens_do_not_corrupt_memory() -> None:
    """Issue 14's reproduction `[0,99,3,99,8,99,10,99][::2]` passed validation on main and then
    aborted the process (the kernel read 99 as an offset): run in a child so a crash is a failure
    of this test, not of the session."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, %r)
        from conftest import make_paged_kv, rel_err
        import pagegen
        from pagegen.reference import paged_extend_ref
        k, v, bt, lens = make_paged_kv([40, 64, 17], 2, 64, 16, "NHD", torch.float16, "cpu")
        q = torch.randn(10, 4, 64).half()
        cu = torch.tensor([0, 99, 3, 99, 8, 99, 10, 99], dtype=torch.int32)[::2]
        out = pagegen.paged_extend(q, k, v, bt, cu, lens)
        err = rel_err(out, paged_extend_ref(q, k, v, bt, cu.contiguous(), lens))
        print("ERR", err)
        assert err < 2e-3, err
    """) % str(Path(__file__).parent)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ERR" in r.stdout


def test_plans_refuse_strided_metadata(device: str) -> None:
    """A plan launches its tensors unchecked every step: strided metadata is refused when it is built."""
    q, k, v, bt, sl = _decode_case(device, [40, 64, 17])
    lens = _strided([40, 64, 17], device)
    with pytest.raises(ValueError, match=r"seq_lens is a strided view .*contiguous\(\)"):
        pagegen.DecodePlan(q, k, v, bt, lens)
    tables = torch.stack([bt, bt], dim=-1)[..., 0]
    with pytest.raises(ValueError, match="block_tables is a strided view"):
        pagegen.DecodePlan(q, k, v, tables, sl)
    qx = torch.randn(10, 4, 64, device=device).half()
    with pytest.raises(ValueError, match="cu_seqlens_q is a strided view"):
        pagegen.ExtendPlan(qx, k, v, bt, _strided([0, 3, 8, 10], device), sl)
    with pytest.raises(ValueError, match="seq_lens is a strided view"):
        pagegen.ExtendPlan(qx, k, v, bt, torch.tensor([0, 3, 8, 10], dtype=torch.int32, device=device), lens)


def test_kv_ops_take_strided_slot_mapping_and_pairs(device: str) -> None:
    """Refused on main; now copied contiguous and written right."""
    k = torch.randn(6, 16, 2, 64).half().to(device)
    v = torch.randn(6, 16, 2, 64).half().to(device)
    new_k, new_v = torch.randn(3, 2, 64).half().to(device), torch.randn(3, 2, 64).half().to(device)
    slots = _strided([5, 40, 17], device)
    pagegen.kv_write(new_k, new_v, k, v, slots)
    for t, s in enumerate((5, 40, 17)):
        assert torch.equal(k[s // 16, s % 16].cpu(), new_k[t].cpu()) and torch.equal(v[s // 16, s % 16].cpu(),
                                                                                      new_v[t].cpu())
    pairs = torch.tensor([[0, 3, 9], [4, 5, 9]], dtype=torch.int64, device=device).t()[:2]  # [[0, 4], [3, 5]]
    assert not pairs.is_contiguous()
    before = k.clone()
    pagegen.copy_blocks(k, v, pairs)
    assert torch.equal(k[4].cpu(), before[0].cpu()) and torch.equal(k[5].cpu(), before[3].cpu())


# ---------------------------------------------------------------- validate checks everything


def test_understated_max_seq_len_is_caught(device: str) -> None:
    """Lengths up to 600 with max_seq_len=300 and split 256 dropped tokens silently on main
    (relative error 0.40), also with validate=True. validate=True (and the CPU path) now refuses."""
    q, k, v, bt, sl = _decode_case(device, [600, 200, 451], seed=3)
    cfg = Config(block_n=64, split_size=256)
    with pytest.raises(ValueError, match="max_seq_len=300"):
        pagegen.paged_decode(q, k, v, bt, sl, max_seq_len=300, config=cfg, validate=True)
    plan = pagegen.DecodePlan(q, k, v, bt, sl, max_seq_len=300, config=cfg)
    with pytest.raises(ValueError, match="max_seq_len=300"):
        plan.run(q, k, v, bt, sl, validate=True)
    cu = torch.tensor([0, 2, 3, 5], dtype=torch.int32, device=device)
    qx = torch.randn(5, 4, 64, device=device).half()
    with pytest.raises(ValueError, match="max_seq_len=300"):
        pagegen.paged_extend(qx, k, v, bt, cu, sl, max_seq_len=300, validate=True)
    # an honest bound is fine and exact
    out = pagegen.paged_decode(q, k, v, bt, sl, max_seq_len=600, config=cfg, validate=True)
    assert rel_err(out, paged_decode_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu())) < TOL[F16]


@pytest.mark.skipif(os.environ.get("PAGEGEN_TEST_DEVICE", "cpu") != "cpu", reason="the CPU (interpreter) path")
def test_cpu_path_always_checks_max_seq_len() -> None:
    """CPU tensors are always validated: the understated bound is refused without validate=True."""
    q, k, v, bt, sl = _decode_case("cpu", [600, 200, 451], seed=3)
    with pytest.raises(ValueError, match="max_seq_len=300"):
        pagegen.paged_decode(q, k, v, bt, sl, max_seq_len=300, config=Config(block_n=64, split_size=256))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0.0, -0.5])
def test_scale_must_be_finite_and_positive(device: str, scale: float) -> None:
    """paged_decode returned all-NaN for nan/inf on main; one check for every op and plan now."""
    q, k, v, bt, sl = _decode_case(device, [20, 9])
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        pagegen.paged_decode(q, k, v, bt, sl, scale=scale)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        pagegen.DecodePlan(q, k, v, bt, sl, scale=scale)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        pagegen.paged_extend(q, k, v, bt, cu, sl, scale=scale)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        pagegen.ExtendPlan(q, k, v, bt, cu, sl, scale=scale)


def test_scale_type_and_illegal_config_error(device: str) -> None:
    q, k, v, bt, sl = _decode_case(device, [20, 9])
    with pytest.raises(TypeError, match="scale must be a number"):
        pagegen.paged_decode(q, k, v, bt, sl, scale=True)
    with pytest.raises(IllegalConfigError, match="is not legal for decode_fp16_hd64"):
        pagegen.paged_decode(q, k, v, bt, sl, config=Config(split_size=100))
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    with pytest.raises(IllegalConfigError, match="is not legal for extend_fp16_hd64"):
        pagegen.paged_extend(q, k, v, bt, cu, sl, config=Config(split_size=256))
    with pytest.raises(IllegalConfigError, match="not legal for kv_write"):
        pagegen.kv_write(k[0], v[0], k, v, torch.arange(16, dtype=torch.int32, device=device),
                         config=Config(block_n=7))


# ---------------------------------------------------------------- plans check their arguments


def test_decode_plan_refuses_tensors_it_was_not_built_for(device: str) -> None:
    """On main a larger batch than planned returned a wrong result with no error."""
    q, k, v, bt, sl = _decode_case(device, [20, 9])
    plan = pagegen.DecodePlan(q, k, v, bt, sl)
    q3, k3, v3, bt3, sl3 = _decode_case(device, [20, 9, 33])
    with pytest.raises(ValueError, match=r"q does not match the plan: planned shape \(2, 4, 64\)"):
        plan.run(q3, k, v, bt3, sl3)
    with pytest.raises(ValueError, match="block_tables does not match"):
        plan.run(q, k, v, bt3[:2], sl)
    with pytest.raises(ValueError, match="seq_lens does not match"):
        plan.run(q, k, v, bt, sl.long())
    with pytest.raises(ValueError, match="k_cache does not match"):
        plan.run(q, k.bfloat16(), v, bt, sl)
    with pytest.raises(ValueError, match="q does not match"):
        plan.run(torch.empty(2, 8, 64, dtype=F16, device=device)[:, ::2], k, v, bt, sl)  # strides differ
    with pytest.raises(ValueError, match="on meta"):
        plan.run(q.to("meta"), k, v, bt, sl)
    with pytest.raises(ValueError, match="out does not match"):
        plan.run(q, k, v, bt, sl, torch.empty(2, 4, 64, dtype=torch.bfloat16, device=device))
    with pytest.raises(TypeError, match="seq_lens must be a torch.Tensor"):
        plan.run(q, k, v, bt, [20, 9])


def test_decode_plan_with_a_slice_of_fused_qkv(device: str) -> None:
    """q = qkv[:, :Hq] and run(out=None): main allocated a contiguous out but wrote it with q's
    strides (garbage on the GPU, a segfault under the interpreter)."""
    g = torch.Generator().manual_seed(5)
    hk, group = 2, 2
    k, v, bt, sl = make_paged_kv([40, 9], hk, 64, 16, "NHD", F16, device, generator=g)
    qkv = torch.randn(2, hk * group + 2 * hk, 64, generator=g).half().to(device)
    q = qkv[:, : hk * group]
    ref = paged_decode_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu())
    for split in (0, 256):
        plan = pagegen.DecodePlan(q, k, v, bt, sl, config=Config(block_n=16, split_size=split))
        out = plan.run(q, k, v, bt, sl)
        assert out.is_contiguous() and rel_err(out, ref) < TOL[F16]
    # an out laid out like a view of a wider buffer: given at build, honoured at run
    big = torch.full((2, 2 * hk * group, 64), float("nan"), dtype=F16, device=device)
    plan = pagegen.DecodePlan(q, k, v, bt, sl, out=big[:, 1::2])
    plan.run(q, k, v, bt, sl, big[:, 1::2])
    assert rel_err(big[:, 1::2], ref) < TOL[F16] and torch.isnan(big[:, 0::2]).all()


def test_extend_plan_validates_once_and_follows_new_contents(device: str) -> None:
    g = torch.Generator().manual_seed(9)
    k, v, bt, sl = make_paged_kv([30, 12], 2, 64, 16, "NHD", F16, device, generator=g)
    q = torch.randn(13, 4, 64, generator=g).half().to(device)
    cu = torch.tensor([0, 9, 13], dtype=torch.int32, device=device)
    plan = pagegen.ExtendPlan(q, k, v, bt, cu, sl, max_q_len=9, config=Config(block_m=16, block_n=16))
    out = torch.full_like(q, float("nan"))
    plan.run(q, k, v, bt, cu, sl, out)
    ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), sl.cpu())
    assert rel_err(out, ref) < TOL[F16]
    assert torch.equal(out.cpu(), pagegen.paged_extend(q, k, v, bt, cu, sl, config=plan.config).cpu())
    cu.copy_(torch.tensor([0, 4, 13], dtype=torch.int32))  # new contents, same layout
    out2 = plan.run(q, k, v, bt, cu, sl, validate=True)
    assert rel_err(out2, paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), sl.cpu())) < TOL[F16]
    with pytest.raises(ValueError, match="more than max_q_len=9"):
        cu.copy_(torch.tensor([0, 1, 13], dtype=torch.int32))
        plan.run(q, k, v, bt, cu, sl, validate=True)
    with pytest.raises(ValueError, match="q does not match the plan"):
        plan.run(q[:12], k, v, bt, cu, sl)
    with pytest.raises(ValueError, match="cu_seqlens_q does not match"):
        plan.run(q, k, v, bt, cu[:2], sl)
