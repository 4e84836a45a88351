"""pagegen: generated, autotuned paged-attention Triton kernels and a KV block allocator."""

from pagegen.decode import paged_decode
from pagegen.spec import Config, KernelSpec

__version__ = "0.1.0"

__all__ = ["Config", "KernelSpec", "paged_decode", "__version__"]
