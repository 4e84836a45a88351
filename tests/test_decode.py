"""paged_decode against the float64 reference: every axis value, ragged lengths, shuffled and
shared block tables, split-KV on and off, and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import DTYPES, TOL, make_paged_kv, rel_err

import pagegen
from pagegen.reference import paged_decode_ref
from pagegen.spec import BLOCK_SIZES, HEAD_DIMS, LAYOUTS, Config

GROUPS = (1, 4, 7, 8)
PRODUCT = list(itertools.product(BLOCK_SIZES, HEAD_DIMS, LAYOUTS, DTYPES))


def run_case(device, seq_lens, kv_heads, group, head_dim, block_size, layout, dtype, config=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v, bt, lens = make_paged_kv(seq_lens, kv_heads, head_dim, block_size, layout, dtype, device, generator=g)
    q = torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=g).to(dtype).to(device)
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    pagegen.paged_decode(q, k, v, bt, lens, layout=layout, config=config, out=out)
    ref = paged_decode_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), lens.cpu(), layout=layout)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"rel err {err:.2e} for {seq_lens=} {group=} {head_dim=} {block_size=} {layout} {dtype}"
    return out


@pytest.mark.parametrize("block_size,head_dim,layout,dtype", PRODUCT)
def test_every_axis_value(device, block_size, head_dim, layout, dtype):
    """The full block_size x head_dim x layout x dtype product; group sizes cycle through 1/4/7/8."""
    i = PRODUCT.index((block_size, head_dim, layout, dtype))
    group = GROUPS[i % len(GROUPS)]
    lens = [1, block_size + 1, 37] if block_size <= 32 else [3, block_size + 1]
    run_case(device, lens, 2 if group < 7 else 1, group, head_dim, block_size, layout, DTYPES[dtype], seed=i)


@pytest.mark.parametrize("group", [1, 2, 4, 7, 8, 16])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_group_sizes(device, group, dtype):
    """GQA/MQA: group sizes including a non-power of two (7) and the MQA-like 16."""
    run_case(device, [5, 40, 17], 2, group, 64, 16, "NHD", DTYPES[dtype], seed=group)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ragged_lengths(device, layout):
    """1 token, exactly one block, one block + 1, many blocks, in one batch."""
    bs = 16
    run_case(device, [1, bs, bs + 1, 9 * bs + 5], 2, 4, 128, bs, layout, torch.float16, Config(block_n=32))


@pytest.mark.parametrize("split_size", [0, 256, 512])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_kv_on_and_off(device, split_size, layout):
    """Flash-decoding split + merge agrees with the single-pass kernel and the reference,
    including sequences shorter than one split (empty trailing splits)."""
    lens = [3, 300, 1100]
    cfg = Config(block_n=64, split_size=split_size)
    out = run_case(device, lens, 2, 4, 64, 16, layout, torch.float16, cfg, seed=split_size)
    base = run_case(device, lens, 2, 4, 64, 16, layout, torch.float16, Config(block_n=64), seed=split_size)
    assert rel_err(out, base.double()) < 2e-3


@pytest.mark.parametrize("block_n", [16, 32, 128])
def test_tiles_spanning_pages(device, block_n):
    """Tiles of several small pages (block_size 8) and pages larger than a tile (64)."""
    run_case(device, [70, 129], 2, 4, 64, 8, "NHD", torch.float16, Config(block_n=block_n), seed=block_n)
    run_case(device, [70, 129], 2, 4, 64, 64, "HND", torch.float16, Config(block_n=block_n), seed=block_n)


def test_shared_prefix_blocks(device):
    """Two sequences whose tables point at the same physical prefix blocks."""
    g = torch.Generator().manual_seed(7)
    bs, hk, group, d = 16, 2, 4, 64
    k, v, bt, lens = make_paged_kv([48, 40], hk, d, bs, "NHD", torch.float16, device, generator=g)
    bt[1, :2] = bt[0, :2]  # the first 32 tokens are shared
    q = torch.randn(2, hk * group, d, generator=g).half().to(device)
    out = torch.full_like(q, float("nan"))
    pagegen.paged_decode(q, k, v, bt, lens, out=out)
    ref = paged_decode_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), lens.cpu())
    assert rel_err(out, ref) < TOL[torch.float16]


def test_scale_argument(device):
    g = torch.Generator().manual_seed(3)
    k, v, bt, lens = make_paged_kv([33, 20], 1, 64, 16, "NHD", torch.float16, device, generator=g)
    q = torch.randn(2, 4, 64, generator=g).half().to(device)
    out = pagegen.paged_decode(q, k, v, bt, lens, scale=0.3)
    ref = paged_decode_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), lens.cpu(), scale=0.3)
    assert rel_err(out, ref) < TOL[torch.float16]
    ref_default = paged_decode_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), lens.cpu(), scale=1 / math.sqrt(64))
    assert rel_err(out, ref_default) > 1e-2  # the argument really changes the result


# ---------------------------------------------------------------- bad input


def _good(device):
    g = torch.Generator().manual_seed(11)
    k, v, bt, lens = make_paged_kv([20, 9], 2, 64, 16, "NHD", torch.float16, device, generator=g)
    q = torch.randn(2, 8, 64, generator=g).half().to(device)
    return dict(q=q, k_cache=k, v_cache=v, block_tables=bt, seq_lens=lens)


def _call(args, **kw):
    return pagegen.paged_decode(
        args["q"], args["k_cache"], args["v_cache"], args["block_tables"], args["seq_lens"], **kw
    )


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(q=a["q"].float()), TypeError, "q has dtype float32"),
        (lambda a: a.update(q=a["q"][None]), ValueError, "q must have 3 dims"),
        (lambda a: a.update(k_cache=a["k_cache"].bfloat16(), v_cache=a["v_cache"].bfloat16()), TypeError, "k_cache"),
        (lambda a: a.update(v_cache=a["v_cache"][:-1]), ValueError, "v_cache must match"),
        (lambda a: a.update(k_cache=a["k_cache"][..., :48], v_cache=a["v_cache"][..., :48]), ValueError,
         "head_dim=48"),
        (lambda a: a.update(q=a["q"][..., :32]), ValueError, "q has head_dim=32"),
        (lambda a: a.update(k_cache=a["k_cache"].reshape(-1, 12, 2, 64)[:4],
                            v_cache=a["v_cache"].reshape(-1, 12, 2, 64)[:4]), ValueError, "block_size=12"),
        (lambda a: a.update(q=a["q"][:, :7]), ValueError, "not a multiple"),
        (lambda a: a.update(block_tables=a["block_tables"][:1]), ValueError, "block_tables has 1 rows"),
        (lambda a: a.update(seq_lens=a["seq_lens"][:1]), ValueError, "seq_lens has 1 entries"),
        (lambda a: a.update(block_tables=a["block_tables"].long()), TypeError, "block_tables has dtype int64"),
        (lambda a: a.update(seq_lens=a["seq_lens"].long()), TypeError, "seq_lens has dtype int64"),
        (lambda a: a.update(seq_lens=a["seq_lens"] + 100), ValueError, "block_tables is too narrow"),
        (lambda a: a.update(q="not a tensor"), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_input(device, mutate, exc, match):
    args = _good(device)
    mutate(args)
    with pytest.raises(exc, match=match):
        _call(args, validate=True)  # capacity checks read seq_lens: on CUDA only with validate=True


def test_bad_layout_and_config(device):
    args = _good(device)
    with pytest.raises(ValueError, match="layout='XYZ'"):
        _call(args, layout="XYZ")
    with pytest.raises(ValueError, match="split_size=100"):
        _call(args, config=Config(split_size=100))
    with pytest.raises(ValueError, match="max_seq_len=4096 exceeds"):
        _call(args, max_seq_len=4096)


def test_cpu_tensors_without_interpreter(monkeypatch):
    args = _good("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CPU tensor.*TRITON_INTERPRET=1"):
        _call(args)


def test_validate_catches_bad_block_ids(device):
    args = _good(device)
    args["block_tables"][0, 0] = 10_000
    with pytest.raises(ValueError, match="block ids outside"):
        _call(args, validate=True)


@pytest.mark.parametrize("split_size", [0, 256])
def test_decode_plan_matches_op_and_follows_new_contents(device, split_size):
    """A plan validates once; run() then follows new block tables, lengths and KV contents."""
    g = torch.Generator().manual_seed(21)
    k, v, bt, lens = make_paged_kv([300, 77], 2, 64, 16, "NHD", torch.float16, device, generator=g)
    q = torch.randn(2, 8, 64, generator=g).half().to(device)
    plan = pagegen.DecodePlan(q, k, v, bt, lens, config=Config(block_n=32, split_size=split_size))
    out = plan.run(q, k, v, bt, lens)
    assert rel_err(out, paged_decode_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), lens.cpu())) < TOL[torch.float16]
    # new contents, same metadata
    k.copy_(torch.randn(k.shape, generator=g).half())
    lens.copy_(torch.tensor([5, 200], dtype=torch.int32))
    bt.copy_(bt.flip(0))
    out2 = torch.full_like(q, float("nan"))
    plan.run(q, k, v, bt, lens, out2)
    assert rel_err(out2, paged_decode_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), lens.cpu())) < TOL[torch.float16]


def test_decode_plan_validates_at_build(device):
    args = _good(device)
    with pytest.raises(TypeError, match="q has dtype float32"):
        pagegen.DecodePlan(args["q"].float(), args["k_cache"], args["v_cache"], args["block_tables"],
                           args["seq_lens"])
