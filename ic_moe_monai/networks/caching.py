"""Tensors derived from a module's parameters or buffers, reused between forwards while those do not change.

The fused IC-MoE layer and the mask decoder's positional encoding depend on parameters or buffers alone. In inference
they would be rebuilt, from the same values, by a few dozen small kernels on every forward; here they are kept on the
owning module and rebuilt only when a source tensor changes. A source counts as changed when its storage, dtype or
version counter changes: every in-place update (optimiser steps, ``load_state_dict``, ``nn.init``) bumps the version
counter. The owners drop their entries when moved or cast (``nn.Module._apply``: ``.to()``, ``.half()``, ...), whose
new tensors could otherwise reuse a freed storage. Writes through ``tensor.data`` bypass version counters.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

import torch
from torch import nn

__all__ = ["forget", "reuse_while_unchanged"]

T = TypeVar("T")


def reuse_while_unchanged(
    owner: nn.Module,
    name: str,
    sources: Iterable[torch.Tensor],
    compute: Callable[[], T],
    extra_key: tuple[Hashable, ...] = (),
) -> T:
    """``compute()``, kept as ``owner.__dict__[name]`` and returned again while ``sources`` and ``extra_key`` stay.

    Args:
        owner: the module that keeps the entry (outside its state dict).
        name: the entry's attribute name.
        sources: every tensor the result depends on.
        compute: builds the result.
        extra_key: further values the result depends on (e.g. the autocast dtype).
    """
    try:
        key = tuple((t.data_ptr(), t.dtype, t._version) for t in sources) + extra_key
    except RuntimeError:  # inference tensors (a module built under torch.inference_mode) have no version counter
        return compute()
    entry = owner.__dict__.get(name)
    if entry is None or entry[0] != key:
        entry = (key, compute())
        owner.__dict__[name] = entry
    return entry[1]


def forget(owner: nn.Module, name: str) -> None:
    """Drop the entry ``name`` of :func:`reuse_while_unchanged`."""
    owner.__dict__.pop(name, None)
