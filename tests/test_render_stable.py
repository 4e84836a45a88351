"""The rendered source of every existing spec (plain attention, today's layouts) stays the same
except for comments: tuned tables were measured on these kernels. A sample of specs (every family,
both layouts, several head dims, block sizes, groups and dtypes) is rendered and hashed with
codegen.kernel_hash (the tables' staleness key: comments and blank lines dropped, the same on every
Python version); the golden hashes were computed from the templates at main's commit 0693073
(before the attention features):
    git show 0693073:templates/<file> > old/<file>  (each template), then
    PAGEGEN_TEMPLATES_DIR=old python -c '... print(codegen.kernel_hash(spec)) ...'
Exception, marked "KV_TMA path": extend specs with pages of >= 64 and a power-of-two head_dim gained the
tensor-descriptor K/V path (issue 18; spec.kv_tma_reason), so their source changed on purpose. No tuned
table holds an extend entry at block_size >= 64 (tuned/h100.yaml and h200.yaml tune block 16 only), so no
measured config goes stale; their hashes were recomputed with the new template.
"""

from __future__ import annotations

import hashlib
import itertools

import pytest

from pagegen import codegen
from pagegen.spec import KernelSpec


def stripped_hash(source: str) -> str:
    """sha256 (16 hex) of the source's code lines (codegen.code_lines: what kernel_hash hashes)."""
    return hashlib.sha256("\n".join(codegen.code_lines(source)).encode()).hexdigest()[:16]


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
    "decode_fp16_hd64_bs1_nhd_g1": "ed1f1ba6d2bac43b",
    "decode_fp16_hd80_bs16_nhd_g4": "dab96f57f31ae08c",
    "decode_fp16_hd128_bs64_nhd_g7": "dcb1bfcd67ddb934",
    "decode_fp16_hd256_bs256_nhd_g8": "7e4838847a67bdb6",
    "decode_bf16_hd80_bs1_nhd_g4": "d238b2b8cdbeb899",
    "decode_bf16_hd128_bs16_nhd_g7": "57a93bb445c92a5e",
    "decode_bf16_hd256_bs64_nhd_g8": "9794197a90114035",
    "decode_bf16_hd64_bs256_nhd_g1": "8fd60528d406e938",
    "decode_fp16_hd128_bs16_hnd_g7": "222cbdd48ee79f2d",
    "decode_fp16_hd256_bs64_hnd_g8": "7b642c4c236d1254",
    "decode_fp16_hd64_bs256_hnd_g1": "ceab9c6109ee9309",
    "decode_fp16_hd80_bs1_hnd_g4": "44d77311831e2174",
    "decode_bf16_hd256_bs16_hnd_g8": "ba85415b397e8df9",
    "decode_bf16_hd64_bs64_hnd_g1": "6615246dfa842468",
    "decode_bf16_hd80_bs256_hnd_g4": "fc938bac75a25503",
    "decode_bf16_hd128_bs1_hnd_g7": "4c1174c46796f60c",
    "extend_fp16_hd64_bs64_nhd_g1": "53d1bee4b3422e14",  # KV_TMA path (issue 18)
    "extend_fp16_hd80_bs256_nhd_g4": "5589872ea9e62a8a",
    "extend_fp16_hd128_bs1_nhd_g7": "521338e66c32508a",
    "extend_fp16_hd256_bs16_nhd_g8": "85b5a27b9903e5ab",
    "extend_bf16_hd80_bs64_nhd_g4": "53edaa39861e9106",
    "extend_bf16_hd128_bs256_nhd_g7": "ae03b29bf00b25c2",  # KV_TMA path (issue 18)
    "extend_bf16_hd256_bs1_nhd_g8": "f312114b72b7e952",
    "extend_bf16_hd64_bs16_nhd_g1": "2401b4df606e7916",
    "extend_fp16_hd128_bs256_hnd_g7": "d8deca8797b3abda",  # KV_TMA path (issue 18)
    "extend_fp16_hd256_bs1_hnd_g8": "35b2ae6ea7606beb",
    "extend_fp16_hd64_bs16_hnd_g1": "be62a548206565c0",
    "extend_fp16_hd80_bs64_hnd_g4": "7ba4cedd88013825",
    "extend_bf16_hd256_bs256_hnd_g8": "d4a18f68ee72e949",  # KV_TMA path (issue 18)
    "extend_bf16_hd64_bs1_hnd_g1": "fe93b11851445b12",
    "extend_bf16_hd80_bs16_hnd_g4": "f09aaec82692424f",
    "extend_bf16_hd128_bs64_hnd_g7": "ef61b99a7e557dde",  # KV_TMA path (issue 18)
    "kv_write_fp16_hd64_bs1_nhd_g1": "9095e0e27b06304f",
    "kv_write_fp16_hd80_bs16_nhd_g1": "363713b4860d0a8e",
    "kv_write_fp16_hd128_bs64_nhd_g1": "4b7a56d2bb1c869d",
    "kv_write_fp16_hd256_bs256_nhd_g1": "bc8c3831170b7066",
    "kv_write_bf16_hd80_bs1_nhd_g1": "9e4fa3b334a3086c",
    "kv_write_bf16_hd128_bs16_nhd_g1": "958e91397218dfb9",
    "kv_write_bf16_hd256_bs64_nhd_g1": "8836d0b1f8a027eb",
    "kv_write_bf16_hd64_bs256_nhd_g1": "6bcc57a4bb47bdb3",
    "kv_write_fp16_hd128_bs16_hnd_g1": "ac0dbd0076b4e8c7",
    "kv_write_fp16_hd256_bs64_hnd_g1": "eb6b9f4a6f911a08",
    "kv_write_fp16_hd64_bs256_hnd_g1": "98b328d0976080a0",
    "kv_write_fp16_hd80_bs1_hnd_g1": "c15b579db5f12c3d",
    "kv_write_bf16_hd256_bs16_hnd_g1": "20854d96ecc1d52d",
    "kv_write_bf16_hd64_bs64_hnd_g1": "1a588d2a61a262e3",
    "kv_write_bf16_hd80_bs256_hnd_g1": "41a3149cdd8ea2ee",
    "kv_write_bf16_hd128_bs1_hnd_g1": "8f6821361f07af59",
    "copy_blocks_fp16_hd64_bs64_nhd_g1": "4af80f0edbe8afbf",
    "copy_blocks_fp16_hd80_bs256_nhd_g1": "1027820b09d3cbe9",
    "copy_blocks_fp16_hd128_bs1_nhd_g1": "dafc45c9cf83182c",
    "copy_blocks_fp16_hd256_bs16_nhd_g1": "f06395be80160b3a",
    "copy_blocks_bf16_hd80_bs64_nhd_g1": "037514b47179745a",
    "copy_blocks_bf16_hd128_bs256_nhd_g1": "377bf97b08fdc6d6",
    "copy_blocks_bf16_hd256_bs1_nhd_g1": "522c9c2d1ae6c9d2",
    "copy_blocks_bf16_hd64_bs16_nhd_g1": "19ac027a509f0d90",
    "copy_blocks_fp16_hd128_bs256_hnd_g1": "22fa682fc6a3c869",
    "copy_blocks_fp16_hd256_bs1_hnd_g1": "74636e21ccbe949b",
    "copy_blocks_fp16_hd64_bs16_hnd_g1": "1401e21812ed6520",
    "copy_blocks_fp16_hd80_bs64_hnd_g1": "a41a7f415c4cb10a",
    "copy_blocks_bf16_hd256_bs256_hnd_g1": "ad2cb6662b1101a0",
    "copy_blocks_bf16_hd64_bs1_hnd_g1": "45afd02823ab6909",
    "copy_blocks_bf16_hd80_bs16_hnd_g1": "ca703d4f41fdc302",
    "copy_blocks_bf16_hd128_bs64_hnd_g1": "b8b465ca5d52cfb8",
}


def test_sample_matches_golden_keys():
    assert [s.variant_key() for s in sample_specs()] == list(GOLDEN)


@pytest.mark.parametrize("spec", sample_specs(), ids=lambda s: s.variant_key())
def test_plain_source_unchanged(spec):
    assert codegen.kernel_hash(spec) == GOLDEN[spec.variant_key()]
    assert stripped_hash(codegen.render(spec)) == GOLDEN[spec.variant_key()]


def test_stripping_ignores_only_comments():
    """The hash sees code changes but not comment or blank-line changes."""
    src = "x = 1  # one\n\n# note\ny = x + 2\nz = '#' + \"#\"  # strings keep their #\n"
    assert stripped_hash(src) == stripped_hash("x = 1\ny = x + 2  # two\n    \nz = '#' + \"#\"\n")
    assert stripped_hash(src) != stripped_hash("x = 1\ny = x + 3\nz = '#' + \"#\"\n")
    assert stripped_hash(src) != stripped_hash("x = 1\ny = x + 2\nz = '' + \"\"\n")


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
