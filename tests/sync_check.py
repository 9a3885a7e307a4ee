"""Find host syncs and data-dependent shapes on the CPU: what would stall a GPU step or break CUDA graph capture.

:class:`NoHostSync` is a ``TorchDispatchMode`` that raises on every aten op that reads a device value on the host
(``.item()``, ``bool(tensor)``, ``nonzero``, ``unique``, boolean-mask indexing, ...): on CUDA each one waits for the
device, and none can be captured in a CUDA graph. Run a training step under it on the CPU to prove it is free of them.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncError", "NoHostSync"]

_aten = torch.ops.aten

SYNCING = {
    _aten._local_scalar_dense.default,  # .item(), float(t), bool(t), if t: ...
    _aten.nonzero.default,
    _aten.nonzero_static.default,
    _aten.argwhere.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.masked_select.default,
    _aten.repeat_interleave.Tensor,
    _aten.equal.default,
    _aten.is_nonzero.default,
    _aten.multinomial.default,  # not a sync on CUDA, but its CPU generator path is not capturable
}


class HostSyncError(RuntimeError):
    """An op that would synchronise the host with the device (or has a data-dependent shape)."""


def _has_bool_index(indices: object) -> bool:
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices
    )


class NoHostSync(TorchDispatchMode):
    """Raise :class:`HostSyncError` on the first op that would sync a CUDA device with the host.

    Args:
        allow: op overloads to let through (e.g. ``torch.ops.aten.nonzero.default``).
    """

    def __init__(self, allow: set | None = None) -> None:
        super().__init__()
        self.allow = allow or set()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func not in self.allow:
            if func in SYNCING:
                raise HostSyncError(f"{func} reads a device value on the host (sync / data-dependent shape)")
            if func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default) and _has_bool_index(
                args[1]
            ):
                raise HostSyncError(f"{func} with a boolean mask has a data-dependent shape (nonzero)")
            if func in (_aten._to_copy.default, _aten.copy_.default):
                source = args[1] if func is _aten.copy_.default else args[0]
                target = kwargs.get("device") if func is _aten._to_copy.default else args[0].device
                if isinstance(source, torch.Tensor) and target is not None and torch.device(target) != source.device:
                    raise HostSyncError(f"{func} moves a tensor between devices ({source.device} → {target})")
        return func(*args, **kwargs)
