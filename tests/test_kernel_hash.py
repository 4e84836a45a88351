"""codegen.kernel_hash: the staleness key of tuned entries ignores comments, sees every code change."""

from __future__ import annotations

import shutil

import pytest

from pagegen import codegen
from pagegen.spec import KernelSpec

SPEC = KernelSpec("decode", head_dim=128, block_size=16, layout="NHD", dtype="bf16", group_size=4)


@pytest.fixture
def templates_copy(tmp_path, monkeypatch):
    """A private copy of the templates that the test may edit; codegen's caches reset around it."""
    dst = tmp_path / "templates"
    shutil.copytree(codegen.templates_dir(), dst)

    def reset() -> None:
        codegen._environment.cache_clear()
        codegen.template_hash.cache_clear()

    monkeypatch.setenv("PAGEGEN_TEMPLATES_DIR", str(dst))
    reset()
    yield dst
    monkeypatch.delenv("PAGEGEN_TEMPLATES_DIR")
    reset()


def test_kernel_hash_is_deterministic_and_spec_specific():
    assert codegen.kernel_hash(SPEC) == codegen.kernel_hash(SPEC)
    other = KernelSpec("decode", head_dim=128, block_size=16, layout="HND", dtype="bf16", group_size=4)
    assert codegen.kernel_hash(other) != codegen.kernel_hash(SPEC)


def test_comment_edits_keep_the_hash_but_template_hash_changes(templates_copy):
    before = codegen.kernel_hash(SPEC), codegen.template_hash("decode")
    path = templates_copy / "decode.py.j2"
    text = path.read_text()
    commented = "    # a new comment line\n\n    b = tl.program_id(0)  # and a tail\n"
    text = text.replace("    b = tl.program_id(0)\n", commented, 1)
    path.write_text(text)
    codegen._environment.cache_clear()
    codegen.template_hash.cache_clear()
    assert codegen.template_hash("decode") != before[1]
    assert codegen.kernel_hash(SPEC) == before[0]


def test_code_edits_change_the_hash(templates_copy):
    before = codegen.kernel_hash(SPEC)
    path = templates_copy / "decode.py.j2"
    text = path.read_text()
    assert "l_safe = tl.where(l_i > 0, l_i, 1.0)" in text
    path.write_text(text.replace("l_safe = tl.where(l_i > 0, l_i, 1.0)", "l_safe = tl.where(l_i > 0, l_i, 2.0)", 1))
    codegen._environment.cache_clear()
    assert codegen.kernel_hash(SPEC) != before
