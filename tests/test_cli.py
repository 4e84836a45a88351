"""The CLI's list and render commands, run as a user would."""

from __future__ import annotations

import ast
import subprocess
import sys

from pagegen.cli import main


def test_list_shows_every_axis(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("block_size", "head_dim", "NHD", "HND", "fp16", "bf16", "split_size", "total"):
        assert word in out


def test_render_prints_valid_source(capsys):
    assert main(["render", "--head-dim", "96", "--group-size", "7", "--layout", "HND",
                 "--config", "block_n=32,split_size=512"]) == 0
    src = capsys.readouterr().out
    ast.parse(src)
    assert "decode_bf16_hd96_bs16_hnd_g7" in src and "block_n=32" in src


def test_render_to_file(tmp_path, capsys):
    out = tmp_path / "k.py"
    assert main(["render", "--head-dim", "64", "--out", str(out)]) == 0
    ast.parse(out.read_text())


def test_render_rejects_bad_values(capsys):
    assert main(["render", "--head-dim", "72"]) == 2
    assert "head_dim=72 is not supported" in capsys.readouterr().err
    assert main(["render", "--config", "block_n=48"]) == 2


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "pagegen", "list"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "total" in r.stdout


def test_spec_and_config_errors_are_one_usage_line(capsys):
    for argv, words in ((["render", "--layout", "nhd"], "layout='nhd' is not supported"),
                        (["render", "--config", "block_n"], "'block_n' is not name=value"),
                        (["render", "--config", "split_size=512,block_n=256", "--head-dim", "256"], "not legal")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("pagegen render: ") and words in err, err
