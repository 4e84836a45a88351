"""pagegen: generated, autotuned paged-attention Triton kernels and a KV block allocator."""

from pagegen.allocator import AllocatorError, AllocatorMisuseError, BlockPool, OutOfBlocksError, PoolStats
from pagegen.decode import DecodePlan, paged_decode
from pagegen.extend import ExtendPlan, paged_extend
from pagegen.kv_cache import KVCache
from pagegen.kv_ops import copy_blocks, kv_write
from pagegen.sequences import SequenceManager
from pagegen.spec import Config, KernelSpec
from pagegen.verify import VerifyPlan, paged_verify

__version__ = "0.1.0"

__all__ = [
    "AllocatorError", "AllocatorMisuseError", "BlockPool", "Config", "DecodePlan", "ExtendPlan", "KVCache",
    "KernelSpec", "OutOfBlocksError", "PoolStats", "SequenceManager", "__version__", "copy_blocks", "kv_write",
    "paged_decode", "paged_extend", "paged_verify", "VerifyPlan",
]
