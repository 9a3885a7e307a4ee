"""CUDA autocast's casting policy, emulated on the CPU, so that mixed-precision dtype bugs show up without a GPU.

Plain CPU autocast is not enough: it keeps ``softmax`` in bfloat16, where CUDA autocast runs it (and norms, exp,
log, sums and the losses) in float32 while matrix products run in float16 / bfloat16. Ops that mix the two without
type promotion (``scatter``, in-place writes, ...) then fail on a GPU only. :class:`CudaAutocastEmulation` is a
``TorchFunctionMode`` that casts each call's floating-point tensors the way CUDA autocast would:

- matrix products and convolutions (``linear``, ``conv*``, ``matmul``, ``bmm``, ``einsum``, attention...) to the
  low-precision dtype;
- the float32 list of CUDA autocast (softmax, log_softmax, layer / group norm, exp, log, pow, sum, norm, the losses)
  to float32;
- every other op runs on its arguments as given, so dtype mismatches raise as they would on CUDA.

Reference: the op lists of https://pytorch.org/docs/stable/amp.html#cuda-ops-that-can-autocast-to-float16 .
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

__all__ = ["CudaAutocastEmulation"]

_T = torch.Tensor

LOW_PRECISION = {
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    torch.matmul, _T.matmul, _T.__matmul__, _T.__rmatmul__, torch.mm, _T.mm, torch.bmm, _T.bmm, torch.addmm,
    _T.addmm, torch.baddbmm, _T.baddbmm, torch.addbmm, torch.mv, _T.mv, torch.addmv, torch.einsum, torch.prelu,
    F.scaled_dot_product_attention, torch.chain_matmul, torch.linalg.multi_dot, torch.conv2d, torch.conv1d,
}  # fmt: skip

FLOAT32 = {
    torch.softmax, F.softmax, _T.softmax, torch.log_softmax, F.log_softmax, _T.log_softmax, F.softmin,
    F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, torch.exp, _T.exp, torch.expm1, _T.expm1,
    torch.log, _T.log, torch.log1p, _T.log1p, torch.log2, _T.log2, torch.log10, _T.log10, torch.pow, _T.pow,
    _T.__pow__, _T.__rpow__, torch.rsqrt, _T.rsqrt, torch.reciprocal, _T.reciprocal, torch.sum, _T.sum, torch.prod,
    _T.prod, torch.cumsum, _T.cumsum, torch.cumprod, _T.cumprod, torch.norm, _T.norm, torch.linalg.vector_norm,
    F.normalize, F.cross_entropy, F.nll_loss, F.binary_cross_entropy_with_logits, F.mse_loss, F.l1_loss,
    F.smooth_l1_loss, F.kl_div, F.softplus, torch.cdist, F.cosine_similarity, torch.logsumexp, _T.logsumexp,
    torch.erfinv, _T.__rtruediv__,
}  # fmt: skip

WIDEST = {torch.addcdiv, torch.addcmul, torch.atan2, torch.cross, torch.dot, torch.tensordot, F.grid_sample,
          torch.scatter_add, _T.scatter_add, _T.scatter_add_}  # fmt: skip

_AUTOCAST_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cast(value: object, dtype: torch.dtype) -> object:
    if isinstance(value, torch.Tensor) and value.dtype in _AUTOCAST_TYPES and value.dtype != dtype:
        return value.to(dtype)
    return value


class CudaAutocastEmulation(TorchFunctionMode):
    """Run the code inside as CUDA autocast would cast it, on any device.

    Args:
        dtype: the low-precision dtype, ``torch.float16`` or ``torch.bfloat16``.
    """

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.dtype = dtype
        self.calls = {"low": 0, "float32": 0}  # how many calls were cast, so a test can check the mode was active

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = None
        if func in LOW_PRECISION:
            target, kind = self.dtype, "low"
        elif func in FLOAT32:
            target, kind = torch.float32, "float32"
        elif func in WIDEST:
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            floats = [t.dtype for t in tensors if t.is_floating_point()]
            target = torch.float32 if torch.float32 in floats else (floats[0] if floats else None)
            kind = None
        if target is not None:
            args, kwargs = tree_map(lambda v: _cast(v, target), (args, kwargs))
            if kind:
                self.calls[kind] += 1
        return func(*args, **kwargs)
