"""The variant space: validation, names, enumeration, configs."""

from __future__ import annotations

import pytest

from pagegen.spec import (
    BLOCK_SIZES,
    HEAD_DIMS,
    Config,
    KernelSpec,
    config_space,
    default_config,
    enumerate_specs,
    illegal_reason,
)


def test_variant_key_is_a_pure_filename_safe_name():
    s = KernelSpec("decode", head_dim=128, block_size=16, layout="NHD", dtype="bf16", group_size=4)
    assert s.variant_key() == "decode_bf16_hd128_bs16_nhd_g4"
    assert s.kv_dtype == "bf16"
    assert KernelSpec.from_dict(s.to_dict()) == s
    assert len({x.variant_key() for x in enumerate_specs()}) == len(list(enumerate_specs()))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(family="decode", head_dim=72, block_size=16), "head_dim=72 is not supported; supported: 64, 80"),
        (dict(family="decode", head_dim=128, block_size=12), "block_size=12"),
        (dict(family="prefill", head_dim=128, block_size=16), "family='prefill'"),
        (dict(family="decode", head_dim=128, block_size=16, layout="NDH"), "layout='NDH'"),
        (dict(family="decode", head_dim=128, block_size=16, dtype="fp32"), "dtype='fp32'"),
        (dict(family="decode", head_dim=128, block_size=16, group_size=0), "group_size=0"),
        (dict(family="decode", head_dim=128, block_size=16, dtype="fp16", kv_dtype="bf16"), "mixed"),
        (dict(family="kv_write", head_dim=128, block_size=16, group_size=4), "group_size must be 1"),
    ],
)
def test_bad_specs_name_the_axis(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelSpec(**kwargs)


def test_from_dict_rejects_unknown_and_missing():
    with pytest.raises(ValueError, match="unknown KernelSpec fields"):
        KernelSpec.from_dict({"family": "decode", "head_dim": 64, "block_size": 16, "colour": 1})
    with pytest.raises(ValueError, match="missing"):
        KernelSpec.from_dict({"family": "decode"})
    with pytest.raises(ValueError, match="unknown Config fields"):
        Config.from_dict({"block_n": 64, "warps": 4})
    with pytest.raises(ValueError, match="must be an int"):
        Config.from_dict({"block_n": "64"})


def test_config_validation():
    with pytest.raises(ValueError, match="num_warps=3"):
        Config(num_warps=3).validate()
    with pytest.raises(ValueError, match="split_size=768"):
        Config(block_n=256, split_size=768).validate()
    with pytest.raises(ValueError, match="block_n=48"):
        Config(block_n=48).validate()


def test_every_axis_value_enumerated():
    specs = list(enumerate_specs(families=("decode",)))
    assert {s.block_size for s in specs} == set(BLOCK_SIZES)
    assert {s.head_dim for s in specs} == set(HEAD_DIMS)
    assert {s.layout for s in specs} == {"NHD", "HND"}
    assert {s.group_size for s in specs} >= {1, 2, 4, 7, 8, 16}


@pytest.mark.parametrize("family", ["decode", "extend", "kv_write", "copy_blocks"])
def test_default_config_always_legal(family):
    for spec in enumerate_specs(families=(family,), group_sizes=(1, 8)):
        assert illegal_reason(spec, default_config(spec)) is None, spec
        space = config_space(spec)
        assert space and all(illegal_reason(spec, c) is None for c in space)


def test_keep_rejects_illegal_combinations():
    spec = KernelSpec("decode", head_dim=256, block_size=16, group_size=4)
    assert illegal_reason(spec, Config(block_n=256)) is not None
    assert illegal_reason(spec, Config(block_n=64, split_size=96)) is not None
    ext = KernelSpec("extend", head_dim=128, block_size=16)
    assert illegal_reason(ext, Config(split_size=256)) == "extend does not split KV"


def test_values_must_have_the_axis_type():
    with pytest.raises(ValueError, match=r"layout=\['NHD'\] is not supported"):
        KernelSpec("decode", head_dim=128, block_size=16, layout=["NHD"])
    with pytest.raises(TypeError, match="group_size must be an int"):
        KernelSpec("decode", head_dim=128, block_size=16, group_size=4.0)
    with pytest.raises(ValueError, match="expected int, got float"):
        Config(block_n=64.0).validate()
    assert Config.from_dict({"block_n": 64, "num_warps": 4}) == Config(block_n=64, num_warps=4)
    huge = ["x" * 1000] * 1000  # a hostile value is shown abbreviated
    with pytest.raises(ValueError) as info:
        KernelSpec("decode", head_dim=huge, block_size=16)
    assert len(str(info.value)) < 300


def test_from_key_round_trips_every_spec():
    for spec in enumerate_specs(families=("decode", "extend", "kv_write", "copy_blocks"), group_sizes=(1, 3, 64)):
        assert KernelSpec.from_key(spec.variant_key()) == spec
