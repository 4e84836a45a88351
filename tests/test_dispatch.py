"""pagegen.dispatch: table lookup, nearest bucket, shape-aware heuristic, warn-once fallbacks;
on a GPU: a decode step captured in a CUDA graph replays correctly."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TOL, make_paged_kv, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import pagegen
from pagegen import codegen, dispatch
from pagegen import gpu as G
from pagegen import table as T
from pagegen.decode import paged_decode
from pagegen.reference import paged_decode_ref
from pagegen.spec import SPLIT_SIZE_VALUES, Config, KernelSpec, default_config, illegal_reason, large_batch_config

SPEC = KernelSpec("decode", head_dim=64, block_size=16, group_size=2)
LIVE = (G.live_gpu() or G.INTERPRETER).key  # "interpret" on the CPU, e.g. "h100" with PAGEGEN_TEST_DEVICE=cuda


@pytest.fixture(autouse=True)
def _fresh_dispatcher():
    dispatch.use_table(None)
    yield
    dispatch.use_table(None)


def _table(key: str, buckets: dict[tuple, Config], thash: str | None = None, kv_heads: int = 2,
           spec: KernelSpec = SPEC) -> T.Table:
    """A one-entry table; a bucket key (a, ctx, "r") is a ragged bucket."""
    e = T.Entry(spec=spec, kernel_hash=thash or codegen.kernel_hash(spec),
                buckets=[T.BucketResult(shape=s[:2], config=c, latency_us=10.0, gbps=1.0, ragged=s[2:] == ("r",))
                         for s, c in buckets.items()],
                trials=5, tuned_at=T.now_iso(), kv_heads=kv_heads)
    return T.Table(gpu_key=key, gpu_name="test", sm_count=4, capability="0.0", entries={e.key: e},
                   toolchain={}, tuned_at=T.now_iso(), interpret=True)


C_SMALL = Config(block_n=16, num_warps=1, num_stages=1, split_size=256)
C_BIG = Config(block_n=32, num_warps=4, num_stages=2, split_size=0)


def _select_quiet(*args) -> Config:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid table must not warn
        return dispatch.select_config(*args)


def test_table_lookup_nearest_bucket_in_log_space(tmp_path: Path) -> None:
    p = T.save(_table(LIVE, {(1, 2048): C_SMALL, (256, 2048): C_BIG}), tmp_path / "t.yaml")
    dispatch.use_table(p)
    assert _select_quiet(SPEC, 1, 2048, 2) == C_SMALL
    assert _select_quiet(SPEC, 2, 1000, 2) == C_SMALL  # a small batch never gets the big-batch winner
    assert _select_quiet(SPEC, 300, 4096, 2) == C_BIG
    # farther than NEAR_LOG2 from every bucket: the heuristic (a winner does not carry over that far)
    sms = G.sm_count()
    for batch in (12, 20):
        assert _select_quiet(SPEC, batch, 2048, 2) == dispatch.heuristic_config(SPEC, batch, 2048, 2, sms)
        assert "within 1.5" in dispatch.explain(SPEC, batch, 2048, 2)[1]
    # decode batches are rescaled by KV heads: 2 sequences x 256 KV heads ~ the 256 x 2 bucket
    assert _select_quiet(SPEC, 2, 2048, 256) == C_BIG
    cfg, source = dispatch.explain(SPEC, 1, 2048, 2)
    assert cfg == C_SMALL and "bucket 1x2048" in source


def test_equally_near_buckets_that_disagree_leave_it_to_the_heuristic(tmp_path: Path) -> None:
    """128x2048 lies as near 128x1024 as 128x4096 and 256x2048 (distance 1 each): with different
    winners there is no evidence for any of them (on the H200 the 128x1024 winner ran it 7% slower
    than the heuristic), so the heuristic decides; when they agree, their config is used."""
    sms = G.sm_count()
    C_MID = Config(block_n=64, num_warps=4, num_stages=3, split_size=1024)
    buckets = {(128, 1024): C_MID, (128, 4096): C_SMALL, (256, 2048): C_BIG}
    dispatch.use_table(T.save(_table(LIVE, buckets), tmp_path / "t.yaml"))
    assert _select_quiet(SPEC, 128, 2048, 2) == dispatch.heuristic_config(SPEC, 128, 2048, 2, sms)
    assert _select_quiet(SPEC, 128, 1024, 2) == C_MID  # exactly a bucket: its winner
    agree = {(128, 1024): C_BIG, (128, 4096): C_BIG, (256, 2048): C_BIG}
    dispatch.use_table(T.save(_table(LIVE, agree), tmp_path / "a.yaml"))
    assert _select_quiet(SPEC, 128, 2048, 2) == C_BIG


C_RAGGED = Config(block_n=32, num_warps=4, num_stages=2, split_size=512)


def test_ragged_calls_look_up_ragged_buckets(tmp_path: Path) -> None:
    """Same (batch, longest context), different bucket kinds: a ragged call gets the ragged winner,
    a uniform call never does, even when the ragged bucket is nearer."""
    dispatch.use_table(T.save(_table(LIVE, {(32, 8192): C_BIG, (64, 8192, "r"): C_RAGGED}), tmp_path / "t.yaml"))
    assert _select_quiet(SPEC, 64, 8192, 2) == C_BIG
    assert _select_quiet(SPEC, 64, 8192, 2, True) == C_RAGGED
    assert _select_quiet(SPEC, 32, 8192, 2, True) == C_RAGGED  # near the only ragged bucket
    far = dispatch.heuristic_config(SPEC, 1, 512, 2, G.sm_count(), ragged=True)
    assert _select_quiet(SPEC, 1, 512, 2, True) == far  # far from it: the heuristic's ragged rule
    cfg, source = dispatch.explain(SPEC, 64, 8192, 2, True)
    assert cfg == C_RAGGED and source.endswith("bucket 64x8192r")
    assert "bucket 32x8192" in dispatch.explain(SPEC, 64, 8192, 2)[1]



def test_no_bucket_of_the_calls_kind_uses_the_heuristic_of_that_kind(tmp_path: Path) -> None:
    """A ragged batch in an entry without ragged buckets gets the heuristic's ragged rule (a uniform
    winner, tuned on full-length batches, made the mixed batch slower than no table on the H200);
    a uniform batch in an entry with only ragged buckets gets the uniform heuristic. Silently: the
    table is valid; explain() says why."""
    sms = G.sm_count()
    dispatch.use_table(T.save(_table(LIVE, {(32, 8192): C_BIG, (1, 2048): C_SMALL}), tmp_path / "u.yaml"))
    ragged_rule = dispatch.heuristic_config(SPEC, 64, 8192, 2, sms, ragged=True)
    assert ragged_rule.split_size and ragged_rule not in (C_BIG, C_SMALL)
    assert _select_quiet(SPEC, 64, 8192, 2, True) == ragged_rule
    cfg, source = dispatch.explain(SPEC, 64, 8192, 2, True)
    assert cfg == ragged_rule and "no single nearest ragged bucket" in source
    assert _select_quiet(SPEC, 64, 8192, 2) == C_BIG  # uniform calls still use the table
    dispatch.use_table(T.save(_table(LIVE, {(64, 8192, "r"): C_RAGGED}), tmp_path / "r.yaml"))
    assert _select_quiet(SPEC, 64, 8192, 2, True) == C_RAGGED
    assert _select_quiet(SPEC, 64, 8192, 2) == dispatch.heuristic_config(SPEC, 64, 8192, 2, sms)
    assert "no single nearest uniform bucket" in dispatch.explain(SPEC, 64, 8192, 2)[1]
    entry = T.load(tmp_path / "r.yaml").entries[SPEC.variant_key()]
    assert dispatch.nearest_bucket(entry, 64, 8192, 2, ragged=False) is None
    assert dispatch.nearest_bucket(entry, 48, 8192, 2, ragged=True).config == C_RAGGED
    assert dispatch.nearest_bucket(entry, 1, 100, 2, ragged=True) is None  # too far
    assert dispatch.nearest_bucket(entry, 1, 100, 2, ragged=True, max_dist=100).config == C_RAGGED


def test_is_ragged() -> None:
    assert not dispatch.is_ragged(64, 8192, None)  # unknown: uniform
    assert not dispatch.is_ragged(64, 8192, 64 * 8192)
    assert not dispatch.is_ragged(1, 8192, 100)  # one sequence is never ragged
    assert dispatch.is_ragged(64, 8192, 64 * 4128)  # U[64, 8192]: half full
    assert not dispatch.is_ragged(4, 100, 300)  # exactly 3/4 full
    assert dispatch.is_ragged(4, 100, 299)


def test_env_var_points_at_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    T.save(_table(LIVE, {(1, 64): C_SMALL}), tmp_path / f"{LIVE}.yaml")
    monkeypatch.setenv(dispatch.ENV_TABLE, str(tmp_path))
    dispatch.reset()
    assert _select_quiet(SPEC, 1, 64, 2) == C_SMALL


def _expect_one_warning(match: str, *calls) -> None:
    with pytest.warns(dispatch.TunedTableWarning, match=match) as rec:
        for args in calls:
            cfg = dispatch.select_config(*args)
            assert cfg == dispatch.heuristic_config(SPEC, args[1], args[2], args[3], G.sm_count())
    assert len([w for w in rec if issubclass(w.category, dispatch.TunedTableWarning)]) == 1


CALLS = ((SPEC, 1, 64, 2), (SPEC, 3, 100, 2), (SPEC, 1, 64, 2))


def test_missing_table_warns_once_and_names_the_fix(tmp_path: Path) -> None:
    dispatch.use_table(tmp_path / "nope.yaml")
    _expect_one_warning(r"no tuned table .* Fix: `pagegen tune (--interpret|--gpu)", *CALLS)


def test_invalid_table_warns_once(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\ngpu: [unclosed\n")
    dispatch.use_table(p)
    _expect_one_warning(r"is invalid.*pagegen check", *CALLS)


def test_stale_entry_warns_once(tmp_path: Path) -> None:
    dispatch.use_table(T.save(_table(LIVE, {(1, 64): C_SMALL}, thash="f" * 16), tmp_path / "t.yaml"))
    _expect_one_warning(rf"{SPEC.variant_key()} .* is stale.*--spec {SPEC.variant_key()}", *CALLS)


def test_missing_entry_and_other_gpu_warn(tmp_path: Path) -> None:
    other = KernelSpec("decode", head_dim=128, block_size=16, group_size=4)
    dispatch.use_table(T.save(_table(LIVE, {(1, 64): C_SMALL}, spec=other), tmp_path / "t.yaml"))
    _expect_one_warning(r"no tuned entry for decode_bf16_hd64", *CALLS)
    other_gpu = "a100" if LIVE != "a100" else "h100"
    dispatch.use_table(T.save(_table(other_gpu, {(1, 64): C_SMALL}), tmp_path / "h.yaml"))
    _expect_one_warning(rf"is for GPU '{other_gpu}'", *CALLS)


def _with_triton(tab: T.Table, version: str) -> T.Table:
    for e in tab.entries.values():
        e.toolchain = {"torch": "2.11.0", "triton": version}
    return tab


def test_entry_of_another_triton_minor_is_stale(tmp_path: Path) -> None:
    """Stage and warp semantics change between Triton releases: an entry tuned under another
    major.minor warns once and falls back; another patch release is the same toolchain."""
    import triton

    major, minor = triton.__version__.split(".")[:2]
    same = _with_triton(_table(LIVE, {(1, 64): C_SMALL}), f"{major}.{minor}.99+gitabc")
    dispatch.use_table(T.save(same, tmp_path / "same.yaml"))
    assert _select_quiet(SPEC, 1, 64, 2) == C_SMALL
    other = _with_triton(_table(LIVE, {(1, 64): C_SMALL}), f"{major}.{int(minor) + 1}.0")
    dispatch.use_table(T.save(other, tmp_path / "other.yaml"))
    _expect_one_warning(rf"{SPEC.variant_key()} .* is stale \(tuned under Triton {major}\.{int(minor) + 1}\.0, "
                        rf"running Triton {re.escape(triton.__version__)}\).*--spec", *CALLS)


def test_stale_reason_is_one_decision(tmp_path: Path) -> None:
    """stale_reason: template hash first, then Triton major.minor (the entry's, else the table's);
    no Triton version recorded is not judged on it."""
    import triton

    tab = _table(LIVE, {(1, 64): C_SMALL})
    entry = tab.entries[SPEC.variant_key()]
    assert dispatch.stale_reason(entry, SPEC) is None
    assert dispatch.stale_reason(entry, SPEC, {"triton": "1.0.0"}) == (
        f"tuned under Triton 1.0.0, running Triton {triton.__version__}")
    entry.toolchain = {"triton": triton.__version__}
    assert dispatch.stale_reason(entry, SPEC, {"triton": "1.0.0"}) is None  # the entry's own wins
    entry.kernel_hash = "0" * 16
    assert "kernel hash 0000000000000000" in dispatch.stale_reason(entry, SPEC)


def test_table_change_drops_every_cached_config_and_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         device: str) -> None:
    """The runtime owns the config cache and the decode/extend plan caches: a same-shape call after
    use_table(), reset() or a new $PAGEGEN_TUNED_TABLE launches the new table's config (on today's
    main decode._plans outlived use_table: a CUDA call kept the old config)."""
    from pagegen import decode, extend
    from pagegen.runtime import RUNTIME

    launched: list[Config] = []
    real = decode.launch_decode
    monkeypatch.setattr(decode, "launch_decode", lambda spec, cfg, *a: (launched.append(cfg), real(spec, cfg, *a)))
    k, v, bt, sl = make_paged_kv([300, 45], 2, 64, 16, "NHD", torch.float16, device)
    q = torch.randn(2, 4, 64, device=device).half()
    ref = paged_decode_ref(q, k, v, bt, sl)
    c_a, c_b = C_SMALL, Config(block_n=32, num_warps=2, num_stages=1, split_size=0)
    fp16 = KernelSpec("decode", head_dim=64, block_size=16, dtype="fp16", group_size=2)
    folder = tmp_path / "env"
    folder.mkdir()
    T.save(_table(LIVE, {(2, 320): c_b}, spec=fp16), folder / f"{LIVE}.yaml")

    def step() -> Config:
        out = torch.full_like(q, float("nan"))
        paged_decode(q, k, v, bt, sl, out=out)
        assert rel_err(out, ref) < TOL[torch.float16]
        return launched[-1]

    dispatch.use_table(T.save(_table(LIVE, {(2, 320): c_a}, spec=fp16), tmp_path / "a.yaml"))
    assert step() == c_a and step() == c_a
    assert RUNTIME.cache_size("decode") == 1  # the second call was served by the plan cache
    dispatch.use_table(T.save(_table(LIVE, {(2, 320): c_b}, spec=fp16), tmp_path / "b.yaml"))
    assert RUNTIME.cache_size("decode") == RUNTIME.cache_size("config") == 0
    assert step() == c_b
    dispatch.use_table(tmp_path / "a.yaml")
    assert step() == c_a
    dispatch.use_table(None)  # automatic lookup: the environment names folder/<gpu>.yaml
    monkeypatch.setenv(dispatch.ENV_TABLE, str(folder))
    assert step() == c_b  # seen on the next lookup, no reset() needed
    monkeypatch.setenv(dispatch.ENV_TABLE, str(tmp_path / "a.yaml"))
    assert step() == c_a
    # extend plans are dropped the same way
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dispatch.TunedTableWarning)  # the table has no extend entry
        pagegen.paged_extend(torch.randn(5, 4, 64, device=device).half(), k, v, bt, cu, sl)
    assert RUNTIME.cache_size("extend") == 1
    dispatch.reset()
    assert RUNTIME.cache_size("extend") == RUNTIME.cache_size("decode") == 0
    assert extend.RUNTIME is decode.RUNTIME is dispatch.RUNTIME


@pytest.mark.skipif(LIVE != G.INTERPRET_KEY, reason="interpreter behaviour")
def test_no_table_under_interpreter_is_silent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select_config(SPEC, 1, 64, 2) == default_config(SPEC)


def test_extend_buckets_are_q_tokens_by_ctx(tmp_path: Path) -> None:
    ext = KernelSpec("extend", head_dim=64, block_size=16, group_size=2)
    c1, c2 = Config(block_m=16, block_n=16), Config(block_m=64, block_n=32)
    tab = _table(LIVE, {(16, 1024): c1, (4096, 1024): c2}, spec=ext)
    dispatch.use_table(T.save(tab, tmp_path / "e.yaml"))
    assert _select_quiet(ext, 32, 1024, 8) == c1
    assert _select_quiet(ext, 2048, 1024, 8) == c2  # no KV-head rescaling for extend


@settings(max_examples=300, deadline=None)
@given(batch=st.integers(1, 512), ctx=st.integers(1, 1 << 17), kv_heads=st.integers(1, 64),
       sms=st.sampled_from([4, 58, 108, 132, 142]), hd=st.sampled_from([64, 96, 128, 256]),
       g=st.sampled_from([1, 4, 8]), ragged=st.booleans(), kv=st.sampled_from(["", "fp8_e4m3"]))
def test_heuristic_is_legal_and_shape_aware(batch, ctx, kv_heads, sms, hd, g, ragged, kv) -> None:
    spec = KernelSpec("decode", head_dim=hd, block_size=16, group_size=g, dtype="bf16", kv_dtype=kv)
    cfg = dispatch.heuristic_config(spec, batch, ctx, kv_heads, sms, ragged)
    assert illegal_reason(spec, cfg) is None
    programs = batch * kv_heads
    large = large_batch_config(spec)
    assert large is None or illegal_reason(spec, large) is None
    if large is not None and programs >= sms and ctx >= dispatch.MIN_SPLIT_CTX:
        # a full batch from an fp8 pool at head_dim 128: the large-batch tiles, split at its size or finer
        assert (cfg.block_n, cfg.num_warps, cfg.num_stages) == (large.block_n, large.num_warps, large.num_stages)
        chunked = [s for s in SPLIT_SIZE_VALUES if s >= dispatch.MIN_SPLIT_CTX and s % large.block_n == 0
                   and math.ceil(ctx / s) >= dispatch.RAGGED_CHUNKS]
        picks = ([large.split_size] if math.ceil(ctx / large.split_size) >= 2 else []) + \
            ([max(chunked)] if ragged and chunked else [])
        assert cfg.split_size == min(picks, default=0)
        return
    assert replace(cfg, split_size=0) == replace(default_config(spec), split_size=0)
    bn = default_config(spec).block_n
    chunked = [s for s in SPLIT_SIZE_VALUES if s >= dispatch.MIN_SPLIT_CTX and s % bn == 0
               and math.ceil(ctx / s) >= dispatch.RAGGED_CHUNKS]
    if ctx < dispatch.MIN_SPLIT_CTX or (programs >= sms and not (ragged and chunked)):
        assert cfg.split_size == 0
    elif programs >= sms:  # ragged and a chunked split exists: the largest of them
        assert cfg.split_size == max(chunked)
    elif ragged and chunked:  # both rules apply: the smaller split, never above the ragged one
        assert 0 < cfg.split_size <= max(chunked)
    elif cfg.split_size:
        splits = math.ceil(ctx / cfg.split_size)
        assert splits >= 2
        # no legal split size gets closer to 2 x SMs programs (log distance)
        best = min(abs(math.log(programs * math.ceil(ctx / s) / (2 * sms))) for s in SPLIT_SIZE_VALUES
                   if s and s % cfg.block_n == 0 and math.ceil(ctx / s) >= 2)
        assert abs(math.log(programs * splits / (2 * sms))) <= best + 1e-9


def test_heuristic_examples() -> None:
    llama = KernelSpec("decode", head_dim=128, block_size=16, group_size=4)
    assert dispatch.heuristic_config(llama, 1, 32768, 8, 132).split_size == 1024  # 8 x 32 = 256 ~ 264 programs
    assert dispatch.heuristic_config(llama, 64, 4096, 8, 132).split_size == 0  # 512 programs fill 132 SMs
    assert dispatch.heuristic_config(llama, 1, 256, 8, 132).split_size == 0  # too short to split
    # the reference's mixed batch (64 x U[64, 8192]): 4 chunks of the longest sequence
    assert dispatch.heuristic_config(llama, 64, 8192, 8, 132, ragged=True).split_size == 2048
    assert dispatch.heuristic_config(llama, 64, 1024, 8, 132, ragged=True).split_size == 0  # < 4 x 512
    # an fp8 pool at head_dim 128: one-warp programs of 32 keys split at 1024 once the batch fills the SMs
    fp8 = KernelSpec("decode", head_dim=128, block_size=16, group_size=4, dtype="bf16", kv_dtype="fp8_e4m3")
    one_warp = Config(block_n=32, num_warps=1, num_stages=5, split_size=1024)
    assert dispatch.heuristic_config(fp8, 128, 4096, 8, 132) == one_warp
    assert dispatch.heuristic_config(fp8, 32, 8192, 8, 132) == one_warp  # 256 programs
    assert dispatch.heuristic_config(fp8, 64, 8192, 8, 132, ragged=True) == one_warp  # finer than the 2048 chunks
    assert dispatch.heuristic_config(fp8, 64, 1024, 8, 132) == replace(one_warp, split_size=0)  # one split's worth
    assert dispatch.heuristic_config(fp8, 64, 3000, 8, 132, ragged=True).split_size == 512  # 4 chunks of 3000
    small = dispatch.heuristic_config(fp8, 8, 4096, 8, 132)  # 64 programs: 4-warp tiles, split to fill
    assert small == dispatch.heuristic_config(llama, 8, 4096, 8, 132) and small.num_warps == 4
    hd64 = KernelSpec("decode", head_dim=64, block_size=16, group_size=4, dtype="bf16", kv_dtype="fp8_e4m3")
    assert large_batch_config(hd64) is None  # its H200 winner at large batches is the default, 128 / 4 / 3


def test_decode_uses_the_tuned_config(tmp_path: Path, device: str) -> None:
    """The public op launches the table's config (seen through explain) and is correct with it."""
    dispatch.use_table(T.save(_table(LIVE, {(2, 300): C_SMALL}), tmp_path / "t.yaml"))
    k, v, bt, sl = make_paged_kv([300, 45], 2, 64, 16, "NHD", torch.bfloat16, device)
    q = torch.randn(2, 4, 64, device=device).to(torch.bfloat16)
    out = paged_decode(q, k, v, bt, sl)
    assert dispatch.explain(SPEC, 2, bt.shape[1] * 16, 2)[0] == C_SMALL
    assert rel_err(out, paged_decode_ref(q, k, v, bt, sl)) < TOL[torch.bfloat16]


def test_decode_passes_raggedness_to_the_dispatcher(tmp_path: Path, device: str) -> None:
    """sum_seq_lens (with max_seq_len) marks a ragged batch: the op then launches the ragged winner,
    correctly; bad hints are refused."""
    dispatch.use_table(T.save(_table(LIVE, {(2, 300): C_SMALL, (2, 300, "r"): C_RAGGED}), tmp_path / "t.yaml"))
    lens = [300, 45]
    k, v, bt, sl = make_paged_kv(lens, 2, 64, 16, "NHD", torch.bfloat16, device)
    q = torch.randn(2, 4, 64, device=device).to(torch.bfloat16)
    assert pagegen.DecodePlan(q, k, v, bt, sl, max_seq_len=300).config == C_SMALL
    plan = pagegen.DecodePlan(q, k, v, bt, sl, max_seq_len=300, sum_seq_lens=sum(lens))
    assert plan.config == C_RAGGED
    ref = paged_decode_ref(q, k, v, bt, sl)
    assert rel_err(plan.run(q, k, v, bt, sl), ref) < TOL[torch.bfloat16]
    out = torch.full_like(q, float("nan"))
    paged_decode(q, k, v, bt, sl, out=out, max_seq_len=300, sum_seq_lens=sum(lens))
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    with pytest.raises(ValueError, match="needs max_seq_len"):
        paged_decode(q, k, v, bt, sl, sum_seq_lens=345)
    with pytest.raises(ValueError, match="impossible"):
        paged_decode(q, k, v, bt, sl, max_seq_len=300, sum_seq_lens=601)
    with pytest.raises(TypeError, match="must be an int"):
        paged_decode(q, k, v, bt, sl, max_seq_len=300, sum_seq_lens=345.0)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [0, 512])
def test_cuda_graph_capture_and_replay(split: int) -> None:
    """A decode step (dispatch + launch, split-KV and merge included) captured in a CUDA graph
    replays correctly on new inputs copied into the captured buffers."""
    spec = KernelSpec("decode", head_dim=128, block_size=16, group_size=4)
    dispatch.use_table(_table(G.live_gpu().key, {(4, 4096): Config(block_n=64, split_size=split)}, spec=spec,
                              kv_heads=8))
    lens = [4096, 17, 1024, 2500]  # the table width covers 4096 tokens: any new length up to it is legal
    k, v, bt, sl = make_paged_kv(lens, 8, 128, 16, "NHD", torch.bfloat16, "cuda")
    q = torch.randn(4, 32, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    paged_decode(q, k, v, bt, sl, out=out, max_seq_len=4096)  # warm: compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode(q, k, v, bt, sl, out=out, max_seq_len=4096)
    for _ in range(3):
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        sl.copy_(torch.randint(1, 4097, (4,), device="cuda", dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_decode_ref(q, k, v, bt, sl)
        assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_runtime_never_keeps_a_value_derived_before_a_table_change() -> None:
    """A plan or config computed while the table changed underneath is not stored (generation)."""
    from pagegen.runtime import Runtime

    rt = Runtime()
    assert rt.lookup("decode", "sig") is None
    before = rt.generation
    rt.use_table(None)  # the table changes while a value is being derived
    rt.store("decode", "sig", "old plan", before)
    assert rt.lookup("decode", "sig") is None
    rt.store("decode", "sig", "new plan", rt.generation)
    assert rt.lookup("decode", "sig") == "new plan" and rt.cache_size("decode") == 1
    rt.reset()
    assert rt.cache_size("decode") == 0
