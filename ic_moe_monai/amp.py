"""Mixed precision settings shared by training, validation, inference and the interactive engine.

``amp_dtype`` in the bundle's configs is ``"auto"`` (bfloat16 where the GPU supports it, else float16), or
``"bfloat16"`` / ``"float16"`` (also ``"bf16"`` / ``"fp16"``), or a ``torch.dtype``. Autocast is used on CUDA only;
on the CPU every path runs in float32. A gradient scaler is needed for float16 alone: bfloat16 has float32's range.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["AMP_DTYPE_NAMES", "autocast", "needs_grad_scaler", "resolve_amp_dtype"]

AMP_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_amp_dtype(
    amp_dtype: str | torch.dtype | None = "auto", device: torch.device | str | None = None
) -> torch.dtype:
    """The autocast dtype for ``device``: ``"auto"`` (or ``None``) picks bfloat16 where supported, else float16.

    Raises:
        ValueError: for a name or dtype that is not a 16-bit float type, with the accepted values.
    """
    if isinstance(amp_dtype, torch.dtype):
        if amp_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be bfloat16 or float16, got {amp_dtype}.")
        return amp_dtype
    name = "auto" if amp_dtype is None else str(amp_dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        device = torch.device(device) if device is not None else None
        if device is not None and device.type == "cuda" and torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16
    if name not in AMP_DTYPE_NAMES:
        raise ValueError(f"amp_dtype must be one of auto, bfloat16 (bf16), float16 (fp16); got {amp_dtype!r}.")
    return AMP_DTYPE_NAMES[name]


def needs_grad_scaler(amp: bool, amp_dtype: torch.dtype) -> bool:
    """Gradient scaling is needed for float16 autocast only (bfloat16 keeps float32's exponent range)."""
    return bool(amp) and amp_dtype == torch.float16


def autocast(
    device: torch.device | str, enabled: bool = True, amp_dtype: str | torch.dtype | None = "auto"
) -> AbstractContextManager:
    """``torch.autocast`` on CUDA in the resolved dtype when ``enabled``; a no-op elsewhere."""
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=resolve_amp_dtype(amp_dtype, device))
