"""bench/extend_chunk_lab.py on the CPU: the chunk rows of an extend step (build_chunks) against a plain
enumeration, including sequences with no new tokens, padding rows and strided metadata; extend_as_verify
(one paged_verify call over the chunk rows) against the float64 reference and paged_extend on varlen
batches of q_len 17..100 over prefixes 0/40/300, group 4 and 1, page edges, split-KV on and off;
chunk_len's routing rule and the prediction model's anchors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import TEST_DEVICE  # noqa: E402

from bench import extend_chunk_lab as L  # noqa: E402


def enumerate_rows(q_lens: list[int], lens: list[int], chunk: int) -> list[tuple[int, int, int, int]]:
    """(first q row, new tokens, seq_len, sequence) of every chunk row, written out by hand."""
    rows, start = [], 0
    for b, (q, n) in enumerate(zip(q_lens, lens, strict=True)):
        for first in range(0, q, chunk):
            n_q = min(chunk, q - first)
            rows.append((start + first, n_q, n - q + first + n_q, b))
        start += q
    return rows


@pytest.mark.parametrize("q_lens,hint", [
    ([17, 0, 5, 100, 16, 32], True),
    ([17, 0, 5, 100, 16, 32], False),  # max_q_len unknown: padding rows at the end
    ([0, 0, 3], True),
    ([128], True),
    ([1, 15, 16, 17, 31, 33, 0], False),
])
def test_build_chunks_rows(q_lens, hint):
    g = torch.Generator().manual_seed(len(q_lens))
    chunk, b, total_q = 16, len(q_lens), sum(q_lens)
    lens = [q + int(torch.randint(0, 300, (1,), generator=g)) for q in q_lens]
    # strided metadata: cu_seqlens_q every other element of a wider tensor, tables a column slice
    wide = torch.zeros(2 * (b + 1), dtype=torch.int32)
    wide[::2] = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    cu = wide[::2]
    tables = torch.randint(0, 1000, (b, 40), generator=g, dtype=torch.int32)[:, 3:30]
    ch = L.build_chunks(cu, torch.tensor(lens, dtype=torch.int32), tables, total_q=total_q, chunk=chunk,
                        max_q_len=max(q_lens) if hint else None)
    want = enumerate_rows(q_lens, lens, chunk)
    n = L.max_chunk_rows(b, total_q, max(q_lens) if hint else total_q, chunk)
    assert n >= len(want) and ch.seq_lens.shape == (n,) and ch.cu_seqlens_q.shape == (n + 1,)
    assert ch.cu_seqlens_q.dtype == ch.seq_lens.dtype == torch.int32 and ch.chunk == chunk
    cu_got, sl_got = ch.cu_seqlens_q.tolist(), ch.seq_lens.tolist()
    for j, (start, n_q, seq_len, seq) in enumerate(want):
        assert (cu_got[j], cu_got[j + 1] - cu_got[j], sl_got[j]) == (start, n_q, seq_len), j
        assert torch.equal(ch.block_tables[j], tables[seq])
    for j in range(len(want), n):  # padding: no rows, no keys
        assert cu_got[j] == cu_got[j + 1] == total_q and sl_got[j] == 0
    assert cu_got[-1] == total_q


def test_max_chunk_rows_bounds_the_rows():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        b = int(torch.randint(1, 9, (1,), generator=g))
        q_lens = torch.randint(0, 130, (b,), generator=g).tolist()
        rows = sum(-(-q // 16) for q in q_lens)
        assert rows <= L.max_chunk_rows(b, sum(q_lens), max(q_lens), 16) or sum(q_lens) == 0
    assert L.max_chunk_rows(1, 128, 128, 16) == 8 and L.max_chunk_rows(8, 256, 32, 16) == 16
    assert L.max_chunk_rows(0, 0, 0, 16) == 0


def test_chunk_len_follows_the_verify_route():
    assert L.chunk_len(4, 128) == 16 and L.chunk_len(1, 64) == 16 and L.chunk_len(8, 128) == 16
    assert L.chunk_len(16, 128) == 8  # 16 x 16 = 256 rows do not fit one program; 8 x 16 do
    with pytest.raises(ValueError, match="group_size=64 at head_dim=256"):
        L.chunk_len(64, 256)


CASES = {c[0]: c for c in L.CPU_CASES}


@pytest.mark.parametrize("name,hint", [("g4-a", True), ("g1-b", True), ("edges", False)])
def test_extend_as_verify_matches_extend(name, hint):
    errs = L.check_case(*CASES[name], hint=hint, device=TEST_DEVICE)
    assert errs["ref"] < L.TOL_F16, errs
    assert errs["extend"] < L.TOL_F16, errs


def test_extend_as_verify_catches_a_wrong_chunk_row(monkeypatch):
    """The check is sharp: chunk rows that see one key too many give a wrong result."""
    real = L.build_chunks

    def off_by_one(*a, **kw):
        ch = real(*a, **kw)
        return L.Chunks(ch.cu_seqlens_q, torch.where(ch.seq_lens > 0, ch.seq_lens + 1, 0).int(), ch.block_tables,
                        ch.chunk)

    monkeypatch.setattr(L, "build_chunks", off_by_one)
    errs = L.check_case("small", 1, 4, 16, "NHD", [(40, 20)], L.VERIFY_NO_SPLIT, device=TEST_DEVICE)
    assert errs["ref"] > 10 * L.TOL_F16


def test_extend_as_verify_refuses_bad_input():
    x = L.make_case(1, 4, 16, "NHD", [(0, 20)])
    with pytest.raises(ValueError, match=r"q must be \[total_q, Hq, D\]"):
        L.extend_as_verify(x["q"][None], x["k"], x["v"], x["bt"], x["cu"], x["sl"])
    with pytest.raises(ValueError, match="more than max_q_len=16"):
        L.extend_as_verify(x["q"], x["k"], x["v"], x["bt"], x["cu"], x["sl"], max_q_len=16)
    empty = L.extend_as_verify(x["q"][:0], x["k"], x["v"], x["bt"], torch.zeros(2, dtype=torch.int32),
                               torch.zeros(1, dtype=torch.int32))
    assert empty.shape == (0, 4, 64)


def test_prediction_model_reproduces_its_anchors():
    p = L.predict_us([32768] * 8, 16)  # 8 x 32768 at q 16: 8 chunk rows of 16, the measured verify
    assert p["chunked"] == pytest.approx(347.7) and p["decode1"] == pytest.approx(261.2)
    p = L.predict_us([32768], 4)  # one chunk row of 4: the one-sequence floor
    assert p["chunked"] == pytest.approx(54.9) and p["decode1"] == pytest.approx(50.1)
    assert p["extend"] == pytest.approx(671.4)
    assert L.predict_us([32768], 128)["chunked"] == pytest.approx(347.7)  # 1 x 128 = 8 rows of 16
