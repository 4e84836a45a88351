"""The rendered source of every existing spec (plain attention, today's layouts) stays the same
except for comments: tuned tables were measured on these kernels. A sample of specs (every family,
both layouts, several head dims, block sizes, groups and dtypes) is rendered and its comment-
stripped token stream hashed; the golden hashes were computed from the templates at main's
commit 0693073 (before the attention features) with `stripped_hash` below:
    git show 0693073:templates/<file> > old/<file>  (each template), then
    PAGEGEN_TEMPLATES_DIR=old python -c '... print(stripped_hash(codegen.render(spec))) ...'
"""

from __future__ import annotations

import hashlib
import io
import itertools
import tokenize

import pytest

from pagegen import codegen
from pagegen.spec import KernelSpec


def stripped_hash(source: str) -> str:
    """sha256 (16 hex) of the source's tokens without comments and blank lines (COMMENT, NL)."""
    toks = [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type not in (tokenize.COMMENT, tokenize.NL)]
    return hashlib.sha256(repr(toks).encode()).hexdigest()[:16]


def sample_specs() -> list[KernelSpec]:
    """4 specs per (family, layout, dtype), cycling head dims, block sizes and groups."""
    hds, bss, groups = (64, 80, 128, 256), (1, 16, 64, 256), (1, 4, 7, 8)
    out = []
    product = itertools.product(("decode", "extend", "kv_write", "copy_blocks"), ("NHD", "HND"), ("fp16", "bf16"))
    for i, (fam, layout, dtype) in enumerate(product):
        for j in range(4):
            g = groups[(i + j) % 4] if fam in ("decode", "extend") else 1
            out.append(KernelSpec(fam, head_dim=hds[(i + j) % 4], block_size=bss[(j + i // 2) % 4], layout=layout,
                                  dtype=dtype, group_size=g))
    return out


GOLDEN = {
    "decode_fp16_hd64_bs1_nhd_g1": "77d4962c9b848a64",
    "decode_fp16_hd80_bs16_nhd_g4": "56cffa958877186a",
    "decode_fp16_hd128_bs64_nhd_g7": "4a97e7ed040e58fc",
    "decode_fp16_hd256_bs256_nhd_g8": "b2028fd890af1854",
    "decode_bf16_hd80_bs1_nhd_g4": "cc46d55755edf432",
    "decode_bf16_hd128_bs16_nhd_g7": "87d6ffc409ea2105",
    "decode_bf16_hd256_bs64_nhd_g8": "a8741146916dbc2d",
    "decode_bf16_hd64_bs256_nhd_g1": "9b987e8f2c343991",
    "decode_fp16_hd128_bs16_hnd_g7": "f9b77b9c98d1baa2",
    "decode_fp16_hd256_bs64_hnd_g8": "707a4c2d8a31c674",
    "decode_fp16_hd64_bs256_hnd_g1": "6af36d062aeff6e0",
    "decode_fp16_hd80_bs1_hnd_g4": "0981dd40d23e58fd",
    "decode_bf16_hd256_bs16_hnd_g8": "39fba19b59da77a6",
    "decode_bf16_hd64_bs64_hnd_g1": "99fb657a56a386f1",
    "decode_bf16_hd80_bs256_hnd_g4": "2cb7db3da7c7932c",
    "decode_bf16_hd128_bs1_hnd_g7": "ad43eb4a583fd4bd",
    "extend_fp16_hd64_bs64_nhd_g1": "05c931a59b564bda",
    "extend_fp16_hd80_bs256_nhd_g4": "02bd8a5c58783e8a",
    "extend_fp16_hd128_bs1_nhd_g7": "5e6756b7af3891cb",
    "extend_fp16_hd256_bs16_nhd_g8": "ed6ee9c4461afe25",
    "extend_bf16_hd80_bs64_nhd_g4": "9595fcd8f294dfb6",
    "extend_bf16_hd128_bs256_nhd_g7": "21600a7bbba33ff0",
    "extend_bf16_hd256_bs1_nhd_g8": "f770361bcd79ef61",
    "extend_bf16_hd64_bs16_nhd_g1": "f16ec2f83cc5c473",
    "extend_fp16_hd128_bs256_hnd_g7": "09a8f7f84d31a0c8",
    "extend_fp16_hd256_bs1_hnd_g8": "0bd54b78d2135291",
    "extend_fp16_hd64_bs16_hnd_g1": "bd45ef795d5e4a0a",
    "extend_fp16_hd80_bs64_hnd_g4": "d195bdefe421228b",
    "extend_bf16_hd256_bs256_hnd_g8": "b01e50ab7909dca3",
    "extend_bf16_hd64_bs1_hnd_g1": "e89f39b0dbc6605e",
    "extend_bf16_hd80_bs16_hnd_g4": "b9feaf5d758a27ea",
    "extend_bf16_hd128_bs64_hnd_g7": "ead2286dcd2a7e33",
    "kv_write_fp16_hd64_bs1_nhd_g1": "e55eaa9592f2f901",
    "kv_write_fp16_hd80_bs16_nhd_g1": "5207ae0adaeb6b68",
    "kv_write_fp16_hd128_bs64_nhd_g1": "1a3e7280b86da61c",
    "kv_write_fp16_hd256_bs256_nhd_g1": "b8b8b839353831f1",
    "kv_write_bf16_hd80_bs1_nhd_g1": "750f9b5bfd5792d7",
    "kv_write_bf16_hd128_bs16_nhd_g1": "eb367de6c3df2e65",
    "kv_write_bf16_hd256_bs64_nhd_g1": "de5598504f846d06",
    "kv_write_bf16_hd64_bs256_nhd_g1": "15ccb48f957f98ee",
    "kv_write_fp16_hd128_bs16_hnd_g1": "abdffd96763af122",
    "kv_write_fp16_hd256_bs64_hnd_g1": "6c13e12d0df117c8",
    "kv_write_fp16_hd64_bs256_hnd_g1": "1e8a9ff1454733be",
    "kv_write_fp16_hd80_bs1_hnd_g1": "b6f54aa6de09c014",
    "kv_write_bf16_hd256_bs16_hnd_g1": "fa8eb9407fff0162",
    "kv_write_bf16_hd64_bs64_hnd_g1": "3d3c32fd0f683659",
    "kv_write_bf16_hd80_bs256_hnd_g1": "048b4ad03a71a7c8",
    "kv_write_bf16_hd128_bs1_hnd_g1": "1269795fba0898d9",
    "copy_blocks_fp16_hd64_bs64_nhd_g1": "48a8fc82b702da88",
    "copy_blocks_fp16_hd80_bs256_nhd_g1": "2a5cab8bf389e71e",
    "copy_blocks_fp16_hd128_bs1_nhd_g1": "ef6ada664ff4e80e",
    "copy_blocks_fp16_hd256_bs16_nhd_g1": "5247a06db7e4d894",
    "copy_blocks_bf16_hd80_bs64_nhd_g1": "90d92ecf9a4e8213",
    "copy_blocks_bf16_hd128_bs256_nhd_g1": "596a00916df6ec7f",
    "copy_blocks_bf16_hd256_bs1_nhd_g1": "d61f83e80926282c",
    "copy_blocks_bf16_hd64_bs16_nhd_g1": "1a87a9c5fa8f32a8",
    "copy_blocks_fp16_hd128_bs256_hnd_g1": "0894649d076ca673",
    "copy_blocks_fp16_hd256_bs1_hnd_g1": "e2846eae59cb3071",
    "copy_blocks_fp16_hd64_bs16_hnd_g1": "2d78bcd17c6e8917",
    "copy_blocks_fp16_hd80_bs64_hnd_g1": "46d743e1531e49bb",
    "copy_blocks_bf16_hd256_bs256_hnd_g1": "9ee2c45f1fabdd5f",
    "copy_blocks_bf16_hd64_bs1_hnd_g1": "733c1559f2a7173f",
    "copy_blocks_bf16_hd80_bs16_hnd_g1": "b92dbc9f79486b83",
    "copy_blocks_bf16_hd128_bs64_hnd_g1": "79d015bfe91b6e1a",
}


def test_sample_matches_golden_keys():
    assert [s.variant_key() for s in sample_specs()] == list(GOLDEN)


@pytest.mark.parametrize("spec", sample_specs(), ids=lambda s: s.variant_key())
def test_plain_source_unchanged(spec):
    assert stripped_hash(codegen.render(spec)) == GOLDEN[spec.variant_key()]


def test_stripping_ignores_only_comments():
    """The hash sees code changes but not comment or blank-line changes."""
    src = "x = 1  # one\n\n# note\ny = x + 2\n"
    assert stripped_hash(src) == stripped_hash("x = 1\ny = x + 2  # two\n")
    assert stripped_hash(src) != stripped_hash("x = 1\ny = x + 3\n")


@pytest.mark.parametrize("flag", ["sliding_window", "softcap", "sinks", "alibi", "kv_packed"])
@pytest.mark.parametrize("family", ["decode", "extend"])
def test_a_feature_changes_the_source(family, flag):
    """A feature's code is present only when it is on (and its key differs)."""
    plain = KernelSpec(family, head_dim=128, block_size=16, group_size=4)
    feat = KernelSpec(family, head_dim=128, block_size=16, group_size=4, **{flag: True})
    assert feat.variant_key() != plain.variant_key()
    assert stripped_hash(codegen.render(feat)) != stripped_hash(codegen.render(plain))
    names = {"sliding_window": "window", "softcap": "softcap_log2", "sinks": "sinks_ptr", "alibi": "alibi_ptr",
             "kv_packed": "stride_kv_head"}
    assert names[flag] not in codegen.render(plain)
    assert names[flag] in codegen.render(feat)
