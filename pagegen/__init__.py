"""pagegen: generated, autotuned paged-attention Triton kernels and a KV block allocator."""

from pagegen.decode import paged_decode
from pagegen.extend import paged_extend
from pagegen.spec import Config, KernelSpec

__version__ = "0.1.0"

__all__ = ["Config", "KernelSpec", "paged_decode", "paged_extend", "__version__"]
