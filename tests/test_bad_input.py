"""Hostile and careless input (issue 14): the kernel cache, tuned tables, spec and config values, the
CLI and the allocator. Each test reproduces a finding that failed before the fix: a clear error (or
a warned fallback) and nothing wrong, ever."""

from __future__ import annotations

import importlib.util
import inspect
import os
import stat
import subprocess
import sys
import time
import warnings
from importlib import _bootstrap_external
from pathlib import Path

import pytest
import yaml

from pagegen import codegen, dispatch
from pagegen import gpu as G
from pagegen import table as T
from pagegen.allocator import AllocatorMisuseError, BlockPool
from pagegen.cli import main
from pagegen.sequences import SequenceManager
from pagegen.spec import Config, KernelSpec, enumerate_specs, illegal_reason

# -- 1. the kernel cache runs only what pagegen rendered -----------------------------------------
CHEAP = KernelSpec("copy_blocks", head_dim=64, block_size=8)  # any spec: nothing is launched here


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache root for this test, and no module already loaded in memory."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PAGEGEN_CACHE_DIR", str(root))
    monkeypatch.setattr(codegen, "_loaded", {})
    return root


def _plant_pyc(source_file: Path, payload: str) -> Path:
    """Write a .pyc of `payload` where the import system looks for `source_file`'s bytecode, stamped
    with the source's mtime and size, so an import would trust it over the source."""
    st = source_file.stat()
    code = compile(payload, str(source_file), "exec")
    pyc = Path(importlib.util.cache_from_source(str(source_file)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(bytes(_bootstrap_external._code_to_timestamp_pyc(code, st.st_mtime, st.st_size)))
    return pyc


def test_planted_pyc_next_to_a_cached_source_never_runs(fresh_cache, tmp_path):
    source = codegen.render(CHEAP)
    path = codegen.source_path(CHEAP, source)
    path.parent.mkdir(parents=True, mode=0o700)
    for d in (path.parent, path.parent.parent, fresh_cache):
        d.chmod(0o700)
    path.write_text(source)
    marker = tmp_path / "pwned"
    _plant_pyc(path, f"open({str(marker)!r}, 'w').write('foreign code ran')\n")
    mod = codegen.load(CHEAP)
    assert not marker.exists(), "a planted .pyc was executed"
    kernel = mod.copy_blocks_kernel
    assert inspect.getsource(kernel.fn) in source  # Triton reads back exactly the rendered text
    assert mod.__file__ == str(path)


def test_loading_writes_no_bytecode_and_creates_private_dirs(fresh_cache):
    mod = codegen.load(CHEAP)
    path = Path(mod.__file__)
    assert path.read_text() == codegen.render(CHEAP)
    assert not list(fresh_cache.rglob("__pycache__")) and not list(fresh_cache.rglob("*.pyc"))
    for d in (fresh_cache, fresh_cache / "kernels", path.parent):
        assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0, f"{d} is open to others: {d.stat().st_mode:o}"


@pytest.mark.parametrize("level", ["root", "kernels", "triton"])
@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_cache_dir_writable_by_others_is_refused(fresh_cache, level, mode):
    kernels = codegen.source_path(CHEAP, codegen.render(CHEAP)).parent
    kernels.mkdir(parents=True)
    target = {"root": fresh_cache, "kernels": fresh_cache / "kernels", "triton": kernels}[level]
    target.chmod(mode)
    with pytest.raises(codegen.CacheDirError, match=r"writable by .*chmod 700 .*PAGEGEN_CACHE_DIR"):
        codegen.load(CHEAP)
    assert not list(kernels.glob("*.py")), "wrote a kernel into a folder others can write"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="giving a folder to another user needs root (os.chown)")
@pytest.mark.parametrize("level", ["root", "kernels"])
def test_cache_dir_owned_by_someone_else_is_refused(fresh_cache, level):
    (fresh_cache / "kernels").mkdir(parents=True, mode=0o700)
    fresh_cache.chmod(0o700)
    target = fresh_cache if level == "root" else fresh_cache / "kernels"
    os.chown(target, 65534, 65534)  # nobody
    with pytest.raises(codegen.CacheDirError, match=r"owned by uid 65534.*PAGEGEN_CACHE_DIR"):
        codegen.load(CHEAP)


# -- 5. tuned tables: a TableError naming the file and the field, and a sticky warned fallback ---
SPEC = KernelSpec("decode", head_dim=64, block_size=16, group_size=2)
LIVE = (G.live_gpu() or G.INTERPRETER).key


def _good_doc() -> dict:
    e = T.Entry(spec=SPEC, kernel_hash=codegen.kernel_hash(SPEC), trials=3, tuned_at=T.now_iso(),
                buckets=[T.BucketResult((1, 2048), Config(block_n=16, num_warps=1, num_stages=1), 10.0)])
    return T.to_dict(T.Table(gpu_key=LIVE, gpu_name="test", sm_count=4, capability="0.0", entries={e.key: e},
                             toolchain={"triton": "3.9.0"}, tuned_at=T.now_iso(), interpret=True))


def _doc_with(path: tuple, value) -> str:
    d = _good_doc()
    node = d
    for k in path[:-1]:
        node = node[k if k != "ENTRY" else SPEC.variant_key()]
    node[path[-1]] = value
    return yaml.safe_dump(d, sort_keys=False)


def _laughs() -> str:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    return yaml.safe_dump(_good_doc(), sort_keys=False).replace("toolchain:", "toolchain_:", 1) + "\n".join(
        lines) + "\ntoolchain: {triton: *j}\n"


BAD_TABLES = {
    # name: (file bytes, what the message must name)
    "non_utf8": (yaml.safe_dump(_good_doc()).replace("name: test", "name: t\udcff").encode("utf-8", "surrogateescape"),
                 "UTF-8"),
    "deep_nesting": ((yaml.safe_dump(_good_doc()) + "deep: " + "[" * 20000 + "]" * 20000 + "\n").encode(),
                     "nest"),
    "head_dim_float": (_doc_with(("entries", "ENTRY", "spec", "head_dim"), 64.0).encode(), "head_dim"),
    "block_size_float": (_doc_with(("entries", "ENTRY", "spec", "block_size"), 16.0).encode(), "block_size"),
    "block_size_true": (_doc_with(("entries", "ENTRY", "spec", "block_size"), True).encode(), "block_size"),
    "version_true": (_doc_with(("version",), True).encode(), "version"),
    "version_float": (_doc_with(("version",), 1.0).encode(), "version"),
    "capability_list": (_doc_with(("gpu", "capability"), [1, 2]).encode(), "capability"),
    "toolchain_float": (_doc_with(("toolchain", "triton"), 3.10).encode(), "toolchain.triton"),
    "duplicate_key": ((yaml.safe_dump(_good_doc()) + "version: 1\n").encode(), "duplicate key 'version'"),
    "billion_laughs": (_laughs().encode(), "aliases"),
    "too_large": (yaml.safe_dump(_good_doc()).encode() + b"#" * (8 << 20), "byte limit"),  # over the cap
}


@pytest.fixture
def fresh_dispatcher():
    dispatch.use_table(None)
    yield
    dispatch.use_table(None)


@pytest.mark.parametrize("name", sorted(BAD_TABLES))
def test_bad_table_is_a_table_error_and_a_sticky_warned_fallback(tmp_path, fresh_dispatcher, name):
    data, names = BAD_TABLES[name]
    path = tmp_path / "h100.yaml"  # a name that does not repeat the field the message must name
    path.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(T.TableError) as info:
        T.load(path)
    assert time.perf_counter() - t0 < 10, "refusing a bad table took too long"
    msg = str(info.value)
    assert str(path) in msg and names in msg and "\n" not in msg, msg
    assert len(msg) < 1000, "the message of a hostile table must stay short"
    # the dispatcher: the first op call warns and uses the heuristic; later calls do the same silently
    expected = dispatch.select_config(SPEC, 1, 2048, 2)  # automatic lookup: no table for the interpreter
    dispatch.use_table(path)
    with pytest.warns(dispatch.TunedTableWarning, match="is invalid, using heuristic configs"):
        first = dispatch.select_config(SPEC, 1, 2048, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = [dispatch.select_config(SPEC, 1, 2048, 2) for _ in range(2)]
    assert first == expected and again == [expected, expected]


# -- 6. Config and KernelSpec values: exact ints from the legal sets -----------------------------
@pytest.mark.parametrize("kwargs", [dict(block_n=64.0), dict(num_warps=True), dict(split_size=False),
                                    dict(num_stages=2.0), dict(block_m=True)])
def test_config_refuses_floats_and_bools(kwargs):
    cfg = Config(**kwargs)
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{field}=.*expected int"):
        cfg.validate()
    assert illegal_reason(KernelSpec("decode", head_dim=128, block_size=16), cfg) is not None


@pytest.mark.parametrize("kwargs", [dict(head_dim=64.0), dict(block_size=16.0), dict(block_size=True),
                                    dict(kv_dtype=None)])
def test_kernel_spec_refuses_wrong_types(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        KernelSpec(**{"family": "decode", "head_dim": 64, "block_size": 16, **kwargs})


def test_specs_yaml_with_a_float_never_reaches_the_source(tmp_path):
    from pagegen import workloads as W

    p = tmp_path / "specs.yaml"
    p.write_text("specs:\n  - {family: decode, head_dim: 128, block_size: 16.0, group_size: 4, kv_heads: 8}\n")
    with pytest.raises(ValueError, match="block_size=16.0"):
        W.load_specs_yaml(p)


def test_from_key_inverts_variant_key_and_refuses_other_spellings():
    from pagegen.workloads import parse_variant_key

    for spec in enumerate_specs(families=("decode", "extend", "kv_write", "copy_blocks")):
        assert KernelSpec.from_key(spec.variant_key()) == spec
    assert parse_variant_key(" decode_bf16_hd128_bs16_nhd_g4 ") == KernelSpec("decode", 128, 16, group_size=4)
    for bad in ("decode_bf16_hd064_bs16_nhd_g4", "decode_bf16_hd128_bs16_NHD_g4", "decode_bf16_hd128_bs16_nhd_g+4",
                "decode_bf16_kvbf16_hd128_bs16_nhd_g4", "decode_bf16_hd128_bs16_nhd", "decode_hd128", "",
                "prefill_bf16_hd128"):
        with pytest.raises(ValueError, match="not a variant key"):
            KernelSpec.from_key(bad)
    with pytest.raises(ValueError, match="head_dim=72 is not supported"):
        KernelSpec.from_key("decode_bf16_hd72_bs16_nhd_g4")


# -- 7. the CLI: one line `pagegen <cmd>: <what>; <fix>`, exit 2, never a traceback --------------
def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors exit from inside parse_args
        rc = exc.code
    err = capsys.readouterr().err
    return rc, err


def _assert_usage_error(rc: int, err: str, command: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith(f"pagegen {command}: ") and "; " in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["list", "--head-dim", "72"], ["list", "--layout", "nhd"], ["list", "--group-size", "0"],
    ["list", "--group-size", "x"], ["list", "--head-dim", "64.0"], ["list", "--block-size", "12,16"],
    ["render", "--config", "block_n=abc"], ["render", "--config", "block_n=64.0"],
    ["render", "--config", "block_n=32,block_n=64"], ["render", "--head-dim", "6x"],
    ["render", "--out", "/missing/dir/x.py"],
])
def test_cli_user_errors_are_one_line(argv, capsys):
    rc, err = _run(argv, capsys)
    _assert_usage_error(rc, err, argv[0])


def test_render_config_error_says_what_was_wrong(capsys):
    rc, err = _run(["render", "--config", "block_n"], capsys)
    assert "dictionary update sequence" not in err and "'block_n' is not name=value" in err


def test_show_missing_table_does_not_suggest_tuning_a_file_name(capsys):
    rc, err = _run(["show", "--table", "/nope.yaml"], capsys)
    _assert_usage_error(rc, err, "show")
    assert "/nope.yaml" in err and "--gpu nope" not in err


EVIL = "version: !!python/object/apply:os.system ['touch {marker}']\n"


def test_python_tag_in_a_table_is_a_usage_error_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(EVIL.format(marker=marker))
    for argv in (["show", "--table", str(evil)], ["merge", str(evil), str(evil), "-o", str(tmp_path / "m.yaml")]):
        rc, err = _run(argv, capsys)
        _assert_usage_error(rc, err, argv[0])
        assert "forbidden tag" in err
    assert not marker.exists() and not (tmp_path / "m.yaml").exists()


def test_python_tag_in_a_specs_file_is_a_usage_error(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "specs.yaml"
    evil.write_text(f"specs: !!python/object/apply:os.system ['touch {marker}']\n")
    try:
        rc, err = _run(["tune", "--plan", "--interpret", "--specs", str(evil)], capsys)
    finally:
        assert not marker.exists()
    _assert_usage_error(rc, err, "tune")


def test_console_entry_point_prints_no_traceback():
    r = subprocess.run([sys.executable, "-m", "pagegen", "list", "--head-dim", "72"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


# -- 10. the allocator ---------------------------------------------------------------------------
def test_forked_siblings_sharing_a_partial_block_append_in_one_batch():
    m = SequenceManager(num_blocks=4, block_size=4)
    m.add("a", [1, 2])  # one partly filled block
    m.fork("a", "b")  # a and b share it (ref 2)
    held = m.pool.allocate(m.pool.num_allocatable - 1)  # one block left: one copy-on-write fits
    r = m.append_batch(["a", "b"], [3, 4])  # one at a time fits: a copies, then b writes in place
    assert len(r.cow) == 1 and len(set(r.slot_mapping.tolist())) == 2
    assert m.pool.num_allocatable == 0
    m.check_invariants()
    m.pool.free(held)


@pytest.mark.parametrize("bad", [True, False])
def test_block_ids_are_not_bools(bad):
    pool = BlockPool(4)
    pool.allocate(2)
    before = pool.snapshot()
    for call in (lambda: pool.free([bad]), lambda: pool.share([bad]), lambda: pool.ref_count(bad)):
        with pytest.raises(AllocatorMisuseError, match="block ids are ints"):
            call()
        assert pool.snapshot() == before
    pool.check_invariants()
