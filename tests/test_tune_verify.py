"""Tuning verify specs (decode with q_len > 1, issue 17 item 5) on the Triton interpreter: a verify
workload from YAML, the verify runner checked against the float64 reference, and `pagegen tune` end
to end writing a `_q2` entry that paged_verify's dispatcher then uses."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from conftest import TOL, make_paged_kv, rel_err

from pagegen import cli_tune, dispatch, tuner
from pagegen import table as T
from pagegen.reference import paged_verify_ref
from pagegen.spec import Config, KernelSpec, default_config
from pagegen.verify import VerifyPlan, paged_verify
from pagegen.workloads import Bucket, Workload, decode_bytes, load_specs_yaml

interp_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                 reason="runs the tuner on the Triton CPU interpreter")
TINY = dict(head_dim=64, block_size=16, layout="NHD", dtype="bf16", group_size=2)


@pytest.fixture(autouse=True)
def _fresh_dispatcher():
    dispatch.use_table(None)
    yield
    dispatch.use_table(None)


def test_verify_workload_from_yaml_and_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "v.yaml"
    path.write_text("specs:\n"
                    "  - {model: Llama-3-8B, key: decode_bf16_hd128_bs16_nhd_g4_q4, kv_heads: 8,\n"
                    "     buckets: ['8x32768', '64x8192r']}\n")
    (w,) = load_specs_yaml(path)
    assert w.spec.q_len == 4 and w.spec.variant_key() == "decode_bf16_hd128_bs16_nhd_g4_q4" and w.kv_heads == 8
    assert [b.name for b in w.buckets] == ["8x32768", "64x8192r"]
    assert isinstance(tuner.runner_for(w, "cpu", True), tuner.VerifyRunner)
    assert all(n >= 4 for n in w.seq_lens(w.buckets[1]))
    # KV once per sequence (as one-token decode), q and out with q_len rows each
    one = KernelSpec("decode", head_dim=128, block_size=16, layout="NHD", dtype="bf16", group_size=4)
    kv = 8 * 32768 * 8 * 128 * 2 * 2
    assert decode_bytes(one, 8, 32768, batch=8) == kv + 8 * 32 * 128 * 2 * 2
    assert tuner.runner_for(w, "cpu", True).work(w.buckets[0]) == kv + 8 * 4 * 32 * 128 * 2 * 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("specs: [{key: decode_bf16_hd128_bs16_nhd_g4_q8, kv_heads: 8, buckets: ['2x4']}]\n")
    with pytest.raises(ValueError, match="ctx 4 < q_len 8"):
        load_specs_yaml(bad)


def test_shipped_verify_yaml_has_q2_q4_q8_of_the_reference_spec() -> None:
    ws = load_specs_yaml(Path(__file__).parents[1] / "bench" / "tune" / "verify.yaml")
    assert sorted(w.spec.q_len for w in ws) == [2, 4, 8, 16]  # the 2, 4, 8; 16 for its one miss
    for w in ws:
        assert w.spec.variant_key().startswith("decode_bf16_hd128_bs16_nhd_g4_q") and w.kv_heads == 8
        assert [b.name for b in w.buckets] == ["8x32768", "64x4096", "1x32768", "32x8192", "64x8192r"]


class SignFlip(tuner.VerifyRunner):
    def launch(self, cfg: Config, x: dict) -> torch.Tensor:
        return super().launch(cfg, x).mul_(-1.0)


@interp_only
def test_verify_runner_matches_the_reference_and_catches_a_wrong_kernel() -> None:
    spec = KernelSpec("decode", q_len=4, **TINY)
    w = Workload(spec, 2, (Bucket(2, 40), Bucket(3, 70, ragged=True)))  # ragged: a length below q_len
    runner = tuner.runner_for(w, "cpu", True)
    assert min(w.buckets[1].lengths()) < 4  # the ragged draw has a length below q_len: raised to it
    x = runner.inputs(w.buckets[1])
    assert x["q"].shape == (3, 4, 4, 64) and x["out"].shape == x["q"].shape
    assert x["seq_lens"].tolist() == w.seq_lens(w.buckets[1])
    for cfg in (default_config(spec), Config(block_n=16, num_warps=4, num_stages=1, split_size=256)):
        tuner.verify(runner, cfg, random.Random(7))  # split off and on
        case, _ = runner.verify_case(random.Random(3))
        out = runner.launch(cfg, case)
        assert rel_err(out, runner.reference(case)) < TOL[torch.bfloat16]
    with pytest.raises(tuner.TrialFailure, match="wrong result"):
        tuner.verify(SignFlip(w, "cpu", True), default_config(spec), random.Random(7))


@interp_only
def test_cli_tunes_a_q2_spec_that_the_dispatcher_then_finds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEGEN_CACHE_DIR", str(tmp_path / "cache"))
    specs = tmp_path / "v.yaml"
    specs.write_text("specs: [{key: decode_bf16_hd64_bs16_nhd_g2_q2, kv_heads: 2, buckets: ['2x40']}]\n")
    out = tmp_path / "t.yaml"
    argv = ["tune", "--interpret", "--specs", str(specs), "--trials", "2", "--no-warm-start",
            "--storage", str(tmp_path / "j.journal"), "--out", str(out), "--quiet"]
    assert cli_tune.main(argv) == 0
    entry = T.load(out).entries["decode_bf16_hd64_bs16_nhd_g2_q2"]
    bucket = next(b for b in entry.buckets if b.shape == (2, 40))  # (the held-out check may add one)
    assert bucket.latency_us > 0 and bucket.trials == 2

    dispatch.use_table(out)
    spec = KernelSpec("decode", q_len=2, **TINY)
    cfg, source = dispatch.explain(spec, 2, 40, 2)
    assert cfg == bucket.config and "bucket 2x40" in source
    k, v, bt, sl = make_paged_kv([40, 33], 2, 64, 16, "NHD", torch.bfloat16, "cpu")
    q = torch.randn(2, 2, 4, 64).to(torch.bfloat16)
    assert VerifyPlan(q, k, v, bt, sl, max_seq_len=40).config == bucket.config  # what the op launches
    got = paged_verify(q, k, v, bt, sl, max_seq_len=40)
    assert rel_err(got, paged_verify_ref(q, k, v, bt, sl)) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_verify_tune_smoke(tmp_path: Path) -> None:
    """On a real GPU: a 3-trial study of the reference spec at q_len 4 on two buckets (one split-worthy)
    verifies on the GPU, times real GB/s, and paged_verify's dispatcher then picks its winner."""
    from pagegen import gpu as G

    gpu = G.cuda_gpu()
    spec = KernelSpec("decode", head_dim=128, block_size=16, group_size=4, q_len=4)
    w = Workload(spec, 8, (Bucket(1, 8192), Bucket(32, 1024)))
    space = {"block_n": [32, 64], "num_warps": [4, 8], "num_stages": [2], "split_size": [0, 512]}
    options = tuner.TuneOptions(trials=3, sampler="grid", storage=str(tmp_path / "study.journal"), space=space,
                                progress=None, trial_timeout_s=120, reps=10)
    table, (res,) = tuner.tune([w], gpu, options)
    assert res.failed == 0, res.failures
    path = T.save(table, tmp_path / f"{gpu.key}.yaml")
    entry = T.load(path).entries[spec.variant_key()]
    assert all(b.latency_us > 1 and b.gbps > 1 for b in entry.buckets)
    dispatch.use_table(path)
    winner = next(b.config for b in entry.buckets if b.shape == (1, 8192))
    k, v, bt, sl = make_paged_kv([8192], 8, 128, 16, "NHD", torch.bfloat16, "cuda")
    q = torch.randn(1, 4, 32, 128, device="cuda").to(torch.bfloat16)
    assert VerifyPlan(q, k, v, bt, sl, max_seq_len=8192).config == winner
    got = paged_verify(q, k, v, bt, sl, max_seq_len=8192).cpu()
    assert rel_err(got, paged_verify_ref(*(t.cpu() for t in (q, k, v, bt, sl)))) < TOL[torch.bfloat16]
