"""``--dtype auto``: the GPU's bfloat16, float32 on CPUs without bfloat16 products, and on CPUs with them the dtype
a decode measured faster, once per machine."""

import pytest
import torch

import hyla.bench.dtype as dtype_choice


def test_auto_dtype_is_float32_without_native_bfloat16(monkeypatch, tmp_path):
    monkeypatch.setattr(dtype_choice, "cpu_info", lambda: ("Some CPU", {"avx2", "fma"}))
    monkeypatch.setattr(dtype_choice, "measure_decode", lambda: pytest.fail("nothing to measure"))
    dtype, why = dtype_choice.auto_dtype("cpu", tmp_path / "dtype.json")
    assert dtype == torch.float32 and why.startswith("Some CPU has no native bfloat16")


@pytest.mark.parametrize(
    ("f32", "bf16", "expected"),
    [(1e-3, 3e-3, torch.float32), (7e-3, 1e-3, torch.bfloat16), (10.5e-3, 10e-3, torch.float32)],  # ~parity: f32
)
def test_auto_dtype_with_a_bfloat16_flag_measures_once_and_keeps_the_faster(monkeypatch, tmp_path, f32, bf16,
                                                                             expected):  # fmt: skip
    """The flag does not predict the speed (an EPYC with avx512_bf16 decodes slower in bfloat16; AMX is ~7x
    faster): the measurement decides, once per machine."""
    calls = []
    monkeypatch.setattr(dtype_choice, "cpu_info", lambda: ("Some CPU", {"avx2", "avx512f", "avx512_bf16"}))
    monkeypatch.setattr(dtype_choice, "measure_decode", lambda: calls.append(1) or {"float32": f32, "bfloat16": bf16})
    cache = tmp_path / "dtype.json"
    first, why = dtype_choice.auto_dtype("cpu", cache)
    again, why_again = dtype_choice.auto_dtype("cpu", cache)
    assert first == again == expected and calls == [1]
    assert f"took {bf16 * 1e3:.1f} ms in bfloat16 against {f32 * 1e3:.1f} ms in float32" in why
    assert "measured now" in why
    assert "measured before" in why_again


def test_the_decode_measurement_times_both_dtypes_and_leaves_the_random_stream_alone():
    state = torch.get_rng_state()
    times = dtype_choice.measure_decode(repeats=1, tokens=2)
    assert set(times) == {"float32", "bfloat16"}
    assert torch.equal(torch.get_rng_state(), state)
