"""CPU smoke test of the serving benchmark (bench/serving.py): the naive and pagegen engines agree
on greedy tokens and their accounting adds up. Kernels run in Triton's interpreter on the CPU
(or compiled with PAGEGEN_TEST_DEVICE=cuda)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEST_DEVICE

BENCH = Path(__file__).resolve().parent.parent / "bench" / "serving.py"


def _load():
    name = "pagegen_bench_serving"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


serving = _load()


@pytest.fixture(scope="module")
def smoke():
    """One smoke run shared by the tests below (about 20 s on one CPU core)."""
    return serving.run_smoke(seed=0, verbose=False, device=TEST_DEVICE)


def test_smoke_engines_agree_on_greedy_tokens(smoke):
    for name, agree in smoke["agreement"].items():
        assert agree["identical"] == agree["checked"] == smoke["trace"]["requests"], (name, agree)


def test_smoke_accounting_adds_up(smoke):
    assert smoke["errors"] == {"naive": [], "pagegen": [], "pagegen-nocache": []}
    want = smoke["trace"]["output_tokens"]
    for name, run in smoke["runs"].items():
        assert run["finished"] == run["requests"] == smoke["trace"]["requests"], name
        assert run["output_tokens"] == want, name
        assert not run["capped"]
        assert 0.0 <= run["kv_waste"] < 1.0


def test_smoke_pagegen_pages_shares_and_preempts(smoke):
    naive, paged, nocache = smoke["runs"]["naive"], smoke["runs"]["pagegen"], smoke["runs"]["pagegen-nocache"]
    # paging: less waste and more concurrent sequences than contiguous slabs on the same budget
    assert paged["kv_waste"] < naive["kv_waste"]
    assert paged["peak_running"] > naive["peak_running"]
    assert paged["kv_capacity_tokens"] <= naive["kv_capacity_tokens"]
    # the budget is tight enough to preempt (and recompute) at least once
    assert paged["preemptions"] >= 1
    # prefix caching: shared system-prompt blocks are reused, so fewer prompt tokens are computed
    assert paged["prefix_hit_rate"] > 0 and nocache["prefix_hit_rate"] == 0
    assert paged["computed_prompt_tokens"] < nocache["computed_prompt_tokens"]
    assert paged["block_prefix_hits"] > 0


def test_trace_is_seeded_and_clipped():
    tc = serving.TraceConfig(num_requests=200, seed=3, rate=5.0, max_prompt=300, max_tokens=200, shared_frac=0.5,
                             system_len=32)
    a, b = serving.make_trace(tc, 1000), serving.make_trace(tc, 1000)
    assert [(r.prompt, r.output_len, r.arrival) for r in a] == [(r.prompt, r.output_len, r.arrival) for r in b]
    c = serving.make_trace(serving.TraceConfig(num_requests=200, seed=4), 1000)
    assert [r.prompt for r in a] != [r.prompt for r in c]
    system = next(r for r in a if r.shared).prompt[:32]
    for r in a:
        own = len(r.prompt) - (32 if r.shared else 0)
        assert 4 <= own <= 300 and 1 <= r.output_len <= 200
        assert (r.prompt[:32] == system) == r.shared or not r.shared
        assert all(0 <= t < 1000 for t in r.prompt)
    arrivals = [r.arrival for r in a]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert 0.3 < sum(r.shared for r in a) / len(a) < 0.7


def test_trace_lengths_follow_the_documented_means():
    tc = serving.TraceConfig(num_requests=4000, seed=0, max_prompt=10**6, max_tokens=10**6)
    s = serving.trace_summary(serving.make_trace(tc, 32000))
    assert abs(s["mean_prompt"] / serving.SHAREGPT_PROMPT_MEAN - 1) < 0.1
    assert abs(s["mean_output"] / serving.SHAREGPT_OUTPUT_MEAN - 1) < 0.1


def test_model_rows_are_independent_of_packing():
    """Packing two sequences into one forward gives each the tokens it gets alone (the property both
    engines rely on)."""
    cfg = serving.PRESETS["smoke"]
    model = serving.Model(cfg, device=torch.device("cpu"), dtype=torch.float32, seed=1, max_pos=64)
    g = cfg.heads // cfg.kv_heads

    def causal(lens):
        def attn(layer, q, k, v):
            out, start = [], 0
            for n in lens:
                qq, kk, vv = (x[start:start + n].transpose(0, 1) for x in (q, k, v))
                o = torch.nn.functional.scaled_dot_product_attention(
                    qq, kk.repeat_interleave(g, 0), vv.repeat_interleave(g, 0), is_causal=True)
                out.append(o.transpose(0, 1))
                start += n
            return torch.cat(out)
        return attn

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, cfg.vocab, (7,), generator=gen), torch.randint(0, cfg.vocab, (12,), generator=gen)
    alone = [model.forward(x, torch.arange(len(x)), causal([len(x)]), torch.tensor([len(x) - 1])) for x in (a, b)]
    packed = model.forward(torch.cat([a, b]), torch.cat([torch.arange(7), torch.arange(12)]), causal([7, 12]),
                           torch.tensor([6, 18]))
    assert packed.tolist() == [int(alone[0]), int(alone[1])]


def test_percentile_nearest_rank():
    xs = [float(i) for i in range(1, 101)]
    assert serving.percentile(xs, 50) == 50.0
    assert serving.percentile(xs, 99) == 99.0
    assert serving.percentile([3.0], 99) == 3.0
    assert serving.percentile([], 50) != serving.percentile([], 50)  # NaN


@pytest.mark.gpu
def test_gpu_driver_end_to_end_small(tmp_path):
    """The GPU driver (warm-up, four runs, table, JSON) with the tiny model: a quick check of the
    script on a GPU before the full benchmark."""
    import json

    out = tmp_path / "serving.json"
    args = ("--model smoke --dtype fp16 --kv-gib 0.001 --requests 12 --max-tokens 16 --max-prompt 64 --system-len 32 "
            "--max-model-len 128 --max-running 8 --max-batch 8 --max-batched-tokens 256 --warm-requests 2 "
            "--time-cap 60 --total-budget 300").split()
    rc = serving.main([*args, "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["results"]) == 4
    for run in data["results"]:
        assert run["finished"] == 12 and not run["capped"] and run["accounting_errors"] == [], run
    agree = data["agreement_naive_vs_pagegen"]
    # fp16 end to end: rounding may flip a rare near-tie, a logic error would flip most first tokens
    assert agree["identical_first_token"] >= 0.75 * agree["checked"] > 0, agree


# -- the fp8 KV pool (bench/serving/fp8.py) --


@pytest.fixture(scope="module")
def fp8_smoke(tmp_path_factory):
    """The fp8 smoke through the command line (fp16 pool vs fp8 e4m3 pool of the same bytes; about 20 s
    on one CPU core): (exit code, the JSON it wrote)."""
    import json

    out = tmp_path_factory.mktemp("fp8") / "serving-fp8.json"
    rc = serving.main(["--smoke", "--smoke-device", TEST_DEVICE, "--kv-dtype", "fp8_e4m3", "--out", str(out)])
    return rc, json.loads(out.read_text())


def test_fp8_smoke_json_has_both_pools_with_the_same_bytes(fp8_smoke):
    rc, data = fp8_smoke
    assert rc == 0
    for key in ("gpu", "gpu_key", "date", "torch", "triton", "pagegen", "model", "trace", "scales"):
        assert data[key], key
    base, fp8 = data["rows"]
    assert (base["kv_pool"], base["engine"]) == ("fp16", "pagegen")
    assert (fp8["kv_pool"], fp8["engine"]) == ("fp8_e4m3", "pagegen-fp8e4m3")
    # same bytes, twice the tokens (block-granular: equal bytes up to one block)
    assert base["kv_budget_bytes"] == fp8["kv_budget_bytes"] == data["kv_budget_bytes"]
    assert abs(fp8["kv_pool_bytes"] - base["kv_pool_bytes"]) <= base["kv_pool_bytes"] / base["num_blocks"]
    assert fp8["kv_capacity_tokens"] == 2 * base["kv_capacity_tokens"] and data["capacity_ratio"] == 2.0
    assert fp8["num_blocks"] == 2 * base["num_blocks"]


def test_fp8_smoke_runs_more_sequences_and_finishes_cleanly(fp8_smoke):
    _, data = fp8_smoke
    base, fp8 = data["rows"]
    n = data["trace"]["requests"]
    for r in (base, fp8):
        assert r["finished"] == r["requests"] == n and not r["capped"], r["engine"]
        assert r["accounting_errors"] == [], r["engine"]
        assert r["output_tokens"] == data["trace"]["output_tokens"]
        assert r["nonfinite_attn"] == 0, r["engine"]  # every attention output of every step was finite
    # the fp16 pool is tight enough to preempt; the fp8 pool of the same bytes holds more sequences at once
    assert base["preemptions"] >= 1 and fp8["preemptions"] < base["preemptions"]
    assert fp8["peak_running"] > base["peak_running"] and data["peak_ratio"] > 1
    assert fp8["mean_decode_batch"] > base["mean_decode_batch"]
    assert data["fp8_over_base_tok_per_s"] > 0
    assert data["agreement"]["checked"] == n  # reported, not asserted: fp8 may flip a near-tie


def test_fp8_smoke_attention_matches_the_emulating_reference(fp8_smoke):
    _, data = fp8_smoke
    c = data["attention_check"]
    layers = data["model"]["layers"]
    assert c["nonfinite"] == 0 and c["pool"] == "fp8_e4m3"
    for name in ("extend_kernel_vs_emulation", "decode_kernel_vs_emulation", "extend_fp8_vs_exact",
                 "decode_fp8_vs_exact", "decode_base_vs_exact", "saturated"):
        assert len(c[name]) == layers, name
    # the kernels' own error (fp16 outputs) is small; fp8 storage costs more, but stays a few percent
    assert c["max_decode_kernel_vs_emulation"] < 5e-3 and c["max_extend_kernel_vs_emulation"] < 5e-3
    assert c["max_decode_base_vs_exact"] < 5e-3
    assert c["max_decode_kernel_vs_emulation"] < c["max_decode_fp8_vs_exact"] < 0.2
    assert c["max_extend_kernel_vs_emulation"] < c["max_extend_fp8_vs_exact"] < 0.2
    assert 0 <= c["max_saturated"] < 0.01  # calibrated on another prompt: a few values clip, not many
    for key in ("k_scale", "v_scale"):
        rows = data["scales"][key]
        assert len(rows) == layers and all(len(r) == 1 and 0 < r[0] < 1 for r in rows), rows


def test_fp8_calibrated_scales_and_engine_scale_contract():
    """Per-tensor scales are the max of the per-head ones; the engine passes 1-element or [kv_heads]
    views of the KVCache's scales, and refuses missing, misshaped or misplaced scales."""
    cfg = serving.PRESETS["smoke"]
    model = serving.Model(cfg, device=torch.device("cpu"), dtype=torch.float32, seed=2, max_pos=64)
    toks = serving.calibration_prompt(24, cfg.vocab, seed=0)
    fp8 = torch.float8_e4m3fn
    kt, vt = serving.calibrate_kv_scales(model, toks, fp8, torch.float16)
    kh, vh = serving.calibrate_kv_scales(model, toks, fp8, torch.float16, per_head=True)
    assert kt.shape == vt.shape == (cfg.layers, 1) and kh.shape == vh.shape == (cfg.layers, cfg.kv_heads)
    assert kt.dtype == torch.float32 and bool((kt > 0).all()) and bool(torch.isfinite(kt).all())
    torch.testing.assert_close(kt[:, 0], kh.amax(1))
    torch.testing.assert_close(vt[:, 0], vh.amax(1))
    assert not torch.equal(kh[:, 0], kh[:, 1])  # heads differ: per-head scales carry information

    def engine(**kw):
        return serving.PagegenEngine(model, kv_dtype=torch.float16, budget_bytes=64 * cfg.kv_bytes_per_token(
            torch.float16), block_size=8, **kw)

    e = engine(pool_dtype=fp8, kv_scales=(kt, vt))
    assert e.cache.num_blocks == 2 * engine().cache.num_blocks
    assert e.scale_kwargs[1]["k_scale"].numel() == 1 and float(e.scale_kwargs[1]["k_scale"]) == float(kt[1, 0])
    torch.testing.assert_close(e.cache.k_scale, kt.expand(-1, cfg.kv_heads))
    h = engine(pool_dtype=fp8, kv_scales=(kh, vh))
    torch.testing.assert_close(h.scale_kwargs[0]["v_scale"], vh[0])
    with pytest.raises(ValueError, match="needs kv_scales"):
        engine(pool_dtype=fp8)
    with pytest.raises(ValueError, match="k_scale: expected float32"):
        engine(pool_dtype=fp8, kv_scales=(kt[:1], vt))
    with pytest.raises(ValueError, match="fp8 pools"):
        engine(kv_scales=(kt, vt))
    with pytest.raises(ValueError, match="not supported"):
        serving.pool_dtype("fp4")


@pytest.mark.gpu
def test_gpu_fp8_driver_end_to_end_small(tmp_path):
    """The fp8 GPU driver (calibration, warm-ups, both pools, attention check, table, JSON) with the tiny
    model: a quick check of the script on a GPU before the real run."""
    import json

    out = tmp_path / "serving-fp8.json"
    args = ("--model smoke --dtype bf16 --kv-dtype fp8_e4m3 --kv-gib 0.0005 --requests 16 --max-tokens 16 "
            "--max-prompt 64 --max-model-len 128 --max-running 16 --max-batched-tokens 256 --warm-requests 2 "
            "--calib-len 32 --check-steps 8 --time-cap 60 --total-budget 200").split()
    assert serving.main([*args, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    base, fp8 = data["rows"]
    assert (base["kv_pool"], fp8["kv_pool"]) == ("bf16", "fp8_e4m3")
    assert fp8["kv_capacity_tokens"] >= 2 * base["kv_capacity_tokens"]
    for run in (base, fp8):
        assert run["finished"] == 16 and not run["capped"] and run["accounting_errors"] == [], run
    c = data["attention_check"]
    assert c["nonfinite"] == 0 and c["max_decode_kernel_vs_emulation"] < 2e-2, c
    assert data["gpu_key"] != "cpu"
