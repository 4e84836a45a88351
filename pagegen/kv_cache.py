"""The KV pool tensors: K and V for every layer, in a layout, sized from a memory budget.

    NHD: k[layer] = [num_blocks, block_size, kv_heads, head_dim]
    HND: k[layer] = [num_blocks, kv_heads, block_size, head_dim]

One block of one layer holds block_size x kv_heads x head_dim elements of K and as many of V, so
bytes_per_block = 2 x num_layers x block_size x kv_heads x head_dim x element size, and a budget of
B bytes gives floor(B / bytes_per_block) blocks. An fp8 pool (torch.float8_e4m3fn / float8_e5m2,
element size 1) holds twice the blocks, so twice the tokens, of an fp16/bf16 pool of the same bytes;
it also carries its dequantization scales (see KVCache).
"""

from __future__ import annotations

import torch

from pagegen._checks import TORCH_DTYPES, TORCH_KV_DTYPES, check_layout
from pagegen.sequences import SequenceManager
from pagegen.spec import BLOCK_SIZES, HEAD_DIMS


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def bytes_per_block(block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, num_layers: int = 1) -> int:
    """Bytes one block takes across K and V of all layers (the scales of an fp8 pool not counted)."""
    return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def blocks_for_budget(budget_bytes: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                      num_layers: int = 1) -> int:
    """How many blocks fit in `budget_bytes`; ValueError if not even one does."""
    per = bytes_per_block(block_size, kv_heads, head_dim, dtype, num_layers)
    n = int(budget_bytes) // per
    if n < 1:
        raise ValueError(
            f"memory budget of {int(budget_bytes)} bytes is below one KV block ({per} bytes = 2 x {num_layers} "
            f"layers x {block_size} tokens x {kv_heads} heads x {head_dim} x {dtype}); raise the budget"
        )
    return n


class KVCache:
    """K and V pool tensors for `num_layers` layers, sized by block count or memory budget.

    Give exactly one of num_blocks, memory_bytes (a byte budget), memory_fraction (a fraction of
    the device's free memory now, CUDA only). block_size / head_dim must be ones the kernels
    support; dtype fp16, bf16, or an fp8 pool (torch.float8_e4m3fn, torch.float8_e5m2: twice the
    blocks for the same bytes). The tensors are allocated uninitialised (torch.empty).

    k, v: [num_layers, *pool_shape] tensors; k[l], v[l] are layer l's pools in `layout`.
    k_scale, v_scale: fp8 pools only (else None): float32 [num_layers, kv_heads] dequantization
    scales, one per KV head, initialised to 1.0; set them in place (calibration) before writing,
    and pass the same ones to kv_write and the attention ops: x ~= stored * scale.
    """

    def __init__(self, *, block_size: int, kv_heads: int, head_dim: int, layout: str = "NHD",
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda", num_layers: int = 1,
                 num_blocks: int | None = None, memory_bytes: int | None = None,
                 memory_fraction: float | None = None) -> None:
        check_layout(layout)
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size={block_size} is not supported; supported: {', '.join(map(str, BLOCK_SIZES))}")
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim={head_dim} is not supported; supported: {', '.join(map(str, HEAD_DIMS))}")
        if dtype not in TORCH_KV_DTYPES:
            shown = ", ".join(str(d) for d in TORCH_KV_DTYPES)
            raise TypeError(f"dtype={dtype} is not supported; supported: {shown}")
        _positive_int("kv_heads", kv_heads)
        _positive_int("num_layers", num_layers)
        device = torch.device(device)
        given = [name for name, v in (("num_blocks", num_blocks), ("memory_bytes", memory_bytes),
                                      ("memory_fraction", memory_fraction)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of num_blocks, memory_bytes, memory_fraction; got {given or 'none'}")
        if memory_fraction is not None:
            if not 0.0 < memory_fraction <= 1.0:
                raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
            if device.type != "cuda":
                raise ValueError(f"memory_fraction needs a CUDA device (got {device}); pass memory_bytes instead")
            free, _total = torch.cuda.mem_get_info(device)
            memory_bytes = int(free * memory_fraction)
        if memory_bytes is not None:
            if memory_bytes < 0:
                raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
            num_blocks = blocks_for_budget(memory_bytes, block_size, kv_heads, head_dim, dtype, num_layers)
        _positive_int("num_blocks", num_blocks)
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.layout = layout
        self.dtype = dtype
        self.device = device
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        shape = self.pool_shape
        self.k = torch.empty((num_layers, *shape), dtype=dtype, device=device)
        self.v = torch.empty((num_layers, *shape), dtype=dtype, device=device)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        if self.is_fp8:
            self.k_scale = torch.ones((num_layers, kv_heads), dtype=torch.float32, device=device)
            self.v_scale = torch.ones((num_layers, kv_heads), dtype=torch.float32, device=device)

    @property
    def is_fp8(self) -> bool:
        """True for an fp8 pool (scaled; see k_scale / v_scale)."""
        return self.dtype not in TORCH_DTYPES

    @property
    def pool_shape(self) -> tuple[int, int, int, int]:
        """Shape of one layer's K (or V) pool in this layout."""
        if self.layout == "NHD":
            return (self.num_blocks, self.block_size, self.kv_heads, self.head_dim)
        return (self.num_blocks, self.kv_heads, self.block_size, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes across K and V of all layers."""
        return bytes_per_block(self.block_size, self.kv_heads, self.head_dim, self.dtype, self.num_layers)

    @property
    def nbytes(self) -> int:
        """Bytes of all pool tensors."""
        return self.block_bytes * self.num_blocks

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, ready for the ops."""
        return self.k[index], self.v[index]

    def layer_scales(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_scale, v_scale) [kv_heads] float32 of one layer of an fp8 pool (views: writes stick)."""
        if self.k_scale is None or self.v_scale is None:
            raise ValueError(f"this pool is {self.dtype}, not fp8: it has no scales")
        return self.k_scale[index], self.v_scale[index]

    def fill_(self, value: float) -> KVCache:
        """Fill every pool with `value` (e.g. NaN to poison in tests). Returns self."""
        self.k.fill_(value)
        self.v.fill_(value)
        return self

    def sequence_manager(self, **kwargs) -> SequenceManager:
        """A SequenceManager over this cache's blocks (kwargs: enable_prefix_caching, hash_fn)."""
        return SequenceManager(self.num_blocks, self.block_size, **kwargs)

    def __repr__(self) -> str:
        return (f"KVCache({self.layout} {tuple(self.k.shape)} {str(self.dtype).replace('torch.', '')} "
                f"on {self.device}, {self.nbytes / 2**20:.1f} MiB)")
