"""The tuner on attention features (issue 15 item 4): workloads carry their model's feature values,
the runners pass them to the kernels and to the float64 reference, the byte and FLOP counts follow the
window, and a windowed spec's table buckets sit at the effective context the dispatcher looks up."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from pagegen import cli, dispatch, tuner
from pagegen import table as T
from pagegen.spec import Config, KernelSpec
from pagegen.tuner.runners import feature_kwargs
from pagegen.workloads import (
    FEATURE_DEFAULTS,
    Bucket,
    Workload,
    bucket_kv_bytes,
    decode_bytes,
    load_specs_yaml,
    visible_pairs,
)

interp_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                 reason="runs kernels on the Triton CPU interpreter")
ROOT = Path(__file__).resolve().parents[1]
WIN_SINK = "decode_bf16_hd64_bs16_nhd_g2_win_sink"


@pytest.fixture(autouse=True)
def _fresh_dispatcher():
    dispatch.use_table(None)
    yield
    dispatch.use_table(None)


def _specs(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "specs.yaml"
    p.write_text(text)
    return p


def test_feature_workloads_parse_from_yaml_and_bad_values_are_one_line_errors(tmp_path: Path) -> None:
    p = _specs(tmp_path, """specs:
  - {model: Gemma-2-9B, key: decode_bf16_hd256_bs16_nhd_g2_win_cap, kv_heads: 8, window: 4096, softcap: 50,
     buckets: ["8x32768", "64x16384r"]}
  - {model: gpt-oss-20b, family: extend, head_dim: 64, block_size: 16, group_size: 8, sinks: true,
     sliding_window: true, window: 128, kv_heads: 8, buckets: ["512x8192"]}
  - {key: decode_bf16_hd128_bs16_nhd_g1_alibi, kv_heads: 32, buckets: ["1x2048"]}
""")
    gemma, oss, mpt = load_specs_yaml(p)
    assert (gemma.window, gemma.softcap, gemma.models) == (4096, 50.0, ("Gemma-2-9B",))
    assert isinstance(gemma.softcap, float)
    assert [gemma.table_shape(b) for b in gemma.buckets] == [(8, 4096), (64, 4096)]
    assert oss.spec.variant_key() == "extend_bf16_hd64_bs16_nhd_g8_win_sink" and oss.window == 128
    assert oss.softcap is None and oss.feature_values() == {"window": 128}
    assert mpt.feature_values() == {} and mpt.table_shape(mpt.buckets[0]) == (1, 2048)

    bad = {
        "window: 4096\n": "window=4096 is given but spec decode_bf16_hd128_bs16_nhd_g4 has no sliding_window",
        "": "has sliding_window but no value",
        "window: 4096.0\n": "sliding_window must be an int",
        "window: 0\n": "sliding_window=0",
        "window: 64\n    softcap: -1\n": "softcap",
        "window: 64\n    windw: 3\n": "unknown keys ['windw']",
        "window: 64\n    buckets: ['8x100', '8x200']\n": "8x100 and 8x200 are the same shape under window 64",
    }
    for extra, message in bad.items():
        key = "decode_bf16_hd128_bs16_nhd_g4" + ("" if extra.startswith("window: 4096\n") else "_win")
        key += "_cap" if "softcap" in extra else ""
        p = _specs(tmp_path, f"specs:\n  - key: {key}\n    kv_heads: 8\n    {extra}")
        with pytest.raises(ValueError, match="specs.yaml:specs\\[0\\]") as exc:
            load_specs_yaml(p)
        assert message in str(exc.value) and "\n" not in str(exc.value), (extra, str(exc.value))
    # a key alone (pagegen tune --spec) gets the documented defaults
    spec = KernelSpec.from_key("decode_bf16_hd256_bs16_nhd_g2_win_cap")
    w = Workload.with_defaults(spec, 8, (Bucket(1, 8192),))
    assert (w.window, w.softcap) == (FEATURE_DEFAULTS["window"], FEATURE_DEFAULTS["softcap"]) == (4096, 50.0)


def test_the_shipped_feature_specs_are_the_named_models() -> None:
    ws = load_specs_yaml(ROOT / "bench" / "tune" / "features.yaml")
    keys = {w.spec.variant_key() for w in ws}
    for w in ws:
        assert KernelSpec.from_key(w.spec.variant_key()) == w.spec
        if w.spec.family == "decode":
            assert any(b.ragged for b in w.buckets), w.spec.variant_key()
        if w.window is not None:  # the window must bind on some bucket
            assert any(b.ctx > w.window for b in w.buckets)
    assert {"decode_bf16_hd128_bs16_nhd_g4_win", "decode_bf16_hd256_bs16_nhd_g2_win_cap",
            "decode_bf16_hd256_bs16_nhd_g2_cap", "decode_bf16_hd64_bs16_nhd_g8_win_sink",
            "decode_bf16_hd64_bs16_nhd_g8_sink", "extend_bf16_hd128_bs16_nhd_g4_win"} <= keys
    assert any(w.spec.alibi for w in ws)
    by_key = {w.spec.variant_key(): w for w in ws}
    assert by_key["decode_bf16_hd64_bs16_nhd_g8_win_sink"].window == 128
    assert by_key["decode_bf16_hd256_bs16_nhd_g2_win_cap"].softcap == 50.0
    run_sh = (ROOT / "bench" / "tune" / "run.sh").read_text()
    assert "T_FEATURES:-90" in run_sh and "bench/tune/features.yaml" in run_sh


def test_windowed_decode_bytes_and_extend_flops_count_what_the_kernel_reads() -> None:
    spec = KernelSpec.from_key("decode_bf16_hd128_bs16_nhd_g4_win")
    w = Workload(spec, 8, (Bucket(32, 32768), Bucket(16, 8192, ragged=True)), window=4096)
    per_token = 8 * 128 * 2 * 2  # K and V, bf16
    qo = 32 * 32 * 128 * 2 * 2
    assert decode_bytes(spec, 8, 32768, batch=32, window=4096) == 32 * 4096 * per_token + qo
    assert decode_bytes(spec, 8, 32768, batch=32, window=4096) == decode_bytes(spec, 8, 4096, batch=32)
    assert decode_bytes(spec, 8, [100, 5000], window=4096) == decode_bytes(spec, 8, [100, 4096])
    runner = tuner.DecodeRunner(w, "cpu", True)
    assert runner.work(w.buckets[0]) == 32 * 4096 * per_token + qo  # 8x less KV than the context holds
    lens = w.buckets[1].lengths()
    assert runner.work(w.buckets[1]) == decode_bytes(spec, 8, [min(n, 4096) for n in lens])
    assert bucket_kv_bytes(spec, 8, w.buckets[0]) == 32 * 32768 * per_token  # the pool still holds all of it

    assert visible_pairs(3, 10) == 8 + 9 + 10 and visible_pairs(3, 10, window=9) == 8 + 9 + 9
    ext = Workload(KernelSpec.from_key("extend_bf16_hd128_bs16_nhd_g4_win"), 8, (Bucket(2048, 18432),), window=4096)
    flops = tuner.ExtendRunner(ext, "cpu", True).work(ext.buckets[0])
    assert flops == 4 * 32 * 128 * 2048 * 4096  # every new token sees exactly its 4096-key window


class DropsFeatures(tuner.DecodeRunner):
    """A decode runner that launches the kernel without the workload's feature values."""

    def launch(self, cfg: Config, x: dict):
        return super().launch(cfg, {**x, "features": {}})


@interp_only
def test_runners_verify_feature_configs_against_the_reference() -> None:
    spec = KernelSpec.from_key("decode_fp16_hd64_bs16_nhd_g2_win_cap_sink_alibi")
    w = Workload(spec, 1, (Bucket(1, 40),), window=24, softcap=20.0)
    rng = random.Random(0)
    cfg = Config(block_n=16, num_warps=4, num_stages=1, split_size=0)
    x, case = tuner.DecodeRunner(w, "cpu", True).verify_case(random.Random(1))
    assert set(x["features"]) == {"sliding_window", "softcap", "sinks", "alibi_slopes"} and "window 24" in case
    assert len(x["seq_lens"]) == 4 and 24 < int(x["seq_lens"][3]) < 56  # a length past the window (it binds)
    assert x["features"]["sinks"].shape == (2,)
    tuner.verify(tuner.DecodeRunner(w, "cpu", True), cfg, rng)
    tuner.verify(tuner.DecodeRunner(w, "cpu", True), Config(block_n=16, num_warps=4, num_stages=1, split_size=256),
                 rng)
    with pytest.raises(tuner.TrialFailure, match="wrong result"):  # the reference does get the features
        tuner.verify(DropsFeatures(w, "cpu", True), cfg, rng)

    ext = Workload(KernelSpec.from_key("extend_fp16_hd64_bs16_nhd_g2_win_sink"), 1, (Bucket(4, 20),), window=9)
    tuner.verify(tuner.ExtendRunner(ext, "cpu", True), Config(block_m=16, block_n=16, num_warps=4, num_stages=1), rng)
    kw = feature_kwargs(ext, 4, "cpu")
    assert kw["sliding_window"] == 9 and kw["sinks"].equal(feature_kwargs(ext, 4, "cpu")["sinks"])  # seeded


@interp_only
def test_cli_tunes_a_feature_spec_into_a_table_keyed_by_its_feature_key(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PAGEGEN_CACHE_DIR", str(tmp_path / "cache"))
    specs = _specs(tmp_path, f"specs:\n  - {{model: tiny-oss, key: {WIN_SINK}, kv_heads: 1, window: 32, "
                             "buckets: ['1x80', '2x48r']}\n")
    out = tmp_path / "t.yaml"
    argv = ["tune", "--interpret", "--specs", str(specs), "--trials", "2", "--no-warm-start", "--quiet",
            "--space", "block_n=16,32;num_warps=4;num_stages=1;split_size=0", "--storage",
            str(tmp_path / "j.journal"), "--out", str(out)]
    assert cli.main(["tune", "--plan", *argv[1:]]) == 0
    assert "window 32" in capsys.readouterr().out
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out shape" in printed
    entry = T.load(out).entries[WIN_SINK]
    assert entry.spec == KernelSpec.from_key(WIN_SINK) and entry.models == ["tiny-oss"]
    # recorded at the effective context min(window, ctx): what the dispatcher looks up
    # (the held-out check may add a bucket: interpreter timings are noise), and so are the held-out shapes
    tuned = [b for b in entry.buckets if b.name in ("1x32", "2x32r")]
    assert len(tuned) == 2 and all(b.trials == 2 and b.gbps is not None for b in tuned)
    assert all(b.shape[1] <= 32 for b in entry.buckets) and entry.held_out
    assert all(h.shape[1] <= 32 for h in entry.held_out)
    dispatch.use_table(out)
    cfg, source = dispatch.explain(entry.spec, 1, 32, 1)
    assert "bucket 1x32" in source and cfg == next(b.config for b in entry.buckets if b.name == "1x32")


@pytest.mark.gpu
def test_gpu_feature_study_records_effective_buckets_the_dispatcher_finds(tmp_path: Path) -> None:
    """On a real GPU: a 3-trial study of Mistral-7B's windowed decode (window 4096) over contexts
    beyond the window verifies against the reference, counts only the window's bytes, records its
    buckets at the effective context and the dispatcher's lookup of a windowed call lands on them."""
    from pagegen import gpu as G

    gpu = G.cuda_gpu()
    spec = KernelSpec.from_key("decode_bf16_hd128_bs16_nhd_g4_win")
    w = Workload(spec, 8, (Bucket(1, 32768), Bucket(32, 16384), Bucket(16, 16384, ragged=True)), window=4096)
    space = {"block_n": [32, 64], "num_warps": [4], "num_stages": [2], "split_size": [0, 512]}
    options = tuner.TuneOptions(trials=3, sampler="grid", storage=str(tmp_path / "j.journal"), space=space,
                                progress=None, reps=10)
    table, (res,) = tuner.tune([w], gpu, options)
    assert res.failed == 0, res.failures
    entry = T.loads(T.dumps(table)).entries[spec.variant_key()]
    assert sorted(b.name for b in entry.buckets) == ["16x4096r", "1x4096", "32x4096"]
    assert all(b.gbps > 1 for b in entry.buckets)
    dispatch.use_table(table)
    assert dispatch.explain(spec, 32, 4096, 8)[1].endswith("bucket 32x4096")
