"""Re-stamp a version-1 tuned table with per-spec kernel hashes (schema version 2), honestly.

A version-1 entry records the template hash of the files it was tuned with. This script takes the
templates of a git commit whose template hash equals the entry's (the templates it was tuned on),
renders the entry's spec with them, and records that kernel hash. The dispatcher then judges the
entry by the code it compiled: it stays valid exactly while today's templates render the same code
for that spec (comments aside). Entries whose template hash no commit given matches are left as
they are (stale, as before).

    python bench/tune/migrate_kernel_hash.py tuned/h100.yaml --commit 0693073
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def templates_at(commit: str, dst: Path) -> None:
    """Write the templates/ folder of `commit` into `dst`."""
    names = subprocess.run(["git", "ls-tree", "--name-only", commit, "templates/"], check=True, capture_output=True,
                           text=True).stdout.split()
    for name in names:
        blob = subprocess.run(["git", "show", f"{commit}:{name}"], check=True, capture_output=True).stdout
        (dst / Path(name).name).write_bytes(blob)


def hashes_with(templates: Path, table_path: str) -> dict[str, tuple[str, str]]:
    """{entry key: (template hash, kernel hash)} of the table's specs rendered with `templates`."""
    code = ("import json, sys\nfrom pagegen import codegen, table as T\nt = T.load(sys.argv[1])\n"
            "print(json.dumps({k: (codegen.template_hash(e.spec.family), codegen.kernel_hash(e.spec))"
            " for k, e in t.entries.items()}))")
    env = dict(os.environ, PAGEGEN_TEMPLATES_DIR=str(templates))
    out = subprocess.run([sys.executable, "-c", code, table_path], check=True, capture_output=True, text=True, env=env)
    import json

    return {k: tuple(v) for k, v in json.loads(out.stdout).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table")
    parser.add_argument("--commit", action="append", required=True, help="a commit whose templates tuned entries")
    args = parser.parse_args()
    from pagegen import table as T

    table = T.load(args.table)
    for commit in args.commit:
        with tempfile.TemporaryDirectory() as tmp:
            templates_at(commit, Path(tmp))
            for shared in ("_layout.py.j2", "_attention.py.j2"):  # macro files the renderer may hash
                (Path(tmp) / shared).touch(exist_ok=True)
            old = hashes_with(Path(tmp), args.table)
        for key, entry in table.entries.items():
            if entry.kernel_hash or key not in old:
                continue
            kernel_then = old[key][1]
            # the hash the entry recorded must be that commit's: then its kernel is that commit's render
            if entry.template_hash == _template_hash_of(commit, entry.spec.family):
                print(f"{key}: template {entry.template_hash} (= {commit}'s) -> kernel {kernel_then}")
                entry.kernel_hash, entry.template_hash = kernel_then, ""
    table.version = T.SCHEMA_VERSION
    T.save(table, args.table)
    left = [k for k, e in table.entries.items() if not e.kernel_hash]
    print(f"wrote {args.table}; entries left with a version-1 template hash: {left or 'none'}")
    return 0


def _template_hash_of(commit: str, family: str) -> str:
    """The template hash pagegen computed at `commit` (its own files: the family's and _layout)."""
    import hashlib

    from pagegen.codegen import TEMPLATE_FILES

    h = hashlib.sha256()
    for name in (TEMPLATE_FILES[family], "_layout.py.j2"):
        h.update(name.encode())
        h.update(subprocess.run(["git", "show", f"{commit}:templates/{name}"], check=True,
                                capture_output=True).stdout)
    return h.hexdigest()[:16]


if __name__ == "__main__":
    sys.exit(main())
