"""Files shared by the kernel cache, the tuned tables and spec lists: crash- and race-safe writes, and
reading untrusted YAML with bounds (size, nesting, aliases) and without silently dropped duplicates."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

MAX_YAML_DEPTH = 32  # nested collections; a real table nests 6 deep
MAX_YAML_ALIASES = 32  # `*name` references; `pagegen tune` writes none (each may double what a reader walks)
ORPHAN_TEMP_AGE_S = 3600.0  # a temp file without a readable writer pid is stale after this long


class InputFileError(ValueError):
    """An input file that cannot be used: too large, not a regular file, not UTF-8, or not the plain
    YAML this reader accepts. The message starts with the file's name and says where and what."""


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temp file in the same folder (fsync, then rename), so
    readers and concurrent writers only ever see a whole file. Returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(p)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def read_text_capped(path: str | os.PathLike, max_bytes: int) -> str:
    """The UTF-8 text of the regular file `path`, refused (InputFileError) before reading when it
    is larger than `max_bytes`, and never reading more than that (a file that grows, /dev/zero).
    OSError (missing, unreadable) passes through."""
    p = Path(path)
    st = os.stat(p)
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(f"{p}: not a regular file")
    if st.st_size > max_bytes:
        raise InputFileError(f"{p}: {st.st_size} bytes, larger than the {max_bytes}-byte limit for this file")
    with open(p, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputFileError(f"{p}: larger than the {max_bytes}-byte limit for this file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{p}: not UTF-8 text (byte {exc.start} is {data[exc.start:exc.start + 1]!r}); "
                             "save it as UTF-8") from None


_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when built in (5x faster)


class StrictLoader(_BaseLoader):
    """yaml's safe loader (plain YAML tags only: no `!!python/...`, nothing is executed) that also
    refuses a key given twice in one mapping (plain YAML keeps the last one silently). load_yaml
    adds the bounds on nesting and aliases."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                except TypeError:  # unhashable: the base class reports it
                    continue
                if dup:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {repr(key)[:80]}",
                        key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _check_shape(text: str) -> None:
    """Walk the parser's events (iterative, nothing composed yet) and refuse more than
    MAX_YAML_DEPTH nested collections (the composer recurses: deeper input exhausts Python's
    stack) or more than MAX_YAML_ALIASES aliases (a "billion laughs" file expands exponentially
    in whoever walks it; merge keys `<<: *x` are aliases too)."""
    depth = aliases = 0
    for event in yaml.parse(text, Loader=_BaseLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                                  event.start_mark)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_YAML_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_YAML_ALIASES} aliases (*name); write the values out",
                    event.start_mark)


def load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document of untrusted text: plain tags only, bounded nesting and aliases, no
    duplicate keys. InputFileError (one line, naming `source`, the line and column) for anything
    refused."""
    try:
        _check_shape(text)
        return yaml.load(text, Loader=StrictLoader)
    except (yaml.YAMLError, UnicodeError) as exc:  # UnicodeError: a str with lone surrogates
        detail = " ".join(str(exc).split())  # one line: the mark's caret art is noise in a message
        detail = detail.replace('in "<unicode string>", line', "at line")
        raise InputFileError(f"{source}: not valid YAML (or uses a forbidden tag): {detail}") from None


def read_yaml(path: str | os.PathLike, max_bytes: int = 1 << 20) -> Any:
    """read_text_capped + load_yaml: the plain data of a small untrusted YAML file (spec lists,
    bucket lists). InputFileError for a refused file; OSError passes through."""
    return load_yaml(read_text_capped(path, max_bytes), str(path))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Remove temp files of `path` (`.<name>.<pid>.*.tmp`) left by writers that died mid-write:
    those whose pid is no longer running, and those without a pid older than ORPHAN_TEMP_AGE_S.
    Returns how many were removed."""
    p = Path(path)
    n = 0
    for tmp in p.parent.glob(f".{p.name}.*.tmp"):
        middle = tmp.name[len(p.name) + 2:-len(".tmp")]
        pid_text = middle.split(".", 1)[0]
        try:
            if pid_text.isdigit() and "." in middle:
                if int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
                    continue
            elif time.time() - tmp.stat().st_mtime < ORPHAN_TEMP_AGE_S:
                continue
            tmp.unlink()
            n += 1
        except OSError:
            continue
    return n
