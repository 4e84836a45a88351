"""Render Jinja2 kernel templates into Triton source, cache the source on disk, import it.

render(spec)  -> Python source of @triton.jit kernels (deterministic: same spec, same text)
load(spec)    -> the imported module (in-memory cache; on-disk content-addressed cache)

The on-disk cache lives under $PAGEGEN_CACHE_DIR (default ~/.cache/pagegen)/kernels/triton-<ver>/
and each file is named <variant_key>_<sha256 of source, 16 hex>.py. Files are written to a temp
file in the same folder and renamed, so concurrent processes and crashes never leave half a file;
two processes rendering the same spec write the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import sys
import threading
import tokenize
from pathlib import Path
from types import ModuleType

import jinja2

from pagegen._files import atomic_write_text
from pagegen.spec import FP8_FORMATS, Config, KernelSpec

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


def kernel_hash(spec: KernelSpec) -> str:
    """sha256 (16 hex) of the spec's rendered kernel source with comments and blank lines dropped.

    A tuned entry is stale exactly when this changes: editing a comment, or a feature branch that
    this spec does not render, keeps every tuned config valid; any change to the code this spec
    compiles does not. Computed from Python tokens, so reflowed comments do not count either.
    """
    tokens = tokenize.generate_tokens(io.StringIO(render(spec)).readline)
    h = hashlib.sha256()
    for tok in tokens:
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            h.update(f"{tok.type}:{tok.string}\x00".encode())
    return h.hexdigest()[:16]


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
    """Atomically write `text` to `path` unless it already holds exactly that text."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    atomic_write_text(path, text)


def _triton_version() -> str:
    import triton

    return triton.__version__


def source_path(spec: KernelSpec, source: str) -> Path:
    """Content-addressed cache path of a rendered source."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"triton-{_triton_version()}" / f"{spec.variant_key()}_{digest}.py"


_loaded: dict[KernelSpec, ModuleType] = {}
_lock = threading.Lock()


def load(spec: KernelSpec) -> ModuleType:
    """Import (rendering and caching on first use) the module of the spec's kernels."""
    mod = _loaded.get(spec)
    if mod is not None:
        return mod
    with _lock:
        mod = _loaded.get(spec)
        if mod is not None:
            return mod
        source = render(spec)
        path = source_path(spec, source)
        _write_if_different(path, source)
        name = f"pagegen_kernels.{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None
        mod = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = mod  # triton reads the source back through inspect
        module_spec.loader.exec_module(mod)
        _loaded[spec] = mod
        return mod
