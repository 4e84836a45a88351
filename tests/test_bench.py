"""The shared bench modules: result paths named by the card's key, the SDPA baseline sweep (a wrong
spelling is rejected, the fastest right one is named), the lower-right causal mask, and the decode
baselines' two spellings (native GQA, group folded into query rows) against the float64 reference;
bench/kernels.py's HND pools (the NHD data transposed) and its --cpu-smoke in both layouts (the
dispatcher sees each layout's spec); bench/extend.py's pair count, batch shapes and inputs, flex
document mask and --cpu-smoke (a batch in one launch, then head_dim 64)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import baselines, common  # noqa: E402
from bench import kernels as K  # noqa: E402
from pagegen import codegen, dispatch  # noqa: E402
from pagegen import gpu as G  # noqa: E402
from pagegen import table as T  # noqa: E402
from pagegen._checks import interpreter_problem  # noqa: E402
from pagegen.reference import paged_decode_ref  # noqa: E402
from pagegen.spec import Config  # noqa: E402


def test_result_path_uses_the_gpu_key(tmp_path, monkeypatch):
    monkeypatch.setenv(common.ENV_RESULTS, str(tmp_path))
    p = common.result_path("decode", "rtx4090", date="2026-12-01", tag="v2")
    assert p == tmp_path / "decode-rtx4090-2026-12-01-v2.json"
    assert common.result_path("decode", date="2026-12-01").name == f"decode-{common.device_key()}-2026-12-01.json"
    assert common.result_path("x", "h200", date="d", out=tmp_path) == tmp_path / "x-h200-d.json"  # a folder
    assert common.result_path("x", "h200", out=tmp_path / "mine.json") == tmp_path / "mine.json"  # a file


def test_tee_log_copies_the_printout(tmp_path, capsys):
    with common.tee_log(tmp_path / "run.json") as log:
        print("row 1")
    assert log == tmp_path / "run.log"
    assert log.read_text() == "row 1\n"
    assert "row 1" in capsys.readouterr().out


def test_lower_right_mask_matches_torch_causal_bias():
    from torch.nn.attention.bias import causal_lower_right

    for q, kv in ((5, 5), (3, 11), (1, 4)):
        want = causal_lower_right(q, kv)._materialize(torch.device("cpu"))
        assert torch.equal(baselines.lower_right_mask(q, kv, "cpu"), want)


def test_sweep_rejects_a_wrong_spelling_and_names_the_fastest(device):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g).to(device) for _ in range(3))
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4.0, -1) @ v.double()  # scale 1/sqrt(16)
    f = torch.nn.functional.scaled_dot_product_attention
    forms = {"right": lambda: f(q, k, v), "wrong": lambda: f(q, k, v, is_causal=True)}
    rows, best = baselines.sweep(forms, lambda o: float((o.double() - ref).norm() / ref.norm()),
                                 backends=("default", "math"), reps=2)
    assert [r["impl"] for r in rows] == ["sdpa-default", "sdpa-math"]
    for r in rows:
        assert r["form"] == "right" and r["us"] > 0, r
        assert r["forms"]["wrong"].startswith("wrong"), r
    assert best is not None and best["impl"] == "sdpa-best"
    assert best["winner"] == f"{best['backend']} (right)" and best["us"] == min(r["us"] for r in rows)


def test_sweep_reports_a_refused_backend_with_its_reason():
    def refuse():
        raise RuntimeError("No available kernel")

    rows, best = baselines.sweep({"only": refuse}, lambda o: 0.0, backends=("default",), reps=1)
    assert best is None and rows[0]["na"].startswith("n/a (") and "us" not in rows[0]


def test_decode_sdpa_spellings_match_the_reference():
    """Native GQA and the folded group give the paged reference's answer, ragged lengths included."""
    geo = K.Geometry("tiny", 8, 2, 64)
    x = K.make_inputs("3x40", seed=3, geo=geo)
    x.lens = [40, 17, 5]
    x.sl = torch.tensor(x.lens, dtype=torch.int32, device=x.q.device)
    kc, vc = K.slab(x)
    forms = K.sdpa_forms(x, kc, vc)
    assert set(forms) == {"gqa", "fold"}
    for name, fn in forms.items():
        err = K.check(fn().float(), x, n_check=3)
        assert err < K.TOL, (name, err)


# ----------------------------------------------------------------- bench/kernels.py --layout


def test_decode_hnd_pool_holds_the_nhd_data():
    """make_inputs in HND draws what NHD draws and stores it [blocks, Hkv, bs, D]: the same tables, q,
    SDPA slab and float64 reference, and check() reads the pool in its own layout."""
    geo = K.Geometry("tiny", 4, 2, 64)
    hnd = replace(geo, layout="HND")
    assert hnd.spec.layout == "HND" and hnd.spec == replace(geo.spec, layout="HND")
    torch.manual_seed(7)
    xn = K.make_inputs("3x40", seed=2, geo=geo)
    torch.manual_seed(7)
    xh = K.make_inputs("3x40", seed=2, geo=hnd)
    assert xn.k.shape == (9, 16, 2, 64) and xh.k.shape == (9, 2, 16, 64) and xh.k.is_contiguous()
    assert torch.equal(xh.k.transpose(1, 2), xn.k) and torch.equal(xh.v.transpose(1, 2), xn.v)
    assert torch.equal(xh.bt, xn.bt) and torch.equal(xh.q, xn.q) and xh.lens == xn.lens
    for a, b in zip(K.nhd_pools(xh), K.nhd_pools(xn), strict=True):  # what the slab and flex's pool copy from
        assert torch.equal(a, b)
    for a, b in zip(K.slab(xn), K.slab(xh), strict=True):
        assert torch.equal(a, b)
    ref_n = paged_decode_ref(xn.q, xn.k, xn.v, xn.bt, xn.sl)
    assert torch.equal(paged_decode_ref(xh.q, xh.k, xh.v, xh.bt, xh.sl, layout="HND"), ref_n)
    # check() reads the pool in its own layout: the NHD answer is right for the HND inputs, a wrong one is not
    assert K.check(ref_n.float(), xh, n_check=3) < 1e-6
    assert K.check(ref_n.flip(0).float(), xh, n_check=3) > K.TOL


def _layout_table(configs: dict[str, Config]) -> T.Table:
    """A tuned table for the live device (the interpreter) with one entry per layout of the smoke spec, one
    uniform bucket 2x40 each, so a row's config says which layout's entry the dispatcher looked up."""
    entries = {}
    for layout, cfg in configs.items():
        spec = replace(K.SMOKE_GEOMETRY, layout=layout).spec
        e = T.Entry(spec=spec, kernel_hash=codegen.kernel_hash(spec), trials=1, tuned_at=T.now_iso(),
                    kv_heads=K.SMOKE_GEOMETRY.hk,
                    buckets=[T.BucketResult(shape=(2, 40), config=cfg, latency_us=1.0, gbps=1.0)])
        entries[e.key] = e
    return T.Table(gpu_key=(G.live_gpu() or G.INTERPRETER).key, gpu_name="test", sm_count=4, capability="0.0",
                   entries=entries, toolchain={}, tuned_at=T.now_iso(), interpret=True)


@pytest.fixture
def kernels_smoke(monkeypatch):
    """bench/kernels.py in --cpu-smoke mode (its SMOKE is read at import from sys.argv), with a two-layout
    table in the dispatcher; the automatic lookup restored after."""
    monkeypatch.setattr(K, "SMOKE", True)
    c_nhd = Config(block_n=16, num_warps=1, num_stages=1, split_size=0)
    c_hnd = Config(block_n=32, num_warps=2, num_stages=1, split_size=0)
    dispatch.use_table(_layout_table({"NHD": c_nhd, "HND": c_hnd}))
    yield c_nhd, c_hnd
    dispatch.use_table(None)


def test_decode_cpu_smoke_hnd_checks_every_impl_and_sees_the_hnd_entry(kernels_smoke, tmp_path):
    """--cpu-smoke --models --layout HND: every row checked against the reference and timed, or none;
    "tuned" takes the HND entry's bucket (ragged: the heuristic), "tuned-nhd" the NHD entry's; the layout
    is in the meta, the workload line and the file name; then NHD: no tag, the NHD entry."""
    c_nhd, c_hnd = kernels_smoke
    with pytest.warns(dispatch.TunedTableWarning) as rec:  # hd 96 g1 has no entry: each layout's key is named
        assert K.main(["--cpu-smoke", "--models", "--layout", "HND", "--reps", "1", "--backends", "default,math",
                       "--out", str(tmp_path)]) == 0
    missing = " ".join(str(w.message) for w in rec)
    assert "no tuned entry for decode_bf16_hd96_bs16_hnd_g1" in missing  # "tuned" looked up the HND spec
    assert "no tuned entry for decode_bf16_hd96_bs16_nhd_g1" in missing  # "tuned-nhd" the NHD one
    (path,) = tmp_path.glob("decode-models-*.json")
    assert path.name.endswith("-hnd.json") and path.with_suffix(".log").exists()
    res = json.loads(path.read_text())
    meta, rows = res["meta"], res["rows"]
    assert meta["layout"] == "HND" and "block 16 HND," in meta["workload"] and "partial" not in res
    runs = [("smoke", "2x40"), ("smoke", "mixed"), ("smoke-g1", "2x40"), ("smoke-g1", "mixed")]
    by = {(r["model"], r["shape"], r["impl"]): r for r in rows}
    for model, shape in runs:
        for impl in ("sdpa-default", "sdpa-math", "sdpa-best", "default", "tuned", "tuned-nhd"):
            r = by[(model, shape, impl)]
            assert "error" not in r and "na" not in r, r
            assert r["rel_err"] < K.TOL and r["us"] > 0, r  # checked against the HND reference, then timed
    assert {(r["model"], r["shape"]) for r in rows} == set(runs)
    tuned, nhd = by[("smoke", "2x40", "tuned")], by[("smoke", "2x40", "tuned-nhd")]
    assert tuned["config"] == c_hnd.to_dict() and tuned["source"].endswith("bucket 2x40"), tuned
    assert nhd["config"] == c_nhd.to_dict() and nhd["source"] == f"NHD spec's {tuned['source']}", nhd
    assert by[("smoke", "mixed", "tuned")]["source"].startswith("heuristic")  # ragged: no ragged bucket
    assert by[("smoke-g1", "2x40", "tuned")]["source"].startswith("heuristic")  # hd 96 g1: no entry
    summary = {(s["model"], s["shape"]): s for s in res["summary"]}
    assert set(summary) == set(runs)
    s = summary[("smoke", "2x40")]
    assert s["tuned_us"] == tuned["us"] and s["tuned_nhd_us"] == nhd["us"] and s["tuned_source"] == tuned["source"]

    assert K.main(["--cpu-smoke", "--layout", "NHD", "--shapes", "2x40", "--impls", "sdpa,tuned", "--reps", "1",
                   "--backends", "default", "--out", str(tmp_path)]) == 0
    (npath,) = tmp_path.glob("decode-[!m]*.json")  # decode-<key>-<date>.json beside decode-models-...
    assert not npath.stem.endswith("-hnd")
    nres = json.loads(npath.read_text())
    assert nres["meta"]["layout"] == "NHD" and "block 16 NHD," in nres["meta"]["workload"]
    (r,) = [r for r in nres["rows"] if r["impl"] == "tuned"]
    assert r["config"] == c_nhd.to_dict() and r["rel_err"] < K.TOL and r["us"] > 0, r
    assert all("nhd" not in r["impl"] for r in nres["rows"])


# ----------------------------------------------------------------- bench/extend.py


@pytest.fixture
def extend_bench(monkeypatch):
    """bench/extend.py as a module, its run-wide globals restored after the test (main() sets them)."""
    from bench import extend as E

    for name in ("BS", "D", "SPEC", "BF16_SPEC", "KV_DTYPE", "TUNE_GRID", "WARMUP"):
        monkeypatch.setattr(E, name, getattr(E, name))
    return E


def test_extend_causal_pairs_counted_by_hand(extend_bench):
    E = extend_bench
    # sequence 0: 3 new tokens, no prefix: they see 1, 2 and 3 keys -> 6 pairs
    # sequence 1: 2 new tokens over 4 cached ones: they see 5 and 6 keys -> 11 pairs
    assert E.causal_pairs([3, 2], [0, 4]) == 17
    assert E.causal_flops([3, 2], [0, 4]) == 4.0 * 17 * E.D * E.HQ
    assert E.causal_flops(2, 4) == 4.0 * 11 * E.D * E.HQ  # one sequence, as the script always counted
    for q, c in ((3, 0), (2, 4), (7, 9)):  # the formula is the lower-right mask's count of True
        assert E.causal_pairs([q], [c]) == int(baselines.lower_right_mask(q, q + c, "cpu").sum())


def test_extend_batch_shapes_parse_and_draw_reproducibly(extend_bench):
    E = extend_bench
    assert E.split_shapes("8@0,2x[4,8]@[0,16],batch16") == ["8@0", "2x[4,8]@[0,16]", "batch16"]
    assert E.parse_batch("8@0") is None
    assert E.parse_batch("batch16") == (16, (64, 1024), (0, 8192))
    q, c = E.seq_lengths("batch16")
    assert (q, c) == E.seq_lengths("16x[64,1024]@[0,8192]")  # the same draw every time
    assert len(q) == len(c) == 16 and all(64 <= n <= 1024 for n in q) and all(0 <= n <= 8192 for n in c)
    assert len(set(q)) > 8 and len(set(c)) > 8  # really drawn, not one value
    for bad in ("2x[8,4]@[0,1]", "0x[1,2]@[0,1]", "2x4@0"):
        with pytest.raises(ValueError, match="shape"):
            E.parse_batch(bad)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_extend_batch_inputs_and_flex_document_mask(extend_bench):
    """Each sequence of a batch sits in the shared pool (its contiguous copy is its pages' tokens), its
    reference rows are the batch reference's, and the flex document mask gives the reference's answer."""
    from pagegen.reference import gather_kv

    E = extend_bench
    x = E.make_inputs("3x[4,24]@[0,40]")
    assert x["cu"].tolist() == [0, *torch.tensor(x["q_lens"]).cumsum(0).tolist()]
    tail = E.ref_tail(x)
    assert tail.shape == (sum(min(E.REF_ROWS, q) for q in x["q_lens"]), E.HQ, E.D)
    for i, s in enumerate(x["seqs"]):
        n = s["max_n"]
        assert torch.equal(gather_kv(x["k"], x["bt"][i], n, "NHD").permute(1, 0, 2), s["kc"][0])
        assert torch.equal(s["qc"][0].transpose(0, 1), x["q"][x["cu"][i]:x["cu"][i + 1]])
        assert torch.allclose(E.ref_tail(s), tail[x["tail_cu"][i]:x["tail_cu"][i + 1]])
    fn, note = E.run_flex_varlen(x, compile=False)
    out = fn()
    assert out.shape == x["q"].shape and "document mask" in note
    assert E.rel(E.tail_of(out, x), tail) < E.TOL


def test_extend_cpu_smoke_runs_a_batch_and_head_dim_64(extend_bench, tmp_path):
    """--cpu-smoke in the interpreter: a 3-sequence batch in one launch (checked, timed, TFLOP/s from its
    pairs) with its per-sequence SDPA baseline, then the head_dim 64 pass in its own JSON."""
    E = extend_bench
    out = tmp_path / "extend.json"
    shape = "3x[4,24]@[0,40]"
    assert E.main(["--cpu-smoke", "--reps", "1", "--impls", "sdpa,pagegen,default", "--backends", "default,math",
                   "--shapes", f"8@0,{shape}", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    meta, rows = res["meta"], res["rows"]
    assert meta["head_dim"] == 128 and "hd128" in meta["workload"] and "one launch" in meta["workload"]
    b = meta["batches"][shape]
    q_lens, ctxs = E.seq_lengths(shape)
    assert (b["q_lens"], b["prefixes"], b["sequences"]) == (q_lens, ctxs, 3)
    assert b["new_tokens"] == sum(q_lens) and b["pairs"] == E.causal_pairs(q_lens, ctxs)
    by = {(r["shape"], r["impl"]): r for r in rows}
    assert {"sdpa-default", "sdpa-math", "sdpa-best", "baseline-best", "pagegen", "default"} <= \
        {i for s, i in by if s == shape}
    flops = 4.0 * b["pairs"] * 128 * E.HQ
    for impl in ("pagegen", "default"):
        r = by[(shape, impl)]
        assert "error" not in r, r
        assert r["err_vs_fp64_tail"] < E.TOL and r["err_vs_sdpa"] < E.TOL, r
        assert r["flops"] == flops and r["tflops"] == pytest.approx(flops / r["us"] / 1e6)
        assert r["speed_vs_fastest_baseline"] == pytest.approx(by[(shape, "baseline-best")]["us"] / r["us"])
    sb = by[(shape, "sdpa-best")]
    assert sb["calls"] == 3 and sb["us"] == pytest.approx(sum(p["us"] for p in sb["per_seq"]))
    assert by[(shape, "sdpa-default")]["calls"] == 3
    assert by[("8@0", "pagegen")]["flops"] == 4.0 * 36 * 128 * E.HQ  # 8 new tokens: 1 + ... + 8 pairs
    assert any(k.startswith(f"{shape} target (issue 18") for k in res["summary"])

    hd = json.loads((tmp_path / "extend-hd64.json").read_text())
    assert hd["meta"]["head_dim"] == 64 and "hd64" in hd["meta"]["workload"]
    (r,) = [r for r in hd["rows"] if r["impl"] == "pagegen"]
    assert "error" not in r and r["err_vs_fp64_tail"] < E.TOL and r["err_vs_sdpa"] < E.TOL, r
    q, c = E.parse_shape(r["shape"])
    assert r["flops"] == 4.0 * E.causal_pairs([q], [c]) * 64 * E.HQ
    assert any("target (issue 18, hd64" in k for k in hd["summary"])


def test_extend_cpu_smoke_on_an_fp8_pool(extend_bench, tmp_path):
    """--kv-dtype fp8_e4m3: the pagegen rows read the fp8 copy of the pool and are checked against the emulating
    reference (their distance to SDPA on the bf16 source is recorded, not checked); pagegen-bf16 runs the bf16
    pool and is checked against both; the summary gives the fp8 pool's speed-up per shape."""
    E = extend_bench
    out = tmp_path / "extend.json"
    shapes = ["8@0", "3x[4,24]@[0,40]"]
    assert E.main(["--cpu-smoke", "--reps", "1", "--kv-dtype", "fp8_e4m3", "--head-dim", "128", "--impls",
                   "sdpa,pagegen,pagegen-bf16", "--backends", "default", "--shapes", ",".join(shapes),
                   "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["kv_dtype"] == "fp8_e4m3" and "fp8_e4m3 pool" in res["meta"]["workload"]
    by = {(r["shape"], r["impl"]): r for r in res["rows"]}
    for shape in shapes:
        fp8, bf16 = by[(shape, "pagegen")], by[(shape, "pagegen-bf16")]
        assert "error" not in fp8 and "error" not in bf16, (fp8, bf16)
        assert fp8["err_vs_fp64_tail"] < E.TOL and "err_vs_sdpa" not in fp8, fp8
        assert 1e-3 < fp8["err_vs_sdpa_bf16_kv"] < 0.2, fp8  # fp8's own cost: real, and bounded
        assert bf16["err_vs_fp64_tail"] < E.TOL and bf16["err_vs_sdpa"] < E.TOL, bf16
        key = f"{shape} pagegen-bf16 / pagegen (time: the fp8 pool's speed-up)"
        assert res["summary"][key] == pytest.approx(bf16["us"] / fp8["us"], rel=1e-2)
    assert E.main(["--cpu-smoke", "--impls", "pagegen-bf16", "--shapes", "8@0", "--head-dim", "128",
                   "--out", str(tmp_path / "x.json")]) == 0  # without --kv-dtype: reported, not fatal
    (row,) = json.loads((tmp_path / "x.json").read_text())["rows"]
    assert "add --kv-dtype" in row["error"]


def test_ncu_summary_reads_a_committed_h200_report(tmp_path):
    """bench/ncu_summary.py on a report bench/ncu_profile.sh brought back from the H200: one row per
    profiled kernel (the fp8 decode kernel and its merge), durations in microseconds, the metrics read."""
    from bench import ncu_summary

    src = Path(__file__).resolve().parents[1] / "bench/results/ncu-h200-2026-12-01/fp8_32x8192_fp8_e4m3.txt"
    rows = ncu_summary.parse(src)
    assert [r["kernel"] for r in rows] == ["decode_kernel", "merge_kernel"]
    dec = rows[0]
    assert 100 < dec["us"] < 300 and dec["grid"] == "(32, 8, 8)" and dec["regs"] == 255.0
    assert 0 < dec["dram_pct"] <= 100 and 1000 < dec["mem_GBps"] < 5000 and dec["spills"] == 0.0
    assert dec["pipe"].startswith("ALU")
    (tmp_path / "a.txt").write_text(src.read_text())
    assert ncu_summary.main([str(tmp_path), "--json", str(tmp_path / "s.json")]) == 0
    assert len(json.loads((tmp_path / "s.json").read_text())) == 2
    assert ncu_summary.main([str(tmp_path / "none")]) == 1


def test_ncu_cases_lists_models_and_refuses_unknown_kinds(capsys):
    """bench/ncu_cases.py (GPU-only steps for ncu): --list names every model; a case kind it does not know,
    or a model it does not know, is refused before anything runs."""
    from bench import ncu_cases
    from pagegen.workloads import DEFAULT_MODELS

    assert ncu_cases.main(["--list"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(DEFAULT_MODELS)
    with pytest.raises(SystemExit, match="unknown case kind 'prefill'"):
        ncu_cases.main(["prefill:128:2048@0"])
    with pytest.raises(SystemExit, match="unknown model 'Llama-9'"):
        ncu_cases.geometry("Llama-9", "NHD")
    with pytest.raises(SystemExit, match="unknown fp8 lab variant 'vt2'"):
        ncu_cases.fp8lab_case("vt2", "128x4096")


@pytest.mark.skipif(interpreter_problem() is not None, reason="the child runs the kernels in the Triton interpreter")
def test_fp8_bench_hnd_smoke_checks_fp8_pools_against_the_emulation(tmp_path):
    """bench/fp8.py --cpu-smoke --layout HND --only accuracy (a subprocess: the script reads --cpu-smoke at import):
    HND pools of the same values, quantized per tensor and per KV head on the HND head axis, every fp8 case within
    the script's tolerance of the emulating reference; the layout is in the workload line and the file name."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "fp8.json"
    proc = subprocess.run([sys.executable, str(root / "bench/fp8.py"), "--cpu-smoke", "--layout", "HND", "--only",
                           "accuracy", "--out", str(out)], capture_output=True, text=True, timeout=240, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert ", HND," in res["meta"]["workload"]
    fp8_rows = [r for r in res["accuracy"] if r["case"] != "bf16"]
    assert len(fp8_rows) == 8  # randn and outlier keys x e4m3/e5m2 x per tensor/per head
    for r in fp8_rows:
        # the kernel's own error is small; fp8's cost is large but bounded (e5m2 on outlier keys: 0.32 on the H200)
        assert r["kernel_err_vs_emulation"] < 2e-2 and r["rel_err_vs_exact"] < 0.5, r
