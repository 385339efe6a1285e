"""Numeric precision of whole-scan inference: float32, or bfloat16 autocast where the hardware computes it natively.

The detectors train with ``bf16-mixed`` (``configs/demo.yaml``), and the convolutions dominate inference as they
dominate training: on a CPU with AVX512-BF16/AMX, bfloat16 autocast makes whole-scan detection of the 3D demo
model 2.1x faster than float32 at the same held-out CPM (``benchmarks/infer_speed.py``, README "Speed and memory
of batch inference"). Box decoding, class probabilities and proposal scores stay in float32 under autocast (the
detector casts them), so only the network's feature maps are rounded.

``"auto"`` uses bfloat16 where it is native (CPU with AVX512-BF16 or AMX; CUDA GPU that supports it) and float32
elsewhere: emulated bfloat16 is slower than float32, so a setting that is fast on one machine never silently
becomes slow on another. ``"32"`` and ``"bf16"`` force one or the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Final, Literal, get_args

import torch

__all__ = [
    "INFERENCE_PRECISIONS",
    "InferencePrecision",
    "as_inference_precision",
    "cpu_has_native_bf16",
    "dtype_name",
    "inference_autocast",
    "resolve_inference_dtype",
]

InferencePrecision = Literal["auto", "32", "bf16"]
INFERENCE_PRECISIONS: Final[tuple[str, ...]] = get_args(InferencePrecision)
_BY_NAME: Final[dict[str, InferencePrecision]] = {"auto": "auto", "32": "32", "bf16": "bf16"}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); ``False`` when torch cannot tell."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def as_inference_precision(value: str) -> InferencePrecision:
    """Check a precision setting read from a command line or a file.

    Args:
        value: ``"auto"``, ``"32"`` or ``"bf16"``.

    Returns:
        The same value, typed.

    Raises:
        ValueError: an unknown precision setting.
    """
    checked = _BY_NAME.get(value)
    if checked is not None:
        return checked
    raise ValueError(f"inference precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """``"bf16"`` or ``"float32"`` (the names ``proposals.json`` records)."""
    return "bf16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")


def resolve_inference_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype of the network for a precision setting on a device.

    Args:
        precision: ``"auto"``, ``"32"`` or ``"bf16"``.
        device: where the detector runs.

    Returns:
        ``torch.bfloat16`` (autocast) or ``torch.float32`` (no autocast).

    Raises:
        ValueError: an unknown precision setting.
    """
    as_inference_precision(precision)
    if precision == "32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    kind = torch.device(device).type
    if kind == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def inference_autocast(precision: str, device: torch.device | str) -> Iterator[torch.dtype]:
    """Run the enclosed inference in the resolved precision (see :func:`resolve_inference_dtype`).

    float32 disables autocast explicitly, so an enclosing autocast region (a Lightning trainer's precision
    plugin) does not leak into a run that asked for float32.

    Args:
        precision: ``"auto"``, ``"32"`` or ``"bf16"``.
        device: where the detector runs.

    Yields:
        The compute dtype in effect.
    """
    dtype = resolve_inference_dtype(precision, device)
    kind = torch.device(device).type
    with torch.autocast(kind, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        yield dtype
