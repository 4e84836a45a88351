"""fp8 KV pools (issue 16): the spec axis, kv_write's quantization, copy_blocks, KVCache sizing, the
reference's emulation, and decode / extend reading fp8 pools (dequantized in registers).

kv_write rounds in-kernel with exact fp32/integer arithmetic and casts only values the fp8 format
holds, so its result is bit-exact against quantize_fp8_ref both in Triton's interpreter (whose own
fp32 -> fp8 cast is inexact: bench/NOTES.md, "fp8 in the interpreter") and on the GPU. Decode and
extend are checked against paged_*_fp8_ref (exact dequantization, then float64 attention) with the
kernel tolerance of the q dtype. They widen fp8 to fp16 (exact for every finite code) and run both dots
in fp16 with fp32 accumulation, under the interpreter and on the GPU alike (so, unlike the plain
kernels, their bf16 queries are checked on the CPU too: no bf16 dot is involved). The same tests run
compiled with PAGEGEN_TEST_DEVICE=cuda; the gpu-marked ones check what only a GPU shows.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
import triton
import triton.language as tl
from conftest import DTYPES, TOL, make_paged_kv, rel_err

from pagegen import codegen, copy_blocks, kv_write, paged_decode, paged_extend
from pagegen.decode import DecodePlan
from pagegen.kv_cache import KVCache
from pagegen.reference import (
    absmax_scale_ref,
    copy_blocks_ref,
    dequantize_fp8_ref,
    dequantize_pool_ref,
    kv_write_fp8_ref,
    paged_decode_fp8_ref,
    paged_decode_ref,
    paged_extend_fp8_ref,
    paged_extend_ref,
    quantize_fp8_ref,
)
from pagegen.spec import FP8_FORMATS, Config, KernelSpec, enumerate_specs
from pagegen.workloads import ELEM_BYTES, decode_bytes, parse_variant_key

FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
NAN_BITS = 0x7F  # a NaN in both formats (e4m3fn: S.1111.111; e5m2: S.11111.11)


def all_codes(fp8: torch.dtype) -> torch.Tensor:
    """The 256 bit patterns of an fp8 format, in order."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8)


def finite_grid(fp8: torch.dtype) -> torch.Tensor:
    """Every finite value of the format, sorted, in float64 (+0 once)."""
    v = all_codes(fp8).double()
    return v[torch.isfinite(v)].unique()


def nasty_values(fp8: torch.dtype, gen: torch.Generator, n: int = 1024) -> torch.Tensor:
    """randn at several spreads, every grid value, every midpoint (ties), subnormals, out of range."""
    grid = finite_grid(fp8)
    fmax = torch.finfo(fp8).max
    mids = (grid[1:] + grid[:-1]) / 2
    spread = torch.cat([torch.randn(n, generator=gen) * s for s in (1e-3, 1.0, 30.0)]).double()
    edge = torch.tensor([fmax * 1.001, -fmax * 1.001, fmax * 4, -1e30, float("inf"), float("-inf"), -0.0, 1e-30])
    return torch.cat([spread, grid, mids, edge.double()])


def poisoned_pool(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, layout: str, fp8: torch.dtype,
                  device: str) -> torch.Tensor:
    shape = (num_blocks, block_size, kv_heads, head_dim) if layout == "NHD" else (num_blocks, kv_heads, block_size,
                                                                                   head_dim)
    return torch.full(shape, NAN_BITS, dtype=torch.uint8, device=device).view(fp8)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view(torch.uint8)


# -- the spec axis -------------------------------------------------------------------------------

def test_fp8_spec_keys_and_limits():
    s = KernelSpec("kv_write", head_dim=128, block_size=16, dtype="bf16", kv_dtype="fp8_e4m3")
    assert s.is_fp8 and s.variant_key() == "kv_write_bf16_kvfp8e4m3_hd128_bs16_nhd_g1"
    c = KernelSpec("copy_blocks", head_dim=64, block_size=8, layout="HND", dtype="fp16", kv_dtype="fp8_e5m2")
    assert c.variant_key() == "copy_blocks_fp16_kvfp8e5m2_hd64_bs8_hnd_g1"
    assert KernelSpec.from_dict(s.to_dict()) == s
    # existing keys are unchanged and never mention fp8
    assert KernelSpec("decode", 128, 16, group_size=4).variant_key() == "decode_bf16_hd128_bs16_nhd_g4"
    assert not any("fp8" in x.variant_key() for x in enumerate_specs())
    d8 = KernelSpec("decode", head_dim=128, block_size=16, kv_dtype="fp8_e4m3", group_size=4)
    assert d8.variant_key() == "decode_bf16_kvfp8e4m3_hd128_bs16_nhd_g4"
    e8 = KernelSpec("extend", head_dim=80, block_size=1, layout="HND", dtype="fp16", kv_dtype="fp8_e5m2", group_size=7)
    for spec in (s, c, d8, e8):  # the tuner's and the CLI's key parser knows fp8 keys
        assert parse_variant_key(spec.variant_key()) == spec
    # a decode step's bytes: fp8 KV at 1 byte an element, q and out at 2
    plain = KernelSpec("decode", head_dim=128, block_size=16, group_size=4)
    assert ELEM_BYTES["fp8_e4m3"] == ELEM_BYTES["fp8_e5m2"] == 1
    kv_bytes = 128 * 4096 * 8 * 128 * 2
    qo = 128 * 32 * 128 * 2 * 2
    assert decode_bytes(d8, 8, 4096, 128) == kv_bytes + qo and decode_bytes(plain, 8, 4096, 128) == 2 * kv_bytes + qo
    with pytest.raises(ValueError, match="kv_dtype='fp8'"):
        KernelSpec("kv_write", head_dim=128, block_size=16, kv_dtype="fp8")
    # the format facts the kernels bind agree with torch's
    for name, (mant, emin, fmax) in FP8_FORMATS.items():
        fi = torch.finfo(FP8[name])
        assert fmax == fi.max and 2.0**emin == fi.tiny and fi.eps == 2.0**-mant


def test_fp8_code_only_in_fp8_renders():
    for fam in ("kv_write", "copy_blocks"):
        plain = codegen.render(KernelSpec(fam, head_dim=96, block_size=16, dtype="fp16"))
        assert "fp8" not in plain.lower() and "scale" not in plain
    for fam in ("decode", "extend"):  # tests/test_render_stable.py pins the plain sources exactly
        for feats in ({}, {"sliding_window": True, "softcap": True, "sinks": True, "alibi": True}):
            plain = codegen.render(KernelSpec(fam, head_dim=96, block_size=16, dtype="fp16", group_size=4, **feats))
            fp8 = codegen.render(KernelSpec(fam, head_dim=96, block_size=16, dtype="fp16", group_size=4,
                                            kv_dtype="fp8_e4m3", **feats))
            assert "fp8" not in plain.lower() and "k_scale_ptr" not in plain and "v_scale" not in plain
            assert "k_scale_ptr" in fp8 and "o = acc * (v_scale / l_safe)[:, None]" in fp8
            assert "qk_scale = qk_scale * tl.load(k_scale_ptr + kvh * stride_ks)" in fp8
    q = codegen.render(KernelSpec("kv_write", head_dim=96, block_size=16, dtype="fp16", kv_dtype="fp8_e5m2"))
    assert "quantize_fp8" in q and "FP8_MAX = tl.constexpr(57344.0)" in q and "FP8_MANT = tl.constexpr(2)" in q


# -- the reference's rounding --------------------------------------------------------------------

@pytest.mark.parametrize("kv", list(FP8))
def test_quantize_ref_is_saturating_round_to_nearest_even(kv):
    """quantize_fp8_ref against a brute-force search of the grid (ties to the even code)."""
    fp8 = FP8[kv]
    gen = torch.Generator().manual_seed(zlib.crc32(kv.encode()))
    x = nasty_values(fp8, gen).float()
    got = quantize_fp8_ref(x[:, None, None], 1.0, fp8).reshape(-1).double()
    grid = finite_grid(fp8)
    fmax = torch.finfo(fp8).max
    xc = x.double().clamp(-fmax, fmax)
    dist = (xc[:, None] - grid[None, :]).abs()
    near = dist == dist.min(1, keepdim=True).values
    codes = grid.to(fp8).view(torch.uint8).long()
    even = (codes % 2 == 0)[None, :]
    pick = torch.where(near.sum(1) > 1, (near & even).double().argmax(1), near.double().argmax(1))
    want = grid[pick]
    assert torch.equal(got.abs(), want.abs()) and bool((got.abs() <= fmax).all())
    assert torch.equal(torch.signbit(got[got != 0]), torch.signbit(x.double()[got != 0]))


def test_quantize_dequantize_relative_error_bound():
    """In the normal range the round trip is within half an ulp: 2^-(mantissa + 1) relative."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, 32, generator=gen) * torch.tensor([0.5, 2.0, 9.0, 100.0])[:, None]
    scale = x.abs().amax(dim=(0, 2)) / 400  # per head, below e4m3's max
    for kv, (mant, emin, _fmax) in FP8_FORMATS.items():
        back = dequantize_fp8_ref(quantize_fp8_ref(x, scale, FP8[kv]), scale)
        normal = (x.double() / scale[:, None].double()).abs() >= 2.0**emin
        rel = ((back - x.double()).abs() / x.double().abs())[normal]
        assert float(rel.max()) <= 2.0 ** -(mant + 1) * (1 + 1e-6)


def test_fp8_attention_reference_dequantizes_exactly():
    """paged_decode_fp8_ref = float64 attention over stored * scale; its distance to the unquantized
    attention is the quantization error (non-zero, a few percent at most for e4m3 and e5m2)."""
    gen = torch.Generator().manual_seed(11)
    nb, bs, hk, d, g = 6, 8, 2, 64, 2
    k = torch.randn(nb, bs, hk, d, generator=gen)
    v = torch.randn(nb, bs, hk, d, generator=gen)
    q = torch.randn(2, hk * g, d, generator=gen)
    tables = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    lens = torch.tensor([19, 24], dtype=torch.int32)
    exact = paged_decode_ref(q, k, v, tables, lens)
    for kv in FP8:
        ks, vs = k.abs().amax(dim=(0, 1, 3)) / 200, torch.tensor(0.02)
        k8, v8 = quantize_fp8_ref(k, ks, FP8[kv]), quantize_fp8_ref(v, vs, FP8[kv])
        ref = paged_decode_fp8_ref(q, k8, v8, tables, lens, k_scale=ks, v_scale=vs)
        manual = paged_decode_ref(q, k8.double() * ks[None, None, :, None].double(), v8.double() * vs.double(), tables,
                                  lens)
        assert torch.equal(ref, manual)
        err = float((ref - exact).norm() / exact.norm())
        assert 0 < err < 0.1, err
        cu = torch.tensor([0, 3, 8], dtype=torch.int32)  # 3 and 5 new tokens at the ends of the sequences
        qx = torch.randn(8, hk * g, d, generator=gen)
        ext = paged_extend_fp8_ref(qx, k8, v8, tables, cu, lens, k_scale=ks, v_scale=vs)
        assert torch.equal(ext, paged_extend_ref(qx, k8.double() * ks[None, None, :, None].double(),
                                                 v8.double() * vs.double(), tables, cu, lens))
    hnd = k.transpose(1, 2)
    assert torch.equal(dequantize_pool_ref(hnd.to(torch.float8_e4m3fn), ks, layout="HND").transpose(1, 2),
                       dequantize_pool_ref(k.to(torch.float8_e4m3fn), ks))


# -- kv_write into fp8 pools ---------------------------------------------------------------------

@pytest.mark.parametrize("per_head", [False, True], ids=["per_tensor", "per_head"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kv", list(FP8))
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_kv_write_fp8_matches_reference_bitwise(layout, kv, dtype, per_head, device):
    fp8, dt = FP8[kv], DTYPES[dtype]
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layout, kv, dtype, per_head)).encode()))
    bs, hk, d = (8, 3, 80) if per_head else (16, 2, 64)  # a padded head_dim too
    nb, t = 5, 23
    k = poisoned_pool(nb, bs, hk, d, layout, fp8, device)
    v = poisoned_pool(nb, bs, hk, d, layout, fp8, device)
    k_ref, v_ref = k.clone(), v.clone()
    spread = torch.tensor([0.3, 4.0, 50.0])[:hk, None]
    k_new = (torch.randn(t, hk, d, generator=gen) * spread).to(dt)
    v_new = torch.randn(t, hk, d, generator=gen).to(dt)
    # ties, subnormals, saturation: grid values and midpoints of the format in some rows (at scale 1)
    special = nasty_values(fp8, gen, n=8)
    special = special[torch.randint(0, special.numel(), (4, hk, d), generator=gen)]
    k_new[:4] = special.to(dt)
    if per_head:
        k_scale = torch.tensor([0.5, 1.0, 0.037])[:hk]
        v_scale = torch.tensor([1.0, 0.25, 3.0])[:hk]
    else:
        k_scale, v_scale = torch.tensor([1.0]), torch.tensor(0.125)
    slots = torch.randperm(nb * bs, generator=gen)[:t]
    slots[torch.randperm(t, generator=gen)[:5]] = -1
    args = [x.to(device) for x in (k_new, v_new)]
    kv_write(*args, k, v, slots.to(device), layout=layout, k_scale=k_scale.to(device), v_scale=v_scale.to(device))
    kv_write_fp8_ref(k_new, v_new, k_ref, v_ref, slots, k_scale=k_scale, v_scale=v_scale, layout=layout)
    assert torch.equal(bits(k), bits(k_ref)) and torch.equal(bits(v), bits(v_ref))
    written = int((slots >= 0).sum()) * hk * d
    assert int((bits(k) != NAN_BITS).sum()) <= written  # untouched slots keep their poison
    assert int(torch.isnan(k.cpu().float()).sum()) >= k.numel() - written
    fmax = torch.finfo(fp8).max
    assert bool((k.cpu().float().nan_to_num(0).abs() <= fmax).all())  # saturated, no inf


def test_kv_write_fp8_strided_rows_and_new_scale_values(device):
    """k_new/v_new as views of a fused QKV tensor, per-head scales as a strided view; changing the
    scales' values only (same tensors) changes the stored codes accordingly, same kernel module."""
    gen = torch.Generator().manual_seed(5)
    fp8, bs, hk, d, nb, t = torch.float8_e4m3fn, 16, 2, 64, 4, 20
    fused = torch.randn(t, 3, hk, d, generator=gen).to(torch.bfloat16)
    slots = torch.randperm(nb * bs, generator=gen)[:t]
    k_scale = torch.tensor([0.02, 9.0, 0.5, 9.0], device=device)[::2]  # a strided view: stride 2 between heads
    v_scale = torch.tensor([0.1], device=device)
    mod = None
    for _step in range(2):
        k = poisoned_pool(nb, bs, hk, d, "NHD", fp8, device)
        v = poisoned_pool(nb, bs, hk, d, "NHD", fp8, device)
        k_ref, v_ref = k.cpu().clone(), v.cpu().clone()
        f = fused.to(device)
        kv_write(f[:, 1], f[:, 2], k, v, slots.to(device), k_scale=k_scale, v_scale=v_scale)
        kv_write_fp8_ref(fused[:, 1], fused[:, 2], k_ref, v_ref, slots, k_scale=k_scale.cpu(),
                         v_scale=v_scale.cpu())
        assert torch.equal(bits(k), bits(k_ref)) and torch.equal(bits(v), bits(v_ref))
        spec = KernelSpec("kv_write", head_dim=d, block_size=bs, dtype="bf16", kv_dtype="fp8_e4m3")
        assert mod is None or codegen.load(spec) is mod
        mod = codegen.load(spec)
        k_scale.mul_(3.0)
        v_scale.fill_(0.01)


def test_kv_write_fp8_rejects_bad_scales(device):
    fp8, bs, hk, d = torch.float8_e5m2, 8, 2, 64
    k = poisoned_pool(3, bs, hk, d, "NHD", fp8, device)
    v = k.clone()
    new = torch.randn(4, hk, d).to(torch.float16).to(device)
    slots = torch.arange(4, device=device)
    one = torch.ones(1, device=device)
    with pytest.raises(ValueError, match="k_scale is required for an fp8_e5m2 pool"):
        kv_write(new, new, k, v, slots)
    with pytest.raises(ValueError, match=r"v_scale has shape \(3,\); expected 1 element .* or \[2\]"):
        kv_write(new, new, k, v, slots, k_scale=one, v_scale=torch.ones(3, device=device))
    with pytest.raises(TypeError, match="k_scale has dtype float16; expected float32"):
        kv_write(new, new, k, v, slots, k_scale=one.half(), v_scale=one)
    with pytest.raises(TypeError, match="k_new/v_new dtype"):
        kv_write(new, new.bfloat16(), k, v, slots, k_scale=one, v_scale=one)
    with pytest.raises(TypeError, match="k_new has dtype float8_e5m2"):
        kv_write(new.to(fp8), new.to(fp8), k, v, slots, k_scale=one, v_scale=one)
    plain = torch.zeros(3, bs, hk, d, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="apply to fp8 pools only"):
        kv_write(new, new, plain, plain.clone(), slots, k_scale=one, v_scale=one)


# -- copy_blocks of fp8 pools --------------------------------------------------------------------

@pytest.mark.parametrize("kv", list(FP8))
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_copy_blocks_fp8_copies_every_bit_pattern(layout, kv, device):
    """Blocks hold all 256 codes (NaN, +-0, subnormals, the max; inf for e5m2); copies are bitwise."""
    fp8 = FP8[kv]
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layout, kv)).encode()))
    nb, bs, hk, d = 6, 8, 2, 64  # 8 * 2 * 64 = 1024 elements a block: every code 4 times
    shape = (nb, bs, hk, d) if layout == "NHD" else (nb, hk, bs, d)
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    codes[0].view(-1)[:256] = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    k = codes.view(fp8).to(device)
    v = codes.flip(0).contiguous().view(fp8).to(device)
    k_ref, v_ref = k.cpu().clone(), v.cpu().clone()
    pairs = torch.tensor([[0, 3], [5, 1], [2, 4]])
    copy_blocks(k, v, pairs.to(device), layout=layout)
    copy_blocks_ref(k_ref, v_ref, pairs, layout=layout)
    assert torch.equal(bits(k), bits(k_ref)) and torch.equal(bits(v), bits(v_ref))
    assert torch.equal(bits(k)[3], codes[0])


# -- KVCache / SequenceManager sizing ------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_kvcache_fp8_holds_twice_the_tokens(layout):
    kw = dict(block_size=16, kv_heads=2, head_dim=64, layout=layout, device="cpu", num_layers=3)
    budget = 3 * 2**20 + 12345
    bf = KVCache(dtype=torch.bfloat16, memory_bytes=budget, **kw)
    f8 = KVCache(dtype=torch.float8_e4m3fn, memory_bytes=budget, **kw)
    assert f8.block_bytes * 2 == bf.block_bytes
    assert f8.num_blocks in (2 * bf.num_blocks, 2 * bf.num_blocks + 1)
    assert f8.nbytes <= budget and f8.k.element_size() == 1 and f8.k.dtype == torch.float8_e4m3fn
    assert f8.k[0].shape == f8.pool_shape and f8.is_fp8 and not bf.is_fp8
    # scales: [layers, kv_heads] fp32, 1.0, views per layer
    ks, vs = f8.layer_scales(1)
    assert f8.k_scale.shape == (3, 2) and ks.dtype == torch.float32 and bool((ks == 1).all())
    ks.fill_(0.5)
    assert float(f8.k_scale[1, 0]) == 0.5 and float(f8.k_scale[0, 0]) == 1.0
    with pytest.raises(ValueError, match="not fp8"):
        bf.layer_scales(0)
    # the allocator over each pool: fp8 runs twice the sequences of 100 tokens (7 blocks each)
    counts = []
    for cache in (bf, f8):
        mgr = cache.sequence_manager(enable_prefix_caching=False)
        n = 0
        while mgr.pool.num_allocatable >= 7:
            mgr.add(n, list(range(100)))
            n += 1
        counts.append(n)
    assert counts[1] >= 2 * counts[0] > 0
    e5 = KVCache(dtype=torch.float8_e5m2, num_blocks=4, **kw).fill_(float("nan"))
    assert bool(torch.isnan(e5.k.float()).all())
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        KVCache(dtype=torch.float32, num_blocks=4, **kw)


def test_kvcache_fp8_round_trip_through_kv_write(device):
    """Write with the cache's own per-head scales, read back with the reference dequantization."""
    cache = KVCache(block_size=8, kv_heads=2, head_dim=64, dtype=torch.float8_e5m2, device=device, num_blocks=4)
    cache.fill_(float("nan"))
    cache.k_scale.copy_(torch.tensor([[0.5, 2.0]]))
    gen = torch.Generator().manual_seed(2)
    k_new = torch.randn(10, 2, 64, generator=gen).to(torch.float16)
    slots = torch.arange(10)
    k, v = cache.layer(0)
    ks, vs = cache.layer_scales(0)
    kv_write(k_new.to(device), k_new.to(device), k, v, slots.to(device), k_scale=ks, v_scale=vs)
    back = dequantize_pool_ref(k.cpu(), ks.cpu()).reshape(-1, 2, 64)[:10]
    rel = ((back - k_new.double()).abs() / k_new.double().abs().clamp_min(1e-3)).max()
    assert float(rel) <= 2.0**-3 + 1e-6  # e5m2: half an ulp is 2^-3 relative


# -- decode and extend over fp8 pools --------------------------------------------------------------

HEAD_SPREAD = (0.5, 4.0, 0.05)  # K of each KV head at another magnitude: per-head scales differ by head


def fp8_paged_kv(seq_lens: list[int], kv_heads: int, head_dim: int, block_size: int, layout: str, fp8: torch.dtype,
                 per_head: bool, device: str, gen: torch.Generator) -> dict:
    """make_paged_kv's random pools (heads at different spreads) quantized as kv_write stores them,
    with absmax scales per tensor ([1]) or per KV head ([Hkv]); keyword arguments of the ops and refs."""
    k, v, tables, lens = make_paged_kv(seq_lens, kv_heads, head_dim, block_size, layout, torch.float32, "cpu",
                                       generator=gen)
    axis = 2 if layout == "NHD" else 1
    shape = [1] * 4
    shape[axis] = kv_heads
    k = k * torch.tensor(HEAD_SPREAD * kv_heads)[:kv_heads].reshape(shape)
    ks = absmax_scale_ref(k, fp8, head_axis=axis if per_head else None)
    vs = absmax_scale_ref(v, fp8, head_axis=axis if per_head else None)
    k8, v8 = quantize_fp8_ref(k, ks, fp8, head_axis=axis), quantize_fp8_ref(v, vs, fp8, head_axis=axis)
    return {"k": k8.to(device), "v": v8.to(device), "tables": tables.to(device), "lens": lens.to(device),
            "k_scale": ks.to(device), "v_scale": vs.to(device)}


def decode_fp8_case(x: dict, q: torch.Tensor, layout: str, config: Config | None = None, **features) -> float:
    """Run paged_decode on x's fp8 pools (NaN-poisoned out) and return its error against the reference."""
    out = torch.full_like(q, float("nan"))
    paged_decode(q, x["k"], x["v"], x["tables"], x["lens"], layout=layout, out=out, config=config,
                 k_scale=x["k_scale"], v_scale=x["v_scale"], **features)
    cpu = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in features.items()}
    ref = paged_decode_fp8_ref(q.cpu(), x["k"].cpu(), x["v"].cpu(), x["tables"].cpu(), x["lens"].cpu(),
                               k_scale=x["k_scale"].cpu(), v_scale=x["v_scale"].cpu(), layout=layout, **cpu)
    return rel_err(out, ref)


# (block_size, head_dim, group) cycled over the grid: pages of 1 token to 256, a padded head dim, GQA 1/4/7
DECODE_SHAPES = ((16, 64, 4), (1, 80, 1), (256, 64, 7), (16, 80, 4))


@pytest.mark.parametrize("per_head", [False, True], ids=["per_tensor", "per_head"])
@pytest.mark.parametrize("split", [0, 256], ids=["nosplit", "split256"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("kv", list(FP8))
def test_decode_fp8_matches_reference(kv, layout, split, per_head, device):
    i = list(FP8).index(kv) * 8 + ["NHD", "HND"].index(layout) * 4 + (split > 0) * 2 + per_head
    bs, d, g = DECODE_SHAPES[i % len(DECODE_SHAPES)]
    qdt = torch.bfloat16 if i % 2 == 0 else torch.float16
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("decode", kv, layout, split, per_head)).encode()))
    hk = 2
    # ragged, with page edges (16, 17) and a split edge (256); 300 tokens make two splits
    x = fp8_paged_kv([1, 16, 17, 256, 300], hk, d, bs, layout, FP8[kv], per_head, device, gen)
    q = (torch.randn(5, 2 * hk * g, d, generator=gen)[:, ::2]).to(qdt).to(device)  # a strided q view
    err = decode_fp8_case(x, q, layout, Config(block_n=32, num_warps=4, num_stages=1, split_size=split))
    assert err <= TOL[qdt], err


# (block_size, head_dim, group) of the extend cases
EXTEND_SHAPES = ((16, 64, 4), (8, 80, 1), (1, 64, 2), (64, 64, 4))


@pytest.mark.parametrize("per_head", [False, True], ids=["per_tensor", "per_head"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("kv", list(FP8))
def test_extend_fp8_matches_reference(kv, layout, per_head, device):
    i = list(FP8).index(kv) * 4 + ["NHD", "HND"].index(layout) * 2 + per_head
    bs, d, g = EXTEND_SHAPES[i % len(EXTEND_SHAPES)]
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("extend", kv, layout, per_head)).encode()))
    hk = 2
    q_lens, ctx = [1, 5, 20, 0], [0, 16, 37, 9]  # a prefill, a page-edge prefix, a longer one, nothing new
    x = fp8_paged_kv([a + b for a, b in zip(q_lens, ctx, strict=True)], hk, d, bs, layout, FP8[kv], per_head,
                     device, gen)
    cu = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32)
    qdt = torch.bfloat16 if i % 2 == 0 else torch.float16
    q = torch.randn(sum(q_lens), hk * g, d, generator=gen).to(qdt).to(device)
    out = torch.full_like(q, float("nan"))
    paged_extend(q, x["k"], x["v"], x["tables"], cu.to(device), x["lens"], layout=layout, out=out,
                 config=Config(block_m=16, block_n=16, num_warps=4, num_stages=1), k_scale=x["k_scale"],
                 v_scale=x["v_scale"])
    ref = paged_extend_fp8_ref(q.cpu(), x["k"].cpu(), x["v"].cpu(), x["tables"].cpu(), cu, x["lens"].cpu(),
                               k_scale=x["k_scale"].cpu(), v_scale=x["v_scale"].cpu(), layout=layout)
    assert rel_err(out, ref) <= TOL[qdt]


def test_fp8_bf16_queries_use_the_fp16_range(device):
    """fp8 pools run their dots in fp16: bf16 queries with outlier channels up to 3e4 (inside fp16's
    range, where the cast is exact) match the reference; beyond +-65504 a query element saturates
    (the documented contract), so the result is finite and equals attention with the clamped query."""
    gen = torch.Generator().manual_seed(65504)
    hk, g, d = 2, 4, 64
    x = fp8_paged_kv([7, 40], hk, d, 16, "NHD", torch.float8_e4m3fn, True, device, gen)
    q = torch.randn(2, hk * g, d, generator=gen) * 0.02  # small logits ...
    q[:, :, 3] = 3e4 * torch.randn(2, hk * g, generator=gen).sign()  # ... plus an outlier channel
    qb = q.to(torch.bfloat16).to(device)
    assert decode_fp8_case(x, qb, "NHD") <= TOL[torch.bfloat16]
    huge = qb.clone()
    huge[:, :, 5] = 1e6
    out = paged_decode(huge, x["k"], x["v"], x["tables"], x["lens"], k_scale=x["k_scale"], v_scale=x["v_scale"])
    assert torch.isfinite(out).all()
    clamped = huge.float().clamp(-65504, 65504)  # fp32: bf16 cannot hold 65504
    ref = paged_decode_fp8_ref(clamped.cpu(), x["k"].cpu(), x["v"].cpu(), x["tables"].cpu(), x["lens"].cpu(),
                               k_scale=x["k_scale"].cpu(), v_scale=x["v_scale"].cpu(), layout="NHD")
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("split", [0, 256], ids=["nosplit", "split256"])
def test_decode_fp8_with_window_and_features(split, device):
    """The K scale is folded before the features act (softcap and ALiBi see real logits; sinks join
    an unscaled denominator, the V scale the normalisation): a sliding window alone, then all four."""
    gen = torch.Generator().manual_seed(21 + split)
    hk, g, d = 2, 4, 64
    x = fp8_paged_kv([3, 50, 300], hk, d, 16, "NHD", torch.float8_e4m3fn, True, device, gen)
    q = torch.randn(3, hk * g, d, generator=gen).half().to(device)
    cfg = Config(block_n=32, num_warps=4, num_stages=1, split_size=split)
    assert decode_fp8_case(x, q, "NHD", cfg, sliding_window=40) <= TOL[torch.float16]
    feats = {"sliding_window": 100, "softcap": 2.0, "sinks": torch.randn(hk * g, generator=gen).to(device),
             "alibi_slopes": torch.rand(hk * g, generator=gen).div(8).to(device)}
    assert decode_fp8_case(x, q, "NHD", cfg, **feats) <= TOL[torch.float16]


def test_decode_fp8_packed_and_stacked_pools(device):
    """fp8 pools as engines hold them: K|V packed in the last dim and [nb, 2, ...] stacked views."""
    gen = torch.Generator().manual_seed(17)
    hk, g, d, fp8 = 2, 2, 64, torch.float8_e5m2
    x = fp8_paged_kv([9, 40], hk, d, 8, "HND", fp8, True, device, gen)
    q = torch.randn(2, hk * g, d, generator=gen).half().to(device)
    codes = x["k"].view(torch.uint8), x["v"].view(torch.uint8)
    packed = torch.cat(codes, dim=-1).view(fp8)  # [nb, Hkv, bs, 2 * D]
    stacked = torch.stack(codes, dim=1).view(fp8)  # [nb, 2, Hkv, bs, D]
    ref = paged_decode_fp8_ref(q.cpu(), x["k"].cpu(), x["v"].cpu(), x["tables"].cpu(), x["lens"].cpu(),
                               k_scale=x["k_scale"].cpu(), v_scale=x["v_scale"].cpu(), layout="HND")
    for k, v in ((packed[..., :d], packed[..., d:]), (stacked[:, 0], stacked[:, 1])):
        out = paged_decode(q, k, v, x["tables"], x["lens"], layout="HND", k_scale=x["k_scale"], v_scale=x["v_scale"],
                           config=Config(block_n=16, num_warps=4, num_stages=1))
        assert rel_err(out, ref) <= TOL[torch.float16]


def test_extend_fp8_with_window(device):
    gen = torch.Generator().manual_seed(8)
    hk, g, d = 2, 2, 64
    x = fp8_paged_kv([30, 45], hk, d, 8, "HND", torch.float8_e5m2, False, device, gen)
    cu = torch.tensor([0, 12, 20], dtype=torch.int32)
    q = torch.randn(20, hk * g, d, generator=gen).half().to(device)
    out = torch.full_like(q, float("nan"))
    paged_extend(q, x["k"], x["v"], x["tables"], cu.to(device), x["lens"], layout="HND", out=out,
                 config=Config(block_m=16, block_n=16, num_warps=4, num_stages=1), sliding_window=10,
                 softcap=3.0, k_scale=x["k_scale"], v_scale=x["v_scale"])
    ref = paged_extend_fp8_ref(q.cpu(), x["k"].cpu(), x["v"].cpu(), x["tables"].cpu(), cu, x["lens"].cpu(),
                               k_scale=x["k_scale"].cpu(), v_scale=x["v_scale"].cpu(), layout="HND",
                               sliding_window=10, softcap=3.0)
    assert rel_err(out, ref) <= TOL[torch.float16]


def _compiled_variants(mod) -> int:
    """Compiled kernels held by a module's decode_kernel (0 under the interpreter, which compiles none)."""
    caches = getattr(mod.decode_kernel, "device_caches", {})
    return sum(len(c[0]) for c in caches.values())


def test_decode_fp8_new_scale_values_need_no_recompile(device):
    """The scales are read by the kernel: new values in the same tensors change the result exactly as
    the reference says, with the same kernel module and no new compiled variant; DecodePlan.run()
    takes another layer's scales."""
    gen = torch.Generator().manual_seed(4)
    hk, g, d, fp8 = 2, 2, 64, torch.float8_e4m3fn
    x = fp8_paged_kv([20, 70], hk, d, 16, "NHD", fp8, True, device, gen)
    q = torch.randn(2, hk * g, d, generator=gen).half().to(device)
    cfg = Config(block_n=32, num_warps=4, num_stages=1)
    spec = KernelSpec("decode", d, 16, dtype="fp16", kv_dtype="fp8_e4m3", group_size=g)
    outs = []
    for step in range(3):
        outs.append(paged_decode(q, x["k"], x["v"], x["tables"], x["lens"], config=cfg, k_scale=x["k_scale"],
                                 v_scale=x["v_scale"]).cpu())
        if step == 0:
            mod, variants = codegen.load(spec), _compiled_variants(codegen.load(spec))
        ref = paged_decode_fp8_ref(q.cpu(), x["k"].cpu(), x["v"].cpu(), x["tables"].cpu(), x["lens"].cpu(),
                                   k_scale=x["k_scale"].cpu(), v_scale=x["v_scale"].cpu())
        assert rel_err(outs[-1], ref) <= TOL[torch.float16]
        x["k_scale"].mul_(torch.tensor([3.0, 0.25], device=device))  # sharper / flatter softmax per head
        x["v_scale"].mul_(2.0)
    assert codegen.load(spec) is mod and _compiled_variants(mod) == variants
    assert rel_err(outs[1], outs[0]) > 0.05 and rel_err(outs[2], outs[1]) > 0.05
    # a plan built on one layer's scales runs another layer's (KVCache.layer_scales views)
    layers = torch.stack([x["k_scale"], x["k_scale"] * 0.5]), torch.stack([x["v_scale"], x["v_scale"] * 3.0])
    plan = DecodePlan(q, x["k"], x["v"], x["tables"], x["lens"], config=cfg, k_scale=layers[0][0],
                      v_scale=layers[1][0])
    refs = [paged_decode_fp8_ref(q.cpu(), x["k"].cpu(), x["v"].cpu(), x["tables"].cpu(), x["lens"].cpu(),
                                 k_scale=layers[0][i].cpu(), v_scale=layers[1][i].cpu()) for i in range(2)]
    for layer in (1, 0):
        got = plan.run(q, x["k"], x["v"], x["tables"], x["lens"], k_scale=layers[0][layer], v_scale=layers[1][layer])
        assert rel_err(got, refs[layer]) <= TOL[torch.float16] < rel_err(got, refs[1 - layer])
    assert rel_err(plan.run(q, x["k"], x["v"], x["tables"], x["lens"]), refs[0]) <= TOL[torch.float16]  # its own


def test_extend_plan_fp8_scales(device):
    """ExtendPlan takes the scales at build and, per run, another layer's (read by the kernel)."""
    from pagegen.extend import ExtendPlan

    gen = torch.Generator().manual_seed(12)
    hk, g, d = 2, 2, 64
    x = fp8_paged_kv([20, 9], hk, d, 8, "NHD", torch.float8_e4m3fn, True, device, gen)
    cu = torch.tensor([0, 6, 9], dtype=torch.int32)
    q = torch.randn(9, hk * g, d, generator=gen).half().to(device)
    cfg = Config(block_m=16, block_n=16, num_warps=4, num_stages=1)
    other = (x["k_scale"] * torch.tensor([2.0, 0.5], device=device), x["v_scale"] * 4.0)
    plan = ExtendPlan(q, x["k"], x["v"], x["tables"], cu.to(device), x["lens"], config=cfg, k_scale=x["k_scale"],
                      v_scale=x["v_scale"])
    for ks, vs, kwargs in ((x["k_scale"], x["v_scale"], {}), (*other, {"k_scale": other[0], "v_scale": other[1]})):
        got = plan.run(q, x["k"], x["v"], x["tables"], cu.to(device), x["lens"], **kwargs)
        ref = paged_extend_fp8_ref(q.cpu(), x["k"].cpu(), x["v"].cpu(), x["tables"].cpu(), cu, x["lens"].cpu(),
                                   k_scale=ks.cpu(), v_scale=vs.cpu())
        assert rel_err(got, ref) <= TOL[torch.float16]
    with pytest.raises(ValueError, match="k_scale is required"):
        ExtendPlan(q, x["k"], x["v"], x["tables"], cu.to(device), x["lens"], config=cfg)


def test_registered_ops_take_fp8_scales(device):
    """pagegen.torch_ops' decode and extend pass k_scale/v_scale through (the registered schemas)."""
    from pagegen import torch_ops

    gen = torch.Generator().manual_seed(13)
    x = fp8_paged_kv([7, 19], 2, 64, 8, "NHD", torch.float8_e4m3fn, True, device, gen)
    q = torch.randn(2, 4, 64, generator=gen).half().to(device)
    scales = {"k_scale": x["k_scale"], "v_scale": x["v_scale"]}
    got = torch_ops.paged_decode(q, x["k"], x["v"], x["tables"], x["lens"], **scales)
    assert torch.equal(got, paged_decode(q, x["k"], x["v"], x["tables"], x["lens"], **scales))
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    qx = torch.randn(5, 4, 64, generator=gen).half().to(device)
    got = torch_ops.paged_extend(qx, x["k"], x["v"], x["tables"], cu, x["lens"], **scales)
    assert torch.equal(got, paged_extend(qx, x["k"], x["v"], x["tables"], cu, x["lens"], **scales))


def test_dispatcher_keeps_fp8_entries_apart(tmp_path):
    """kv_dtype is a spec axis of the tuned table: an fp8 entry survives a save/load round trip and
    serves fp8 calls only; the bf16 spec beside it (no entry) falls back to the heuristic."""
    import warnings

    from pagegen import dispatch
    from pagegen import gpu as G
    from pagegen import table as T
    from pagegen.dispatch import heuristic_config

    fp8 = KernelSpec("decode", head_dim=64, block_size=16, kv_dtype="fp8_e4m3", group_size=2)
    plain = KernelSpec("decode", head_dim=64, block_size=16, group_size=2)
    tuned = Config(block_n=16, num_warps=1, num_stages=1, split_size=256)
    entry = T.Entry(spec=fp8, kernel_hash=codegen.kernel_hash(fp8),
                    buckets=[T.BucketResult(shape=(2, 300), config=tuned, latency_us=10.0, gbps=1.0)],
                    trials=5, tuned_at=T.now_iso(), kv_heads=2)
    live = (G.live_gpu() or G.INTERPRETER).key
    table = T.Table(gpu_key=live, gpu_name="test", sm_count=4, capability="0.0", entries={entry.key: entry},
                    toolchain={}, tuned_at=T.now_iso(), interpret=True)
    path = T.save(table, tmp_path / "t.yaml")
    assert "decode_bf16_kvfp8e4m3_hd64_bs16_nhd_g2" in T.load(path).entries
    dispatch.use_table(path)
    try:
        assert dispatch.select_config(fp8, 2, 300, 2) == tuned
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no tuned entry" for the bf16 spec
            cfg, source = dispatch.explain(plain, 2, 300, 2)
        assert source == "heuristic" and cfg == heuristic_config(plain, 2, 300, 2, G.sm_count())
    finally:
        dispatch.use_table(None)


@pytest.mark.parametrize("split", [0, 256], ids=["nosplit", "split256"])
def test_verify_fp8_matches_reference(split, device):
    """A speculative verify step (3 new tokens a sequence, the decode kernel's q_len rows) over fp8
    pools, per-head scales; VerifyPlan likewise, with another layer's scales at run time."""
    from pagegen.verify import VerifyPlan, paged_verify

    gen = torch.Generator().manual_seed(31 + split)
    hk, g, d, ql = 2, 2, 64, 3
    x = fp8_paged_kv([5, 40, 300], hk, d, 16, "NHD", torch.float8_e4m3fn, True, device, gen)
    q = torch.randn(3, ql, hk * g, d, generator=gen).half().to(device)
    cu = torch.arange(0, 4 * ql, ql, dtype=torch.int32)
    cfg = Config(block_n=32, num_warps=4, num_stages=1, split_size=split)
    scales = {"k_scale": x["k_scale"], "v_scale": x["v_scale"]}
    out = paged_verify(q, x["k"], x["v"], x["tables"], x["lens"], config=cfg, **scales)

    def ref(ks, vs):
        return paged_extend_fp8_ref(q.cpu().reshape(3 * ql, hk * g, d), x["k"].cpu(), x["v"].cpu(), x["tables"].cpu(),
                                    cu, x["lens"].cpu(), k_scale=ks.cpu(), v_scale=vs.cpu()).reshape(q.shape)

    assert rel_err(out, ref(x["k_scale"], x["v_scale"])) <= TOL[torch.float16]
    plan = VerifyPlan(q, x["k"], x["v"], x["tables"], x["lens"], config=cfg, **scales)
    ks2, vs2 = x["k_scale"] * 2.0, x["v_scale"] * 0.5
    got = plan.run(q, x["k"], x["v"], x["tables"], x["lens"], k_scale=ks2, v_scale=vs2)
    assert rel_err(got, ref(ks2, vs2)) <= TOL[torch.float16]
    with pytest.raises(ValueError, match="k_scale is required"):
        paged_verify(q, x["k"], x["v"], x["tables"], x["lens"], config=cfg)


def test_attention_fp8_scale_contract(device):
    """Scales: required for fp8 pools, refused for others, checked like kv_write's (fp8_scales)."""
    gen = torch.Generator().manual_seed(9)
    x = fp8_paged_kv([5, 9], 2, 64, 8, "NHD", torch.float8_e5m2, False, device, gen)
    q = torch.randn(2, 4, 64, generator=gen).half().to(device)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    one = torch.ones(1, device=device)
    for op, args in ((paged_decode, (x["tables"], x["lens"])), (paged_extend, (x["tables"], cu, x["lens"]))):
        with pytest.raises(ValueError, match="k_scale is required for an fp8_e5m2 pool"):
            op(q, x["k"], x["v"], *args)
        with pytest.raises(ValueError, match=r"v_scale has shape \(3,\); expected 1 element .* or \[2\]"):
            op(q, x["k"], x["v"], *args, k_scale=one, v_scale=torch.ones(3, device=device))
        with pytest.raises(TypeError, match="k_scale has dtype float64; expected float32"):
            op(q, x["k"], x["v"], *args, k_scale=one.double(), v_scale=one)
        plain = x["k"].to(torch.float16)
        with pytest.raises(ValueError, match="apply to fp8 pools only"):
            op(q, plain, plain, *args, k_scale=one, v_scale=one)
        with pytest.raises(TypeError, match="or both be one fp8 format"):
            op(q, x["k"], x["v"].to(torch.float8_e4m3fn), *args, k_scale=one, v_scale=one)
        with pytest.raises(TypeError, match="q has dtype float8_e5m2"):
            op(q.to(torch.float8_e5m2), x["k"], x["v"], *args, k_scale=one, v_scale=one)


@pytest.mark.parametrize("family", ["decode", "extend"])
def test_tuner_runners_build_fp8_inputs(family, device):
    """The tuner's runners quantize their random pools (absmax scales) for an fp8 spec, launch with the
    scales, and verify against the emulating reference; a garbage kernel still fails verification."""
    import random

    from pagegen import tuner
    from pagegen.workloads import Bucket, Workload

    spec = KernelSpec(family, head_dim=64, block_size=16, dtype="fp16", kv_dtype="fp8_e5m2", group_size=2)
    runner = tuner.RUNNERS[family](Workload(spec, 2, (Bucket(2, 40),)), device, interpret=device == "cpu")
    x = runner.inputs(Bucket(2, 40))
    assert x["k"].dtype == torch.float8_e5m2 and x["scales"]["k_scale"].shape == (1,)
    fmax = torch.finfo(torch.float8_e5m2).max
    assert float(x["k"].float().abs().max()) == fmax  # absmax / fmax: the largest element hits the format's max
    cfg = Config(block_n=16, block_m=16, num_warps=4, num_stages=1)
    assert torch.isfinite(runner.launch(cfg, x)).all()
    tuner.verify(runner, cfg, random.Random(1))

    class Garbage(tuner.RUNNERS[family]):
        def launch(self, cfg, x):
            return super().launch(cfg, x).mul_(-1.0)

    with pytest.raises(tuner.TrialFailure, match="wrong result"):
        tuner.verify(Garbage(runner.w, device, device == "cpu"), cfg, random.Random(1))


# -- compiled for sm_90 (no GPU needed) ----------------------------------------------------------

_COMPILE_KV_WRITE = """
import json, re, sys
from pagegen.compile_check import compile_for_target, load_jit_module, ptxas_report
from pagegen.spec import KernelSpec
out = []
for kv, dt, layout, hd in json.loads(sys.argv[1]):
    spec = KernelSpec("kv_write", hd, 16, layout=layout, dtype=dt, kv_dtype=kv)
    pool = {"fp8_e4m3": "*fp8e4nv", "fp8_e5m2": "*fp8e5"}[kv]
    types = {"k_new_ptr": "*" + dt, "v_new_ptr": "*" + dt, "k_ptr": pool, "v_ptr": pool, "slot_ptr": "*i64",
             "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
    k = compile_for_target(load_jit_module(spec).kv_write_kernel, types, {"BLOCK_N": 32}, num_stages=1,
                           no_divisibility=("stride_ks", "stride_vs"))
    rep = ptxas_report(k)
    rep["cvt"] = sorted(set(re.findall(r"cvt[.]rn[.]satfinite[.]e[45]m[32]x2[.]f32", k.asm["ptx"])))
    out.append(rep)
print(json.dumps(out))
"""


def test_kv_write_fp8_compiles_for_sm90():
    """The quantizing kv_write compiles for sm_90 without spills, in few registers (K is quantized
    and stored before V is loaded), ending in the hardware's saturating round-to-nearest cvt."""
    cases = [("fp8_e4m3", "bf16", "NHD", 128), ("fp8_e5m2", "fp16", "HND", 80)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_KV_WRITE, json.dumps(cases)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for (kv, *_), rep in zip(cases, json.loads(r.stdout.strip().splitlines()[-1]), strict=True):
        assert rep["spill_bytes"] == 0 and rep["registers"] <= 96, rep
        assert rep["cvt"] == [f"cvt.rn.satfinite.{kv[4:]}x2.f32"], rep


_COMPILE_ATTENTION = """
import json, re, sys
from pagegen.compile_check import compile_for_target, load_jit_module, ptxas_report
from pagegen.spec import KernelSpec
out = []
for fam, kv, dt, layout, consts, warps, stages in json.loads(sys.argv[1]):
    spec = KernelSpec(fam, 128, 16, layout=layout, dtype=dt, kv_dtype=kv, group_size=4)
    pool = {"fp8_e4m3": "*fp8e4nv", "fp8_e5m2": "*fp8e5"}[kv]
    types = {"q_ptr": "*" + dt, "k_ptr": pool, "v_ptr": pool, "out_ptr": "*" + dt, "part_out_ptr": "*fp32",
             "part_lse_ptr": "*fp32", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "cu_seqlens_q_ptr": "*i32",
             "qk_scale": "fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
    k = compile_for_target(getattr(load_jit_module(spec), fam + "_kernel"), types, dict(consts, DOT_FP32=False),
                           num_warps=warps, num_stages=stages, no_divisibility=("stride_ks", "stride_vs"))
    rep = ptxas_report(k)
    rep["mma"] = "mma" in k.asm["ptx"]
    rep["cvt"] = sorted(set(re.findall(r"cvt[.]rn[.]f16x2[.]e[45]m[32]x2", k.asm["ptx"])))
    out.append(rep)
print(json.dumps(out))
"""


def test_attention_fp8_compiles_for_sm90():
    """Decode (plain and split) and extend over fp8 pools compile for sm_90 without spills, keep their
    dots on the tensor cores, and widen the codes with the hardware's packed fp8 -> f16 cvt."""
    cases = [("decode", "fp8_e4m3", "bf16", "NHD", {"BLOCK_N": 128, "SPLIT_SIZE": 0}, 4, 3),
             ("decode", "fp8_e5m2", "fp16", "HND", {"BLOCK_N": 64, "SPLIT_SIZE": 512}, 4, 3),
             ("extend", "fp8_e4m3", "bf16", "NHD", {"BLOCK_M": 128, "BLOCK_Q": 32, "BLOCK_N": 64}, 8, 5)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_ATTENTION, json.dumps(cases)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for (_fam, kv, *_), rep in zip(cases, json.loads(r.stdout.strip().splitlines()[-1]), strict=True):
        assert rep["spill_bytes"] == 0 and rep["mma"], rep
        assert rep["cvt"] == [f"cvt.rn.f16x2.{kv[4:]}x2"], rep


# -- what only a GPU shows -----------------------------------------------------------------------

@triton.jit
def _cast_kernel(src, dst, n, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(src + offs, mask=m)
    tl.store(dst + offs, tl.clamp(x, -FP8_MAX, FP8_MAX).to(dst.dtype.element_ty), mask=m)


@triton.jit
def _upcast_kernel(src, d32, d16, dbf, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(src + offs, mask=m)
    tl.store(d32 + offs, x.to(tl.float32), mask=m)
    tl.store(d16 + offs, x.to(tl.float16), mask=m)
    tl.store(dbf + offs, x.to(tl.bfloat16), mask=m)


@pytest.mark.gpu
@pytest.mark.parametrize("kv", list(FP8))
def test_gpu_hardware_fp8_casts_are_exact(kv, device):
    """On the GPU, Triton's own casts are what kv_write's in-kernel rounding reproduces: fp32 ->
    fp8 rounds to nearest even (after a clamp: saturating), and fp8 -> fp32/fp16/bf16 is exact for
    every finite code (phase B's in-register dequantization relies on this)."""
    fp8 = FP8[kv]
    gen = torch.Generator().manual_seed(1)
    x = nasty_values(fp8, gen).float()
    x = x[torch.isfinite(x)]
    out = torch.empty(x.numel(), dtype=torch.uint8, device=device).view(fp8)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(device), out, x.numel(), FP8_MAX=torch.finfo(fp8).max,
                                                   BLOCK=1024)
    assert torch.equal(bits(out), bits(quantize_fp8_ref(x[:, None, None], 1.0, fp8).reshape(-1)))
    codes = all_codes(fp8)
    fin = torch.isfinite(codes.float())
    outs = [torch.empty(256, dtype=dt, device=device) for dt in (torch.float32, torch.float16, torch.bfloat16)]
    _upcast_kernel[(1,)](codes.to(device), *outs, 256, BLOCK=256)
    for o in outs:
        assert torch.equal(o.cpu()[fin], codes.to(o.dtype)[fin])


@pytest.mark.gpu
def test_gpu_kv_write_fp8_keeps_nan(device):
    fp8 = torch.float8_e4m3fn
    k = poisoned_pool(2, 8, 1, 64, "NHD", fp8, device).zero_()
    new = torch.full((2, 1, 64), float("nan"), dtype=torch.bfloat16, device=device)
    one = torch.ones(1, device=device)
    kv_write(new, new, k, k.clone(), torch.tensor([0, 9], device=device), k_scale=one, v_scale=one)
    assert bool(torch.isnan(k.float()[0, 0]).all()) and bool(torch.isnan(k.float()[1, 1]).all())
@pytest.mark.gpu
@pytest.mark.parametrize("kv", list(FP8))
def test_gpu_fp8_attention_reference_shape_default_configs(kv, device):
    """The reference spec (bf16 q, head_dim 128, 32 q / 8 KV heads, block 16) with pagegen's own configs
    (pipelined tiles of 128 keys; split-KV for the long batch of 2) matches the emulating reference."""
    gen = torch.Generator().manual_seed(zlib.crc32(kv.encode()))
    hk, g, d = 8, 4, 128
    for lens, per_head in (([1, 15, 16, 17, 1000, 4097], False), ([9000, 3], True)):
        x = fp8_paged_kv(lens, hk, d, 16, "NHD", FP8[kv], per_head, device, gen)
        q = torch.randn(len(lens), hk * g, d, generator=gen).to(torch.bfloat16).to(device)
        out = paged_decode(q, x["k"], x["v"], x["tables"], x["lens"], k_scale=x["k_scale"], v_scale=x["v_scale"],
                           max_seq_len=max(lens))
        ref = paged_decode_fp8_ref(q.cpu(), x["k"].cpu(), x["v"].cpu(), x["tables"].cpu(), x["lens"].cpu(),
                                   k_scale=x["k_scale"].cpu(), v_scale=x["v_scale"].cpu())
        assert rel_err(out, ref) <= TOL[torch.bfloat16]
        cu = torch.tensor([0] + list(itertools.accumulate(min(n, 300) for n in lens)), dtype=torch.int32)
        qx = torch.randn(int(cu[-1]), hk * g, d, generator=gen).to(torch.bfloat16).to(device)
        out = paged_extend(qx, x["k"], x["v"], x["tables"], cu.to(device), x["lens"], k_scale=x["k_scale"],
                           v_scale=x["v_scale"])
        ref = paged_extend_fp8_ref(qx.cpu(), x["k"].cpu(), x["v"].cpu(), x["tables"].cpu(), cu, x["lens"].cpu(),
                                   k_scale=x["k_scale"].cpu(), v_scale=x["v_scale"].cpu())
        assert rel_err(out, ref) <= TOL[torch.bfloat16]


