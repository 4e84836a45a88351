"""Multi-token decode (speculative verify, issue 17): paged_verify / VerifyPlan against the float64
reference and against paged_extend on the same inputs (they compute one function), across q_len
1..16, GQA groups 1/4/7/8, block sizes 1..256, ragged contexts, new tokens crossing page boundaries,
split-KV on and off, uniform [B, q_len, Hq, D] and varlen (cu_seqlens_q) queries, a feature
combination (window + sinks), fp16 (the interpreter's bf16 dot is garbage), NaN-poisoned outputs;
the q_len spec axis (keys, legality) and the decode/verify/extend routing; bad arguments."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, make_paged_kv, rel_err

import pagegen
from pagegen import codegen
from pagegen.dispatch import attention_path
from pagegen.reference import paged_verify_ref
from pagegen.spec import MAX_VERIFY_ACC, Config, KernelSpec, config_space, default_config, illegal_reason
from pagegen.verify import VerifyPlan, paged_verify

F16 = torch.float16
NO_SPLIT = Config(block_n=16)
SPLIT = Config(block_n=32, split_size=256)


def make_case(device, lens, q_lens, kv_heads, group, head_dim, block_size, layout="NHD", seed=0, varlen=False):
    """Paged pools holding `lens` tokens a sequence (its new tokens included) and the verify query:
    [B, q_len, Hq, D] when q_lens is an int and not varlen, else packed [total_q, Hq, D] + cu_seqlens_q."""
    g = torch.Generator().manual_seed(seed)
    k, v, bt, sl = make_paged_kv(lens, kv_heads, head_dim, block_size, layout, F16, device, generator=g)
    hq = kv_heads * group
    if isinstance(q_lens, int) and not varlen:
        q = torch.randn(len(lens), q_lens, hq, head_dim, generator=g).to(F16).to(device)
        return q, k, v, bt, sl, None
    q_lens = [q_lens] * len(lens) if isinstance(q_lens, int) else q_lens
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32).to(device)
    q = torch.randn(sum(q_lens), hq, head_dim, generator=g).to(F16).to(device)
    return q, k, v, bt, sl, cu


def check_verify(device, lens, q_lens, kv_heads, group, head_dim, block_size, layout="NHD", config=None, seed=0,
                 varlen=False, extend=True, **feats):
    """paged_verify (poisoned out) against the reference and, when `extend`, against paged_extend."""
    q, k, v, bt, sl, cu = make_case(device, lens, q_lens, kv_heads, group, head_dim, block_size, layout, seed, varlen)
    ql = q.shape[1] if cu is None else max(q_lens) if isinstance(q_lens, list) else q_lens
    out = torch.full_like(q, float("nan"))  # every element must be written
    paged_verify(q, k, v, bt, sl, cu_seqlens_q=cu, max_q_len=None if cu is None else ql, layout=layout,
                 config=config, out=out, **feats)
    cpu = {a: (t.cpu() if isinstance(t, torch.Tensor) else t) for a, t in feats.items()}
    ref = paged_verify_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu(),
                           cu_seqlens_q=None if cu is None else cu.cpu(), layout=layout, **cpu)
    err = rel_err(out, ref)
    what = f"{lens=} {q_lens=} {kv_heads=} {group=} {head_dim=} {block_size=} {layout} {config} {varlen=} {feats=}"
    assert err < TOL[F16], f"verify rel err {err:.2e}: {what}"
    if extend:  # the extend op computes the same function on the packed form
        b = len(lens)
        q3 = q.reshape(-1, q.shape[-2], q.shape[-1])
        cu3 = cu if cu is not None else torch.arange(0, (b + 1) * ql, ql, dtype=torch.int32, device=q.device)
        ext = pagegen.paged_extend(q3, k, v, bt, cu3, sl, layout=layout, config=Config(block_m=32, block_n=16),
                                   **feats)
        diff = rel_err(out.reshape(ext.shape), ext.double())
        assert diff < TOL[F16], f"verify vs paged_extend rel diff {diff:.2e}: {what}"
    return out


# -- q_len x group x block size (uniform q, split off) -----------------------------------------------

CASES = [  # (q_len, group, block_size, lens): ragged contexts; new tokens crossing page boundaries
    (2, 1, 1, [9, 3, 30]),
    (2, 4, 16, [17, 2, 45]),  # 17 - 2 = 15: the two new tokens straddle the page boundary at 16
    (3, 7, 8, [10, 40, 3]),  # 3 new tokens of 10 at positions 7..9 cross the page at 8
    (4, 8, 32, [33, 70, 4]),
    (4, 1, 64, [66, 5, 130]),
    (8, 4, 128, [130, 8, 20]),
    (8, 7, 16, [23, 61, 9]),
    (16, 1, 256, [270, 16, 40]),
    (16, 8, 8, [20, 37, 16]),  # q_len 16 x group 8 = 128 rows, the most one program holds
    (16, 4, 1, [19, 24]),
]


@pytest.mark.parametrize("q_len,group,block_size,lens", CASES)
def test_verify_uniform(device, q_len, group, block_size, lens):
    check_verify(device, lens, q_len, kv_heads=2, group=group, head_dim=64, block_size=block_size, config=NO_SPLIT)


@pytest.mark.parametrize("q_len", [2, 4, 16])
def test_verify_heuristic_config(device, q_len):
    """No config given: the dispatcher's choice (heuristic under the interpreter) for the q_len spec."""
    check_verify(device, [50, 21], q_len, kv_heads=1, group=4, head_dim=64, block_size=16)


# -- split-KV on: several splits, the merge per (sequence, token, head) ------------------------------

@pytest.mark.parametrize("q_len,group,block_size,layout", [(2, 4, 16, "NHD"), (4, 7, 8, "HND"), (8, 1, 64, "NHD"),
                                                          (16, 8, 32, "HND")])
def test_verify_split(device, q_len, group, block_size, layout):
    # 600: 3 splits of 256, the new tokens in the last; 257: the last new token alone in split 1;
    # 260 with q_len 8 or 16: the new tokens straddle the split boundary at 256
    lens = [600, 257, 260, q_len]
    check_verify(device, lens, q_len, kv_heads=1, group=group, head_dim=64, block_size=block_size, layout=layout,
                 config=SPLIT)


def test_verify_padded_head_dim(device):
    """head_dim 80 (padded to 128): masked loads in the unmasked-prefix loop too."""
    check_verify(device, [70, 300], 4, kv_heads=1, group=4, head_dim=80, block_size=16, config=SPLIT)
    check_verify(device, [70, 33], 3, kv_heads=2, group=2, head_dim=80, block_size=16, config=NO_SPLIT)


# -- varlen: cu_seqlens_q, sequences with different (and zero) new-token counts -----------------------

@pytest.mark.parametrize("config", [NO_SPLIT, SPLIT], ids=["nosplit", "split"])
def test_verify_varlen(device, config):
    q_lens = [3, 1, 0, 4, 2]
    lens = [300, 40, 17, 9, 261]
    check_verify(device, lens, q_lens, kv_heads=2, group=4, head_dim=64, block_size=16, config=config, varlen=True)


def test_verify_varlen_uniform_counts(device):
    """Packed q whose sequences all have q_len new tokens equals the [B, q_len, Hq, D] form."""
    out_v = check_verify(device, [40, 25], 4, kv_heads=1, group=4, head_dim=64, block_size=16, config=NO_SPLIT,
                         varlen=True, extend=False)
    out_u = check_verify(device, [40, 25], 4, kv_heads=1, group=4, head_dim=64, block_size=16, config=NO_SPLIT,
                         extend=False)
    assert torch.equal(out_v.view(out_u.shape), out_u)


def test_verify_varlen_single_tokens_with_empty(device):
    """max_q_len 1 but a sequence without new tokens: not the one-token decode layout (q rows != batch),
    so the q_len-2 kernel runs; the empty sequence writes nothing."""
    check_verify(device, [30, 12, 50], [1, 0, 1], kv_heads=1, group=4, head_dim=64, block_size=16, config=NO_SPLIT,
                 varlen=True)


# -- features with q_len > 1: the window ends at each row's own position ----------------------------

@pytest.mark.parametrize("config,window", [(NO_SPLIT, 20), (SPLIT, 300), (SPLIT, 5)],
                         ids=["nosplit-w20", "split-w300", "split-w5"])
def test_verify_window_sinks(device, config, window):
    g = torch.Generator().manual_seed(3)
    hq = 2 * 4
    sinks = (2.0 * torch.randn(hq, generator=g)).to(device)
    # window 5 < q_len 8: later rows cannot see the first new tokens (the leading-edge mask)
    check_verify(device, [600, 40, 8], 8, kv_heads=2, group=4, head_dim=64, block_size=16, config=config,
                 sliding_window=window, sinks=sinks)


def test_verify_window_skips_keys(device):
    """Keys below the first new token's window are never read: NaN there leaves the output finite."""
    q, k, v, bt, sl, _ = make_case(device, [200, 90], 4, 1, 4, 64, 16, seed=5)
    ref = paged_verify_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu(), sliding_window=30)
    for i, n in enumerate([200, 90]):
        first = n - 4 - 30 + 1  # row 0 at position n - 4 sees keys n - 4 - 29 ..
        for pos in range(first):
            blk, slot = int(bt[i, pos // 16]), pos % 16
            k[blk, slot] = float("nan")
            v[blk, slot] = float("nan")
    out = paged_verify(q, k, v, bt, sl, sliding_window=30, config=Config(block_n=16, split_size=256))
    assert rel_err(out, ref) < TOL[F16]


def test_verify_softcap_alibi(device):
    from pagegen.features import standard_alibi_slopes

    slopes = standard_alibi_slopes(4).to(device)
    check_verify(device, [45, 300], 4, kv_heads=1, group=4, head_dim=64, block_size=16, config=SPLIT, softcap=5.0,
                 alibi_slopes=slopes)


# -- routing: q_len 1 -> one-token decode, > 16 -> extend -------------------------------------------

def test_attention_path():
    assert attention_path(1, 4, 128) == 1
    assert [attention_path(n, 4, 128) for n in (2, 3, 4, 5, 8, 9, 16)] == [2, 4, 4, 8, 8, 16, 16]
    assert attention_path(17, 4, 128) == 0  # long queries: extend
    assert attention_path(16, 8, 128) == 16  # 128 rows x 128
    assert attention_path(16, 16, 128) == 0  # 256 rows: past one program's accumulator
    assert attention_path(16, 8, 256) == 0 and attention_path(8, 8, 256) == 8


def test_verify_q_len_1_is_decode(device):
    q, k, v, bt, sl, _ = make_case(device, [40, 7, 90], 1, 2, 4, 64, 16)
    out = paged_verify(q, k, v, bt, sl, config=NO_SPLIT)
    dec = pagegen.paged_decode(q[:, 0], k, v, bt, sl, config=NO_SPLIT)
    assert torch.equal(out[:, 0], dec)


def test_verify_long_q_goes_to_extend(device):
    check_verify(device, [40, 30], 20, kv_heads=1, group=4, head_dim=64, block_size=16, extend=False)
    check_verify(device, [40, 30], [20, 3], kv_heads=1, group=4, head_dim=64, block_size=16, varlen=True,
                 extend=False)


# -- strided query views and the plan ---------------------------------------------------------------

def test_verify_strided_q(device):
    """q a view into a bigger [B, q_len, Hq + extra, D] buffer (strides honoured), out contiguous."""
    q, k, v, bt, sl, _ = make_case(device, [50, 33], 4, 1, 4, 64, 16)
    big = torch.randn(2, 4, 7, 64).to(F16).to(device)
    big[:, :, 1:5] = q
    view = big[:, :, 1:5]
    out = paged_verify(view, k, v, bt, sl, config=NO_SPLIT)
    assert rel_err(out, paged_verify_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu())) < TOL[F16]


@pytest.mark.parametrize("config", [NO_SPLIT, SPLIT], ids=["nosplit", "split"])
def test_verify_plan(device, config):
    q, k, v, bt, sl, _ = make_case(device, [300, 20], 4, 1, 4, 64, 16)
    plan = VerifyPlan(q, k, v, bt, sl, config=config)
    assert plan.spec.q_len == 4 and plan.spec.variant_key().endswith("_g4_q4")
    out = torch.full_like(q, float("nan"))
    plan.run(q, k, v, bt, sl, out=out)
    ref = paged_verify_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu())
    assert rel_err(out, ref) < TOL[F16]
    sl2 = torch.tensor([280, 19], dtype=torch.int32, device=device)  # contents change, shapes do not
    out2 = plan.run(q, k, v, bt, sl2)
    assert rel_err(out2, paged_verify_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl2.cpu())) < TOL[F16]


def test_verify_plan_varlen_and_q1(device):
    q, k, v, bt, sl, cu = make_case(device, [60, 30], [3, 2], 1, 4, 64, 16, varlen=True)
    plan = VerifyPlan(q, k, v, bt, sl, cu_seqlens_q=cu, max_q_len=3, config=NO_SPLIT)
    out = plan.run(q, k, v, bt, sl, cu)
    assert rel_err(out, paged_verify_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu(), cu_seqlens_q=cu.cpu())) < 2e-3
    q1, k1, v1, bt1, sl1, _ = make_case(device, [60, 30], 1, 1, 4, 64, 16)
    plan1 = VerifyPlan(q1, k1, v1, bt1, sl1, config=NO_SPLIT)
    assert plan1.spec.q_len == 1
    assert torch.equal(plan1.run(q1, k1, v1, bt1, sl1)[:, 0], pagegen.paged_decode(q1[:, 0], k1, v1, bt1, sl1,
                                                                                   config=NO_SPLIT))


@pytest.mark.gpu
def test_verify_plan_cuda_graph(device):
    """A fixed-q_len verify step captured in a CUDA graph replays correctly with new lengths."""
    q, k, v, bt, sl, _ = make_case(device, [3000, 700, 64, 1500], 4, 8, 4, 128, 16)
    plan = VerifyPlan(q, k, v, bt, sl, max_seq_len=3000)
    out = torch.empty_like(q)
    plan.run(q, k, v, bt, sl, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.run(q, k, v, bt, sl, out=out)
    sl.copy_(torch.tensor([2999, 650, 30, 1501], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, paged_verify_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu())) < TOL[F16]


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_verify_packed_pool(device, layout):
    """K and V packed in the last dim of one pool ([..., 2 * D], read as views): the kv_packed variant."""
    q, k, v, bt, sl, _ = make_case(device, [300, 45], 4, 2, 4, 64, 16, layout=layout)
    pool = torch.cat([k, v], dim=-1).contiguous()
    kp, vp = pool[..., :64], pool[..., 64:]
    out = torch.full_like(q, float("nan"))
    paged_verify(q, kp, vp, bt, sl, layout=layout, out=out, config=SPLIT)
    assert rel_err(out, paged_verify_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu(), layout=layout)) < TOL[F16]


@pytest.mark.gpu
@pytest.mark.parametrize("q_len", [2, 4, 8, 16])
def test_verify_bf16_gpu(device, q_len):
    """bf16 at the benchmark's geometry (head_dim 128, 32 q / 8 KV heads, block 16), ragged contexts,
    the dispatcher's config (split-KV at these lengths), against the float64 reference and extend."""
    g = torch.Generator().manual_seed(q_len)
    lens = [4099, 517, q_len, 2048]
    k, v, bt, sl = make_paged_kv(lens, 8, 128, 16, "NHD", torch.bfloat16, device, generator=g)
    q = torch.randn(len(lens), q_len, 32, 128, generator=g).to(torch.bfloat16).to(device)
    out = paged_verify(q, k, v, bt, sl, max_seq_len=max(lens), sum_seq_lens=sum(lens))
    ref = paged_verify_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu())
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    cu = torch.arange(0, (len(lens) + 1) * q_len, q_len, dtype=torch.int32, device=device)
    ext = pagegen.paged_extend(q.reshape(-1, 32, 128), k, v, bt, cu, sl)
    assert rel_err(out.reshape(ext.shape), ext.double()) < TOL[torch.bfloat16]


# -- compiled for sm_90 (no GPU needed): the interpreter accepts code the compiler rejects -----------

COMPILE_CASES = [  # the default config of each spec (spec.default_config), split on and off, varlen
    dict(head_dim=128, block_size=16, layout="NHD", group=4, q_len=2, block_n=128, warps=4, stages=3, split=1024),
    dict(head_dim=128, block_size=16, layout="NHD", group=4, q_len=8, block_n=128, warps=4, stages=3, split=0,
         varlen=True),
    dict(head_dim=128, block_size=16, layout="NHD", group=4, q_len=16, block_n=64, warps=8, stages=3, split=4096),
    dict(head_dim=128, block_size=16, layout="HND", group=8, q_len=16, block_n=64, warps=8, stages=3, split=512,
         varlen=True),
    dict(head_dim=96, block_size=32, layout="NHD", group=7, q_len=4, block_n=128, warps=4, stages=3, split=1024),
]


def test_verify_compiles_for_sm90_without_spills():
    """Each case compiles (decode and merge) through Triton's bundled ptxas, puts the rows through the
    tensor cores (mma) and fits in registers. A subprocess: Triton imported under the interpreter
    cannot compile."""
    import json
    import os
    import subprocess
    import sys

    for case in COMPILE_CASES:  # the cases are the configs the dispatcher would pick
        spec = KernelSpec("decode", head_dim=case["head_dim"], block_size=case["block_size"], group_size=case["group"],
                          q_len=case["q_len"])
        cfg = Config(block_n=case["block_n"], num_warps=case["warps"], num_stages=case["stages"])
        assert default_config(spec) == cfg, (case, default_config(spec))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "pagegen.compile_check", json.dumps(COMPILE_CASES)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = json.loads(r.stdout.strip().splitlines()[-1])
    for case, rep in zip(COMPILE_CASES, reports, strict=True):
        assert rep["spill_bytes"] == 0 and rep["mma"], (case, rep)


# -- the spec axis --------------------------------------------------------------------------------

def test_q_len_spec_axis():
    base = KernelSpec("decode", head_dim=128, block_size=16, group_size=4)
    s4 = KernelSpec("decode", head_dim=128, block_size=16, group_size=4, q_len=4, sliding_window=True)
    assert base.variant_key() == "decode_bf16_hd128_bs16_nhd_g4" and "q_len" not in base.to_dict()
    assert s4.variant_key() == "decode_bf16_hd128_bs16_nhd_g4_q4_win"
    assert KernelSpec.from_dict(s4.to_dict()) == s4 and s4.rows_padded == 16
    assert KernelSpec("decode", head_dim=128, block_size=16, group_size=7, q_len=16).rows_padded == 128
    with pytest.raises(ValueError, match="q_len=3 is not supported"):
        KernelSpec("decode", head_dim=128, block_size=16, q_len=3)
    with pytest.raises(ValueError, match="decode axis"):
        KernelSpec("extend", head_dim=128, block_size=16, q_len=4)
    with pytest.raises(ValueError, match="use the extend family"):
        KernelSpec("decode", head_dim=128, block_size=16, group_size=16, q_len=16)
    with pytest.raises(TypeError):
        KernelSpec("decode", head_dim=128, block_size=16, q_len=True)
    assert KernelSpec.from_key(s4.variant_key()) == s4  # the key parses back, q_len included
    with pytest.raises(ValueError, match="not a variant key"):
        KernelSpec.from_key("decode_bf16_hd128_bs16_nhd_g4_q1")  # q_len 1 has no suffix: one spelling
    with pytest.raises(ValueError, match="q_len=3 is not supported"):
        KernelSpec.from_key("decode_bf16_hd128_bs16_nhd_g4_q3")
    from pagegen.workloads import Bucket, Workload

    w = Workload(s4, kv_heads=8, buckets=(Bucket(8, 4096),), window=1024)  # tunable (tests/test_tune_verify.py)
    assert w.table_shape(w.buckets[0]) == (8, 1024 + 3)  # the keys its 4 new tokens see together
    for g, ql, hd in [(4, 16, 128), (8, 16, 128), (8, 8, 256), (1, 2, 64)]:
        spec = KernelSpec("decode", head_dim=hd, block_size=16, group_size=g, q_len=ql)
        assert spec.rows_padded * spec.head_dim_padded <= MAX_VERIFY_ACC
        assert illegal_reason(spec, default_config(spec)) is None and config_space(spec)


def test_q_len_1_source_unchanged():
    """q_len == 1 renders none of the verify code (test_render_stable holds the golden hashes)."""
    src = codegen.render(KernelSpec("decode", head_dim=128, block_size=16, group_size=4))
    assert "VARLEN" not in src and "row_pos" not in src
    src4 = codegen.render(KernelSpec("decode", head_dim=128, block_size=16, group_size=4, q_len=4))
    assert "VARLEN: tl.constexpr" in src4 and "Q_LEN = tl.constexpr(4)" in src4


# -- bad arguments ----------------------------------------------------------------------------------

def test_verify_bad_arguments(device):
    q, k, v, bt, sl, cu = make_case(device, [40, 30], [3, 2], 1, 4, 64, 16, varlen=True)
    with pytest.raises(ValueError, match=r"\[B, q_len, Hq, D\]"):
        paged_verify(q, k, v, bt, sl)  # packed q without cu_seqlens_q
    with pytest.raises(ValueError, match="cu_seqlens_q has 2 entries"):
        paged_verify(q, k, v, bt, sl, cu_seqlens_q=cu[:2], max_q_len=3)
    with pytest.raises(ValueError, match="more than max_q_len=2"):
        paged_verify(q, k, v, bt, sl, cu_seqlens_q=cu, max_q_len=2, validate=True)  # contents: validate
    with pytest.raises(ValueError, match="exceeds q.shape"):
        paged_verify(q, k, v, bt, sl, cu_seqlens_q=cu, max_q_len=6)
    q4, k4, v4, bt4, sl4, _ = make_case(device, [40, 3], 4, 1, 4, 64, 16)
    with pytest.raises(ValueError, match="seq_lens\\[1\\]=3"):
        paged_verify(q4, k4, v4, bt4, sl4, validate=True)  # 4 new tokens but only 3 cached (contents)
    with pytest.raises(ValueError, match="contradicts"):
        paged_verify(q4, k4, v4, bt4, sl4, max_q_len=2)
    with pytest.raises(ValueError, match="not legal"):
        paged_verify(q4, k4, v4, bt4, torch.tensor([40, 30], dtype=torch.int32, device=device),
                     config=Config(block_n=256, num_warps=1))
    with pytest.raises(ValueError, match="out must be"):
        paged_verify(q4, k4, v4, bt4, sl4, out=torch.empty(2, 4, 4, 32, dtype=F16, device=device))
    with pytest.raises(ValueError, match="more than max_q_len=1"):  # the one-token route checks the offsets too
        paged_verify(q[:2], k, v, bt, sl, cu_seqlens_q=torch.tensor([0, 2, 2], dtype=torch.int32, device=device),
                     max_q_len=1, validate=True)
    with pytest.raises(ValueError, match="q_len 0"):
        paged_verify(q4[:, :0], k4, v4, bt4, sl4)
    plan = VerifyPlan(q4, k4, v4, bt4, torch.tensor([40, 30], dtype=torch.int32, device=device), config=NO_SPLIT)
    with pytest.raises(ValueError, match="q does not match the plan"):
        plan.run(q4[:, :2], k4, v4, bt4, sl4)
    with pytest.raises(ValueError, match="exactly when"):
        plan.run(q4, k4, v4, bt4, sl4, cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="seq_lens\\[1\\]=3"):
        plan.run(q4, k4, v4, bt4, sl4, validate=True)  # contents are only read with validate=True
    with pytest.raises(ValueError, match="strided view"):
        VerifyPlan(q4, k4, v4, bt4, torch.stack([sl4, sl4], 1)[:, 0])


def test_verify_strided_metadata_copied(device):
    """The one-shot op copies a strided seq_lens view packed (a plan refuses it: above)."""
    q, k, v, bt, sl, _ = make_case(device, [50, 33], 4, 1, 4, 64, 16)
    col = torch.stack([sl, sl + 7], 1)[:, 0]
    out = paged_verify(q, k, v, bt, col, config=NO_SPLIT)
    assert rel_err(out, paged_verify_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu())) < TOL[F16]


def test_verify_plan_long_q_is_extend(device):
    """A plan for q_len 20 (past the verify path) plans extend on the packed view and matches the reference."""
    q, k, v, bt, sl, _ = make_case(device, [40, 30], 20, 1, 4, 64, 16)
    plan = VerifyPlan(q, k, v, bt, sl)
    assert plan.path == 0 and plan.spec.family == "extend"
    out = plan.run(q, k, v, bt, sl)
    assert rel_err(out, paged_verify_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu())) < TOL[F16]
    with pytest.raises(ValueError, match="cannot be viewed"):
        VerifyPlan(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, bt, sl)


# -- tuned tables: an entry per q_len spec -----------------------------------------------------------

def test_tuned_entry_per_q_len(device, tmp_path):
    """A table entry keyed decode_..._q4 round-trips through YAML and is what a q_len-4 verify step
    (and only it) gets; the q_len-1 spec keeps its own entry."""
    import warnings

    from pagegen import dispatch
    from pagegen import gpu as G
    from pagegen import table as T

    tuned = Config(block_n=16, num_warps=2, num_stages=1, split_size=256)
    spec4 = KernelSpec("decode", head_dim=64, block_size=16, dtype="fp16", group_size=4, q_len=4)
    e = T.Entry(spec=spec4, kernel_hash=codegen.kernel_hash(spec4),
                buckets=[T.BucketResult(shape=(2, 512), config=tuned, latency_us=10.0, gbps=1.0)],
                trials=3, tuned_at=T.now_iso(), kv_heads=1)
    tab = T.Table(gpu_key=(G.live_gpu() or G.INTERPRETER).key, gpu_name="test", sm_count=4, capability="0.0",
                  entries={e.key: e}, toolchain={}, tuned_at=T.now_iso(), interpret=True)
    assert e.key == "decode_fp16_hd64_bs16_nhd_g4_q4"
    path = T.save(tab, tmp_path / "t.yaml")
    assert T.load(path).entries[e.key].spec == spec4
    dispatch.use_table(path)
    try:
        q, k, v, bt, sl, _ = make_case(device, [300, 40], 4, 1, 4, 64, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the q4 entry exists: no fallback warning
            plan = VerifyPlan(q, k, v, bt, sl, max_seq_len=300)
        assert plan.config == tuned
        out = plan.run(q, k, v, bt, sl)
        assert rel_err(out, paged_verify_ref(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu())) < TOL[F16]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no q1 entry: the heuristic (after a warning)
            plan1 = VerifyPlan(q[:, :1].contiguous(), k, v, bt, sl, max_seq_len=300)
        assert plan1.spec.q_len == 1 and plan1.config != tuned
    finally:
        dispatch.use_table(None)
