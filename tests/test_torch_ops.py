"""pagegen.torch_ops: the registered ops pass torch.library.opcheck (schema, fake tensors, AOT
dispatch), a model step that writes K/V and attends traces with torch.compile(fullgraph=True) and
matches eager, and every keyword of the eager ops is wired or deliberately left out."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch._dynamo.testing
from conftest import make_paged_kv, rel_err

import pagegen
from pagegen import torch_ops
from pagegen.reference import paged_decode_ref, paged_extend_ref

# opcheck's tests without the autograd ones (the ops have no backward)
OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def _decode_inputs(device, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    k, v, bt, lens = make_paged_kv([5, 40, 17], 2, 64, 16, "NHD", dtype, device, generator=g)
    q = torch.randn(3, 4, 64, generator=g).to(dtype).to(device)
    return q, k, v, bt, lens


def _extend_inputs(device, seed=1):
    g = torch.Generator().manual_seed(seed)
    seq_lens, q_lens = [9, 33], [3, 17]
    k, v, bt, lens = make_paged_kv(seq_lens, 2, 64, 16, "NHD", torch.float16, device, generator=g)
    cu = torch.tensor([0, 3, 20], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), 4, 64, generator=g).half().to(device)
    return q, k, v, bt, cu, lens


def test_opcheck_attention_ops(device):
    """Schema (nothing mutated), fake output matching the real one in shape/dtype/strides, AOT dispatch."""
    q, k, v, bt, lens = _decode_inputs(device)
    torch.library.opcheck(torch.ops.pagegen.paged_decode.default, (q, k, v, bt, lens, "NHD", None, 40, None),
                          test_utils=OPCHECK_TESTS)
    q, k, v, bt, cu, lens = _extend_inputs(device)
    torch.library.opcheck(torch.ops.pagegen.paged_extend.default, (q, k, v, bt, cu, lens, "NHD", 0.1, 17, 33),
                          test_utils=OPCHECK_TESTS)
    # verify: q [B, q_len, Hq, D], the new tokens' K/V already counted in seq_lens
    q, k, v, bt, lens = _decode_inputs(device, seed=3)
    q3 = torch.randn(3, 2, 4, 64, generator=torch.Generator().manual_seed(4)).half().to(device)
    torch.library.opcheck(torch.ops.pagegen.paged_verify.default,
                          (q3, k, v, bt, lens, None, None, "NHD", None, 40, None), test_utils=OPCHECK_TESTS)


def test_compiled_verify_matches_eager(device):
    """A compiled verify step (two new tokens per sequence) has no graph break and equals the eager op."""
    torch._dynamo.reset()
    q, k, v, bt, lens = _decode_inputs(device, seed=5)
    q2 = torch.randn(3, 2, 4, 64, generator=torch.Generator().manual_seed(6)).half().to(device)
    eager = pagegen.paged_verify(q2, k, v, bt, lens, max_seq_len=48)
    step = torch.compile(lambda *a: torch_ops.paged_verify(*a, max_seq_len=48), fullgraph=True, backend="aot_eager")
    out = step(q2, k, v, bt, lens)
    assert out.shape == q2.shape and torch.equal(out, eager)


def test_opcheck_pool_ops(device):
    """kv_write and copy_blocks declare their in-place writes to both pools."""
    g = torch.Generator().manual_seed(2)
    k = torch.randn(6, 16, 2, 64, generator=g).half().to(device)
    v = torch.randn(6, 16, 2, 64, generator=g).half().to(device)
    k_new = torch.randn(4, 2, 64, generator=g).half().to(device)
    v_new = torch.randn(4, 2, 64, generator=g).half().to(device)
    slots = torch.tensor([3, 17, -1, 90], dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.pagegen.kv_write.default, (k_new, v_new, k, v, slots, "NHD"),
                          test_utils=OPCHECK_TESTS)
    pairs = torch.tensor([[0, 4], [2, 5]], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.pagegen.copy_blocks.default, (k, v, pairs, "NHD"), test_utils=OPCHECK_TESTS)


def test_fake_tensor_trace(device):
    """Under FakeTensorMode the ops run no kernel and give outputs shaped like q."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, bt, lens = _decode_inputs(device)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fq, fk, fv, fbt, flens = (mode.from_tensor(t) for t in (q, k, v, bt, lens))
        out = torch_ops.paged_decode(fq, fk, fv, fbt, flens)
        assert out.shape == q.shape and out.dtype == q.dtype and out.stride() == q.stride()
        torch_ops.kv_write(fq[:, :2], fq[:, 2:], fk, fv, flens)  # [3, 2, 64] into the pool: shape-valid
        assert fk.shape == k.shape


def _step(q, k_new, v_new, k_cache, v_cache, slots, bt, lens, cu, max_q_len):
    """A model step's attention part: write the new tokens' K/V, then one extend over all of them
    (prefill) and one decode for each sequence's last token, in a graph with arithmetic around it."""
    torch_ops.kv_write(k_new, v_new, k_cache, v_cache, slots)
    out = torch_ops.paged_extend(q * 1.0, k_cache, v_cache, bt, cu, lens, max_q_len=max_q_len)
    last = cu[1:] - 1
    dec = torch_ops.paged_decode(q[last], k_cache, v_cache, bt, lens, max_seq_len=64)
    return out + 0.0, dec


def _step_inputs(device):
    g = torch.Generator().manual_seed(3)
    q_lens, bs = [5, 12], 16
    k, v = (torch.randn(8, bs, 2, 64, generator=g).half().to(device) for _ in range(2))
    bt = torch.tensor([[3, 0, 6, 6], [5, 1, 2, 7]], dtype=torch.int32, device=device)
    # sequence 0 has 20 cached tokens before the step, sequence 1 has 30: the new tokens follow them
    past = [20, 30]
    slots = torch.tensor([int(bt[b, p // bs]) * bs + p % bs for b, n in enumerate(q_lens)
                          for p in range(past[b], past[b] + n)], dtype=torch.int64, device=device)
    lens = torch.tensor([p + n for p, n in zip(past, q_lens, strict=True)], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 5, 17], dtype=torch.int32, device=device)
    q = torch.randn(17, 4, 64, generator=g).half().to(device)
    k_new, v_new = (torch.randn(17, 2, 64, generator=g).half().to(device) for _ in range(2))
    return q, k_new, v_new, k, v, slots, bt, lens, cu


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_step_matches_eager(device, backend):
    """fullgraph=True: one graph, no break; outputs and the written pools equal the eager run's,
    and both equal the float64 reference."""
    torch._dynamo.reset()
    q, k_new, v_new, k, v, slots, bt, lens, cu = _step_inputs(device)
    k2, v2 = k.clone(), v.clone()
    eager_out, eager_dec = _step(q, k_new, v_new, k, v, slots, bt, lens, cu, 12)
    counts = torch._dynamo.testing.CompileCounterWithBackend(backend)
    out, dec = torch.compile(_step, fullgraph=True, backend=counts)(q, k_new, v_new, k2, v2, slots, bt, lens, cu, 12)
    assert counts.frame_count == 1
    assert torch.equal(out, eager_out) and torch.equal(dec, eager_dec)
    assert torch.equal(k2, k) and torch.equal(v2, v)  # the in-place writes reached the caller's pools
    ref = paged_extend_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), cu.cpu(), lens.cpu())
    assert rel_err(out, ref) < 2e-3
    ref_dec = paged_decode_ref(q[cu[1:] - 1].cpu(), k.cpu(), v.cpu(), bt.cpu(), lens.cpu())
    assert rel_err(dec, ref_dec) < 2e-3


def test_copy_blocks_compiled(device):
    """copy_blocks inside a compiled function mutates the caller's pools like the eager op."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    k, v = (torch.randn(6, 16, 2, 64, generator=g).half().to(device) for _ in range(2))
    pairs = torch.tensor([[0, 4], [2, 5]], dtype=torch.int32, device=device)
    expect_k, expect_v = k.clone(), v.clone()
    expect_k[[4, 5]], expect_v[[4, 5]] = k[[0, 2]], v[[0, 2]]
    torch.compile(lambda a, b, p: torch_ops.copy_blocks(a, b, p), fullgraph=True, backend="aot_eager")(k, v, pairs)
    assert torch.equal(k, expect_k) and torch.equal(v, expect_v)


@pytest.mark.parametrize("eager", [pagegen.paged_decode, pagegen.paged_extend, pagegen.paged_verify,
                                   pagegen.kv_write, pagegen.copy_blocks])
def test_every_eager_argument_is_wired(eager):
    """A keyword added to an eager op (e.g. a new attention feature) must be added to its registered
    op (and wrapper), or listed in torch_ops.NOT_WIRED with the reason."""
    eager_args = set(inspect.signature(eager).parameters)
    schema_args = {a.name for a in getattr(torch.ops.pagegen, eager.__name__).default._schema.arguments}
    wrapper_args = set(inspect.signature(getattr(torch_ops, eager.__name__)).parameters)
    for where, args in (("op schema", schema_args), ("wrapper", wrapper_args)):
        missing = eager_args - args - torch_ops.NOT_WIRED
        assert not missing, f"{eager.__name__}: not in the pagegen.torch_ops {where}: {sorted(missing)}"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_inductor_and_cuda_graphs(mode):
    """On the GPU: the inductor backend, and CUDA graphs (reduce-overhead) replayed after the block
    tables, lengths and pools changed in place, match eager."""
    torch._dynamo.reset()
    q, k_new, v_new, k, v, slots, bt, lens, cu = _step_inputs("cuda")
    torch._dynamo.mark_static_address(k)  # the pools are written in place: keep one address (as engines do)
    torch._dynamo.mark_static_address(v)
    step = torch.compile(_step, fullgraph=True, mode=mode)
    for i in range(3):  # warm-up, record, replay
        k.normal_()
        v.normal_()
        k2, v2 = k.clone(), v.clone()
        q.normal_()
        eager_out, eager_dec = _step(q, k_new, v_new, k2, v2, slots, bt, lens, cu, 12)
        out, dec = step(q, k_new, v_new, k, v, slots, bt, lens, cu, 12)
        torch.cuda.synchronize()
        assert rel_err(out, eager_out) < 1e-3 and rel_err(dec, eager_dec) < 1e-3, f"call {i}"
        assert torch.equal(k, k2) and torch.equal(v, v2), f"call {i}"


@pytest.mark.gpu
def test_decode_in_a_captured_cuda_graph():
    """torch.cuda.graph captures torch_ops.paged_decode (no host sync); replays see new contents."""
    q, k, v, bt, lens = _decode_inputs("cuda")
    torch_ops.paged_decode(q, k, v, bt, lens, max_seq_len=bt.shape[1] * k.shape[1])  # warm-up: render, compile, plan
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch_ops.paged_decode(q, k, v, bt, lens, max_seq_len=bt.shape[1] * k.shape[1])
    for _ in range(2):
        q.normal_()
        k.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, paged_decode_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), lens.cpu())) < 2e-3
