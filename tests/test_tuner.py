"""pagegen.tuner end to end under the Triton interpreter: a tiny study writes a valid table the
dispatcher then uses; injected failures never win; a killed study resumes; GPU gating of the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import TOL, make_paged_kv, rel_err

from pagegen import cli_tune, codegen, dispatch, tuner
from pagegen import gpu as G
from pagegen import table as T
from pagegen.decode import paged_decode
from pagegen.reference import paged_decode_ref
from pagegen.spec import Config, KernelSpec
from pagegen.workloads import INTERPRET_SPEC, Bucket, Workload, parse_variant_key

BUCKETS = (Bucket(1, 24), Bucket(2, 40))
WORKLOAD = Workload(INTERPRET_SPEC, 2, BUCKETS, ("tiny",))
# three configs, one sampler pass each (grid): small and deterministic
SPACE = {"block_n": [16, 32, 64], "num_warps": [4], "num_stages": [2], "split_size": [0]}


interp_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                 reason="runs the tuner on the Triton CPU interpreter")


@pytest.fixture(autouse=True)
def _fresh_dispatcher():
    dispatch.use_table(None)
    yield
    dispatch.use_table(None)


def _options(tmp_path: Path, **kw) -> tuner.TuneOptions:
    base = dict(trials=3, sampler="grid", storage=str(tmp_path / "study.journal"), space=SPACE, progress=None,
                trial_timeout_s=120)
    return tuner.TuneOptions(**{**base, **kw})


@interp_only
def test_tiny_study_writes_a_table_the_dispatcher_uses(tmp_path: Path) -> None:
    lines: list[str] = []
    table, results = tuner.tune([WORKLOAD], G.INTERPRETER, _options(tmp_path, progress=lines.append))
    assert table is not None and table.interpret and table.gpu_key == G.INTERPRET_KEY
    (res,) = results
    assert res.trials == 3 and res.failed == 0
    assert any("trial 3/3" in s and "meaningless" in s for s in lines)
    summary = tuner.format_summary(results, True)
    assert "1x24" in summary and "2x40" in summary and "mean nothing" in summary
    path = T.merge_into(tmp_path / "interpret.yaml", table) and tmp_path / "interpret.yaml"
    entry = T.load(path).entries[INTERPRET_SPEC.variant_key()]
    assert sorted(b.shape for b in entry.buckets) == [(1, 24), (2, 40)]
    assert all(b.trials == 3 and b.latency_us > 0 for b in entry.buckets)

    dispatch.use_table(path)
    winner = {b.shape: b.config for b in entry.buckets}
    k, v, bt, sl = make_paged_kv([40, 33], 2, 64, 16, "NHD", torch.bfloat16, "cpu")
    q = torch.randn(2, 4, 64).to(torch.bfloat16)
    out = paged_decode(q, k, v, bt, sl)
    cfg, source = dispatch.explain(INTERPRET_SPEC, 2, bt.shape[1] * 16, 2)
    assert cfg == winner[(2, 40)] and "bucket 2x40" in source
    assert rel_err(out, paged_decode_ref(q, k, v, bt, sl)) < TOL[torch.bfloat16]


class FaultyRunner(tuner.DecodeRunner):
    """A decode runner whose block_n=16 kernel fails to compile and whose block_n=32 kernel computes
    garbage (a sign flip); the others are the real thing."""

    def launch(self, cfg: Config, x: dict) -> torch.Tensor:
        if cfg.block_n == 16:
            raise RuntimeError("CompilationError: injected fault")
        out = super().launch(cfg, x)
        return out.mul_(-1.0) if cfg.block_n == 32 else out


class HangingRunner(tuner.DecodeRunner):
    """A decode runner whose every launch hangs."""

    def launch(self, cfg: Config, x: dict) -> torch.Tensor:
        time.sleep(3600)
        raise AssertionError("unreachable")


@interp_only
def test_failing_and_wrong_configs_are_failed_trials_that_never_win(tmp_path: Path) -> None:
    table, (res,) = tuner.tune([WORKLOAD], G.INTERPRETER, _options(tmp_path, runners={"decode": FaultyRunner}))
    assert res.trials == 3 and res.failed == 2
    reasons = sorted(r for _, r in res.failures)
    assert reasons[0].startswith("compile error") and reasons[1].startswith("wrong result: relative error")
    assert {b.config.block_n for b in table.entries[INTERPRET_SPEC.variant_key()].buckets} == {64}


@interp_only
def test_timeout_is_a_failed_trial(tmp_path: Path) -> None:
    space = {**SPACE, "block_n": [16]}
    table, (res,) = tuner.tune([WORKLOAD], G.INTERPRETER, _options(
        tmp_path, runners={"decode": HangingRunner}, space=space, trials=1, trial_timeout_s=1.0))
    assert [r for _, r in res.failures] == ["timeout after 1 s"]
    assert table is None and res.entry is None  # nothing correct finished: nothing to write


CHILD = textwrap.dedent("""
    import os, sys, time
    from pagegen import tuner
    from pagegen import gpu as G
    from pagegen.workloads import INTERPRET_SPEC, Bucket, Workload
    w = Workload(INTERPRET_SPEC, 2, (Bucket(1, 24), Bucket(2, 40)))
    space = {"block_n": [16, 32, 64], "num_warps": [1, 4], "num_stages": [2], "split_size": [0]}
    opts = dict(sampler="grid", storage=sys.argv[1], space=space, progress=None, trial_timeout_s=0)
    tuner.tune([w], G.INTERPRETER, tuner.TuneOptions(trials=2, **opts))
    print("FIRST-DONE", flush=True)
    class Hang(tuner.DecodeRunner):
        def launch(self, cfg, x):
            time.sleep(3600)
    # every further config hangs: the parent kills this process mid-trial
    tuner.tune([w], G.INTERPRETER, tuner.TuneOptions(trials=2, runners={"decode": Hang}, **opts))
""")


@interp_only
def test_killed_study_resumes_with_its_finished_trials(tmp_path: Path) -> None:
    import optuna

    journal = tmp_path / "study.journal"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(journal)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "FIRST-DONE"
        storage = tuner.open_storage(str(journal), "interpret")
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until the hanging trial is running
            (name,) = optuna.study.get_all_study_names(storage)
            study = optuna.load_study(study_name=name, storage=storage)
            if any(t.state == optuna.trial.TrialState.RUNNING and "pid" in t.user_attrs for t in study.get_trials()):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    before = {t.number: t.params for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(before) == 2

    space = {"block_n": [16, 32, 64], "num_warps": [1, 4], "num_stages": [2], "split_size": [0]}
    codegen.template_hash.cache_clear()  # name the study after the templates on disk, as the child did
    _, (res,) = tuner.tune([WORKLOAD], G.INTERPRETER, _options(tmp_path, trials=1, space=space))
    study = optuna.load_study(study_name=res.study_name, storage=storage)
    trials = {t.number: t for t in study.get_trials()}
    assert {n: trials[n].params for n in before} == before  # finished trials survived the kill
    dead = [t for t in trials.values() if t.state == optuna.trial.TrialState.FAIL]
    assert len(dead) == 1 and dead[0].user_attrs["reason"].startswith("worker died")
    assert not [t for t in trials.values() if t.state == optuna.trial.TrialState.RUNNING]
    assert res.trials == 4  # 2 from the first run, the killed one (failed), 1 now: its retry
    (retry,) = [t for t in trials.values() if t.user_attrs.get("retry_of") == dead[0].number]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == dead[0].params


def test_cli_refuses_a_gpu_mismatch(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # pretend we are on a GPU machine
    h100 = G.GpuInfo(key="h100", name="NVIDIA H100 80GB HBM3", sm_count=132, capability="9.0")
    monkeypatch.setattr(G, "cuda_gpu", lambda index=None: h100)
    assert cli_tune.main(["tune", "--gpu", "a100", "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert "does not match the detected GPU" in err and "--force-gpu" in err
    assert cli_tune.resolve_gpu("a100", False, True) == (h100, "a100")
    assert cli_tune.resolve_gpu("h100", False, False) == (h100, None)
    monkeypatch.setattr(G, "cuda_gpu", lambda index=None: None)
    assert cli_tune.main(["tune", "--gpu", "h100"]) == 2
    assert "no CUDA GPU detected" in (err := capsys.readouterr().err) and "--interpret" in err


@interp_only
def test_cli_interpret_run_writes_outside_tuned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PAGEGEN_CACHE_DIR", str(tmp_path / "cache"))
    assert cli_tune.default_out(G.INTERPRET_KEY) == tmp_path / "cache" / "tuned" / "interpret.yaml"
    assert cli_tune.main(["tune", "--interpret", "--gpu", "h100"]) == 2
    out = tmp_path / "t.yaml"
    argv = ["tune", "--interpret", "--buckets", "1x16", "--trials", "1", "--no-warm-start", "--storage",
            str(tmp_path / "j.journal"), "--out", str(out), "--quiet"]
    assert cli_tune.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli_tune.main(["check", str(out), "--gpu", "interpret"]) == 0


def test_warm_start_uses_nearest_tuned_spec() -> None:
    near = KernelSpec("decode", head_dim=128, block_size=16, group_size=4)
    far = KernelSpec("decode", head_dim=64, block_size=16, group_size=1)
    c_near, c_far = Config(block_n=32, num_warps=8, num_stages=3, split_size=512), Config(block_n=16, num_warps=1)
    entries = {}
    for spec, cfg in ((near, c_near), (far, c_far)):
        e = T.Entry(spec=spec, kernel_hash="0" * 16, buckets=[T.BucketResult((1, 64), cfg, 1.0)], trials=1,
                    tuned_at=T.now_iso())
        entries[e.key] = e
    tab = T.Table("h100", "x", 132, "9.0", entries=entries, toolchain={}, tuned_at=T.now_iso())
    target = Workload(KernelSpec("decode", head_dim=128, block_size=16, group_size=8), 1, (Bucket(1, 32768),))
    cands = tuner.warm_start_configs(target, [tab], 132, tuner.search_space(target.spec))
    assert c_near in cands and c_far not in cands
    assert cands[0].split_size == 0 and any(c.split_size for c in cands[1:])  # default, then heuristic split


def test_objective_and_helpers() -> None:
    bs = (Bucket(1, 10), Bucket(2, 10, weight=3.0))
    assert tuner.objective_value({"1x10": 10.0, "2x10": 10.0}, bs) == pytest.approx(10.0)
    assert tuner.objective_value({"1x10": 1.0, "2x10": 16.0}, bs) == pytest.approx(8.0)
    assert parse_variant_key("decode_bf16_hd128_bs16_nhd_g4") == KernelSpec("decode", 128, 16, group_size=4)
    with pytest.raises(ValueError, match="not a variant key"):
        parse_variant_key("decode_hd128")
    assert json.loads(json.dumps(tuner.search_space(INTERPRET_SPEC)))["split_size"][0] == 0


@interp_only
def test_extend_study_reports_tflops(tmp_path: Path) -> None:
    spec = KernelSpec("extend", head_dim=64, block_size=16, group_size=2)
    w = Workload(spec, 1, (Bucket(4, 20),))
    space = {"block_m": [16], "block_n": [16, 32], "num_warps": [4], "num_stages": [1]}
    table, (res,) = tuner.tune([w], G.INTERPRETER, _options(tmp_path, trials=2, space=space))
    assert res.trials == 2 and res.failed == 0, res.failures
    (b,) = table.entries[spec.variant_key()].buckets
    assert b.shape == (4, 20) and b.gbps is None and b.tflops is not None
    assert tuner.extend_layout(Bucket(4096, 1024)) == (4, 1024, 1024)


@pytest.mark.gpu
def test_gpu_tune_smoke(tmp_path: Path) -> None:
    """On a real GPU: a 3-trial study of the reference spec on two small buckets writes a valid table
    with real timings, and the dispatcher then launches its winner."""
    from pagegen.timing import bench, copy_bandwidth

    gpu = G.cuda_gpu()
    spec = KernelSpec("decode", head_dim=128, block_size=16, group_size=4)
    w = Workload(spec, 8, (Bucket(1, 4096), Bucket(32, 1024)))
    space = {"block_n": [32, 64], "num_warps": [4], "num_stages": [2], "split_size": [0, 512]}
    table, (res,) = tuner.tune([w], gpu, _options(tmp_path, trials=3, space=space, reps=10))
    assert res.failed == 0, res.failures
    path = T.save(table, tmp_path / f"{gpu.key}.yaml")
    entry = T.load(path).entries[spec.variant_key()]
    assert all(b.latency_us > 1 and b.gbps > 1 for b in entry.buckets)
    dispatch.use_table(path)
    assert dispatch.explain(spec, 1, 4096, 8)[1].endswith("bucket 1x4096")
    assert copy_bandwidth() > 100  # GB/s
    t = bench(lambda i: torch.empty(1, device="cuda").zero_(), reps=5, graph=True)
    assert t.meaningful and t.method == "cuda-graph" and t.median_us > 0


def test_parse_space_and_study_names() -> None:
    space = tuner.parse_space("block_n=64,32; split_size=0,512")
    assert space["block_n"] == [32, 64] and space["split_size"] == [0, 512]
    assert space["num_warps"] == list(tuner.search_space(INTERPRET_SPEC)["num_warps"])
    for bad in ("block_q=1", "block_n=48", "block_n=x", "num_stages=9"):
        with pytest.raises(ValueError, match="--space"):
            tuner.parse_space(bad)
    # opt-in values: legal in a Config and in --space, absent from the default search (studies keep spaces)
    assert tuner.parse_space("num_stages=5,6,8")["num_stages"] == [5, 6, 8]
    assert max(tuner.search_space(INTERPRET_SPEC)["num_stages"]) == 5
    assert Config.from_dict({"num_stages": 8}).num_stages == 8
    full = tuner.study_name(WORKLOAD, "h100", None)
    assert full.startswith(f"pagegen-h100:{INTERPRET_SPEC.variant_key()}:t")
    assert tuner.study_name(WORKLOAD, "h100", "ci", space).startswith("ci:") and ":s" in tuner.study_name(
        WORKLOAD, "h100", None, space)
    wrapped = RuntimeError("interpreter")
    wrapped.__cause__ = tuner.TrialTimeout("timeout after 3 s")
    assert tuner.reason_of(wrapped) == "timeout after 3 s"


RDB_CHILD = textwrap.dedent("""
    import sys, time
    from pagegen import tuner
    from pagegen import gpu as G
    from pagegen.workloads import INTERPRET_SPEC, Bucket, Workload
    class Hang(tuner.DecodeRunner):
        def launch(self, cfg, x):
            time.sleep(3600)
    w = Workload(INTERPRET_SPEC, 2, (Bucket(1, 24), Bucket(2, 40)))
    space = {"block_n": [16, 32, 64], "num_warps": [4], "num_stages": [2], "split_size": [0]}
    opts = tuner.TuneOptions(trials=1, sampler="grid", storage=sys.argv[1], space=space, progress=None,
                             trial_timeout_s=0, heartbeat_s=1, warm_start=False, runners={"decode": Hang})
    tuner.tune([w], G.INTERPRETER, opts)
""")


@interp_only
def test_rdb_heartbeat_fails_and_retries_a_killed_workers_trial(tmp_path: Path) -> None:
    """RDB storage (SQLite here, PostgreSQL in CI): a worker killed mid-trial stops sending
    heartbeats; the next worker marks its trial failed and runs the same config again."""
    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RDB_CHILD, url], env=env)
    storage = tuner.open_storage(url, "interpret", heartbeat_s=1)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            names = optuna.study.get_all_study_names(storage)
            # "pid" is set inside the objective, i.e. after Optuna's heartbeat thread started
            if names and any(t.state == optuna.trial.TrialState.RUNNING and "pid" in t.user_attrs
                             for t in optuna.load_study(study_name=names[0], storage=storage).get_trials()):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    time.sleep(3.5)  # past the grace period (2 heartbeats; SQLite stores whole seconds)
    _, (res,) = tuner.tune([WORKLOAD], G.INTERPRETER,
                           _options(tmp_path, storage=url, trials=1, heartbeat_s=1, warm_start=False))
    trials = optuna.load_study(study_name=res.study_name, storage=storage).get_trials()
    dead, retry = trials[0], trials[1]
    assert dead.state == optuna.trial.TrialState.FAIL
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == dead.params
    # retried by Optuna's heartbeat callback, or (if the heartbeat was not stale yet) by the
    # tuner's own reaper, which sees that the worker's process on this host is gone
    assert dead.number in (retry.system_attrs.get("failed_trial"), retry.user_attrs.get("retry_of"))


def test_worker_command_lines_hide_storage_passwords() -> None:
    from pagegen.cli_tune import redact_url

    shown = redact_url("--storage postgresql+psycopg2://pagegen:hunter2@127.0.0.1:5432/db --trials 3")
    assert "hunter2" not in shown and "pagegen:***@127.0.0.1:5432/db" in shown
    assert redact_url("--storage /tmp/h100.journal") == "--storage /tmp/h100.journal"


def test_ragged_bucket_is_tuned_on_ragged_lengths_and_recorded(tmp_path: Path) -> None:
    """A ragged decode bucket ("64x8192r") times a batch of seeded lengths in [ctx // 128, ctx],
    is a different study from the uniform one, and the table records it."""
    from pagegen.workloads import parse_bucket

    b = parse_bucket("64x8192r")
    assert b.ragged and b.name == "64x8192r" and b.shape == (64, 8192)
    lens = b.lengths()
    assert len(lens) == 64 and min(lens) >= 64 and max(lens) <= 8192 and len(set(lens)) > 32
    assert lens == Bucket(64, 8192, ragged=True).lengths()  # same batch for every trial and worker
    assert parse_bucket({"batch": 4, "ctx": 100, "ragged": True}).ragged
    assert Bucket(64, 8192).lengths() == [8192] * 64
    spec = INTERPRET_SPEC
    uniform = Workload(spec, 2, (Bucket(3, 70),))
    ragged = Workload(spec, 2, (Bucket(3, 70, ragged=True),))
    assert tuner.study_name(uniform, "interpret", None) != tuner.study_name(ragged, "interpret", None)
    with pytest.raises(ValueError, match="decode only"):
        Workload(KernelSpec("extend", head_dim=64, block_size=16), 2, (Bucket(8, 64, ragged=True),))
    # the table keeps the flag through a save/load round trip
    entry = T.Entry(spec=spec, kernel_hash="x", buckets=[
        T.BucketResult(shape=(3, 70), config=Config(block_n=16), latency_us=1.0, ragged=True)],
        trials=1, tuned_at=T.now_iso(), kv_heads=2)
    table = T.Table(gpu_key="interpret", gpu_name="cpu", sm_count=4, capability="0.0", toolchain={},
                    tuned_at=T.now_iso(), interpret=True, entries={entry.key: entry})
    T.save(table, tmp_path / "t.yaml")
    assert "ragged: true" in (tmp_path / "t.yaml").read_text()
    assert T.load(tmp_path / "t.yaml").entries[entry.key].buckets[0].ragged


@interp_only
def test_cli_warm_from_seeds_studies_from_another_gpus_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """--warm-from TABLE: another card's winners reach the tuner's warm start; a bad file is refused."""
    monkeypatch.setenv("PAGEGEN_CACHE_DIR", str(tmp_path / "cache"))
    sibling = T.Table("h100", "NVIDIA H100", 132, "9.0", entries={}, toolchain={}, tuned_at=T.now_iso())
    src = T.save(sibling, tmp_path / "h100.yaml")
    seen: list = []

    def fake_tune(workloads, gpu, options, forced_key=None):
        seen.extend(options.warm_tables)
        return None, []

    monkeypatch.setattr(tuner, "tune", fake_tune)
    base = ["tune", "--interpret", "--trials", "1", "--storage", str(tmp_path / "j.journal"), "--out",
            str(tmp_path / "t.yaml"), "--quiet"]
    assert cli_tune.main([*base, "--warm-from", str(src)]) == 1  # the fake tunes nothing
    assert [t.gpu_key for t in seen] == ["h100"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ngpu: [\n")
    assert cli_tune.main([*base, "--warm-from", str(bad)]) == 2
    assert "--warm-from" in capsys.readouterr().err


def test_interpreter_problem_names_the_broken_combination(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """Triton 3.6's interpreter with NumPy >= 2.4 cannot run any kernel: say so up front."""
    import numpy
    import triton

    from pagegen._checks import interpreter_problem

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # check in this process (patched versions), not a re-exec
    msg = interpreter_problem()
    assert msg and "numpy<2.4" in msg and "3.6.0" in msg
    assert cli_tune.main(["tune", "--interpret", "--trials", "1"]) == 2
    assert "numpy<2.4" in capsys.readouterr().err
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert interpreter_problem() is None
    monkeypatch.setattr(triton, "__version__", "3.9.0+git1234")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert interpreter_problem() is None
