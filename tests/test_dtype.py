"""`dtype="auto"`: bfloat16 where the CPU multiplies bf16 fast, float32 elsewhere."""

import pytest
import torch

import mechlens as ml
from mechlens.models import loading


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "amx_bf16", "amx_tile"}, torch.bfloat16),
        ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"avx2", "avx512f"}, torch.float32),  # AVX-512 without its bf16 instructions
        (set(), torch.float32),  # no /proc/cpuinfo (macOS, Windows)
    ],
)
def test_auto_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(loading, "cpu_flags", lambda: flags)
    assert loading.resolve_dtype("auto") is expected
    assert loading.resolve_dtype("auto", "cpu") is expected
    assert ml.load_model("tiny-llama", dtype="auto").dtype is expected


def test_cpu_flags_reads_proc_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16 amx_bf16\n\nprocessor\t: 1\n")
    real = loading.Path

    monkeypatch.setattr(loading, "Path", lambda p: real(info) if p == "/proc/cpuinfo" else real(p))
    assert {"avx512_bf16", "amx_bf16", "fpu"} <= loading.cpu_flags()
    monkeypatch.setattr(loading, "Path", lambda p: real(tmp_path / "missing"))
    assert loading.cpu_flags() == set()


def test_names_and_dtypes_are_the_same_choice():
    for name, dtype in loading.DTYPES.items():
        assert loading.resolve_dtype(name) is dtype
        assert loading.resolve_dtype(dtype) is dtype
        assert ml.load_model("tiny-qwen2", dtype=name).dtype is dtype


@pytest.mark.parametrize("bad", ["int8", "fp32", torch.int64, 32, None])
def test_bad_dtypes_name_the_argument(bad):
    with pytest.raises(ValueError, match="dtype must be"):
        ml.load_model("tiny-llama", dtype=bad)


def test_organism_loaders_take_dtype(monkeypatch):
    from mechlens.organism import load_subject

    monkeypatch.setattr(loading, "cpu_flags", lambda: set())
    assert load_subject("tiny-llama", dtype="auto").dtype is torch.float32
    assert load_subject("tiny-llama", dtype="bfloat16").dtype is torch.bfloat16
