"""Render Jinja2 kernel templates into Triton source, cache the source on disk, run it.

render(spec)  -> Python source of @triton.jit kernels (deterministic: same spec, same text)
load(spec)    -> the module of those kernels (in-memory cache; on-disk content-addressed cache)

The on-disk cache lives under $PAGEGEN_CACHE_DIR (default ~/.cache/pagegen)/kernels/triton-<ver>/
and each file is named <variant_key>_<sha256 of source, 16 hex>.py. Files are written to a temp
file in the same folder and renamed, so concurrent processes and crashes never leave half a file;
two processes rendering the same spec write the same bytes.

The cache is code that pagegen executes, so:
  * pagegen executes only source it rendered itself: `load` compiles the rendered text in memory
    (exec_source), never the file, and never bytecode (no `__pycache__/*.pyc` is read or written;
    the import system would trust a planted .pyc whose recorded mtime and size match the file);
  * the file on disk (which Triton reads back through `inspect`, for error messages and caching)
    is checked against that text before use and rewritten when it differs, and its lines are
    primed in `linecache`, so what Triton reads is what was rendered;
  * the cache folder and its kernels subfolders must be owned by the current user and not
    writable by group or others (CacheDirError otherwise); pagegen creates them with mode 0700.
"""

from __future__ import annotations

import functools
import hashlib
import linecache
import os
import stat
import sys
import threading
from pathlib import Path
from types import ModuleType

import jinja2

from pagegen._files import atomic_write_text
from pagegen.spec import FP8_FORMATS, Config, KernelSpec, kv_tma_reason

TEMPLATE_FILES = {
    "decode": "decode.py.j2",
    "extend": "extend.py.j2",
    "kv_write": "kv_write.py.j2",
    "copy_blocks": "copy_blocks.py.j2",
}
# macro files every family may import; part of each family's template hash
SHARED_TEMPLATES = ("_layout.py.j2", "_attention.py.j2")

_TL_DTYPES = {"fp16": "tl.float16", "bf16": "tl.bfloat16", "fp8_e4m3": "tl.float8e4nv", "fp8_e5m2": "tl.float8e5"}


def templates_dir() -> Path:
    """Where the templates are: shipped inside the wheel, or the repository's top-level folder."""
    env = os.environ.get("PAGEGEN_TEMPLATES_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here / "templates", here.parent / "templates"):
        if (cand / TEMPLATE_FILES["decode"]).is_file():
            return cand
    raise FileNotFoundError(f"pagegen templates not found next to {here}; set PAGEGEN_TEMPLATES_DIR")


def cache_dir() -> Path:
    """Root of pagegen's on-disk cache ($PAGEGEN_CACHE_DIR or ~/.cache/pagegen)."""
    env = os.environ.get("PAGEGEN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pagegen"


class CacheDirError(RuntimeError):
    """The kernel cache folder is not private to this user (pagegen runs code from it), or cannot
    be created; the message names the folder and the fix."""


def private_dir(path: Path) -> Path:
    """`path`, created with mode 0700 (and any missing parents) when absent, after checking that it
    is a directory owned by the current user and not writable by group or others: whoever can
    write into a folder pagegen runs code from could swap the code. Raises CacheDirError."""
    other = "set PAGEGEN_CACHE_DIR to a private folder of yours (it is created with mode 0700)"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        raise CacheDirError(f"kernel cache folder {path}: cannot create it ({exc.strerror or exc}); {other}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"kernel cache folder {path} is not a directory; remove it, or {other}")
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    if uid is not None and st.st_uid != uid:
        raise CacheDirError(f"kernel cache folder {path} is owned by uid {st.st_uid}, not by you (uid {uid}), and "
                            f"pagegen runs code from it; {other}")
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit)
        raise CacheDirError(f"kernel cache folder {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o}), "
                            f"and pagegen runs code from it; run `chmod 700 {path}`, or {other}")
    return path


def kernels_dir() -> Path:
    """The folder of this Triton version's cached kernel sources, every level checked by
    private_dir (the cache root, kernels/, triton-<version>/)."""
    root = private_dir(cache_dir())
    return private_dir(private_dir(root / "kernels") / f"triton-{_triton_version()}")


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


@functools.cache
def template_hash(family: str) -> str:
    """sha256 (16 hex) of the family's template and the shared macros: a tuned entry is stale
    when this changes."""
    h = hashlib.sha256()
    root = templates_dir()
    for name in (TEMPLATE_FILES[family], *SHARED_TEMPLATES):
        h.update(name.encode())
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]


def code_lines(source: str) -> list[str]:
    """The lines of Python `source` that are code: comments (a `#` outside a string literal) and
    trailing blanks removed, blank lines dropped. A plain scan, identical on every Python version
    (tokenize and ast differ between releases); rendered kernels hold no multi-line strings."""
    lines = []
    for line in source.splitlines():
        quote = ""
        cut = len(line)
        for i, ch in enumerate(line):
            if quote:
                if ch == quote and line[i - 1] != "\\":
                    quote = ""
            elif ch in "'\"":
                quote = ch
            elif ch == "#":
                cut = i
                break
        code = line[:cut].rstrip()
        if code.strip():
            lines.append(code)
    return lines


def kernel_hash(spec: KernelSpec) -> str:
    """sha256 (16 hex) of the spec's rendered kernel source, comments and blank lines dropped
    (code_lines): the staleness key of tuned entries. Editing a comment, or a feature branch that
    this spec does not render, keeps every tuned config valid; any change to the code this spec
    compiles does not. The same on every Python version and machine."""
    return hashlib.sha256("\n".join(code_lines(render(spec))).encode()).hexdigest()[:16]


def template_context(spec: KernelSpec) -> dict[str, object]:
    """Turn the spec into the literals a template binds (templates stay thin)."""
    return {
        "spec": spec,
        "key": spec.variant_key(),
        "family": spec.family,
        "layout": spec.layout,
        "HEAD_DIM": spec.head_dim,
        "HEAD_DIM_PAD": spec.head_dim_padded,
        "PAGE": spec.block_size,
        "GROUP": spec.group_size,
        "GROUP_PAD": spec.group_padded,
        # decode: query tokens per sequence at most, and the program's rows (Q_LEN x GROUP, padded)
        "Q_LEN": spec.q_len,
        "ROWS_PAD": spec.rows_padded,
        "DTYPE": _TL_DTYPES[spec.dtype],
        "KV_DTYPE": _TL_DTYPES[spec.kv_dtype],
        # feature flags: each feature's code is rendered only when its flag is on
        "WINDOW": spec.sliding_window,
        "SOFTCAP": spec.softcap,
        "SINKS": spec.sinks,
        "ALIBI": spec.alibi,
        "KV_PACKED": spec.kv_packed,
        # extend: the kernel has the tensor-descriptor (TMA) K/V path, chosen at launch by KV_TMA
        "TMA": kv_tma_reason(spec) is None,
        "FEATURES": spec.sliding_window or spec.softcap or spec.sinks or spec.alibi,
        # fp8 pools: the format's mantissa bits, smallest normal exponent, largest finite value
        "FP8": spec.is_fp8,
        **dict(zip(("FP8_MANT", "FP8_EMIN", "FP8_MAX"), FP8_FORMATS.get(spec.kv_dtype, (0, 0, 0.0)), strict=True)),
        "template_hash": template_hash(spec.family),
    }


def render(spec: KernelSpec, config: Config | None = None) -> str:
    """Python source of the spec's @triton.jit kernels.

    The source depends on the spec only: tunables (tile sizes, warps, stages, split size) are
    constexpr launch arguments. With `config`, a header comment records the launch options so a
    vendored copy says how it was meant to run; the kernels are unchanged.
    """
    spec.validate()
    template = _environment().get_template(TEMPLATE_FILES[spec.family])
    source = template.render(**template_context(spec))
    if config is not None:
        config.validate()
        opts = ", ".join(f"{k}={v}" for k, v in config.to_dict().items())
        source = f"# launch config: {opts}\n" + source
    return source


def _write_if_different(path: Path, text: str) -> None:
    """Atomically write `text` to `path` unless it already holds exactly that text (a file that
    differs, corrupt or tampered with, is replaced)."""
    try:
        if path.read_bytes() == text.encode():
            return
    except OSError:
        pass
    atomic_write_text(path, text)


def _triton_version() -> str:
    import triton

    return triton.__version__


def _source_name(spec: KernelSpec, source: str) -> str:
    """<variant_key>_<sha256 of source, 16 hex>.py"""
    return f"{spec.variant_key()}_{hashlib.sha256(source.encode()).hexdigest()[:16]}.py"


def source_path(spec: KernelSpec, source: str) -> Path:
    """Content-addressed cache path of a rendered source (the path only; write_source puts it there)."""
    return cache_dir() / "kernels" / f"triton-{_triton_version()}" / _source_name(spec, source)


def write_source(spec: KernelSpec, source: str) -> Path:
    """Put the rendered `source` at its content-addressed path in the (checked, private) kernel
    cache, unless the file there already holds exactly this text; returns the path.
    Raises CacheDirError for a cache folder that is not private to this user."""
    path = kernels_dir() / _source_name(spec, source)
    _write_if_different(path, source)
    return path


def exec_source(name: str, path: Path, source: str) -> ModuleType:
    """Run `source` as a new module `name` whose __file__ is `path` (registered in sys.modules).

    The code is compiled from `source` itself, never read from `path` and never from bytecode, and
    linecache is primed with `source` under `path` (an entry with no mtime, which checkcache keeps),
    so `inspect.getsourcelines`, which Triton uses to parse and hash @jit functions, returns
    exactly this text whatever is on disk.
    """
    filename = str(path)
    code = compile(source, filename, "exec", dont_inherit=True)  # not this module's __future__ flags
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    mod = ModuleType(name)
    mod.__file__ = filename
    sys.modules[name] = mod
    try:
        exec(code, mod.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


_loaded: dict[KernelSpec, ModuleType] = {}
_lock = threading.Lock()


def load(spec: KernelSpec) -> ModuleType:
    """The module of the spec's kernels: rendered, written to the cache (checked) and executed
    from the rendered text on first use; the same module object afterwards. Raises CacheDirError
    for a cache folder that is not private to this user (see the module docstring)."""
    mod = _loaded.get(spec)
    if mod is not None:
        return mod
    with _lock:
        mod = _loaded.get(spec)
        if mod is not None:
            return mod
        source = render(spec)
        path = write_source(spec, source)
        mod = exec_source(f"pagegen_kernels.{path.stem}", path, source)
        _loaded[spec] = mod
        return mod
