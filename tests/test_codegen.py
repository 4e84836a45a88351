"""Rendering: every variant renders deterministically to valid Python holding only its layout's
code; the on-disk cache is content-addressed and safe with concurrent writers."""

from __future__ import annotations

import ast
import multiprocessing as mp

import pytest

from pagegen import codegen
from pagegen.spec import Config, KernelSpec, enumerate_specs

FAMILIES_WITH_TEMPLATES = [f for f, name in codegen.TEMPLATE_FILES.items() if (codegen.templates_dir() / name).exists()]


@pytest.mark.parametrize("family", FAMILIES_WITH_TEMPLATES)
def test_every_variant_renders_to_valid_python(family):
    for spec in enumerate_specs(families=(family,)):
        src = codegen.render(spec)
        tree = ast.parse(src)
        jitted = [
            n.name for n in tree.body if isinstance(n, ast.FunctionDef)
            and any("jit" in ast.unparse(d) for d in n.decorator_list)
        ]
        assert jitted, spec
        # nothing but imports, constexpr globals and @triton.jit kernels
        for node in tree.body:
            assert isinstance(node, ast.Import | ast.ImportFrom | ast.Assign | ast.FunctionDef), ast.dump(node)
        # only the spec's own layout: NHD code indexes tokens by stride, HND heads by stride
        other = "HND" if spec.layout == "NHD" else "NHD"
        assert f"layout {other}" not in src
        if spec.layout == "NHD":
            assert "stride_kv_head" not in src and "stride_kc_head" not in src
        else:
            assert "stride_kv_tok" not in src and "stride_kc_tok" not in src
        assert codegen.render(spec) == src  # deterministic


def test_config_header_is_a_comment_only():
    spec = KernelSpec("decode", head_dim=128, block_size=16, group_size=4)
    plain = codegen.render(spec)
    with_cfg = codegen.render(spec, Config(block_n=32, split_size=512))
    assert with_cfg.endswith(plain)
    assert with_cfg.splitlines()[0].startswith("# launch config: block_n=32")


def test_template_hash_is_stable_and_family_specific():
    assert codegen.template_hash("decode") == codegen.template_hash("decode")
    assert len(codegen.template_hash("decode")) == 16


def _load_in_child(cache: str, q) -> None:
    import os

    os.environ["PAGEGEN_CACHE_DIR"] = cache
    os.environ["TRITON_INTERPRET"] = "1"
    from pagegen import codegen as cg

    mod = cg.load(KernelSpec("decode", head_dim=64, block_size=8, group_size=2))
    q.put(mod.__file__)


def test_disk_cache_concurrent_processes(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(str(tmp_path), q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    paths = {q.get(timeout=5) for _ in procs}
    assert len(paths) == 1  # content-addressed: one file for one source
    files = list(tmp_path.rglob("*.py"))
    assert len(files) == 1 and not list(tmp_path.rglob("*.tmp"))
    spec = KernelSpec("decode", head_dim=64, block_size=8, group_size=2)
    assert files[0].read_text() == codegen.render(spec)


def test_in_memory_cache_returns_same_module(tmp_path, monkeypatch):
    spec = KernelSpec("decode", head_dim=80, block_size=32, group_size=1)
    assert codegen.load(spec) is codegen.load(spec)


def test_cached_file_is_checked_and_never_executed(tmp_path, monkeypatch):
    """A cached file whose text differs from the render (corrupt or tampered with) is rewritten, and
    the module runs the rendered text, whatever the file holds at import time."""
    import inspect

    monkeypatch.setenv("PAGEGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(codegen, "_loaded", {})
    spec = KernelSpec("kv_write", head_dim=64, block_size=8)
    source = codegen.render(spec)
    path = codegen.write_source(spec, source)
    marker = tmp_path / "pwned"
    path.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    assert codegen.write_source(spec, source) == path and path.read_text() == source
    mod = codegen.load(spec)
    assert inspect.getsource(mod.kv_write_kernel.fn) in source and not marker.exists()
