"""A plain (not editable) install ships the templates and tuned tables and finds them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("PAGEGEN_TEST_DEVICE") == "cuda" and importlib.util.find_spec("hatchling") is None,
                    reason="building the wheel needs the hatchling backend from the package index; the GPU "
                           "machines have no network (CPU CI runs this test)")
def test_wheel_ships_templates_and_tables_and_finds_them(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("pagegen-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for t in ("decode", "extend", "kv_write", "copy_blocks", "_layout"):
        assert f"pagegen/templates/{t}.py.j2" in names
    shipped = {p.name for p in (ROOT / "tuned").glob("*.yaml")}
    assert {n.split("/")[-1] for n in names if n.startswith("pagegen/tuned/") and n.endswith(".yaml")} == shipped
    # unpack as an installed package, away from the repository, and ask where it looks
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import pagegen.codegen as c, pagegen.dispatch as d; "
            "print(c.templates_dir()); print(d.tuned_dir()); print(len(c.render(c.KernelSpec('decode', 128, 16))))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("PAGEGEN_TEMPLATES_DIR", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tdir, tuned, n = r.stdout.split()
    assert Path(tdir) == site / "pagegen" / "templates"
    assert Path(tuned) == site / "pagegen" / "tuned"
    assert int(n) > 1000
