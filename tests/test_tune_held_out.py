"""`pagegen tune` user errors (one line, exit 2, also under --plan) and the held-out check that
keeps a tuned table from being slower than the heuristic (issue 13 item 1, issue 14 item 7)."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from pagegen import cli, dispatch, tuner
from pagegen import gpu as G
from pagegen import table as T
from pagegen.spec import Config
from pagegen.workloads import INTERPRET_SPEC, QUICK_DECODE_BUCKETS, Bucket, Workload, default_buckets

interp_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                 reason="runs kernels on the Triton CPU interpreter")


@pytest.fixture(autouse=True)
def _fresh_dispatcher():
    dispatch.use_table(None)
    yield
    dispatch.use_table(None)


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pagegen tune: ") and "; " in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def test_plan_validates_what_a_run_validates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pagegen._checks import interpreter_problem

    if interpreter_problem():  # e.g. the GPU image: `--interpret` stops at that first (tested elsewhere)
        pytest.skip("this Triton/NumPy pair cannot run the interpreter that --interpret plans for")
    base = ["tune", "--plan", "--interpret"]
    assert "block_n values [7]" in _usage_error([*base, "--space", "block_n=7"], capsys)
    assert "unknown tunable" in _usage_error([*base, "--space", "block_q=16"], capsys)
    assert "--trials -1" in _usage_error([*base, "--trials", "-1"], capsys)
    assert "--workers 0" in _usage_error([*base, "--workers", "0"], capsys)
    assert "not a variant key" in _usage_error([*base, "--spec", "decode_hd128"], capsys)
    assert "head_dim=72" in _usage_error(["tune", "--plan", "--head-dim", "72"], capsys)
    assert "not a gpu key" in _usage_error(["tune", "--plan", "--gpu", "no such gpu"], capsys)
    assert "--interpret tunes" in _usage_error([*base, "--gpu", "h100"], capsys)
    assert "cannot read" in _usage_error([*base, "--specs", str(tmp_path / "missing.yaml")], capsys)
    bad_table = tmp_path / "bad.yaml"
    bad_table.write_text("version: 1\ngpu: [\n")
    assert "--warm-from" in _usage_error([*base, "--warm-from", str(bad_table)], capsys)
    if importlib.util.find_spec("MySQLdb") is None:  # mysql:// names that driver
        assert "driver is missing" in _usage_error([*base, "--storage", "mysql://u:pw@h/db"], capsys)
    assert "not a valid database URL" in _usage_error([*base, "--storage", "postgresql+nodriver://h/db"], capsys)
    assert cli.main([*base, "--space", "block_n=16,32"]) == 0
    assert "held-out" in capsys.readouterr().out


def test_python_object_tag_in_specs_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    evil = tmp_path / "specs.yaml"
    evil.write_text("specs:\n  - !!python/object/apply:os.system ['echo pwned > %s']\n" % (tmp_path / "pwned"))
    line = _usage_error(["tune", "--plan", "--specs", str(evil)], capsys)
    assert str(evil) in line and "not plain YAML" in line
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "bin.yaml").write_bytes(b"specs: [\xff\xfe]\n")
    assert "not UTF-8" in _usage_error(["tune", "--plan", "--specs", str(tmp_path / "bin.yaml")], capsys)


def test_every_default_decode_tune_has_a_ragged_bucket() -> None:
    for quick in (True, False):
        assert any(b.ragged for b in default_buckets("decode", quick))
    assert any(b.ragged for b in QUICK_DECODE_BUCKETS)
    from pagegen.workloads import load_specs_yaml

    root = Path(__file__).resolve().parents[1] / "bench" / "tune"
    for name in ("decode-reference.yaml", "models.yaml", "fp8.yaml", "verify.yaml", "models-hnd.yaml"):
        for w in load_specs_yaml(root / name):
            assert any(b.ragged for b in w.buckets), f"{name}: {w.spec.variant_key()} has no ragged bucket"


def test_held_out_shapes_lie_between_the_buckets() -> None:
    w = Workload(INTERPRET_SPEC, 2, (Bucket(1, 2048), Bucket(8, 4096), Bucket(32, 8192), Bucket(128, 2048)))
    held = tuner.held_out_buckets(w)
    assert held and len(held) <= 12
    assert any(b.ragged for b in held) and any(not b.ragged for b in held)
    tuned = {(b.shape, b.ragged) for b in w.buckets}
    for b in held:
        assert (b.shape, b.ragged) not in tuned
        assert 1 <= b.a <= 128 and 2048 <= b.ctx <= 8192
    assert len({b.a for b in held}) > 1 and len({b.ctx for b in held}) > 1  # several batches and lengths
    assert len(tuner.held_out_buckets(w, interpret=True)) == 2


class SlowUnlessHeuristic(tuner.DecodeRunner):
    """Every config but the heuristic's (block_n 128) sleeps 0.5 s per launch (far above the
    interpreter's noise): the table's picks lose."""

    def launch(self, cfg: Config, x: dict) -> torch.Tensor:
        if cfg.block_n != 128:
            time.sleep(0.5)
        return super().launch(cfg, x)


@interp_only
def test_a_table_slower_than_the_heuristic_gets_the_shape_as_a_bucket() -> None:
    w = Workload(INTERPRET_SPEC, 2, (Bucket(1, 16), Bucket(2, 40)))
    entry = T.Entry(spec=INTERPRET_SPEC, kernel_hash="x", trials=1, tuned_at=T.now_iso(), kv_heads=2, buckets=[
        T.BucketResult(b.shape, Config(block_n=16, num_warps=4, num_stages=1), 1.0) for b in w.buckets])
    table = T.Table("interpret", "cpu", 4, "0.0", entries={entry.key: entry}, toolchain={}, tuned_at=T.now_iso(),
                    interpret=True)
    options = tuner.TuneOptions(runners={"decode": SlowUnlessHeuristic}, progress=None)
    rows = tuner.check_held_out(table, [w], G.INTERPRETER, options)
    assert rows and all(r.ratio > 1.03 and r.heuristic_config.block_n == 128 for r in rows)
    added = [r.added for r in rows]
    assert all(added), added  # every held-out shape lies near a bucket here
    got = {b.name: b for b in entry.buckets}
    for r in rows:
        assert got[r.added].config == r.heuristic_config and got[r.added].ragged == r.bucket.ragged
    assert [(h.shape, h.ragged) for h in entry.held_out] == [(r.bucket.shape, r.bucket.ragged) for r in rows]
    text = tuner.format_held_out(rows, True)
    assert "added bucket" in text and "mean nothing" in text
    loaded = T.loads(T.dumps(table)).entries[entry.key]  # the record survives a save/load round trip
    assert len(loaded.buckets) == len(entry.buckets) and len(loaded.held_out) == len(entry.held_out)
    for a, b in zip(loaded.held_out, entry.held_out, strict=True):
        assert (a.shape, a.ragged) == (b.shape, b.ragged) and a.table_us == pytest.approx(b.table_us, abs=1e-3)


@interp_only
def test_tune_ends_with_the_held_out_check_and_records_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """The whole flow on the interpreter: tune, time held-out shapes against the heuristic, print the
    comparison, record it in the table; no lock or temp file is left beside the table."""
    monkeypatch.setenv("PAGEGEN_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "t.yaml"
    argv = ["tune", "--interpret", "--buckets", "1x16,3x40r", "--trials", "1", "--no-warm-start", "--quiet",
            "--space", "block_n=16;num_warps=4;num_stages=1;split_size=0", "--storage", str(tmp_path / "j.journal"),
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out shape" in printed and "table/heur" in printed
    entry = T.load(out).entries[INTERPRET_SPEC.variant_key()]
    assert len(entry.held_out) == 2 and {h.ragged for h in entry.held_out} == {True, False}
    assert all(h.table_us > 0 and h.heuristic_us > 0 for h in entry.held_out)
    assert {p.name for p in tmp_path.iterdir()} <= {"cache", "j.journal", "t.yaml"}  # no .lock, no .tmp


@pytest.mark.gpu
def test_gpu_held_out_check_leaves_no_losing_shape_near_a_bucket(tmp_path: Path) -> None:
    """On a real GPU: after a small study of the reference spec, every held-out shape near a bucket on
    which the table's pick lost by more than 3% to the heuristic has become a bucket whose config is at
    least as fast there as the heuristic's."""
    from pagegen.spec import KernelSpec
    from pagegen.tuner.held_out import NEAR_LOG2, TOLERANCE, _dist

    gpu = G.cuda_gpu()
    spec = KernelSpec("decode", head_dim=128, block_size=16, group_size=4)
    w = Workload(spec, 8, (Bucket(1, 4096), Bucket(32, 1024), Bucket(16, 4096, ragged=True)))
    space = {"block_n": [32, 64], "num_warps": [4], "num_stages": [2], "split_size": [0, 512]}
    options = tuner.TuneOptions(trials=3, sampler="grid", storage=str(tmp_path / "j.journal"), space=space,
                                progress=None, reps=20)
    table, _ = tuner.tune([w], gpu, options)
    rows = tuner.check_held_out(table, [w], gpu, options)
    assert rows and all(r.table_us > 0 and r.heuristic_us > 0 for r in rows)
    entry = table.entries[spec.variant_key()]
    buckets = {b.name: b for b in entry.buckets}
    for r in rows:
        near = _dist(r.bucket.shape, buckets[r.near].shape) <= NEAR_LOG2
        if r.ratio > 1 + TOLERANCE and near:
            assert r.added and buckets[r.added].latency_us <= r.heuristic_us
    assert len(entry.held_out) == len(rows)


def test_spec_with_specs_selects_entries_of_the_list(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--spec KEY with --specs FILE tunes only those entries, as the file gives them (model, KV heads, buckets),
    in the order asked; a key the file does not list is a one-line usage error naming the file."""
    from pagegen.cli_tune import _workloads

    specs = tmp_path / "specs.yaml"
    specs.write_text("buckets: [\"8x4096\", \"64x8192r\"]\nspecs:\n"
                     "  - {model: A, key: decode_bf16_hd128_bs16_nhd_g4, kv_heads: 8}\n"
                     "  - {model: B, key: decode_bf16_kvfp8e4m3_hd96_bs16_nhd_g1, kv_heads: 32,"
                     " buckets: [\"1x2048\"]}\n"
                     "  - {model: C, key: decode_bf16_hd64_bs16_hnd_g4, kv_heads: 8}\n")
    args = cli.build_parser().parse_args(["tune", "--specs", str(specs), "--spec", "decode_bf16_hd64_bs16_hnd_g4",
                                          "--spec", "decode_bf16_kvfp8e4m3_hd96_bs16_nhd_g1"])
    got = _workloads(args, interpret=False)
    assert [(w.spec.variant_key(), w.kv_heads, w.models) for w in got] == [
        ("decode_bf16_hd64_bs16_hnd_g4", 8, ("C",)), ("decode_bf16_kvfp8e4m3_hd96_bs16_nhd_g1", 32, ("B",))]
    assert [b.name for b in got[0].buckets] == ["8x4096", "64x8192r"]
    assert [b.name for b in got[1].buckets] == ["1x2048"]
    line = _usage_error(["tune", "--plan", "--specs", str(specs), "--spec", "decode_bf16_hd256_bs16_nhd_g2"], capsys)
    assert "decode_bf16_hd256_bs16_nhd_g2 not in" in line and str(specs) in line
