"""fp8 KV pools (issue 16): the spec axis, kv_write's quantization, copy_blocks, KVCache sizing and
the reference's emulation.

kv_write rounds in-kernel with exact fp32/integer arithmetic and casts only values the fp8 format
holds, so its result is bit-exact against quantize_fp8_ref both in Triton's interpreter (whose own
fp32 -> fp8 cast is inexact: bench/NOTES.md, "fp8 in the interpreter") and on the GPU. The same
tests run compiled with PAGEGEN_TEST_DEVICE=cuda; the gpu-marked ones check what only a GPU shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
import triton
import triton.language as tl
from conftest import DTYPES

from pagegen import codegen, copy_blocks, kv_write
from pagegen.kv_cache import KVCache
from pagegen.reference import (
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
from pagegen.spec import FP8_FORMATS, KernelSpec, enumerate_specs

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
    with pytest.raises(ValueError, match="not supported for family 'decode' yet"):
        KernelSpec("decode", head_dim=128, block_size=16, kv_dtype="fp8_e4m3", group_size=4)
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
