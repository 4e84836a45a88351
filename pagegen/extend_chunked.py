"""A short extend over a long prefix as one verify launch over chunk rows (issue 18 item 2).

Extend has no split-KV: each of its programs walks its sequence's whole context. When a step has
few programs (one sequence with a few dozen new tokens over 32768 cached ones: 8 programs) most SMs
idle. The verify kernel (pagegen.verify: the decode template with up to 16 new tokens x group rows in
one program, and split-KV) computes the same function for a "chunk row" of at most C new tokens, so
an extend of q_len new tokens is ceil(q_len / C) chunk rows sharing their sequence's block-table row:

    chunk k of a sequence with ctx = seq_len - q_len cached tokens before its new ones holds new
    tokens [C k, min(C (k + 1), q_len)), n_q = their count, and has seq_len_k = ctx + C k + n_q (its
    last token's position + 1). Verify's rule (token i of a row with n_q new tokens sits at
    p = seq_len_k - n_q + i and sees keys 0..p) is then exactly extend's.

q and out keep extend's [total_q, Hq, D] rows: the chunk rows are a varlen verify batch over them.
The rows are built on the metadata's device by a few small torch ops and no host sync (their number
N is a host-side bound; rows past the last real chunk are padding the verify kernel skips), so the
route is CUDA-graph capturable. `pagegen.dispatch.extend_chunk_route` decides when it pays;
paged_extend and ExtendPlan take it on their own when no config is forced.

    build_chunks(cu_seqlens_q, seq_lens, block_tables, total_q=, chunk=, max_q_len=) -> Chunks
    extend_as_verify(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, chunk=, ...) -> out
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagegen.dispatch import max_chunk_rows

__all__ = ["Chunks", "build_chunks", "extend_as_verify"]


@dataclass(frozen=True, slots=True)
class Chunks:
    """The verify batch of an extend step: N chunk rows (N = dispatch.max_chunk_rows), row j holding
    new tokens of one sequence, the rows of a sequence in order, padding rows (no tokens) at the end."""

    cu_seqlens_q: torch.Tensor  # [N + 1] int32: row j owns q rows cu[j] .. cu[j + 1] (0 rows for padding)
    seq_lens: torch.Tensor  # [N] int32: keys row j's last token sees = its position + 1 (0 for padding)
    block_tables: torch.Tensor  # [N, max_blocks] int32: the block-table row of row j's sequence
    chunk: int  # new tokens a row holds at most: the verify kernel's q_len


def build_chunks(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, *, total_q: int,
                 chunk: int, max_q_len: int | None = None) -> Chunks:
    """The chunk rows of an extend step, computed on the metadata's device with no host sync.

    cu_seqlens_q: [B + 1] int32 (sequence b owns q rows cu[b] .. cu[b + 1], ending at total_q);
    seq_lens: [B] int32 keys of each sequence, its new tokens included; block_tables: [B, max_blocks];
    chunk: tokens a row (dispatch.chunk_len); max_q_len: a host-side bound of the per-sequence counts
    (default total_q), which only sizes N. Sequence b with q_b new tokens gives ceil(q_b / chunk) rows;
    row k of it owns q rows cu[b] + chunk k .. + n_q (n_q = min(chunk, q_b - chunk k)) and sees
    seq_len = seq_lens[b] - q_b + chunk k + n_q keys. Strided metadata views are read through their
    strides (gathers). Contents are trusted: the callers check the extend metadata first when asked.
    """
    b = seq_lens.shape[0]
    n = max_chunk_rows(b, total_q, total_q if max_q_len is None else max_q_len, chunk)
    dev = seq_lens.device
    if n == 0:
        return Chunks(torch.zeros(1, dtype=torch.int32, device=dev), torch.zeros(0, dtype=torch.int32, device=dev),
                      block_tables[:0].contiguous(), chunk)
    cu = cu_seqlens_q.long()
    q_lens = cu[1:] - cu[:-1]  # [B]
    counts = (q_lens + chunk - 1) // chunk  # chunk rows of each sequence
    ends = counts.cumsum(0)  # [B]: rows before the next sequence's first
    j = torch.arange(n, device=dev)
    seq = torch.searchsorted(ends, j, right=True)  # [N] the sequence of row j; B for padding
    pad = seq >= b
    seq = seq.clamp_(max=b - 1)
    first = (j - (ends - counts)[seq]) * chunk  # the row's first new token within its sequence
    q_seq = q_lens[seq]
    n_q = (q_seq - first).clamp_(0, chunk)
    start = torch.where(pad, cu[b], cu[seq] + first)
    lens = torch.where(pad, 0, seq_lens.long()[seq] - q_seq + first + n_q)
    return Chunks(torch.cat([start, cu[b:]]).int(), lens.int(), block_tables[seq], chunk)


def extend_as_verify(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *, chunk: int, max_q_len: int | None = None,
                     out: torch.Tensor, **verify_kw) -> torch.Tensor:
    """paged_extend's function by one paged_verify call over chunk rows; writes and returns `out`.

    q, out: [total_q, Hq, D] (extend's packed rows; row t of q -> row t of out); cu_seqlens_q [B + 1]
    int32; seq_lens [B] int32 keys per sequence including the new ones (their K/V in the pool);
    block_tables [B, max_blocks]; chunk: dispatch.chunk_len of the call; max_q_len: host-side bound of
    the per-sequence counts (sizes the rows). verify_kw go to paged_verify (layout, scale, max_seq_len,
    validate, features, k_scale/v_scale). The extend metadata must have been checked by the caller
    where it is checked at all (validate, CPU tensors); paged_verify then checks the chunk rows.
    """
    from pagegen.verify import paged_verify  # verify imports extend: resolved at call time

    chunks = build_chunks(cu_seqlens_q, seq_lens, block_tables, total_q=q.shape[0], chunk=chunk, max_q_len=max_q_len)
    if chunks.seq_lens.shape[0] == 0:
        return out
    return paged_verify(q, k_cache, v_cache, chunks.block_tables, chunks.seq_lens, cu_seqlens_q=chunks.cu_seqlens_q,
                        max_q_len=chunks.chunk, out=out, **verify_kw)
