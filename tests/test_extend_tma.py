"""The extend kernel's tensor-descriptor (TMA) K/V path (issue 18): against the float64 reference in
the interpreter (Triton 3.9's interpreter emulates host-side tensor descriptors), the pools it must
refuse (and then run the gather path, correctly), the spec and config rules, and on a GPU every
legal kv_tma config."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from conftest import TOL, make_paged_kv, rel_err

import pagegen
import pagegen.extend as ext
from pagegen import codegen
from pagegen.features import standard_alibi_slopes
from pagegen.reference import paged_extend_ref
from pagegen.spec import (
    TUNABLES,
    Config,
    KernelSpec,
    config_space,
    default_config,
    illegal_reason,
    kv_tma_reason,
    tunables,
)
from pagegen.tuner import search_space


@pytest.fixture
def descriptors(monkeypatch):
    """Counts the TensorDescriptors pagegen.extend builds (one K and one V per descriptor set)."""
    made = []
    real = ext.TensorDescriptor

    def counting(*args, **kwargs):
        made.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ext, "TensorDescriptor", counting)
    return made


def cu_seqlens(q_lens: list[int], device) -> torch.Tensor:
    out = [0]
    for n in q_lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def poison_tails(k, v, bt, lens, layout: str) -> None:
    """NaN in every slot of a sequence's last page past its seq_len: the TMA box of a diagonal tile
    reads those keys (the gather masks them), so the kernel must drop them, not multiply them by 0."""
    page = k.shape[1] if layout == "NHD" else k.shape[2]
    for b, n in enumerate(lens.tolist()):
        if n % page:
            blk = int(bt[b, n // page])
            for t in (k, v):
                if layout == "NHD":
                    t[blk, n % page:] = float("nan")
                else:
                    t[blk, :, n % page:] = float("nan")


def make_case(device, ctx, qn, kv_heads, group, head_dim, block_size, layout, dtype=torch.float16, seed=0):
    """Random paged pool (tails poisoned), queries, offsets and poisoned output for one ragged batch."""
    g = torch.Generator().manual_seed(seed)
    lens_list = [c + n for c, n in zip(ctx, qn, strict=True)]
    k, v, bt, lens = make_paged_kv(lens_list, kv_heads, head_dim, block_size, layout, dtype, "cpu", generator=g)
    poison_tails(k, v, bt, lens, layout)
    q = torch.randn(sum(qn), kv_heads * group, head_dim, generator=g).to(dtype)
    to = lambda t: t.to(device)  # noqa: E731
    return dict(q=to(q), k=to(k), v=to(v), bt=to(bt), cu=cu_seqlens(qn, device), lens=to(lens), layout=layout,
                max_q_len=max(qn))


def check(case, config, **features) -> torch.Tensor:
    """paged_extend with `config` against the float64 reference; returns the output."""
    out = torch.full_like(case["q"], float("nan"))
    pagegen.paged_extend(case["q"], case["k"], case["v"], case["bt"], case["cu"], case["lens"], layout=case["layout"],
                         config=config, out=out, max_q_len=case["max_q_len"], **features)
    ref = paged_extend_ref(*(case[n].cpu() for n in ("q", "k", "v", "bt", "cu", "lens")), layout=case["layout"],
                           **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in features.items()})
    err = rel_err(out, ref)
    assert err < TOL[case["q"].dtype], f"rel err {err:.2e} with {config}"
    return out


# ---------------------------------------------------------------- the TMA path against the reference

# (layout, block_size, block_n): tiles smaller than a page and as large as one, at pages of 64 and 256
TMA_CASES = [("NHD", 64, 32), ("NHD", 256, 64), ("HND", 64, 64), ("HND", 256, 32)]


@pytest.mark.parametrize("layout,block_size,block_n", TMA_CASES)
def test_tma_path_matches_reference(device, descriptors, layout, block_size, block_n):
    """A ragged batch: a plain prefill crossing a page, a prefix ending mid-page with new tokens that
    cross into the next page, one token over a prefix, a prefill ending exactly at a page boundary."""
    ctx = [0, block_size + 3, 2 * block_size - 1, 0]
    qn = [block_size + 5, 9, 1, block_size]
    case = make_case(device, ctx, qn, 2, 2, 64, block_size, layout, seed=block_size + block_n)
    cfg = Config(block_m=16, block_n=block_n, num_warps=4, num_stages=1, kv_tma=1)
    check(case, cfg)
    assert len(descriptors) == 2  # the TMA path ran (K and V descriptors), not the fallback


def test_tma_path_with_features(device, descriptors):
    """Softcap, sinks and ALiBi change only the scores: they work on the TMA path (group 4, 2 KV heads)."""
    case = make_case(device, [0, 70], [20, 11], 2, 4, 64, 64, "NHD", seed=5)
    g = torch.Generator().manual_seed(6)
    feats = dict(softcap=5.0, sinks=(2.0 * torch.randn(8, generator=g)).to(device),
                 alibi_slopes=standard_alibi_slopes(8).to(device))
    check(case, Config(block_m=32, block_n=64, num_warps=4, num_stages=1, kv_tma=1), **feats)
    assert len(descriptors) == 2


def test_plan_reuses_descriptors_and_falls_back_per_run(device, descriptors):
    """An ExtendPlan builds the descriptors once for a pool and reuses them while its addresses stay;
    a run on a pool of the same layout whose base is not 16-byte aligned takes the gather path and
    is still right."""
    case = make_case(device, [3, 64], [30, 5], 2, 2, 64, 64, "NHD", seed=7)
    cfg = Config(block_m=16, block_n=64, num_warps=4, num_stages=1, kv_tma=1)
    args = [case[n] for n in ("q", "k", "v", "bt", "cu", "lens")]
    plan = pagegen.ExtendPlan(*args, config=cfg, max_q_len=case["max_q_len"])
    ref = paged_extend_ref(*(t.cpu() for t in args))
    for _ in range(2):
        assert rel_err(plan.run(*args), ref) < TOL[torch.float16]
    assert len(descriptors) == 2  # built at the first run, reused at the second
    # the same pools, one element further into a bigger buffer: same shape and strides, misaligned base
    k2, v2 = (torch.empty(t.numel() + 1, dtype=t.dtype, device=device)[1:].view(t.shape) for t in args[1:3])
    k2.copy_(args[1])
    v2.copy_(args[2])
    assert k2.stride() == args[1].stride() and k2.data_ptr() % 16
    assert rel_err(plan.run(args[0], k2, v2, *args[3:]), ref) < TOL[torch.float16]
    assert len(descriptors) == 2  # no descriptor for the misaligned pool


# ---------------------------------------------------------------- pools the TMA path refuses


def _spec(layout="NHD", block_size=64, **kw) -> KernelSpec:
    return KernelSpec("extend", head_dim=64, block_size=block_size, layout=layout, dtype="fp16", group_size=2, **kw)


def test_kv_tma_problem_rules():
    """kv_tma_problem accepts a packed pool and names what is wrong with each pool it refuses."""
    nhd = torch.zeros(5, 64, 2, 64, dtype=torch.float16)
    hnd = torch.zeros(5, 2, 64, 64, dtype=torch.float16)
    assert ext.kv_tma_problem(_spec(), nhd, nhd) is None
    assert ext.kv_tma_problem(_spec("HND"), hnd, hnd) is None
    assert ext.kv_tma_view(_spec(), nhd) == ([5 * 64, 2 * 64], [2 * 64, 1])
    assert ext.kv_tma_view(_spec("HND"), hnd) == ([5 * 2 * 64, 64], [64, 1])
    stacked = torch.zeros(5, 2, 64, 2, 64, dtype=torch.float16)[:, 0]  # K of a [num_blocks, 2, ...] pool
    assert "stride(0) must be block_size x stride(1)" in ext.kv_tma_problem(_spec(), stacked, stacked)
    heads = torch.zeros(5, 4, 64, 64, dtype=torch.float16)[:, :2]  # two of four heads: not one 2D view
    assert "must be contiguous" in ext.kv_tma_problem(_spec("HND"), heads, heads)
    odd = torch.zeros(5 * 64 * 2 * 64 + 1, dtype=torch.float16)[1:].view(5, 64, 2, 64)
    assert "16-byte aligned" in ext.kv_tma_problem(_spec(), nhd, odd)
    wide = torch.zeros(5, 64, 2 * 64 + 4, dtype=torch.float16)[:, :, :128].view(5, 64, 2, 64)  # row of 264 B
    assert "multiple of 16 bytes" in ext.kv_tma_problem(_spec(), wide, wide)
    assert "block_size=16" in ext.kv_tma_problem(_spec(block_size=16), nhd, nhd)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_refused_pool_runs_the_gather_path(device, descriptors, layout):
    """kv_tma=1 on a K|V-stacked pool view ([num_blocks, 2, ...]): no descriptor, right answer."""
    case = make_case(device, [0, 67], [12, 6], 2, 2, 64, 64, layout, seed=11)
    stacked = torch.stack([case["k"], case["v"]], dim=1)  # [nb, 2, ...]: k = stacked[:, 0] is a strided view
    case["k"], case["v"] = stacked[:, 0], stacked[:, 1]
    check(case, Config(block_m=16, block_n=32, num_warps=4, num_stages=1, kv_tma=1))
    assert descriptors == []


def test_cuda_without_tma_is_refused(monkeypatch):
    """A device without TMA (before Hopper) takes the gather path."""
    nhd = torch.zeros(5, 64, 2, 64, dtype=torch.float16)
    monkeypatch.setattr(ext, "_has_tma", lambda device: False)
    assert "has no TMA" in ext.kv_tma_problem(_spec(), nhd, nhd)


# ---------------------------------------------------------------- spec and config rules


def test_kv_tma_reason_rules():
    assert kv_tma_reason(_spec()) is None
    assert kv_tma_reason(_spec("HND", 256)) is None
    assert "block_size=32" in kv_tma_reason(_spec(block_size=32))
    assert "power of two" in kv_tma_reason(KernelSpec("extend", head_dim=80, block_size=64))
    assert "fp8" in kv_tma_reason(_spec(kv_dtype="fp8_e4m3"))
    assert "sliding_window" in kv_tma_reason(_spec(sliding_window=True))
    assert "kv_packed" in kv_tma_reason(_spec(kv_packed=True))
    assert "extend only" in kv_tma_reason(KernelSpec("decode", head_dim=64, block_size=64))


def test_illegal_reason_kv_tma():
    """kv_tma=1 needs a spec with the path and a key tile inside one page."""
    ok = Config(block_m=64, block_n=64, num_warps=4, num_stages=3, kv_tma=1)
    assert illegal_reason(_spec(), ok) is None
    assert "block_n <= block_size" in illegal_reason(_spec(), dataclasses.replace(ok, block_n=128))
    assert illegal_reason(_spec(block_size=128), dataclasses.replace(ok, block_n=128)) is None
    for spec in (_spec(block_size=16), _spec(sliding_window=True), _spec(kv_dtype="fp8_e5m2"),
                 KernelSpec("decode", head_dim=64, block_size=64)):
        assert illegal_reason(spec, ok).startswith("kv_tma=1: "), spec
    assert "kv_tma=2" in illegal_reason(_spec(), dataclasses.replace(ok, kv_tma=2))


def test_config_dict_form():
    """Tables written before kv_tma read as kv_tma=0, and writing a kv_tma=0 config adds no key."""
    old = {"block_n": 64, "num_warps": 8, "num_stages": 5, "split_size": 0, "block_m": 128}
    cfg = Config.from_dict(old)
    assert cfg.kv_tma == 0 and cfg.to_dict() == old
    on = dataclasses.replace(cfg, kv_tma=1)
    assert on.to_dict() == {**old, "kv_tma": 1} and Config.from_dict(on.to_dict()) == on
    with pytest.raises(ValueError, match="kv_tma"):
        Config.from_dict({**old, "kv_tma": True})


def test_search_space_has_kv_tma_only_where_it_renders():
    """The tuner searches kv_tma for extend specs whose kernel has the path, and only there."""
    assert "kv_tma" in TUNABLES["extend"]
    assert tunables(_spec())["kv_tma"] == (0, 1)
    assert search_space(_spec())["kv_tma"] == [0, 1]
    for spec in (_spec(block_size=16), KernelSpec("decode", head_dim=64, block_size=64),
                 KernelSpec("extend", head_dim=96, block_size=256)):
        assert "kv_tma" not in tunables(spec) and "kv_tma" not in search_space(spec)
    space = config_space(_spec())
    tma = [c for c in space if c.kv_tma]
    assert tma and all(c.block_n <= 64 for c in tma)
    assert not any(c.kv_tma for c in config_space(_spec(block_size=16)))
    # the heuristic takes the path where it renders (1.12-1.18x the gather on the H200), nowhere else
    assert default_config(_spec()).kv_tma == 1
    assert default_config(_spec(block_size=16)).kv_tma == 0
    assert default_config(KernelSpec("extend", head_dim=96, block_size=256)).kv_tma == 0


def test_only_specs_with_the_path_render_it():
    """The descriptor code is in the source exactly where kv_tma_reason(spec) is None."""
    for spec in (_spec(), _spec("HND", 256), _spec(block_size=32), _spec(sliding_window=True),
                 KernelSpec("extend", head_dim=80, block_size=64)):
        assert ("k_desc" in codegen.render(spec)) == (kv_tma_reason(spec) is None), spec


# ---------------------------------------------------------------- GPU: every legal kv_tma config

GPU_SPECS = [  # (layout, block_size, head_dim, dtype): the benchmark's geometry first, then its neighbours
    ("NHD", 64, 128, torch.bfloat16), ("HND", 64, 128, torch.bfloat16), ("NHD", 256, 64, torch.float16),
    ("NHD", 128, 256, torch.bfloat16),
]


def gpu_cases() -> list[tuple]:
    """(spec fields, config) pairs: the legal kv_tma=1 configs of the benchmark's spec at 4 or 8 warps and
    2, 3 or 5 stages, and of its neighbours those at 8 warps and 3 stages (every legal config, about 1100,
    would be an hour of compiles; the tuner checks each config it times against the reference anyway)."""
    out = []
    for i, (layout, bs, hd, dtype) in enumerate(GPU_SPECS):
        spec = KernelSpec("extend", head_dim=hd, block_size=bs, layout=layout,
                          dtype="bf16" if dtype == torch.bfloat16 else "fp16", group_size=4)
        for cfg in config_space(spec):
            if cfg.kv_tma and ((i == 0 and cfg.num_warps in (4, 8) and cfg.num_stages in (2, 3, 5))
                               or (cfg.num_warps == 8 and cfg.num_stages == 3)):
                out.append(pytest.param(spec, dtype, cfg, id=f"{spec.variant_key()}-{cfg.block_m}x{cfg.block_n}"
                                        f"-w{cfg.num_warps}-s{cfg.num_stages}"))
    return out


_GPU_CASES: dict = {}


@pytest.mark.gpu
@pytest.mark.parametrize("spec,dtype,cfg", gpu_cases())
def test_gpu_legal_kv_tma_config(device, descriptors, spec, dtype, cfg):
    """A legal kv_tma=1 config compiled on the GPU against the float64 reference (32 q / 8 KV heads, a
    ragged batch: a plain prefill, long and mid-page prefixes, one token). A failure is a bug of
    illegal_reason (it should have refused the config) or of the template."""
    if spec not in _GPU_CASES:  # one input set and reference per spec, shared by its configs
        case = make_case(device, [0, 1000, 3 * spec.block_size + 7, 77], [300, 129, 1, 64], 8, 4, spec.head_dim,
                         spec.block_size, spec.layout, dtype=dtype, seed=spec.block_size)
        ref = paged_extend_ref(*(case[n].cpu() for n in ("q", "k", "v", "bt", "cu", "lens")), layout=spec.layout)
        _GPU_CASES[spec] = (case, ref)
    case, ref = _GPU_CASES[spec]
    out = torch.full_like(case["q"], float("nan"))
    pagegen.paged_extend(case["q"], case["k"], case["v"], case["bt"], case["cu"], case["lens"], layout=spec.layout,
                         config=cfg, out=out, max_q_len=case["max_q_len"])
    assert len(descriptors) == 2  # the TMA path ran
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"rel err {err:.2e} with {cfg}"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_gpu_plan_with_tma_in_a_cuda_graph(device, descriptors, layout):
    """An ExtendPlan on the TMA path captured in a CUDA graph (host descriptors: nothing allocated,
    no sync) replays correctly on new contents copied into the captured buffers."""
    case = make_case(device, [0, 500, 70], [256, 64, 9], 8, 4, 128, 64, layout, dtype=torch.bfloat16, seed=3)
    cfg = Config(block_m=128, block_n=64, num_warps=8, num_stages=3, kv_tma=1)
    args = [case[n] for n in ("q", "k", "v", "bt", "cu", "lens")]
    plan = pagegen.ExtendPlan(*args, layout=layout, config=cfg, max_q_len=case["max_q_len"])
    out = torch.full_like(case["q"], float("nan"))
    plan.run(*args, out=out)  # warm: compile (and build the descriptors) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.run(*args, out=out)
    for _ in range(3):
        args[0].copy_(torch.randn_like(args[0]))
        args[1].copy_(torch.randn_like(args[1]))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_extend_ref(*(t.cpu() for t in args), layout=layout)
        assert rel_err(out, ref) < TOL[torch.bfloat16]
    assert len(descriptors) == 2


def test_every_layout_and_page_is_covered():
    """TMA_CASES covers both layouts at pages of 64 and 256, with tiles below and at the page size."""
    cases = set(TMA_CASES)
    assert {(lay, bs) for lay, bs, _ in cases} == set(itertools.product(("NHD", "HND"), (64, 256)))
    assert any(n < bs for _, bs, n in cases) and any(n == bs for _, bs, n in cases)
