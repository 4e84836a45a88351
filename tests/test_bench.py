"""The shared bench modules: result paths named by the card's key, the SDPA baseline sweep (a wrong
spelling is rejected, the fastest right one is named), the lower-right causal mask, and the decode
baselines' two spellings (native GQA, group folded into query rows) against the float64 reference."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import baselines, common  # noqa: E402
from bench import kernels as K  # noqa: E402


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
