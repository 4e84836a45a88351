"""pagegen: generated, autotuned paged-attention Triton kernels and a KV block allocator."""

from pagegen.allocator import AllocatorError, AllocatorMisuseError, BlockPool, OutOfBlocksError, PoolStats
from pagegen.decode import paged_decode
from pagegen.extend import paged_extend
from pagegen.kv_cache import KVCache
from pagegen.kv_ops import copy_blocks, kv_write
from pagegen.sequences import SequenceManager
from pagegen.spec import Config, KernelSpec

__version__ = "0.1.0"

__all__ = ["Config", "KernelSpec", "paged_decode", "paged_extend", "__version__",
           "AllocatorError", "AllocatorMisuseError", "BlockPool", "OutOfBlocksError", "PoolStats",
           "KVCache", "SequenceManager", "copy_blocks", "kv_write"]
