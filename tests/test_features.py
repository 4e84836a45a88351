"""Attention features (sliding window, softcap, sinks, ALiBi) and engines' pool forms (K/V stacked
or packed in one tensor) in paged_decode / DecodePlan / paged_extend, against the float64
reference: each feature alone and in the named models' combinations, window edges, split-KV on
and off, both layouts, fp16 (the interpreter's bf16 dot is garbage); the window skips the keys
outside it (NaN there leaves the output finite); bad feature arguments are refused."""

from __future__ import annotations

import ast
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import TOL, make_paged_kv, rel_err

import pagegen
from pagegen import codegen
from pagegen.decode import DecodePlan
from pagegen.features import check_features, standard_alibi_slopes
from pagegen.reference import paged_decode_ref, paged_extend_ref
from pagegen.spec import FEATURE_SUFFIXES, Config, KernelSpec

F16 = torch.float16
FEATURES = ("window", "softcap", "sinks", "alibi")


def feature_args(names, hq: int, g: torch.Generator, device, window: int = 40, softcap: float = 5.0) -> dict:
    """Keyword arguments of the ops for the named features (values realistic for tests)."""
    args: dict = {}
    if "window" in names:
        args["sliding_window"] = window
    if "softcap" in names:
        args["softcap"] = softcap  # small enough that tanh bends the random scores
    if "sinks" in names:
        args["sinks"] = (2.0 * torch.randn(hq, generator=g)).to(device)
    if "alibi" in names:
        args["alibi_slopes"] = standard_alibi_slopes(hq).to(device)
    return args


def pool_form(k: torch.Tensor, v: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V as an engine holds them, returned as the views pagegen reads: separate tensors,
    stacked [nb, 2, ...] or [2, nb, ...], or packed in the last dim [..., 2 * D]."""
    d = k.shape[-1]
    if form == "separate":
        return k, v
    if form == "stack1":
        pool = torch.stack([k, v], dim=1).contiguous()
        return pool[:, 0], pool[:, 1]
    if form == "stack0":
        pool = torch.stack([k, v], dim=0).contiguous()
        return pool[0], pool[1]
    if form == "packed":
        pool = torch.cat([k, v], dim=-1).contiguous()
        return pool[..., :d], pool[..., d:]
    raise ValueError(form)


def poison_before(cache: torch.Tensor, bt: torch.Tensor, seq: int, first: int, layout: str) -> None:
    """NaN into positions 0 .. first - 1 of sequence `seq` (they must never be read)."""
    bs = cache.shape[1] if layout == "NHD" else cache.shape[2]
    for pos in range(max(0, first)):
        blk, slot = int(bt[seq, pos // bs]), pos % bs
        if layout == "NHD":
            cache[blk, slot] = float("nan")
        else:
            cache[blk, :, slot] = float("nan")


def run_decode(device, lens, kv_heads, group, head_dim, block_size, layout, feats=(), config=None, seed=0,
               form="separate", poison=False, dtype=F16, **values):
    g = torch.Generator().manual_seed(seed)
    k, v, bt, sl = make_paged_kv(lens, kv_heads, head_dim, block_size, layout, dtype, device, generator=g)
    hq = kv_heads * group
    q = torch.randn(len(lens), hq, head_dim, generator=g).to(dtype).to(device)
    args = feature_args(feats, hq, g, device, **values)
    k_ref, v_ref = k.cpu().clone(), v.cpu().clone()  # the reference reads the pools before any poison
    if poison:
        w = args["sliding_window"]
        for i, n in enumerate(lens):
            poison_before(k, bt, i, n - w, layout)
            poison_before(v, bt, i, n - w, layout)
    kc, vc = pool_form(k, v, form)
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    pagegen.paged_decode(q, kc, vc, bt, sl, layout=layout, config=config, out=out, **args)
    cpu = {a: (t.cpu() if isinstance(t, torch.Tensor) else t) for a, t in args.items()}
    ref = paged_decode_ref(q.cpu(), k_ref, v_ref, bt.cpu(), sl.cpu(), layout=layout, **cpu)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"decode rel err {err:.2e}: {lens=} {feats=} {values=} {layout} {config} {form}"
    return out, (q, kc, vc, bt, sl, args)


def run_extend(device, seq_lens, q_lens, kv_heads, group, head_dim, block_size, layout, feats=(), config=None, seed=0,
               form="separate", poison=False, dtype=F16, **values):
    g = torch.Generator().manual_seed(seed)
    k, v, bt, sl = make_paged_kv(seq_lens, kv_heads, head_dim, block_size, layout, dtype, device, generator=g)
    hq = kv_heads * group
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32).to(device)
    q = torch.randn(sum(q_lens), hq, head_dim, generator=g).to(dtype).to(device)
    args = feature_args(feats, hq, g, device, **values)
    k_ref, v_ref = k.cpu().clone(), v.cpu().clone()  # the reference reads the pools before any poison
    if poison:  # keys below the first new token's window are seen by no row
        w = args["sliding_window"]
        for i, (n, m) in enumerate(zip(seq_lens, q_lens, strict=True)):
            poison_before(k, bt, i, n - m - w + 1, layout)
            poison_before(v, bt, i, n - m - w + 1, layout)
    kc, vc = pool_form(k, v, form)
    out = torch.full_like(q, float("nan"))
    pagegen.paged_extend(q, kc, vc, bt, cu, sl, layout=layout, config=config, out=out, **args)
    cpu = {a: (t.cpu() if isinstance(t, torch.Tensor) else t) for a, t in args.items()}
    ref = paged_extend_ref(q.cpu(), k_ref, v_ref, bt.cpu(), cu.cpu(), sl.cpu(), layout=layout, **cpu)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"extend rel err {err:.2e}: {seq_lens=} {q_lens=} {feats=} {values=} {layout} {form}"
    return out


SPLIT = Config(block_n=64, split_size=256)
NO_SPLIT = Config(block_n=32)
EXT = Config(block_m=32, block_n=16)


# -- each feature alone ---------------------------------------------------------------------------

@pytest.mark.parametrize("config", [NO_SPLIT, SPLIT], ids=["nosplit", "split"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("feat", FEATURES)
def test_decode_each_feature(device, feat, layout, config):
    """Short, one-page-plus and multi-split sequences; the window (300) covers two splits of 256."""
    run_decode(device, [1, 17, 600], 2, 4, 64, 16, layout, (feat,), config, window=300, seed=len(feat))


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("feat", FEATURES)
def test_extend_each_feature(device, feat, layout):
    """A plain prefill, a chunk after a prefix, and one token (decode-like), window 24 (mid-page)."""
    run_extend(device, [20, 75, 33], [20, 30, 1], 2, 4, 64, 16, layout, (feat,), EXT, window=24, seed=len(feat))


def test_all_features_together(device):
    run_decode(device, [9, 600], 2, 4, 64, 16, "NHD", FEATURES, SPLIT, window=333)
    run_extend(device, [40, 70], [40, 25], 2, 4, 64, 16, "HND", FEATURES, EXT, window=19)


# -- the named models' combinations -------------------------------------------------------------

@pytest.mark.parametrize("config", [NO_SPLIT, SPLIT], ids=["nosplit", "split"])
def test_mistral_window(device, config):
    """Mistral-7B: window 4096 (scaled down), 32 q / 8 KV heads (group 4), head_dim 128."""
    run_decode(device, [50, 530], 2, 4, 128, 16, "NHD", ("window",), config, window=280)
    run_extend(device, [50, 90], [50, 33], 2, 4, 128, 16, "NHD", ("window",), EXT, window=36)


@pytest.mark.parametrize("config", [Config(block_n=32), Config(block_n=64, split_size=256)], ids=["nosplit", "split"])
def test_gemma2_softcap_and_window(device, config):
    """Gemma-2: softcap 50 + window, head_dim 256 (query scale 256^-0.5), group 2."""
    run_decode(device, [7, 520], 1, 2, 256, 16, "HND", ("softcap", "window"), config, window=261, softcap=50.0)
    run_decode(device, [7, 520], 1, 2, 256, 16, "HND", ("softcap",), config, softcap=50.0)  # the global layers
    run_extend(device, [30, 64], [30, 20], 1, 2, 256, 16, "HND", ("softcap", "window"), Config(block_m=16, block_n=16),
               window=21, softcap=50.0)


@pytest.mark.parametrize("config", [NO_SPLIT, SPLIT], ids=["nosplit", "split"])
def test_gpt_oss_sinks_and_window(device, config):
    """gpt-oss: sinks + window 128, 64 q / 8 KV heads scaled down to 8 / 1 (group 8), head_dim 64."""
    run_decode(device, [3, 128, 129, 700], 1, 8, 64, 16, "NHD", ("sinks", "window"), config, window=128)
    run_decode(device, [3, 700], 1, 8, 64, 16, "NHD", ("sinks",), config)  # the full-attention layers
    run_extend(device, [40, 160], [40, 37], 1, 8, 64, 16, "NHD", ("sinks", "window"), Config(block_m=64, block_n=32),
               window=32)


@pytest.mark.parametrize("config", [NO_SPLIT, SPLIT], ids=["nosplit", "split"])
def test_alibi_standard_slopes(device, config):
    """BLOOM/MPT-style ALiBi: 6 heads (not a power of two) with the standard slopes, MHA."""
    run_decode(device, [12, 400], 6, 1, 64, 16, "HND", ("alibi",), config)
    run_extend(device, [12, 50], [12, 20], 6, 1, 64, 16, "HND", ("alibi",), EXT)


def test_standard_alibi_slopes():
    assert standard_alibi_slopes(8).tolist() == [2.0 ** -(i + 1) for i in range(8)]
    six = standard_alibi_slopes(6).tolist()  # 4 of the power-of-two 4, then every other of 8
    assert six == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


# -- window edges -------------------------------------------------------------------------------

L = 520  # > 2 splits of 256


@pytest.mark.parametrize("config", [NO_SPLIT, SPLIT], ids=["nosplit", "split"])
@pytest.mark.parametrize("window", [1, L - 1, L, L + 7, 203], ids=["W1", "Wlen-1", "Wlen", "Wgtlen", "Wmidpage"])
def test_decode_window_edges(device, window, config):
    """W = 1, length - 1, length, > length, and a window starting mid-page (520 - 203 = 317)."""
    run_decode(device, [L, 5], 2, 4, 64, 16, "NHD", ("window",), config, window=window, seed=window)


@pytest.mark.parametrize("window", [1, 2, 49, 50, 57, 13])
def test_extend_window_edges(device, window):
    """W = 1, 2, length - 1, length, > length, and windows starting mid-page, tiles of 16 query rows
    (BLOCK_M 32, group 2) over several pages; a plain prefill and a chunk after a prefix."""
    run_extend(device, [50, 50], [50, 17], 2, 2, 64, 16, "HND", ("window",), EXT, window=window, seed=window)


@pytest.mark.parametrize("block_size", [1, 8, 64])
def test_window_across_block_sizes(device, block_size):
    run_decode(device, [70, 300], 2, 4, 64, block_size, "NHD", ("window",), SPLIT if block_size < 64 else NO_SPLIT,
               window=90)
    run_extend(device, [70, 40], [30, 40], 2, 4, 64, block_size, "NHD", ("window",), EXT, window=25)


# -- the window skips, it does not mask ----------------------------------------------------------

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the plain kernel's NaN, on purpose
@pytest.mark.parametrize("config", [NO_SPLIT, SPLIT], ids=["nosplit", "split"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_decode_window_skips_tiles(device, layout, config):
    """Every key before the window is NaN: the output stays finite and right (those keys are never
    loaded); the same pool without a window gives NaN (so the poison is really there)."""
    out, (q, k, v, bt, sl, _) = run_decode(device, [600, 299, 40], 2, 4, 64, 16, layout, ("window",), config,
                                           window=290, poison=True)
    plain = pagegen.paged_decode(q, k, v, bt, sl, layout=layout, config=config)
    assert not torch.isfinite(plain[:2]).all()


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_extend_window_skips_tiles(device, layout):
    run_extend(device, [120, 90], [20, 33], 2, 4, 64, 16, layout, ("window",), EXT, window=40, poison=True)


def test_window_bounds_the_dispatch_context(device):
    """The dispatcher and the split grid see min(window, context): a window of 128 over a 4096-token
    capacity picks the config of a 128-token context (no split), not the long context's."""
    g = torch.Generator().manual_seed(3)
    k, v, bt, sl = make_paged_kv([4096], 2, 64, 16, "NHD", F16, device, generator=g)
    q = torch.randn(1, 8, 64, generator=g).to(F16).to(device)
    plain = DecodePlan(q, k, v, bt, sl)
    windowed = DecodePlan(q, k, v, bt, sl, sliding_window=128)
    assert plain.config.split_size > 0  # batch 1 at 4096 tokens: split-KV
    assert windowed.config.split_size == 0
    assert windowed.spec.sliding_window and not plain.spec.sliding_window


# -- pools as engines hold them -------------------------------------------------------------------

FORMS = ("separate", "stack1", "stack0", "packed")


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("form", FORMS)
def test_pool_forms(device, form, layout):
    """K/V as two tensors, stacked in one ([nb, 2, ...], [2, nb, ...]) or packed in the last dim
    ([..., 2 * D], views [..., :D] / [..., D:]): read in place, decode (split on) and extend."""
    _, (q, k, v, bt, sl, _) = run_decode(device, [5, 300], 2, 4, 64, 16, layout, (), SPLIT, form=form)
    assert (form == "packed") == (k.stride(2) != k.shape[3])
    spec = DecodePlan(q, k, v, bt, sl, layout=layout, config=NO_SPLIT).spec
    assert spec.kv_packed == (form == "packed")
    assert spec.variant_key().endswith("_kvp") == (form == "packed")
    run_extend(device, [20, 45], [20, 9], 2, 4, 80, 16, layout, (), EXT, form=form)


def test_packed_pool_with_features(device):
    run_decode(device, [9, 300], 2, 4, 64, 16, "HND", ("window", "sinks"), SPLIT, form="packed", window=270)
    run_extend(device, [30, 60], [30, 21], 2, 4, 64, 16, "NHD", ("softcap", "alibi"), EXT, form="packed")


def test_decode_plan_with_features(device):
    """DecodePlan bakes the features in; its run() matches paged_decode; sinks' contents may change."""
    out, (q, k, v, bt, sl, args) = run_decode(device, [30, 300], 2, 4, 64, 16, "NHD", ("window", "sinks", "softcap"),
                                              SPLIT, window=260)
    plan = DecodePlan(q, k, v, bt, sl, config=SPLIT, **args)
    assert torch.equal(plan.run(q, k, v, bt, sl), out)
    args["sinks"].add_(1.0)
    ref = paged_decode_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu(), **{a: (t.cpu() if isinstance(t, torch.Tensor)
                                                                                   else t) for a, t in args.items()})
    assert rel_err(plan.run(q, k, v, bt, sl), ref) < TOL[F16]


# -- bad feature arguments ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    ({"sliding_window": 0}, ValueError, "sliding_window=0"),
    ({"sliding_window": -4}, ValueError, "sliding_window"),
    ({"sliding_window": True}, TypeError, "sliding_window"),
    ({"sliding_window": 12.0}, TypeError, "sliding_window"),
    ({"softcap": 0.0}, ValueError, "softcap"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"softcap": math.inf}, ValueError, "softcap"),
    ({"softcap": math.nan}, ValueError, "softcap"),
    ({"softcap": "50"}, TypeError, "softcap"),
    ({"sinks": [0.0] * 8}, TypeError, "sinks"),
    ({"sinks": torch.zeros(4)}, ValueError, r"sinks has shape \(4,\); expected \[8\]"),
    ({"sinks": torch.zeros(8, dtype=torch.float16)}, TypeError, "sinks has dtype float16; expected float32"),
    ({"alibi_slopes": torch.zeros(8, 1)}, ValueError, "alibi_slopes has shape"),
    ({"alibi_slopes": "strided"}, ValueError, "alibi_slopes must be contiguous"),
])
def test_bad_feature_arguments(device, kwargs, exc, match):
    g = torch.Generator().manual_seed(0)
    k, v, bt, sl = make_paged_kv([20], 2, 64, 16, "NHD", F16, device, generator=g)
    q = torch.randn(1, 8, 64).to(F16).to(device)
    kwargs = {a: (t.to(device) if isinstance(t, torch.Tensor) else t) for a, t in kwargs.items()}
    if kwargs.get("alibi_slopes") == "strided":  # made on the device: .to(device) would make it contiguous
        kwargs["alibi_slopes"] = torch.zeros(16, device=device)[::2]
    with pytest.raises(exc, match=match):
        pagegen.paged_decode(q, k, v, bt, sl, **kwargs)
    with pytest.raises(exc, match=match):
        pagegen.paged_extend(q, k, v, bt, torch.tensor([0, 1], dtype=torch.int32, device=device), sl, **kwargs)
    with pytest.raises(exc, match=match):
        DecodePlan(q, k, v, bt, sl, **kwargs)


def test_features_on_the_wrong_device():
    with pytest.raises(ValueError, match="sinks is on cpu but q is on meta"):
        check_features(4, torch.device("meta"), sinks=torch.zeros(4))


def test_overlapping_pool_view_refused(device):
    """A second-innermost stride below head_dim (rows overlap) is not a pool pagegen can read."""
    g = torch.Generator().manual_seed(0)
    k, v, bt, sl = make_paged_kv([20], 2, 64, 16, "NHD", F16, device, generator=g)
    bad = k.as_strided(k.shape, (k.stride(0), k.stride(1), 32, 1))
    with pytest.raises(ValueError, match="second-innermost stride"):
        pagegen.paged_decode(torch.randn(1, 8, 64).to(F16).to(device), bad, bad, bt, sl)


# -- the spec axes --------------------------------------------------------------------------------

def test_feature_spec_axes():
    plain = KernelSpec("decode", head_dim=64, block_size=16, group_size=8)
    assert plain.variant_key() == "decode_bf16_hd64_bs16_nhd_g8" and plain.features == ()
    assert "sliding_window" not in plain.to_dict()  # tables of plain specs keep their form
    oss = KernelSpec("decode", head_dim=64, block_size=16, group_size=8, sliding_window=True, sinks=True)
    assert oss.variant_key() == "decode_bf16_hd64_bs16_nhd_g8_win_sink"
    assert oss.features == ("sliding_window", "sinks")
    assert KernelSpec.from_dict(oss.to_dict()) == oss
    with pytest.raises(TypeError, match="softcap must be a bool"):
        KernelSpec("decode", head_dim=64, block_size=16, softcap=50.0)
    with pytest.raises(ValueError, match="attention family"):
        KernelSpec("kv_write", head_dim=64, block_size=16, alibi=True)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_models_bf16_on_gpu(device, layout):
    """The named models' settings in bf16 at real sizes (GPU only: the interpreter's bf16 dot is garbage)."""
    bf = torch.bfloat16
    lens = [1, 4095, 4097, 9000]
    run_decode(device, lens, 8, 4, 128, 16, layout, ("window",), window=4096, dtype=bf)  # Mistral-7B
    run_decode(device, lens, 8, 2, 256, 16, layout, ("softcap", "window"), window=4096, softcap=50.0, dtype=bf)
    run_decode(device, lens, 8, 8, 64, 16, layout, ("sinks", "window"), window=128, dtype=bf)  # gpt-oss
    run_decode(device, lens, 8, 8, 64, 16, layout, ("sinks",), dtype=bf)
    run_decode(device, lens, 16, 1, 128, 16, layout, ("alibi",), dtype=bf)  # MPT-7B-like
    run_extend(device, [3000, 5000], [1000, 700], 8, 4, 128, 16, layout, ("window",), window=4096, dtype=bf)
    run_extend(device, [3000, 5000], [1000, 700], 8, 2, 256, 16, layout, ("softcap", "window"), window=4096,
               softcap=50.0, dtype=bf)
    run_extend(device, [600, 900], [300, 500], 8, 8, 64, 16, layout, ("sinks", "window"), window=128, dtype=bf)
    run_extend(device, [600, 900], [300, 500], 16, 1, 128, 16, layout, ("alibi",), dtype=bf)


# -- the feature kernels compile for real -----------------------------------------------------------

COMPILE_SCRIPT = r"""
import json, sys
from pagegen.compile_check import DECODE_TYPES, compile_for_target, load_jit_module, ptxas_report
from pagegen.spec import KernelSpec
FEAT = {"window": "i32", "softcap_log2": "fp32", "sinks_ptr": "*fp32", "alibi_ptr": "*fp32"}
EXT = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "block_tables_ptr": "*i32",
       "cu_seqlens_q_ptr": "*i32", "seq_lens_ptr": "*i32", "qk_scale": "fp32"}
MERGE = {k: DECODE_TYPES[k] for k in ("out_ptr", "part_out_ptr", "part_lse_ptr", "seq_lens_ptr")}
out = []
for flags in json.loads(sys.argv[1]):
    for fam in ("decode", "extend"):
        mod = load_jit_module(KernelSpec(fam, head_dim=128, block_size=16, group_size=4, **flags))
        if fam == "decode":
            for split in (0, 512):
                k = compile_for_target(mod.decode_kernel, {**DECODE_TYPES, **FEAT},
                                       {"BLOCK_N": 128, "SPLIT_SIZE": split, "DOT_FP32": False}, num_stages=3)
                out.append(dict(ptxas_report(k), mma="mma" in k.asm["ptx"], case=f"{fam} {flags} split {split}"))
            compile_for_target(mod.merge_kernel, {**MERGE, **FEAT}, {"SPLIT_SIZE": 512, "SPLITS_PAD": 8})
        else:
            k = compile_for_target(mod.extend_kernel, {**EXT, **FEAT},
                                   {"BLOCK_M": 128, "BLOCK_Q": 32, "BLOCK_N": 64, "DOT_FP32": False},
                                   num_warps=8, num_stages=5)
            out.append(dict(ptxas_report(k), mma="mma" in k.asm["ptx"], case=f"{fam} {flags}"))
print(json.dumps(out))
"""


def test_feature_kernels_compile_for_sm90_without_spills():
    """Decode (split on and off), merge and extend with every feature, and with a packed pool,
    compile for sm_90 (Triton's bundled ptxas, no GPU), use the tensor cores and do not spill.
    Measured (head_dim 128, group 4): decode 128-168 registers, extend 180-215."""
    flags = [{"sliding_window": True, "softcap": True, "sinks": True, "alibi": True}, {"sliding_window": True},
             {"kv_packed": True}]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(flags)], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for rep in json.loads(r.stdout.strip().splitlines()[-1]):
        assert rep["spill_bytes"] == 0 and rep["mma"], rep


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("family", ["decode", "extend"])
def test_every_feature_combination_renders(family, layout):
    """All 32 combinations of the features and the packed pool render to valid Python holding the
    code of exactly the features that are on."""
    markers = {"sliding_window": "window,", "softcap": "softcap_log2,", "sinks": "sinks_ptr,", "alibi": "alibi_ptr,"}
    for bits in itertools.product((False, True), repeat=len(FEATURE_SUFFIXES)):
        flags = dict(zip(FEATURE_SUFFIXES, bits, strict=True))
        spec = KernelSpec(family, head_dim=80, block_size=16, layout=layout, group_size=4, **flags)
        src = codegen.render(spec)
        ast.parse(src)
        for name, marker in markers.items():
            assert (marker in src) == flags[name], (spec.variant_key(), name)
