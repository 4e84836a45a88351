"""kv_write and copy_blocks against plain torch (pagegen.reference), every layout and dtype.

Pools are poisoned with NaN (or random values) before the kernels run; results must equal the
reference bit for bit (these ops only move data), and untouched slots must keep their poison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
from conftest import DTYPES

from pagegen import copy_blocks, kv_write
from pagegen.reference import copy_blocks_ref, kv_write_ref
from pagegen.spec import Config

LAYOUTS = ("NHD", "HND")
# (block_size, head_dim, kv_heads): a sample covering tiny and big pages, padded head dims
SHAPES = [(1, 64, 2), (8, 80, 1), (16, 128, 2), (32, 96, 3), (256, 64, 1)]


def pool(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, layout: str, dtype: torch.dtype,
         device: str, poison: str = "nan", gen: torch.Generator | None = None) -> torch.Tensor:
    shape = (num_blocks, block_size, kv_heads, head_dim) if layout == "NHD" else (num_blocks, kv_heads, block_size,
                                                                                   head_dim)
    if poison == "nan":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN poison compares equal to itself)."""
    return torch.equal(a.cpu().view(torch.int16), b.cpu().view(torch.int16))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("block_size,head_dim,kv_heads", SHAPES)
def test_kv_write_matches_reference(layout, dtype, block_size, head_dim, kv_heads, device):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layout, dtype, block_size, head_dim)).encode()))
    dt = DTYPES[dtype]
    num_blocks = max(3, 40 // block_size + 2)
    slots_total = num_blocks * block_size
    t = min(29, slots_total - 1)
    k = pool(num_blocks, block_size, kv_heads, head_dim, layout, dt, device)
    v = pool(num_blocks, block_size, kv_heads, head_dim, layout, dt, device)
    k_ref, v_ref = k.clone(), v.clone()
    k_new = torch.randn(t, kv_heads, head_dim, generator=gen).to(dt).to(device)
    v_new = torch.randn(t, kv_heads, head_dim, generator=gen).to(dt).to(device)
    slots = torch.randperm(slots_total, generator=gen)[:t]
    slots[torch.randperm(t, generator=gen)[: t // 4]] = -1  # padding tokens: skipped
    slots = slots.to(device=device, dtype=torch.int32 if block_size % 2 else torch.int64)
    kv_write(k_new, v_new, k, v, slots, layout=layout)
    kv_write_ref(k_new, v_new, k_ref, v_ref, slots, layout=layout)
    assert same_bits(k, k_ref) and same_bits(v, v_ref)
    # every written row is finite, every other slot still NaN
    assert int(torch.isfinite(k).sum()) == int((slots >= 0).sum()) * kv_heads * head_dim


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kv_write_strided_inputs_and_small_tiles(layout, device):
    """k_new/v_new as views of a fused [T, 3, Hkv, D] tensor; BLOCK_N smaller than T."""
    gen = torch.Generator().manual_seed(7)
    dt, bs, hk, d, nb, t = torch.bfloat16, 16, 2, 64, 6, 50
    fused = torch.randn(t, 3, hk, d, generator=gen).to(dt).to(device)
    k_new, v_new = fused[:, 1], fused[:, 2]
    k = pool(nb, bs, hk, d, layout, dt, device, poison="randn", gen=gen)
    v = pool(nb, bs, hk, d, layout, dt, device, poison="randn", gen=gen)
    k_ref, v_ref = k.clone(), v.clone()
    slots = torch.randperm(nb * bs, generator=gen)[:t].to(device)
    kv_write(k_new, v_new, k, v, slots, layout=layout, config=Config(block_n=16, num_warps=2, num_stages=1))
    kv_write_ref(k_new, v_new, k_ref, v_ref, slots, layout=layout)
    assert same_bits(k, k_ref) and same_bits(v, v_ref)


def test_kv_write_all_skipped_and_empty(device):
    dt = torch.float16
    k = pool(4, 8, 1, 64, "NHD", dt, device)
    v = pool(4, 8, 1, 64, "NHD", dt, device)
    new = torch.randn(5, 1, 64).to(dt).to(device)
    kv_write(new, new, k, v, torch.full((5,), -1, dtype=torch.int32, device=device))
    assert torch.isnan(k).all() and torch.isnan(v).all()
    empty = new[:0]
    kv_write(empty, empty, k, v, torch.zeros(0, dtype=torch.int64, device=device))
    assert torch.isnan(k).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("block_size,head_dim,kv_heads", SHAPES[:4])
def test_copy_blocks_matches_reference(layout, dtype, block_size, head_dim, kv_heads, device):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layout, dtype, block_size, head_dim, "copy")).encode()))
    dt = DTYPES[dtype]
    nb = 12
    k = pool(nb, block_size, kv_heads, head_dim, layout, dt, device, poison="randn", gen=gen)
    v = pool(nb, block_size, kv_heads, head_dim, layout, dt, device, poison="randn", gen=gen)
    k[9:] = float("nan")  # destinations poisoned
    v[9:] = float("nan")
    k_ref, v_ref = k.clone(), v.clone()
    pairs = torch.tensor([[3, 9], [0, 11], [7, 10], [3, 5]], dtype=torch.int32, device=device)
    copy_blocks(k, v, pairs, layout=layout)
    copy_blocks_ref(k_ref, v_ref, pairs, layout=layout)
    assert same_bits(k, k_ref) and same_bits(v, v_ref)
    assert torch.isfinite(k).all() and torch.isfinite(v).all()


def test_copy_blocks_padded_pool_strides_and_empty(device):
    """A pool sliced out of a wider allocation (block stride > block size) copies correctly."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 2, 8, 2, 64, generator=gen).to(torch.float16).to(device)
    k, v = wide[:, 0], wide[:, 1]  # NHD [6, 8, 2, 64], block stride 2 x 8 x 2 x 64
    k_ref, v_ref = k.clone(), v.clone()
    pairs = torch.tensor([[0, 4], [1, 5]], dtype=torch.int64, device=device)
    copy_blocks(k, v, pairs, config=Config(block_n=16, num_warps=1, num_stages=1))
    copy_blocks_ref(k_ref, v_ref, pairs)
    assert same_bits(k, k_ref) and same_bits(v, v_ref)
    copy_blocks(k, v, pairs[:0])
    assert same_bits(k, k_ref)


# -- validation: clear errors naming the argument ------------------------------------------
def _small(device, layout="NHD", dtype=torch.float16):
    k = pool(4, 8, 2, 64, layout, dtype, device, poison="randn")
    return k, k.clone(), torch.randn(3, 2, 64).to(dtype).to(device)


@pytest.mark.parametrize(
    "mutate,err,match",
    [
        (lambda a: a.update(k_new=a["k_new"][:, :1]), ValueError, "k_new has shape"),
        (lambda a: a.update(v_new=a["v_new"][:2]), ValueError, "v_new has shape"),
        (lambda a: a.update(k_new=a["k_new"].to(torch.bfloat16)), TypeError, "must equal the pool dtype"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"].float()), TypeError, "slot_mapping has dtype"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"][:2]), ValueError, "slot_mapping has 2 entries"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"] + 100), ValueError, "the pool has 32 slots"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"] * 0), ValueError, "repeats a slot"),
        (lambda a: a.update(v_cache=a["v_cache"][:3]), ValueError, "v_cache must match"),
        (lambda a: a.update(layout="NDH"), ValueError, "layout='NDH'"),
        (lambda a: a.update(k_new=a["k_new"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
         "contiguous in their last dim"),
    ],
)
def test_kv_write_rejects_bad_input(mutate, err, match, device):
    k, v, new = _small(device)
    args = dict(k_new=new, v_new=new.clone(), k_cache=k, v_cache=v,
                slot_mapping=torch.tensor([0, 9, 17], dtype=torch.int32, device=device), layout="NHD")
    mutate(args)
    before = k.clone()
    with pytest.raises(err, match=match):
        kv_write(args.pop("k_new"), args.pop("v_new"), args.pop("k_cache"), args.pop("v_cache"),
                 args.pop("slot_mapping"), validate=True, **args)
    assert same_bits(k, before)


@pytest.mark.parametrize(
    "pairs,err,match",
    [
        ([[0, 1, 2]], ValueError, r"expected \[P, 2\]"),
        ([[0, 4]], ValueError, "outside"),
        ([[0, 1], [2, 1]], ValueError, "repeats a destination"),
        ([[0, 1], [1, 2]], ValueError, "both a source and a destination"),
    ],
)
def test_copy_blocks_rejects_bad_input(pairs, err, match, device):
    k, v, _ = _small(device)
    before = k.clone()
    with pytest.raises(err, match=match):
        copy_blocks(k, v, torch.tensor(pairs, device=device), validate=True)
    assert same_bits(k, before)
    with pytest.raises(TypeError, match="block_pairs has dtype"):
        copy_blocks(k, v, torch.zeros(1, 2, device=device))


def test_unsupported_pool_geometry(device):
    k = torch.randn(4, 12, 2, 64).half().to(device)  # block_size 12 is not in the whitelist
    with pytest.raises(ValueError, match="block_size=12"):
        copy_blocks(k, k.clone(), torch.tensor([[0, 1]], device=device))


# -- GPU: realistic sizes, every head dim and block size ------------------------------------
GPU_SWEEP = sorted({(16, d) for d in (64, 80, 96, 112, 128, 192, 256)} | {(b, 128) for b in (1, 8, 32, 64, 128, 256)})


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size,head_dim", GPU_SWEEP)
def test_kv_ops_gpu_sweep(layout, block_size, head_dim, device):
    gen = torch.Generator().manual_seed(block_size * 1000 + head_dim)
    dt, hk = torch.bfloat16, 8
    nb = max(64, 8192 // block_size)
    t = min(4096, nb * block_size // 2)
    k = pool(nb, block_size, hk, head_dim, layout, dt, device)
    v = pool(nb, block_size, hk, head_dim, layout, dt, device)
    k_ref, v_ref = k.clone(), v.clone()
    k_new = torch.randn(t, hk, head_dim, generator=gen).to(dt).to(device)
    v_new = torch.randn(t, hk, head_dim, generator=gen).to(dt).to(device)
    slots = torch.randperm(nb * block_size, generator=gen)[:t]
    slots[::7] = -1
    slots = slots.to(device)
    kv_write(k_new, v_new, k, v, slots, layout=layout, validate=True)
    kv_write_ref(k_new, v_new, k_ref, v_ref, slots, layout=layout)
    assert same_bits(k, k_ref) and same_bits(v, v_ref)
    perm = torch.randperm(nb, generator=gen)
    pairs = torch.stack([perm[: nb // 4], perm[nb // 4 : nb // 2]], 1).to(torch.int32).to(device)
    copy_blocks(k, v, pairs, layout=layout, validate=True)
    copy_blocks_ref(k_ref, v_ref, pairs, layout=layout)
    assert same_bits(k, k_ref) and same_bits(v, v_ref)


# -- the compiler, not just the interpreter: sm_90 through Triton's bundled ptxas (no GPU) -------
COMPILE_CASES = [  # family, head_dim, block_size, layout, dtype; default launch config
    ("kv_write", 128, 16, "NHD", "bf16"),
    ("kv_write", 256, 16, "HND", "fp16"),
    ("kv_write", 80, 1, "NHD", "bf16"),
    ("copy_blocks", 128, 16, "NHD", "bf16"),
    ("copy_blocks", 256, 256, "HND", "fp16"),
    ("copy_blocks", 96, 1, "HND", "bf16"),
]

COMPILE_SCRIPT = r"""
import json, sys
from pagegen.compile_check import compile_for_target, load_jit_module, ptxas_report
from pagegen.kv_ops import _config
from pagegen.spec import KernelSpec
out = []
for fam, hd, bs, layout, dt in json.loads(sys.argv[1]):
    spec = KernelSpec(fam, head_dim=hd, block_size=bs, layout=layout, dtype=dt)
    cfg = _config(spec, None)
    mod = load_jit_module(spec)
    types = {"k_ptr": "*" + dt, "v_ptr": "*" + dt}
    if fam == "kv_write":
        types.update(k_new_ptr="*" + dt, v_new_ptr="*" + dt, slot_ptr="*i64")
        fn = mod.kv_write_kernel
    else:
        types.update(pairs_ptr="*i32")
        fn = mod.copy_blocks_kernel
    k = compile_for_target(fn, types, {"BLOCK_N": cfg.block_n}, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out.append(ptxas_report(k))
print(json.dumps(out))
"""


def test_kv_ops_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(COMPILE_CASES)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = json.loads(r.stdout.strip().splitlines()[-1])
    for case, rep in zip(COMPILE_CASES, reports, strict=True):
        assert rep["spill_bytes"] == 0, (case, rep)
