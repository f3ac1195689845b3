"""precision=auto decides from the machine, and says why."""

from __future__ import annotations

import pytest

from runner import hardware
from runner.schema import Precision


@pytest.mark.parametrize("native, expected", [(False, "no"), (True, "bf16")])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: native)
    mixed, why = hardware.resolve_precision(Precision.auto, "cpu")
    assert mixed == expected
    assert why == ("precision=auto: the CPU has native bf16 instructions (AVX512-BF16/AMX)" if native else
                   "precision=auto: the CPU has no native bf16 instructions (bf16 would be emulated, slower)")


def test_the_choice_and_its_reason_are_logged(caplog, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    caplog.set_level("INFO")
    hardware.make_accelerator(hardware.Device.cpu, Precision.auto, 1)
    assert "device: cpu, precision: fp32 (precision=auto: the CPU has no native bf16 instructions" in caplog.text
