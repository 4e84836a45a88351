"""GPU identity: device name -> short key, SM count, compute capability, the live device.

One function, `gpu_key(name)`, turns a device name into the key that names tuned tables
(`tuned/<key>.yaml`); the tuner, the table code and the dispatcher all use it, so a table written
on a card is found again on a card of the same kind.

Under the Triton CPU interpreter (TRITON_INTERPRET=1) the "device" is the interpreter itself:
`live_gpu()` reports key `interpret` with 4 notional SMs, so the whole pipeline (tuner, table,
dispatcher) runs on the CPU with the same code paths.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

INTERPRET_KEY = "interpret"
INTERPRET_SMS = 4

# (pattern on the lower-cased name, key); first match wins, so longer names come first
_KEY_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"gh200", "gh200"),
    (r"gb200", "gb200"),
    (r"\bb200\b", "b200"),
    (r"\bb100\b", "b100"),
    (r"\bh200\b", "h200"),
    (r"\bh100\b", "h100"),
    (r"\bh800\b", "h800"),
    (r"\bh20\b", "h20"),
    (r"\ba100\b", "a100"),
    (r"\ba800\b", "a800"),
    (r"\ba10g\b", "a10g"),
    (r"\ba10\b", "a10"),
    (r"\ba30\b", "a30"),
    (r"\ba40\b", "a40"),
    (r"\bl40s\b", "l40s"),
    (r"\bl40\b", "l40"),
    (r"\bl4\b", "l4"),
    (r"\bt4\b", "t4"),
    (r"\bv100\b", "v100"),
    (r"rtx\s*(pro\s*)?(\d{4})\s*ti\b", "rtx{2}ti"),
    (r"rtx\s*(\d{4})\s*ada", "rtx{1}ada"),
    (r"rtx\s*(\d{4})\b", "rtx{1}"),
    (r"rtx\s*a(\d{4})\b", "rtxa{1}"),
    (r"\bmi(\d{3}[a-z]?)\b", "mi{1}"),
)

# keys pagegen knows by name (for messages); any other card gets a slug of its name
KNOWN_KEYS = ("a100", "a10g", "a10", "h100", "h200", "gh200", "b200", "l40s", "l40", "l4", "t4", "v100",
              "rtx4090", "rtx3090", "mi300x")


def gpu_key(name: str) -> str:
    """Short, filename-safe key of a device name.

    "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA A100-SXM4-80GB" -> "a100", "NVIDIA L40S" -> "l40s",
    "NVIDIA GeForce RTX 4090" -> "rtx4090", "NVIDIA A10G" -> "a10g". Unknown names become a slug
    of the name without the vendor ("Foo Accelerator X" -> "foo_accelerator_x").
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"gpu name must be a non-empty string, got {name!r}")
    low = name.lower().replace("-", " ").replace("_", " ")
    if low.strip() == INTERPRET_KEY:
        return INTERPRET_KEY
    for pattern, key in _KEY_PATTERNS:
        m = re.search(pattern, low)
        if m:
            return key.format(*([m.group(0)] + list(m.groups())))
    slug = re.sub(r"^(nvidia|amd|intel)\s+", "", low)
    slug = re.sub(r"[^a-z0-9]+", "_", slug).strip("_")
    return slug or "unknown"


def valid_key(key: str) -> bool:
    """True if `key` has the shape of a gpu key (lower-case letters, digits and underscores)."""
    return isinstance(key, str) and re.fullmatch(r"[a-z0-9_]{1,40}", key) is not None


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """Identity of one device."""

    key: str  # gpu_key(name): names the tuned table
    name: str  # full device name as the driver reports it
    sm_count: int  # streaming multiprocessors (compute units on ROCm)
    capability: str  # compute capability "major.minor" ("0.0" for the interpreter)
    memory_bytes: int = 0  # total device memory (0 unknown)

    @property
    def interpret(self) -> bool:
        return self.key == INTERPRET_KEY


INTERPRETER = GpuInfo(key=INTERPRET_KEY, name="Triton CPU interpreter", sm_count=INTERPRET_SMS, capability="0.0")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET set and not "0").

    The one owner of this test: `pagegen._checks.interpreting` is this function."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_gpu(index: int | None = None) -> GpuInfo | None:
    """The CUDA device `index` (default: the current one), or None when torch sees no CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    idx = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(idx)
    return GpuInfo(
        key=gpu_key(props.name),
        name=props.name,
        sm_count=int(props.multi_processor_count),
        capability=f"{props.major}.{props.minor}",
        memory_bytes=int(props.total_memory),
    )


def detect(index: int | None = None) -> GpuInfo | None:
    """The live device kernels will run on: the interpreter under TRITON_INTERPRET=1, else the
    CUDA device (default: current), else None (no GPU)."""
    if interpreting():
        return INTERPRETER
    return cuda_gpu(index)


@functools.lru_cache(maxsize=16)
def _cached_detect(index: int | None, interpret: bool) -> GpuInfo | None:
    return INTERPRETER if interpret else cuda_gpu(index)


def live_gpu(index: int | None = None) -> GpuInfo | None:
    """`detect()`, cached per (device index, interpreter mode): cheap enough for a hot path."""
    return _cached_detect(index, interpreting())


def sm_count(index: int | None = None) -> int:
    """SM count of the live device (cached); 4 under the interpreter; 1 with no GPU at all."""
    info = live_gpu(index)
    return info.sm_count if info is not None else 1
