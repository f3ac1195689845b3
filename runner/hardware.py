"""Precision and device become one ``Accelerator`` before the loop, so the loop never branches on dtype."""

from __future__ import annotations

import functools
import logging

import torch

from runner.errors import RunnerError
from runner.schema import Device, Precision

log = logging.getLogger(__name__)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX).

    On such cores bf16 autocast is ~2.5x fp32 matmul throughput (298 vs 121 GFLOP/s measured on the
    2-core CI machine) and the Hugging Face Trainer trains ~1.4x faster; elsewhere bf16 is emulated.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_device(device: Device) -> str:
    if device == Device.gpu and not torch.cuda.is_available():
        raise RunnerError("hardware=gpu but no CUDA GPU is visible; use hardware=cpu or hardware=auto")
    if device == Device.auto:
        return "gpu" if torch.cuda.is_available() else "cpu"
    return device.value


def resolve_precision(precision: Precision, device: str) -> str:
    """Accelerate's ``mixed_precision`` value: "no", "bf16" or "fp16"."""
    if precision == Precision.auto:
        if device == "gpu":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "no"
    if precision == Precision.fp16 and device == "cpu":
        raise RunnerError("precision=fp16 needs a GPU; on CPU use precision=bf16 or precision=fp32")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision.value]


def make_accelerator(device: Device, precision: Precision, grad_accum: int):
    from accelerate import Accelerator

    where = resolve_device(device)
    mixed = resolve_precision(precision, where)
    log.info("device: %s, precision: %s", where, {"no": "fp32"}.get(mixed, mixed))
    return Accelerator(cpu=where == "cpu", mixed_precision=mixed, gradient_accumulation_steps=grad_accum)
