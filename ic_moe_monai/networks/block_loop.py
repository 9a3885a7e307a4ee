"""The loop over the encoder's blocks, each followed by its IC-MoE layer, run eagerly or through ``torch.compile``
(compiled once per mode, shared by every copy of a model)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ic_moe_monai.errors import ConfigError, config_flag
from ic_moe_monai.networks.sam_weights import ENCODER_CONFIGS

if TYPE_CHECKING:
    from ic_moe_monai.networks.ic_moe import ICMoE

__all__ = ["compile_setting", "compiled_run_blocks", "run_blocks"]


def run_blocks(
    model: ICMoE, tokens: torch.Tensor, experts: bool, start: int = 0, block_done: bool = False
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """The encoder's blocks from ``start`` on tokens ``(B, h, w, D)``, each followed by its IC-MoE layer if it has
    one (and, in a TinyViT, by its stage's patch merging if it ends a stage); with ``block_done``, ``tokens`` are
    block ``start``'s output already (a cached trunk)."""
    aux = []
    for i in range(start, ENCODER_CONFIGS[model.encoder_name].depth):
        if not (block_done and i == start):
            tokens = model._block(i, tokens)
        if experts and str(i) in model.moe_layers:
            tokens, layer_aux = model.moe_layers[str(i)](tokens)
            aux.append(layer_aux)
        tokens = model._after_block(i, tokens)
    return tokens, aux


_COMPILED_RUN_BLOCKS: dict[str, Callable] = {}


def compiled_run_blocks(mode: bool | str) -> Callable:
    """:func:`run_blocks` through ``torch.compile``, compiled on first use. A function of the model rather than a
    bound method, so that copies of a model (``copy.deepcopy``) never call into the original."""
    mode = "default" if mode is True else str(mode)
    if mode not in _COMPILED_RUN_BLOCKS:
        _COMPILED_RUN_BLOCKS[mode] = torch.compile(run_blocks, mode=mode)
    return _COMPILED_RUN_BLOCKS[mode]


def compile_setting(value: bool | str) -> bool | str:
    """``compile_blocks`` as given: on/off words (``"false"`` from a command line) as a bool, else a compile mode."""
    try:
        return config_flag(value, "compile_blocks")
    except ConfigError:
        return value
