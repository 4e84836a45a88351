"""paged_extend against the float64 reference: every axis value, ragged batches (ctx_len = 0,
short and long prefixes, q_len = 1, q_len not a multiple of the tile), shared prefix blocks,
chunked prefill, every tile shape, and bad input."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DTYPES, TEST_DEVICE, TOL, make_paged_kv, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pagegen
from pagegen.reference import paged_extend_ref
from pagegen.spec import BLOCK_SIZES, HEAD_DIMS, LAYOUTS, Config, KernelSpec, default_config, illegal_reason

GROUPS = (1, 4, 7, 8)


def cu_seqlens(q_lens: list[int], device: str) -> torch.Tensor:
    """[B + 1] int32 offsets of each sequence's query rows."""
    return torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=device)


def run_case(device, ctx_lens, q_lens, kv_heads, group, head_dim, block_size, layout, dtype, config=None, seed=0,
             max_q_len=None):
    """Random pool holding ctx + q tokens per sequence (the new tokens' K/V already written),
    random queries; checks paged_extend against the float64 reference and returns its output."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens, strict=True)]
    k, v, bt, lens = make_paged_kv(seq_lens, kv_heads, head_dim, block_size, layout, dtype, device, generator=g)
    q = torch.randn(sum(q_lens), kv_heads * group, head_dim, generator=g).to(dtype).to(device)
    cu = cu_seqlens(q_lens, device)
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    pagegen.paged_extend(q, k, v, bt, cu, lens, layout=layout, config=config, out=out, max_q_len=max_q_len)
    ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), lens.cpu(), layout=layout)
    err = rel_err(out, ref)
    assert err < TOL[dtype], (
        f"rel err {err:.2e} for {ctx_lens=} {q_lens=} {group=} {head_dim=} {block_size=} {layout} {dtype} {config}"
    )
    return out


# every (block_size, head_dim) pair once; layout, dtype and group size cycle so each value appears
PAIRS = list(itertools.product(BLOCK_SIZES, HEAD_DIMS))


def every_axis_case(block_size: int, head_dim: int) -> dict:
    """test_every_axis_value's case for one (block_size, head_dim) pair: layout, dtype and group cycle
    over PAIRS; a ragged batch of a plain prefill, a prefix ending mid-page and q_len = 1 over a longer
    prefix. Keyword arguments of run_case (bench/extend_tile_check.py runs the same cases)."""
    i = PAIRS.index((block_size, head_dim))
    group = GROUPS[(i // 4 + i) % len(GROUPS)]
    small = block_size <= 64
    return dict(ctx_lens=[0, block_size + 3, 2 * block_size + 5] if small else [0, block_size + 3],
                q_lens=[7, 12, 1] if small else [7, 12], kv_heads=2 if group < 7 else 1, group=group,
                head_dim=head_dim, block_size=block_size, layout=LAYOUTS[i % 2],
                dtype=DTYPES[("fp16", "bf16")[(i // 2) % 2]], seed=i)


@pytest.mark.parametrize("block_size,head_dim", PAIRS)
def test_every_axis_value(device, block_size, head_dim):
    """block_size x head_dim in full; layout, dtype and group sizes 1/4/7/8 sampled across it."""
    run_case(device, **every_axis_case(block_size, head_dim))


@pytest.mark.parametrize("group", [1, 2, 4, 7, 8, 16])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_group_sizes(device, group, dtype):
    """GQA/MQA packing of (token, head) rows, including a group (7) that does not divide BLOCK_M."""
    run_case(device, [0, 21, 40], [9, 5, 14], 2, group, 64, 16, "NHD", DTYPES[dtype], seed=group,
             config=Config(block_m=32 if group <= 8 else 64, block_n=32))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ragged_batch(device, layout):
    """ctx_len 0 and long, q_len 1, q_len a multiple of the tile and not, in one batch."""
    ctx = [0, 0, 3, 150, 64, 1]
    qn = [17, 1, 1, 33, 32, 40]
    run_case(device, ctx, qn, 2, 4, 128, 16, layout, torch.float16, Config(block_m=32, block_n=32), seed=5)


TILES = [(16, 16), (16, 64), (32, 128), (64, 32), (64, 64), (128, 16), (128, 64)]


@pytest.mark.parametrize("block_m,block_n", TILES)
def test_tile_shapes(device, block_m, block_n):
    """Query tiles smaller and larger than q_len, key tiles spanning pages and inside one page,
    the unmasked prefix loop empty and not."""
    cfg = Config(block_m=block_m, block_n=block_n)
    run_case(device, [0, 70, 200], [45, 3, 20], 2, 4, 64, 8, "NHD", torch.float16, cfg, seed=block_m + block_n)
    run_case(device, [130], [19], 1, 2, 64, 64, "HND", torch.bfloat16, cfg, seed=block_m * block_n)


def test_default_configs_are_legal():
    """default_config is legal for every extend spec, and illegal_reason() rejects tiles that cannot fit."""
    for hd, g in itertools.product(HEAD_DIMS, (1, 7, 16, 64)):
        spec = KernelSpec("extend", head_dim=hd, block_size=16, group_size=g)
        assert illegal_reason(spec, default_config(spec)) is None, spec
    spec = KernelSpec("extend", head_dim=128, block_size=16, group_size=64)
    assert "query heads" in illegal_reason(spec, Config(block_m=32, block_n=64))
    big = KernelSpec("extend", head_dim=256, block_size=16)
    assert illegal_reason(big, Config(block_m=128, block_n=64)) is not None
    assert illegal_reason(big, Config(block_m=64, block_n=256, num_stages=4)) is not None


def test_q_len_one_matches_decode(device):
    """With one new token per sequence, extend is decode."""
    g = torch.Generator().manual_seed(9)
    k, v, bt, lens = make_paged_kv([1, 30, 77], 2, 64, 16, "NHD", torch.float16, device, generator=g)
    q = torch.randn(3, 8, 64, generator=g).half().to(device)
    ext = pagegen.paged_extend(q, k, v, bt, cu_seqlens([1, 1, 1], device), lens, max_q_len=1)
    dec = pagegen.paged_decode(q, k, v, bt, lens)
    assert rel_err(ext, dec.double()) < 2e-3


def test_shared_prefix_blocks(device):
    """Two sequences whose tables point at the same physical prefix blocks, with different new tokens."""
    g = torch.Generator().manual_seed(7)
    bs, hk, group, d = 16, 2, 4, 64
    k, v, bt, lens = make_paged_kv([48 + 10, 48 + 21], hk, d, bs, "NHD", torch.float16, device, generator=g)
    bt[1, :3] = bt[0, :3]  # the 48-token prefix is shared
    q_lens = [10, 21]
    q = torch.randn(sum(q_lens), hk * group, d, generator=g).half().to(device)
    cu = cu_seqlens(q_lens, device)
    out = torch.full_like(q, float("nan"))
    pagegen.paged_extend(q, k, v, bt, cu, lens, out=out, config=Config(block_m=16, block_n=32))
    ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), lens.cpu())
    assert rel_err(out, ref) < TOL[torch.float16]


def _write_tokens(cache: torch.Tensor, table: torch.Tensor, start: int, values: torch.Tensor, layout: str) -> None:
    """Scatter values [n, Hk, D] into the pool at positions start .. start+n of the one sequence
    of `table` [1, max_blocks] (what kv_write does), in plain torch."""
    bs = cache.shape[1] if layout == "NHD" else cache.shape[2]
    pos = torch.arange(start, start + values.shape[0])
    blk = table.cpu()[0, pos // bs].long().to(cache.device)
    slot = (pos % bs).to(cache.device)
    if layout == "NHD":
        cache[blk, slot] = values
    else:
        cache[blk, :, slot] = values


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunked_prefill_equals_full(device, layout):
    """Prefilling 53 tokens in chunks of 20, 1 and 32 (each chunk's K/V written, then extended over
    what is cached) gives the same rows as one prefill of all 53."""
    g = torch.Generator().manual_seed(13)
    bs, hk, group, d, n = 8, 2, 4, 64, 53
    shape = (12, bs, hk, d) if layout == "NHD" else (12, hk, bs, d)
    k = torch.full(shape, float("nan"), dtype=torch.float16, device=device)  # unwritten slots are NaN
    v = torch.full_like(k, float("nan"))
    table = torch.randperm(12, generator=g)[:7].int()[None].to(device)
    kn = torch.randn(n, hk, d, generator=g).half().to(device)
    vn = torch.randn(n, hk, d, generator=g).half().to(device)
    q = torch.randn(n, hk * group, d, generator=g).half().to(device)
    cfg = Config(block_m=16, block_n=16)
    chunks, done = [], 0
    for size in (20, 1, 32):
        _write_tokens(k, table, done, kn[done : done + size], layout)
        _write_tokens(v, table, done, vn[done : done + size], layout)
        lens = torch.tensor([done + size], dtype=torch.int32, device=device)
        chunks.append(pagegen.paged_extend(q[done : done + size], k, v, table, cu_seqlens([size], device), lens,
                                           layout=layout, config=cfg))
        done += size
    full = pagegen.paged_extend(q, k, v, table, cu_seqlens([n], device), torch.tensor([n], dtype=torch.int32,
                                device=device), layout=layout, config=cfg)
    ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), table.cpu(), cu_seqlens([n], "cpu"),
                           torch.tensor([n], dtype=torch.int32), layout=layout)
    assert rel_err(full, ref) < TOL[torch.float16]
    assert rel_err(torch.cat(chunks), full.double()) < 2e-3


def test_empty_sequences_and_empty_batch(device):
    """A sequence with no new tokens (repeated offset) writes nothing; zero query tokens is a no-op."""
    run_case(device, [5, 40, 0], [3, 0, 6], 2, 4, 64, 16, "NHD", torch.float16, Config(block_m=16, block_n=16))
    g = torch.Generator().manual_seed(2)
    k, v, bt, lens = make_paged_kv([9], 2, 64, 16, "NHD", torch.float16, device, generator=g)
    q = torch.empty(0, 8, 64, dtype=torch.float16, device=device)
    out = pagegen.paged_extend(q, k, v, bt, cu_seqlens([0], device), lens)
    assert out.shape == (0, 8, 64)


def test_max_q_len_bound(device):
    """A tight host-side max_q_len gives the same rows as the default bound (q.shape[0])."""
    a = run_case(device, [10, 3], [9, 4], 2, 4, 64, 16, "NHD", torch.float16, Config(block_m=16), seed=1,
                 max_q_len=9)
    b = run_case(device, [10, 3], [9, 4], 2, 4, 64, 16, "NHD", torch.float16, Config(block_m=16), seed=1)
    assert torch.equal(a.cpu(), b.cpu())


def test_scale_argument(device):
    g = torch.Generator().manual_seed(3)
    k, v, bt, lens = make_paged_kv([33, 20], 1, 64, 16, "NHD", torch.float16, device, generator=g)
    q = torch.randn(12, 4, 64, generator=g).half().to(device)
    cu = cu_seqlens([5, 7], device)
    out = pagegen.paged_extend(q, k, v, bt, cu, lens, scale=0.3)
    ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), lens.cpu(), scale=0.3)
    assert rel_err(out, ref) < TOL[torch.float16]
    ref_default = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), lens.cpu(), scale=1 / math.sqrt(64))
    assert rel_err(out, ref_default) > 1e-2  # the argument really changes the result


def test_strided_q_and_out_views(device):
    """q a view into a fused QKV projection [T, Hq + 2 Hkv, D] and out a view too: only the last
    dim must be contiguous."""
    g = torch.Generator().manual_seed(17)
    hk, group, d = 2, 4, 64
    k, v, bt, lens = make_paged_kv([30, 12], hk, d, 16, "NHD", torch.float16, device, generator=g)
    qkv = torch.randn(13, hk * group + 2 * hk, d, generator=g).half().to(device)
    q = qkv[:, : hk * group]  # [13, 8, 64], row stride 12 * 64
    cu = cu_seqlens([9, 4], device)
    big = torch.full((13, 2 * hk * group, d), float("nan"), dtype=torch.float16, device=device)
    out = big[:, 1::2]  # every other head of a wider buffer
    pagegen.paged_extend(q, k, v, bt, cu, lens, out=out, config=Config(block_m=16, block_n=16))
    ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), lens.cpu())
    assert rel_err(out, ref) < TOL[torch.float16]
    assert torch.isnan(big[:, 0::2]).all()  # nothing written outside the view


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.lists(st.tuples(st.integers(0, 90), st.integers(0, 40)), min_size=1, max_size=4),
    group=st.sampled_from([1, 3, 4, 8]),
    block_size=st.sampled_from([1, 8, 16, 32]),
    tiles=st.sampled_from([(16, 16), (32, 32), (64, 16)]),
    layout=st.sampled_from(LAYOUTS),
)
def test_property_random_batches(device, data, group, block_size, tiles, layout):
    """Random ragged batches of (ctx_len, q_len), sizes and tiles all agree with the reference."""
    ctx = [c for c, _ in data]
    qn = [n for _, n in data]
    if sum(qn) == 0:
        qn[0] = 1
    cfg = Config(block_m=tiles[0], block_n=tiles[1])
    run_case(device, ctx, qn, 1, group, 64, block_size, layout, torch.float16, cfg, seed=sum(ctx) + sum(qn))


# ---------------------------------------------------------------- bad input


def _good(device):
    g = torch.Generator().manual_seed(11)
    k, v, bt, lens = make_paged_kv([20, 9], 2, 64, 16, "NHD", torch.float16, device, generator=g)
    q = torch.randn(8, 8, 64, generator=g).half().to(device)
    return dict(q=q, k_cache=k, v_cache=v, block_tables=bt, cu_seqlens_q=cu_seqlens([5, 3], device), seq_lens=lens)


def _call(args, **kw):
    return pagegen.paged_extend(
        args["q"], args["k_cache"], args["v_cache"], args["block_tables"], args["cu_seqlens_q"], args["seq_lens"], **kw
    )


def _set(name, fn):
    return lambda a: a.update({name: fn(a[name])})


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (_set("q", lambda t: t.float()), TypeError, "q has dtype float32"),
        (_set("q", lambda t: t[None]), ValueError, "q must have 3 dims"),
        (_set("q", lambda t: t[..., :32]), ValueError, "q has head_dim=32"),
        (_set("q", lambda t: t[:, :7]), ValueError, "not a multiple"),
        (_set("q", lambda t: "not a tensor"), TypeError, "q must be a torch.Tensor"),
        (lambda a: a.update(k_cache=a["k_cache"].bfloat16(), v_cache=a["v_cache"].bfloat16()), TypeError, "k_cache"),
        (_set("v_cache", lambda t: t[:-1]), ValueError, "v_cache must match"),
        (lambda a: a.update(k_cache=a["k_cache"][..., :48], v_cache=a["v_cache"][..., :48]), ValueError,
         "head_dim=48"),
        (_set("block_tables", lambda t: t[:1]), ValueError, "block_tables has 1 rows"),
        (_set("block_tables", lambda t: t.long()), TypeError, "block_tables has dtype int64"),
        (_set("seq_lens", lambda t: t.long()), TypeError, "seq_lens has dtype int64"),
        (_set("cu_seqlens_q", lambda t: t.long()), TypeError, "cu_seqlens_q has dtype int64"),
        (_set("cu_seqlens_q", lambda t: t[:2]), ValueError, "cu_seqlens_q has 2 entries; expected batch"),
        (_set("cu_seqlens_q", lambda t: t[None]), ValueError, "cu_seqlens_q must have 1 dims"),
        (_set("cu_seqlens_q", lambda t: t + 1), ValueError, "cu_seqlens_q must start at 0"),
        (_set("cu_seqlens_q", lambda t: t * 0 + torch.tensor([0, 5, 7], dtype=t.dtype, device=t.device)),
         ValueError, "must end at q.shape"),
        (_set("cu_seqlens_q", lambda t: t * 0 + torch.tensor([0, 9, 8], dtype=t.dtype, device=t.device)),
         ValueError, "non-decreasing"),
        (_set("seq_lens", lambda t: t * 0 + 4), ValueError, r"seq_lens\[0\]=4"),
        (_set("seq_lens", lambda t: t + 100), ValueError, "block_tables is too narrow"),
        (_set("cu_seqlens_q", lambda t: t.cpu() if t.is_cuda else t.to("meta")), ValueError, "cu_seqlens_q is on"),
    ],
)
def test_bad_input(device, mutate, exc, match):
    args = _good(device)
    mutate(args)
    with pytest.raises(exc, match=match):
        _call(args, validate=True)


def test_bad_layout_config_and_bounds(device):
    args = _good(device)
    with pytest.raises(ValueError, match="layout='XYZ'"):
        _call(args, layout="XYZ")
    with pytest.raises(ValueError, match="split_size"):
        _call(args, config=Config(split_size=256, block_n=64))
    with pytest.raises(ValueError, match="max_q_len=9 exceeds"):
        _call(args, max_q_len=9)
    with pytest.raises(ValueError, match="max_seq_len=4096 exceeds"):
        _call(args, max_seq_len=4096)
    with pytest.raises(ValueError, match="more than max_q_len=4"):
        _call(args, max_q_len=4, validate=True)
    with pytest.raises(ValueError, match="scale must be a positive"):
        _call(args, scale=-0.1)
    with pytest.raises(ValueError, match="out must be"):
        _call(args, out=torch.empty_like(args["q"])[:3])


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


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [None, (64, 64, 8, 2), (64, 32, 8, 5), (128, 64, 8, 5), (128, 32, 8, 2)])
def test_gpu_long_prefixes(device, tiles):
    """Compiled on the GPU at the benchmark's geometry (bf16, hd128, 32 q / 8 KV heads, block 16):
    a plain prefill, a long prefix, a decode-like token, in one ragged batch, for the default and
    the configs the benchmark tunes over (pipelined stages included)."""
    cfg = None if tiles is None else Config(block_m=tiles[0], block_n=tiles[1], num_warps=tiles[2],
                                            num_stages=tiles[3])
    run_case(device, [0, 4096, 1000, 77], [700, 300, 1, 129], 8, 4, 128, 16, "NHD", torch.bfloat16, cfg,
             seed=21, max_q_len=700)


# ---------------------------------------------------------------- real compile (sm_90, no GPU)

COMPILE_CASES = [  # (head_dim, block_size, layout, group, dtype, (block_m, block_n, warps, stages[, kv_tma]) or None)
    (128, 16, "NHD", 4, "bf16", None),
    (128, 16, "NHD", 4, "bf16", (128, 64, 8, 5)),
    (80, 8, "HND", 7, "fp16", None),
    (256, 256, "NHD", 2, "bf16", None),
    (256, 16, "NHD", 4, "bf16", (128, 32, 8, 2)),  # a 128-row tile at head_dim 256 (EXTEND_F32_PER_THREAD)
    (64, 1, "HND", 1, "fp16", (64, 32, 4, 5)),
    # the tensor-descriptor K/V path (issue 18): the lab's b_tma_kv config, and HND at block 256
    (128, 64, "NHD", 4, "bf16", (128, 64, 8, 3, 1)),
    (128, 256, "HND", 4, "fp16", (128, 64, 8, 5, 1)),
]

COMPILE_SCRIPT = r"""
import json, sys
from pagegen.compile_check import compile_for_target, load_jit_module, ptxas_report
from pagegen.spec import Config, KernelSpec, default_config, illegal_reason, kv_tma_reason
out = []
for hd, bs, layout, g, dt, cfg in json.loads(sys.argv[1]):
    spec = KernelSpec("extend", head_dim=hd, block_size=bs, layout=layout, group_size=g, dtype=dt)
    cfg = default_config(spec) if cfg is None else Config(block_m=cfg[0], block_n=cfg[1], num_warps=cfg[2],
                                                          num_stages=cfg[3], kv_tma=(cfg + [0])[4])
    assert illegal_reason(spec, cfg) is None, (spec, cfg)
    types = {n: "*" + dt for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    types.update(block_tables_ptr="*i32", cu_seqlens_q_ptr="*i32", seq_lens_ptr="*i32", qk_scale="fp32")
    consts = dict(BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_m // g, BLOCK_N=cfg.block_n, DOT_FP32=False)
    if kv_tma_reason(spec) is None:  # the kernel has the TMA path: descriptors, or None and KV_TMA=False
        consts["KV_TMA"] = bool(cfg.kv_tma)
        if cfg.kv_tma:
            desc = f"tensordesc<{dt}[{cfg.block_n}, {hd}]>"
            types.update(k_desc=desc, v_desc=desc)
        else:
            consts.update(k_desc=None, v_desc=None)
    k = compile_for_target(load_jit_module(spec).extend_kernel, types, consts, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages)
    rep = ptxas_report(k)
    rep["wgmma"] = "wgmma" in k.asm["ptx"]
    rep["cp_async"] = "cp.async.cg" in k.asm["ptx"] or "cp.async.ca" in k.asm["ptx"]
    rep["tma_loads"] = k.asm["ptx"].count("cp.async.bulk.tensor")
    rep["kv_tma"] = cfg.kv_tma
    out.append(rep)
print(json.dumps(out))
"""


def test_extend_compiles_for_sm90_without_spills():
    """The interpreter accepts code the compiler rejects: compile for sm_90 (Triton's ptxas, no GPU
    needed) and check registers fit, both dots use wgmma and the K/V gathers are asynchronous, or, with
    kv_tma=1 (pages >= 64), K/V come by TMA (cp.async.bulk.tensor)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(COMPILE_CASES)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = json.loads(r.stdout.strip().splitlines()[-1])
    for case, rep in zip(COMPILE_CASES, reports, strict=True):
        assert rep["spill_bytes"] == 0, (case, rep)
        assert rep["wgmma"], (case, rep)
        if rep["kv_tma"]:  # K and V by TMA boxes (two a tile in each loop)
            assert rep["tma_loads"] >= 4, (case, rep)
        else:
            assert rep["cp_async"] and rep["tma_loads"] == 0, (case, rep)


def test_tile_check_script_runs_the_every_axis_cases(capsys):
    """bench/extend_tile_check.py runs a tile on this file's every_axis cases (on the suite's device): one
    line a case of the head dims asked for, against the float64 reference."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import extend_tile_check

    where = ["--cpu"] if TEST_DEVICE == "cpu" else []
    assert extend_tile_check.main([*where, "--tile", "64,32,8,2", "--head-dims", "192"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + sum(1 for _, d in PAIRS if d == 192) and lines[-1].endswith("0 case(s) failed")
    assert all(" ok " in line for line in lines[:-1]), lines
