"""pagegen.table: schema validation, safe loading, atomic save, merge rules; `pagegen check/merge`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pagegen import cli_tune, codegen
from pagegen import table as T
from pagegen.spec import Config, KernelSpec

SPEC = KernelSpec("decode", head_dim=128, block_size=16, group_size=4)
SPEC2 = KernelSpec("decode", head_dim=64, block_size=16, group_size=1)


def bucket(shape, us, block_n=64, split=0) -> T.BucketResult:
    return T.BucketResult(shape=shape, config=Config(block_n=block_n, split_size=split), latency_us=us,
                          gbps=100.0, trials=3)


def entry(spec=SPEC, buckets=None, tuned_at="2026-01-01T00:00:00Z", thash=None) -> T.Entry:
    return T.Entry(spec=spec, kernel_hash=thash or codegen.kernel_hash(spec),
                   buckets=buckets or [bucket((1, 2048), 20.0), bucket((32, 8192), 300.0)], trials=10, failed=1,
                   tuned_at=tuned_at, kv_heads=8, models=["Llama-3-8B"])


def table(key="h100", entries=(), tuned_at="2026-01-01T00:00:00Z") -> T.Table:
    return T.Table(gpu_key=key, gpu_name=f"NVIDIA {key.upper()}", sm_count=132, capability="9.0",
                   entries={e.key: e for e in entries}, toolchain={"torch": "2.11", "triton": "3.6"},
                   tuned_at=tuned_at)


def test_roundtrip(tmp_path: Path) -> None:
    t = table(entries=[entry(), entry(SPEC2)])
    p = T.save(t, tmp_path / "h100.yaml")
    back = T.load(p)
    assert T.to_dict(back) == T.to_dict(t)
    assert back.entries[SPEC.variant_key()].buckets[0].config == Config(block_n=64)
    assert [x.name for x in tmp_path.iterdir()] == ["h100.yaml"]  # no temp file left behind


def _dump(t: T.Table) -> dict:
    return T.to_dict(t)


def test_malformed_yaml() -> None:
    with pytest.raises(T.TableError, match="not valid YAML"):
        T.loads("version: 1\ngpu: {key: h100\n  entries: [", "bad.yaml")
    with pytest.raises(T.TableError, match="empty"):
        T.loads("", "empty.yaml")
    with pytest.raises(T.TableError, match="expected a mapping"):
        T.loads("- 1\n- 2\n", "list.yaml")


def test_python_tags_rejected_without_executing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = f"!!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(T.TableError):
        T.loads(evil, "evil.yaml")
    doc = yaml.safe_dump(_dump(table(entries=[entry()])))
    doc = doc.replace(f"version: {T.SCHEMA_VERSION}", f"version: !!python/object/apply:os.system ['touch {marker}']")
    with pytest.raises(T.TableError, match="forbidden tag|not valid YAML"):
        T.loads(doc, "evil2.yaml")
    with pytest.raises(T.TableError):
        T.loads("version: 1\ngpu: !!python/object:pagegen.spec.Config {block_n: 64}\n", "evil3.yaml")
    assert not marker.exists()


def test_unknown_version() -> None:
    d = _dump(table(entries=[entry()]))
    d["version"] = 99
    with pytest.raises(T.TableError, match="unknown table version 99"):
        T.from_dict(d, "v99.yaml")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (("gpu", "key"), "missing field 'key'"),
        (("tuned_at",), "missing field 'tuned_at'"),
        (("entries",), "missing field 'entries'"),
        (("entries", SPEC.variant_key(), "kernel_hash"), "exactly one of kernel_hash"),
        (("entries", SPEC.variant_key(), "buckets", 0, "latency_us"), "missing field 'latency_us'"),
        (("entries", SPEC.variant_key(), "buckets", 0, "config"), "missing field 'config'"),
    ],
)
def test_missing_fields(path: tuple, message: str) -> None:
    d = _dump(table(entries=[entry()]))
    node = d
    for k in path[:-1]:
        node = node[k]
    del node[path[-1]]
    with pytest.raises(T.TableError, match=message):
        T.from_dict(d, "t.yaml")


def test_bad_values() -> None:
    d = _dump(table(entries=[entry()]))
    e = d["entries"][SPEC.variant_key()]
    e["buckets"][0]["config"]["block_n"] = 48
    with pytest.raises(T.TableError, match="block_n=48"):
        T.from_dict(d, "t.yaml")
    d = _dump(table(entries=[entry()]))
    d["entries"]["decode_bf16_hd64_bs16_nhd_g1"] = d["entries"].pop(SPEC.variant_key())
    with pytest.raises(T.TableError, match="does not match its spec"):
        T.from_dict(d, "t.yaml")
    d = _dump(table(entries=[entry()]))
    d["entries"][SPEC.variant_key()]["buckets"][0]["latency_us"] = -1
    with pytest.raises(T.TableError, match="latency_us"):
        T.from_dict(d, "t.yaml")
    d = _dump(table(entries=[entry()]))
    d["gpu"]["key"] = "H100 80GB"
    with pytest.raises(T.TableError, match="not a gpu key"):
        T.from_dict(d, "t.yaml")


def test_merge_faster_wins_per_bucket_and_ties_go_newer() -> None:
    a = table(entries=[entry(buckets=[bucket((1, 2048), 20.0, 32), bucket((32, 8192), 300.0, 32)])])
    b = table(entries=[entry(buckets=[bucket((1, 2048), 25.0, 64), bucket((32, 8192), 300.0, 64),
                                      bucket((8, 4096), 50.0, 64)], tuned_at="2026-02-01T00:00:00Z")],
              tuned_at="2026-02-01T00:00:00Z")
    m = T.merge(a, b)
    got = {x.shape: (x.latency_us, x.config.block_n) for x in m.entries[SPEC.variant_key()].buckets}
    assert got == {(1, 2048): (20.0, 32), (32, 8192): (300.0, 64), (8, 4096): (50.0, 64)}
    assert m.tuned_at == "2026-02-01T00:00:00Z"


def test_merge_keeps_entries_of_both_and_stale_loses() -> None:
    fresh = entry(buckets=[bucket((1, 2048), 30.0)])
    stale = entry(buckets=[bucket((1, 2048), 5.0)], thash="0" * 16, tuned_at="2026-03-01T00:00:00Z")
    m = T.merge(table(entries=[fresh]), table(entries=[stale, entry(SPEC2)]))
    assert set(m.entries) == {SPEC.variant_key(), SPEC2.variant_key()}
    assert m.entries[SPEC.variant_key()].buckets[0].latency_us == 30.0  # the fast but stale entry lost


def test_merge_refuses_other_gpu() -> None:
    with pytest.raises(T.TableError, match="different GPUs"):
        T.merge(table("h100", [entry()]), table("a100", [entry()]))


def test_merge_into_creates_and_keeps(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "h100.yaml"
    T.merge_into(p, table(entries=[entry()]))
    T.merge_into(p, table(entries=[entry(SPEC2)]))
    assert set(T.load(p).entries) == {SPEC.variant_key(), SPEC2.variant_key()}


def test_cli_check_and_merge(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = T.save(table("h100", [entry()]), tmp_path / "h100.yaml")
    other = T.save(table("h100", [entry(SPEC2)], tuned_at="2026-05-01T00:00:00Z"), tmp_path / "h100b.yaml")
    a100 = T.save(table("a100", [entry()]), tmp_path / "a100.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 7\n")
    assert cli_tune.main(["check", str(good), str(a100)]) == 0
    assert cli_tune.main(["check", str(good), str(bad)]) == 1
    assert "INVALID" in capsys.readouterr().out
    assert cli_tune.main(["check", "--gpu", "h100", str(a100)]) == 1
    out = tmp_path / "merged.yaml"
    assert cli_tune.main(["merge", str(good), str(other), "-o", str(out)]) == 0
    assert len(T.load(out).entries) == 2
    assert cli_tune.main(["merge", str(good), str(a100), "-o", str(tmp_path / "x.yaml")]) == 2
    assert "different GPUs" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()
    assert cli_tune.main(["show", "--table", str(out)]) == 0
    shown = capsys.readouterr().out
    assert SPEC.variant_key() in shown and "1x2048" in shown


def test_ragged_and_uniform_buckets_of_one_shape_coexist(tmp_path: Path) -> None:
    """64x8192 and 64x8192r are different buckets: both survive save/load and merge; a real
    duplicate is refused."""
    uni, rag = bucket((64, 8192), 400.0), bucket((64, 8192), 380.0, split=2048)
    rag.ragged = True
    t = table(entries=[entry(buckets=[rag, uni])])
    back = T.load(T.save(t, tmp_path / "h100.yaml"))
    assert [b.name for b in back.entries[SPEC.variant_key()].buckets] == ["64x8192", "64x8192r"]
    faster_uni = bucket((64, 8192), 390.0, block_n=32)
    merged = T.merge(t, table(entries=[entry(buckets=[faster_uni], tuned_at="2026-02-01T00:00:00Z")]))
    got = {b.name: b.config for b in merged.entries[SPEC.variant_key()].buckets}
    assert got == {"64x8192": Config(block_n=32), "64x8192r": Config(block_n=64, split_size=2048)}
    doc = _dump(table(entries=[entry(buckets=[uni, bucket((64, 8192), 1.0)])]))
    with pytest.raises(T.TableError, match="duplicate buckets"):
        T.loads(yaml.safe_dump(doc), "dup.yaml")


def test_shipped_tables_and_plain_yaml_features_still_load(tmp_path: Path) -> None:
    """The strict loader refuses only what is hostile: shipped tables, a few anchors/aliases and a
    merge key still load."""
    for shipped in (Path(__file__).resolve().parents[1] / "tuned").glob("*.yaml"):
        T.load(shipped)
    text = T.dumps(table(entries=[entry()]))
    text = text.replace("toolchain: {torch: '2.11', triton: '3.6'}", "toolchain: &tc {torch: '2.11', triton: '3.6'}")
    assert "&tc" in text
    text += "x_defaults: &d {a: 1}\nx_more: {<<: *d, b: 2}\nx_again: *tc\n"
    p = tmp_path / "h100.yaml"
    p.write_text(text)
    assert T.load(p).toolchain == {"torch": "2.11", "triton": "3.6"}


def test_table_errors_stay_one_short_line(tmp_path: Path) -> None:
    d = _dump(table(entries=[entry()]))
    d["gpu"]["name"] = ["x" * 10_000] * 100  # a huge wrong value is shown abbreviated
    with pytest.raises(T.TableError, match=r"gpu\.name: expected a string") as info:
        T.from_dict(d, "t.yaml")
    assert len(str(info.value)) < 300
    p = tmp_path / "dir.yaml"
    p.mkdir()
    with pytest.raises(T.TableError, match="not a regular file"):
        T.load(p)


def _paths(node, prefix=()):
    """Every (path, value) in a nested dict/list document."""
    yield prefix, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                               max_size=2))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_wrong_value_anywhere_is_a_table_error(data) -> None:
    """Replace or delete one field anywhere in a valid table: loading gives a Table or a TableError,
    never another exception (the dispatcher's fallback catches TableError only)."""
    doc = _dump(table(entries=[entry(), entry(SPEC2)]))
    paths = [p for p, _ in _paths(doc) if p]
    path = data.draw(st.sampled_from(paths))
    node = doc
    for k in path[:-1]:
        node = node[k]
    if data.draw(st.booleans()) and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = data.draw(HOSTILE)
    try:
        T.loads(yaml.safe_dump(doc), "fuzz.yaml")
    except T.TableError as exc:
        assert "fuzz.yaml" in str(exc) and "\n" not in str(exc)


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_are_a_table_or_a_table_error(tmp_path_factory, blob: bytes) -> None:
    p = tmp_path_factory.mktemp("fuzz") / "t.yaml"
    p.write_bytes(blob)
    try:
        T.load(p)
    except T.TableError as exc:
        assert str(p) in str(exc)
