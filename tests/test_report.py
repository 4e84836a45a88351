"""`pagegen report`: rendered on the CPU from a small interpreter-style study and table, as a user runs it.

The study is written with Optuna directly, the way the tuner writes it (study name, `bucket_us` and
`reason` trial attributes, the heuristic's config among the trials), so no kernel runs here.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import importlib.util
import random
import re

import pytest

pytest.importorskip("matplotlib")

import optuna  # noqa: E402
from optuna.distributions import CategoricalDistribution  # noqa: E402
from optuna.storages.journal import JournalFileBackend, JournalStorage  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from pagegen import codegen  # noqa: E402
from pagegen import table as T  # noqa: E402
from pagegen.cli import main  # noqa: E402
from pagegen.dispatch import heuristic_config  # noqa: E402
from pagegen.gpu import INTERPRET_KEY, INTERPRET_SMS  # noqa: E402
from pagegen.spec import Config, KernelSpec  # noqa: E402
from pagegen.tuner import search_space  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPEC = KernelSpec("decode", head_dim=64, block_size=16, layout="NHD", dtype="fp16", group_size=2)
KV_HEADS = 2
BUCKETS = [((2, 256), False), ((4, 512), False), ((4, 512), True)]  # (shape, ragged)
CONFIGS = [Config(block_n=b, num_warps=w, num_stages=s, split_size=sp)
           for b in (16, 32, 64) for w in (1, 4) for s in (1, 2) for sp in (0, 256)]


def _name(shape, ragged) -> str:
    return f"{shape[0]}x{shape[1]}" + ("r" if ragged else "")


def _make(tmp_path, copy_gbps=950.0, held_out=True):
    """A journal with one study of SPEC (complete, failed and pruned trials) and the table it tuned."""
    rng = random.Random(7)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    journal = tmp_path / "interp.journal"
    storage = JournalStorage(JournalFileBackend(str(journal)))
    th = codegen.kernel_hash(SPEC)
    study = optuna.create_study(storage=storage, study_name=f"pagegen-{INTERPRET_KEY}:{SPEC.variant_key()}:t{th[:8]}:"
                                                            "b0a1b2c", direction="minimize")
    study.set_user_attr("gpu", INTERPRET_KEY)
    space = search_space(SPEC)
    dists = {k: CategoricalDistribution(v) for k, v in space.items()}
    heur = {_name(s, r): heuristic_config(SPEC, s[0], s[1], KV_HEADS, INTERPRET_SMS, r) for s, r in BUCKETS}
    cands = list(dict.fromkeys([*heur.values(), *rng.sample(CONFIGS, 6)]))
    t0 = dt.datetime(2026, 12, 1, 12, 0, 0)
    step = dt.timedelta(seconds=30)  # every finished trial took 30 s of GPU time

    def add(n: int, cfg: Config, state: TrialState, value: float | None, attrs: dict) -> None:
        study.add_trial(FrozenTrial(number=n, state=state, value=value, datetime_start=t0 + 2 * n * step,
                                    datetime_complete=t0 + (2 * n + 1) * step,
                                    params={k: getattr(cfg, k) for k in space}, distributions=dists,
                                    user_attrs=attrs, system_attrs={}, intermediate_values={}, trial_id=n))

    times: dict[Config, dict[str, float]] = {}
    for i, cfg in enumerate(cands):
        times[cfg] = {_name(s, r): rng.uniform(20.0, 400.0) for s, r in BUCKETS}
        add(i, cfg, TrialState.COMPLETE, sum(times[cfg].values()) / len(BUCKETS), {"bucket_us": times[cfg]})
    for j, reason in enumerate(("compile error: CompilationError: boom", "out of resources: shared memory 300000",
                                "compile error: CompilationError: again")):
        add(len(cands) + j, CONFIGS[j], TrialState.FAIL, None, {"reason": reason})
    buckets = []
    for shape, ragged in BUCKETS:
        n = _name(shape, ragged)
        us, cfg = min(((times[c][n], c) for c in cands), key=lambda x: x[0])
        nbytes = shape[0] * shape[1] * KV_HEADS * SPEC.head_dim * 2 * 2
        buckets.append(T.BucketResult(shape=shape, config=cfg, latency_us=round(us, 3),
                                      gbps=round(nbytes / (us * 1e-6) / 1e9, 1), trials=len(cands), ragged=ragged))
    entry = T.Entry(spec=SPEC, kernel_hash=th, buckets=buckets, trials=len(cands) + 3, failed=3,
                    tuned_at="2026-12-01T12:00:00Z", kv_heads=KV_HEADS, models=["tiny"])
    stale_spec = KernelSpec("decode", head_dim=128, block_size=16, layout="NHD", dtype="fp16", group_size=4)
    stale = T.Entry(spec=stale_spec, kernel_hash="0000000000000000", trials=1, tuned_at="2026-11-01T00:00:00Z",
                    buckets=[T.BucketResult((1, 128), Config(block_n=32), 55.5, gbps=1.2, trials=1)], kv_heads=1)
    table = T.Table(gpu_key=INTERPRET_KEY, gpu_name="Triton interpreter", sm_count=INTERPRET_SMS, capability="0.0",
                    entries={entry.key: entry, stale.key: stale}, toolchain={"triton": "3.9"},
                    tuned_at="2026-12-01T12:00:00Z", interpret=True, copy_gbps=copy_gbps)
    text = T.dumps(table)
    if held_out:  # the tuner's held-out records (another branch adds them to table.py): appended raw here
        text = text.replace(f"  {entry.key}:\n", f"  {entry.key}:\n    held_out:\n"
                            "    - {shape: [3, 384], ragged: false, table_us: 101.5, heuristic_us: 99.25}\n"
                            "    - {shape: [3, 384], ragged: true, table_us: 80.0, heuristic_us: 96.0}\n", 1)
    path = tmp_path / "interp.yaml"
    path.write_text(text)
    return path, journal, table, entry, heur, times


def test_report_renders_images_and_numbers(tmp_path, capsys):
    path, journal, _, entry, heur, times = _make(tmp_path)
    out = tmp_path / "r"
    assert main(["report", "--table", str(path), "--storage", str(journal), "--out", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    assert {"roofline_decode.png", "gain.png", "held_out.png"} <= names
    assert any(n.endswith("_history.png") for n in names) and any(n.endswith("_importance.png") for n in names)
    page = (out / "report.html").read_text()
    for p in pngs:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
        assert f'href="{p.name}"' in page
        assert base64.b64encode(data).decode() in page  # embedded: the page stands alone
    for b in entry.buckets:  # the table's numbers
        row = re.search(rf"<tr><td>{b.name}</td>(.*?)</tr>", page)
        assert row, b.name
        assert f"<td>{b.latency_us:.1f}</td>" in row.group(1)
        assert f"<td>{b.gbps:.1f}</td>" in row.group(1)
        assert f"<td>{100 * b.gbps / 950.0:.0f}%</td>" in row.group(1)
        h_us = times[heur[b.name]][b.name]  # the heuristic's time, read from the study
        assert f"<td>{h_us:.1f}</td>" in row.group(1)
        assert f"<td>{h_us / b.latency_us:.2f}x</td>" in row.group(1)
    assert "950 GB/s (recorded in the table)" in page
    assert "compile error</td><td>2</td>" in page and "out of resources</td><td>1</td>" in page
    assert "<td>101.5</td><td>99.2</td><td>1.023</td>" in page or "<td>101.5</td><td>99.3</td>" in page
    assert "slowest held-out shape: 1.023x" in page
    assert "interpreter run" in page
    minutes = 0.5 * entry.trials  # 30 s per finished trial
    assert f"GPU time of finished trials: {minutes:.1f} min" in page
    assert "Stale entries" in page and "0000000000000000" in page
    assert "Held-out check: not recorded" in page  # the stale entry has none


def test_report_default_journal_and_overrides(tmp_path, monkeypatch, capsys):
    """--gpu finds pagegen tune's default journal; --copy-gbps overrides the table's ceiling."""
    path, journal, *_ = _make(tmp_path, copy_gbps=None, held_out=False)
    monkeypatch.setenv("PAGEGEN_CACHE_DIR", str(tmp_path / "cache"))
    from pagegen.report_data import default_storage

    dest = default_storage(INTERPRET_KEY)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(journal.read_bytes())
    out = tmp_path / "r"
    assert main(["report", "--gpu", INTERPRET_KEY, "--table", str(path), "--copy-gbps", "1234", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "1234 GB/s (given with --copy-gbps)" in page
    assert f"read from {dest}" in page
    assert "Held-out check: not recorded" in page and not (out / "held_out.png").exists()


def test_compare_two_tables(tmp_path, capsys):
    a, _, table, entry, *_ = _make(tmp_path)
    e2 = dataclasses.replace(entry, buckets=[dataclasses.replace(b, latency_us=b.latency_us * 2, gbps=b.gbps / 2)
                                             for b in entry.buckets])
    slower = dataclasses.replace(table, gpu_key="other", gpu_name="Other card", entries={entry.key: e2})
    b = tmp_path / "b.yaml"
    T.save(slower, b)
    out = tmp_path / "c"
    assert main(["report", "--compare", str(a), str(b), "--out", str(out)]) == 0
    assert (out / "compare.png").read_bytes().startswith(PNG_MAGIC)
    page = (out / "compare.html").read_text()
    for bk in entry.buckets:
        assert f"<td>{bk.name}</td><td>{bk.latency_us:.1f}</td><td>{bk.latency_us * 2:.1f}</td>" in page
    assert "0.50x" in page


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pagegen report: ")
    return lines[0]


def test_bad_inputs_give_one_line(tmp_path, capsys):
    path, journal, *_ = _make(tmp_path)
    bad = tmp_path / "bad.journal"
    bad.write_text('{"op_code": 0, "worker_id": "x"\nnot json at all\n')
    assert main(["report", "--table", str(path), "--storage", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read the study storage" in _one_error_line(capsys)

    empty = tmp_path / "empty.journal"
    empty.write_text("")
    assert main(["report", "--table", str(path), "--storage", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no finished trial" in _one_error_line(capsys)

    assert main(["report", "--table", str(path), "--storage", str(tmp_path / "nope.journal")]) == 2
    assert "does not exist" in _one_error_line(capsys)

    broken = tmp_path / "broken.yaml"
    broken.write_text(path.read_text().replace("latency_us: ", "latency_us: -", 1))
    assert main(["report", "--table", str(broken), "--storage", str(journal), "--out", str(tmp_path / "o")]) == 2
    assert "latency_us" in _one_error_line(capsys)

    held = tmp_path / "held.yaml"
    held.write_text(path.read_text().replace("table_us: 101.5", "table_us: oops", 1))
    assert main(["report", "--table", str(held), "--out", str(tmp_path / "o")]) == 2
    assert "held_out[0]" in _one_error_line(capsys)

    assert main(["report", "--gpu", "h100", "--table", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "not of --gpu h100" in _one_error_line(capsys)


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    path, *_ = _make(tmp_path, held_out=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["report", "--table", str(path), "--out", str(tmp_path / "o")]) == 2
    assert _one_error_line(capsys) == 'pagegen report: matplotlib is not installed; pip install "pagegen[report]"'
