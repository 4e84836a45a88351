"""A short extend over a long prefix as chunked verify (pagegen.extend_chunked, issue 18 item 2): the
dispatcher's rule against the H200 lab it was fitted to, and paged_extend / ExtendPlan taking the
route (forced on the CPU, where the rule never fires) against the float64 reference: varlen batches
with empty sequences, NHD and HND, a strided q, NaN-poisoned out, features, changing contents
between plan runs. On a GPU: the rule fires on its own and the routed result is right."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import DTYPES, TOL, make_paged_kv, rel_err

import pagegen
import pagegen.extend as E
from pagegen.dispatch import CHUNK_MIN_GAIN, chunk_len, extend_chunk_route, max_chunk_rows
from pagegen.reference import paged_extend_ref
from pagegen.spec import Config

H200_SMS = 132


def route(batch: int, q_len: int, ctx: int, *, kv_heads: int = 8, group: int = 4, head_dim: int = 128,
          kv_bytes: int = 2, block_m: int = 128, total_q: int | None = None) -> int:
    return extend_chunk_route(batch, batch * q_len if total_q is None else total_q, q_len, ctx, kv_heads, group,
                              head_dim, kv_bytes, block_m, H200_SMS)


def test_rule_reproduces_the_h200_lab():
    """bench/results/extend_chunk_lab-h200-2026-12-01.json: chunked won 4.7 / 4.6 / 3.2 / 2.0x at
    1 x 32768 with 17 / 32 / 64 / 128 new tokens and lost at 8 x 8192 with 32 (extend 158 us, chunked
    221 us)."""
    for q_len in (17, 32, 64, 128):
        assert route(1, q_len, 32768) == 16, q_len
    assert route(8, 32, 8192) == 0


def test_rule_stays_on_extend_where_extend_fills_the_chip_or_the_prefix_is_short():
    assert route(1, 512, 33280) == 0  # 128 programs, 32 chunk rows each reading 33k keys: extend
    assert route(1, 2048, 16384) == 0  # 512 programs > 132 SMs
    assert route(64, 17, 32768) == 0  # 64 x 8 programs
    assert route(1, 17, 2048) == 0  # the chunk rows' setup outweighs a short walk
    assert route(1, 1, 32768) == 0  # one token: decode's business, not extend's
    assert route(1, 17, 32768, group=64, head_dim=256) == 0  # not even 2 tokens x 64 rows fit a verify program
    assert chunk_len(64, 256) == 0 and chunk_len(4, 128) == 16 and chunk_len(16, 128) == 8


def test_rule_is_monotone_in_the_prefix():
    """Once a longer prefix makes the route pay, every longer one does too (same batch and tokens)."""
    for b, q in itertools.product((1, 2, 4), (17, 48, 100)):
        picks = [route(b, q, ctx) for ctx in (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)]
        first = next((i for i, c in enumerate(picks) if c), len(picks))
        assert all(picks[first:]), (b, q, picks)


def test_rule_model_margin():
    """Right at the margin: the route is taken only with >= CHUNK_MIN_GAIN predicted."""
    from pagegen import dispatch as D

    for ctx in (4096, 6000, 8192):
        extend_us = ctx * D.CHUNK_WALK_NS / 1000
        rows = max_chunk_rows(1, 17, 17, 16)
        chunked_us = D.CHUNK_SETUP_US + rows * 8 * ctx * 128 * 2 * 2 / D.CHUNK_STREAM_BYTES_PER_US
        assert bool(route(1, 17, ctx)) == (extend_us >= CHUNK_MIN_GAIN * chunked_us)


@pytest.fixture
def forced_route(monkeypatch):
    """paged_extend / ExtendPlan take the chunked route on any device (the rule's chunk length), and the
    extend kernel must not launch; the plan caches are dropped before and after."""
    pagegen.dispatch.reset()
    monkeypatch.setattr(E, "_chunk_route", lambda q, k, spec, config, *a: chunk_len(spec.group_size, spec.head_dim))

    def no_extend(*a, **kw):
        raise AssertionError("the extend kernel launched on a routed call")

    monkeypatch.setattr(E, "launch_extend", no_extend)
    monkeypatch.setattr(E._Launcher, "__call__", no_extend)
    yield
    monkeypatch.undo()
    pagegen.dispatch.reset()


def _case(device, ctx_lens, q_lens, kv_heads, group, head_dim, block_size, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens, strict=True)]
    k, v, bt, lens = make_paged_kv(seq_lens, kv_heads, head_dim, block_size, layout, dtype, device, generator=g)
    q = torch.randn(sum(q_lens), kv_heads * group, head_dim, generator=g).to(dtype).to(device)
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=device)
    return q, k, v, bt, cu, lens


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_paged_extend_routed_matches_reference(device, forced_route, layout):
    """A varlen batch (17 new over 40 cached, an empty sequence, 40 over none, 5 over 300) through the
    route, q a strided view, out poisoned."""
    dtype = DTYPES["fp16"]
    q, k, v, bt, cu, lens = _case(device, [40, 10, 0, 300], [17, 0, 40, 5], 2, 4, 64, 16, layout, dtype, seed=3)
    qs = torch.empty(q.shape[0] * 2, q.shape[1], q.shape[2], dtype=dtype, device=device)[::2]  # row-strided view
    qs.copy_(q)
    assert not qs.is_contiguous()
    out = torch.full_like(q, float("nan"))
    res = pagegen.paged_extend(qs, k, v, bt, cu, lens, layout=layout, out=out, max_q_len=40)
    assert res is out
    ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), lens.cpu(), layout=layout)
    assert rel_err(out, ref) < TOL[dtype]


def test_paged_extend_routed_with_features(device, forced_route):
    """sliding_window and softcap pass through the route (the verify kernel applies them)."""
    dtype = DTYPES["fp16"]
    q, k, v, bt, cu, lens = _case(device, [90, 7], [33, 20], 1, 4, 64, 8, "NHD", dtype, seed=5)
    out = pagegen.paged_extend(q, k, v, bt, cu, lens, sliding_window=24, softcap=20.0)
    ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), lens.cpu(), sliding_window=24,
                           softcap=20.0)
    assert rel_err(out, ref) < TOL[dtype]


def test_extend_plan_routed_runs_with_new_contents(device, forced_route):
    """An ExtendPlan taking the route: two runs on the same layout with different lengths and tokens."""
    dtype = DTYPES["fp16"]
    q, k, v, bt, cu, lens = _case(device, [60, 5], [20, 12], 2, 2, 64, 16, "NHD", dtype, seed=7)
    plan = pagegen.ExtendPlan(q, k, v, bt, cu, lens, max_q_len=20)
    assert plan.chunk == 16
    for step in range(2):
        if step:  # the same tensors, new contents: fewer new tokens for the first sequence, more for the second
            cu.copy_(torch.tensor([0, 15, 32], dtype=torch.int32))
            lens.copy_(torch.tensor([70, 29], dtype=torch.int32))
            q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(dtype))
        out = torch.full_like(q, float("nan"))
        plan.run(q, k, v, bt, cu, lens, out=out)
        ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), lens.cpu())
        assert rel_err(out, ref) < TOL[dtype], step


def test_forced_config_keeps_the_extend_kernel(device, monkeypatch):
    """A caller's config is an extend config: the route is never taken with one."""
    pagegen.dispatch.reset()
    calls = []
    monkeypatch.setattr(E, "_chunk_route", lambda *a: calls.append(a) or 16)
    q, k, v, bt, cu, lens = _case(device, [40], [17], 1, 4, 64, 16, "NHD", DTYPES["fp16"], seed=9)
    plan = pagegen.ExtendPlan(q, k, v, bt, cu, lens, config=Config(block_m=64, block_n=32, num_warps=4, num_stages=1))
    assert plan.chunk == 0 and not calls
    pagegen.dispatch.reset()


def test_cpu_calls_never_take_the_route():
    """The cost model was measured on a GPU: on other devices the rule is not consulted."""
    q = torch.zeros(17, 32, 128, dtype=torch.float16)
    assert E._chunk_route(q, torch.zeros(1, 16, 8, 128, dtype=torch.float16), None, None, 1, 17, 32768) == 0


@pytest.mark.gpu
def test_gpu_short_extend_over_long_prefix_routes_and_is_right(device):
    """On the GPU at the benchmark geometry (bf16, hd128, 32 q / 8 KV heads, block 16): 1 x 17 new
    tokens over 16384 cached ones takes the route by itself, and matches the reference; 64 sequences
    of the same do not take it."""
    pagegen.dispatch.reset()
    dtype = torch.bfloat16
    q, k, v, bt, cu, lens = _case(device, [16384], [17], 8, 4, 128, 16, "NHD", dtype, seed=11)
    plan = pagegen.ExtendPlan(q, k, v, bt, cu, lens, max_q_len=17, max_seq_len=16384 + 17)
    assert plan.chunk == 16
    out = torch.full_like(q, float("nan"))
    pagegen.paged_extend(q, k, v, bt, cu, lens, out=out, max_q_len=17, max_seq_len=16384 + 17)
    ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), lens.cpu())
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(plan.run(q, k, v, bt, cu, lens), ref) < TOL[dtype]
    q64, k64, v64, bt64, cu64, lens64 = _case(device, [4096] * 64, [17] * 64, 8, 4, 128, 16, "NHD", dtype, seed=12)
    assert pagegen.ExtendPlan(q64, k64, v64, bt64, cu64, lens64, max_q_len=17).chunk == 0


@pytest.mark.parametrize("per_head", [False, True], ids=["per_tensor", "per_head"])
def test_paged_extend_routed_fp8_pool(device, forced_route, per_head):
    """An e4m3 pool through the route: the scales reach the verify kernel (per tensor and per KV head)."""
    from test_fp8 import fp8_paged_kv

    from pagegen.reference import paged_extend_fp8_ref

    gen = torch.Generator().manual_seed(31 + per_head)
    q_lens, ctx = [20, 3], [37, 60]
    x = fp8_paged_kv([a + b for a, b in zip(q_lens, ctx, strict=True)], 2, 64, 16, "NHD", torch.float8_e4m3fn,
                     per_head, device, gen)
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    q = torch.randn(sum(q_lens), 8, 64, generator=gen).to(torch.float16).to(device)
    out = torch.full_like(q, float("nan"))
    pagegen.paged_extend(q, x["k"], x["v"], x["tables"], cu.to(device), x["lens"], out=out, k_scale=x["k_scale"],
                         v_scale=x["v_scale"])
    ref = paged_extend_fp8_ref(q.cpu(), x["k"].cpu(), x["v"].cpu(), x["tables"].cpu(), cu, x["lens"].cpu(),
                               k_scale=x["k_scale"].cpu(), v_scale=x["v_scale"].cpu())
    assert rel_err(out, ref) <= TOL[torch.float16]


@pytest.mark.gpu
def test_gpu_routed_plan_captures_in_a_cuda_graph(device):
    """A routed ExtendPlan (chunk rows rebuilt on the device at every run, no sync) captured in a CUDA
    graph and replayed after the lengths and tokens change in place."""
    pagegen.dispatch.reset()
    dtype = torch.bfloat16
    q, k, v, bt, cu, lens = _case(device, [16384], [17], 8, 4, 128, 16, "NHD", dtype, seed=13)
    plan = pagegen.ExtendPlan(q, k, v, bt, cu, lens, max_q_len=17, max_seq_len=16384 + 17)
    assert plan.chunk == 16
    out = torch.empty_like(q)
    plan.run(q, k, v, bt, cu, lens, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.run(q, k, v, bt, cu, lens, out=out)
    cu.copy_(torch.tensor([0, 17], dtype=torch.int32))
    lens.copy_(torch.tensor([12000], dtype=torch.int32))  # a shorter prefix, same new tokens
    q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(14)).to(dtype))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), lens.cpu())
    assert rel_err(out, ref) < TOL[dtype]
