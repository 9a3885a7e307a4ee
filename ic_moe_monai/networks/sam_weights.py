"""Building SAM's parts for a given size and loading official SAM / MedSAM checkpoints into them.

SAM checkpoints (``sam_vit_b_01ec64.pth`` and friends, MedSAM's ``medsam_vit_b.pth``) are plain state dicts of
``segment_anything.modeling.Sam``: keys ``image_encoder.*``, ``prompt_encoder.*`` and ``mask_decoder.*``.
Loading keeps the pretrained encoder bit-exact, except for the tensors whose shape depends on the input size or the
attention window (absolute position embedding, relative-position tables of global blocks and, when the window is not
SAM's 14, of windowed blocks), which are interpolated, and the decoder's per-mask parameters, which are adapted to
``K + 1`` class masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

__all__ = [
    "ENCODER_CONFIGS",
    "TINY_VIT_ENCODERS",
    "EncoderConfig",
    "LoadReport",
    "SamCheckpointError",
    "auto_window_size",
    "build_image_encoder",
    "build_mask_decoder",
    "build_prompt_encoder",
    "detect_sam_variant",
    "fit_tensor",
    "key_mismatch",
    "load_sam_checkpoint",
    "read_sam_state_dict",
    "source_key",
]

SAM_PRETRAIN_SIZE = 1024


@dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of one ``ImageEncoderViT`` size (and the decoder width that goes with it)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    patch_size: int = 16
    window_size: int = 14
    out_chans: int = 256  # = prompt embedding and mask decoder width
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8


# The three official sizes, exactly as ``segment_anything.build_sam`` makes them, and ``lite``: the same classes
# at a size that trains from scratch on a CPU (global attention everywhere, small patches for small images).
ENCODER_CONFIGS: dict[str, EncoderConfig] = {
    "vit_b": EncoderConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": EncoderConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": EncoderConfig(1280, 32, 16, (7, 15, 23, 31)),
    "lite": EncoderConfig(
        embed_dim=192,
        depth=6,
        num_heads=6,
        global_attn_indexes=(0, 1, 2, 3, 4, 5),
        patch_size=4,
        window_size=0,
        out_chans=128,
        decoder_mlp_dim=512,
        decoder_heads=4,
    ),
    # LiteMedSAM's TinyViT (networks/tiny_vit.py, not an ImageEncoderViT): 10 attention blocks over stages 1-3, the
    # last 320 wide; stride 4 from input to embedding ("patch_size"); SAM's vit_b decoder width.
    "medsam_lite": EncoderConfig(
        embed_dim=320, depth=10, num_heads=10, global_attn_indexes=(), patch_size=4, window_size=0
    ),
}
# sizes that are TinyViTs rather than segment_anything's ImageEncoderViT
TINY_VIT_ENCODERS = frozenset({"medsam_lite"})


class SamCheckpointError(ValueError):
    """A SAM checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class LoadReport:
    """What :func:`load_sam_checkpoint` did besides copying tensors unchanged."""

    path: str
    variant: str
    interpolated: list[str] = field(default_factory=list)  # resized to the model's img_size
    adapted: list[str] = field(default_factory=list)  # reshaped to K + 1 masks or to in_channels
    loaded: list[str] = field(default_factory=list)  # every key copied into the model
    sha256: str | None = None  # of the file, where it was checked


def auto_window_size(encoder: str, img_size: int) -> int:
    """The attention window of the windowed blocks that costs fewer FLOPs at ``img_size``: SAM's own (14) or the
    whole token grid (global attention).

    SAM pads the token grid to a multiple of its window: at ``img_size`` 256 the 16 x 16 grid becomes 28 x 28, over
    three times the tokens for attention and its projections, while one 16-wide window attends over 256 tokens only.
    At 1024 (a 64 x 64 grid), global attention over 4096 tokens would cost more than SAM's windows. On a tie SAM's
    window is kept. ``lite`` keeps its global attention everywhere (window 0).

    Args:
        encoder: encoder size.
        img_size: square input size.
    """
    cfg = _config(encoder)
    grid = img_size // cfg.patch_size
    if cfg.window_size == 0:
        return 0
    return min((cfg.window_size, grid), key=lambda window: _windowed_block_flops(grid, window, cfg.embed_dim))


def _windowed_block_flops(grid: int, window: int, dim: int) -> int:
    """Multiply-adds of one windowed ViT block: qkv and output projections (4 D² per token) on the padded grid, the
    MLP (8 D² per token) on the real one, and attention (2 N² D per window of N tokens)."""
    padded = -(-grid // window) * window
    windows = (padded // window) ** 2
    return padded**2 * 4 * dim**2 + grid**2 * 8 * dim**2 + windows * 2 * window**4 * dim


def build_image_encoder(
    encoder: str, img_size: int, in_channels: int = 3, window_size: int | None = None
) -> ImageEncoderViT:
    """Build an unmodified ``ImageEncoderViT`` of size ``encoder`` for square inputs of ``img_size``.

    Args:
        encoder: encoder size.
        img_size: square input size (multiple of the patch size).
        in_channels: input channels.
        window_size: attention window of the non-global blocks (0: global everywhere); default SAM's (or ``lite``'s).
    """
    cfg = _config(encoder)
    if encoder in TINY_VIT_ENCODERS:
        raise ValueError(f"encoder {encoder!r} is a TinyViT: build it with ic_moe_monai.networks.tiny_vit.")
    if img_size % cfg.patch_size:
        raise ValueError(f"img_size={img_size} must be a multiple of the patch size {cfg.patch_size} of {encoder!r}.")
    if window_size is None:
        window_size = cfg.window_size
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=cfg.patch_size,
        in_chans=in_channels,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=4,
        out_chans=cfg.out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=window_size,
        global_attn_indexes=cfg.global_attn_indexes,
    )


def build_prompt_encoder(encoder: str, img_size: int) -> PromptEncoder:
    """SAM's prompt encoder for an ``img_size`` input (points and boxes are given in input pixels)."""
    cfg = _config(encoder)
    grid = img_size // cfg.patch_size
    return PromptEncoder(
        embed_dim=cfg.out_chans,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )


def build_mask_decoder(encoder: str, num_classes: int) -> MaskDecoder:
    """SAM's mask decoder with one mask token per class, background included (``num_classes + 1``)."""
    cfg = _config(encoder)
    return MaskDecoder(
        num_multimask_outputs=num_classes,  # MaskDecoder adds one token: K + 1 masks in all
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=cfg.out_chans, mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads
        ),
        transformer_dim=cfg.out_chans,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


def read_sam_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a SAM-format state dict safely (``weights_only=True``), with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise SamCheckpointError(f"SAM checkpoint {path}: no such file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for foreign bytes; all mean the same to the user
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SamCheckpointError(
            f"SAM checkpoint {path}: not a readable PyTorch checkpoint of tensors ({first_line})."
        ) from err
    # Training checkpoints (MedSAM's own, MONAI's CheckpointSaver) wrap the state dict in a dict.
    for wrapper in ("model", "state_dict", "network"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SamCheckpointError(f"SAM checkpoint {path}: the file holds {type(obj).__name__}, not a state dict.")
    state = {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel / DDP prefixes
    if "image_encoder.pos_embed" not in state:
        raise SamCheckpointError(
            f"SAM checkpoint {path}: not a SAM checkpoint (no 'image_encoder.pos_embed'; "
            f"first keys: {', '.join(list(state)[:3]) or 'none'})."
        )
    return state


def detect_sam_variant(state: Mapping[str, torch.Tensor]) -> str:
    """Name the ViT size of a SAM state dict from its embedding width and block count."""
    width = state["image_encoder.pos_embed"].shape[-1]
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for name, cfg in ENCODER_CONFIGS.items():
        if (cfg.embed_dim, cfg.depth) == (width, depth) and name != "lite" and name not in TINY_VIT_ENCODERS:
            return name
    return f"an unknown ViT (embed dim {width}, {depth} blocks)"


def load_sam_checkpoint(
    path: str | Path,
    image_encoder: ImageEncoderViT,
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
    encoder: str,
) -> LoadReport:
    """Load an official SAM or MedSAM checkpoint into the three SAM parts of an IC-MoE network.

    Args:
        path: the ``.pth`` file.
        image_encoder, prompt_encoder, mask_decoder: the parts to fill, as built by this module.
        encoder: the size the parts were built for (``vit_b``, ``vit_l`` or ``vit_h``).

    Returns:
        a :class:`LoadReport` naming the interpolated and adapted tensors.

    Raises:
        SamCheckpointError: missing file, not a checkpoint, another ViT size, missing or unexpected keys.
    """
    state = read_sam_state_dict(path)
    variant = detect_sam_variant(state)
    if variant != encoder:
        cfg = _config(encoder)
        raise SamCheckpointError(
            f"SAM checkpoint {path} holds a {variant} image encoder, but encoder={encoder!r} "
            f"(embed dim {cfg.embed_dim}, {cfg.depth} blocks) was requested; pass encoder={variant!r} "
            "or the matching checkpoint."
        )
    report = LoadReport(path=str(path), variant=variant)
    parts = {"image_encoder": image_encoder, "prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder}
    _check_keys(path, state, parts)
    for prefix, module in parts.items():
        target = module.state_dict()
        new_state = {}
        for key, current in target.items():
            full = f"{prefix}.{key}"
            source_name = source_key(full, state)
            if source_name != full:
                report.adapted.append(full)
            new_state[key] = fit_tensor(full, state[source_name], current, report)
        module.load_state_dict(new_state, strict=True)
        report.loaded.extend(f"{prefix}.{k}" for k in new_state)
    return report


def _config(encoder: str) -> EncoderConfig:
    if encoder not in ENCODER_CONFIGS:
        raise ValueError(f"encoder must be one of {sorted(ENCODER_CONFIGS)}, got {encoder!r}.")
    return ENCODER_CONFIGS[encoder]


def _check_keys(path: str | Path, state: Mapping[str, torch.Tensor], parts: Mapping[str, nn.Module]) -> None:
    expected = {f"{prefix}.{k}" for prefix, module in parts.items() for k in module.state_dict()}
    # The decoder's per-mask parameters are adapted, so compare them by family, not by index.
    expected_fixed = {k for k in expected if not _is_per_mask(k)}
    given_fixed = {k for k in state if not _is_per_mask(k) and not k.startswith(("pixel_mean", "pixel_std"))}
    missing = sorted(expected_fixed - given_fixed)
    unexpected = sorted(given_fixed - expected_fixed)
    if not any(k.startswith("mask_decoder.output_hypernetworks_mlps.0.") for k in state):
        missing.append("mask_decoder.output_hypernetworks_mlps.0.*")
    if missing or unexpected:
        raise SamCheckpointError(f"SAM checkpoint {path}: {key_mismatch(missing, unexpected)}.")


def key_mismatch(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    """``"N missing key(s), e.g. …; M unexpected key(s), e.g. …"`` for a checkpoint that does not fit."""
    found = []
    if missing:
        found.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        found.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
    return "; ".join(found)


def source_key(key: str, state: Mapping[str, torch.Tensor]) -> str:
    """The checkpoint key a model key is filled from: hypernetwork MLP ``i`` comes from ``i mod n_masks``."""
    if not _is_per_mask(key):
        return key
    n_masks = state["mask_decoder.mask_tokens.weight"].shape[0]
    parts = key.split(".")
    parts[2] = str(int(parts[2]) % n_masks)
    return ".".join(parts)


def _is_per_mask(key: str) -> bool:
    return key.startswith("mask_decoder.output_hypernetworks_mlps.")


def fit_tensor(key: str, source: torch.Tensor, current: torch.Tensor, report: LoadReport) -> torch.Tensor:
    """Return ``source`` reshaped to ``current``'s shape where the design allows it, recording what was done."""
    if source.shape == current.shape:
        return source
    if key.endswith("image_encoder.pos_embed"):
        report.interpolated.append(key)
        return _resize_pos_embed(source, current.shape[1:3])
    if ".attn.rel_pos_" in key and key.startswith("image_encoder."):
        report.interpolated.append(key)
        return _resize_rel_pos(source, current.shape[0])
    if key == "image_encoder.patch_embed.proj.weight" and source.shape[1] != current.shape[1]:
        report.adapted.append(key)
        # A different number of input channels: spread the RGB filters' mean evenly over the new channels,
        # so an image repeated over channels gives the pretrained response.
        mean = source.mean(dim=1, keepdim=True) * (source.shape[1] / current.shape[1])
        return mean.expand(-1, current.shape[1], -1, -1).clone()
    if key in ("mask_decoder.mask_tokens.weight",) or key.startswith("mask_decoder.iou_prediction_head.layers."):
        report.adapted.append(key)
        return _cycle_rows(source, current.shape[0])
    raise SamCheckpointError(
        f"SAM checkpoint {report.path}: tensor {key} has shape {tuple(source.shape)}, "
        f"the model needs {tuple(current.shape)}."
    )


def _cycle_rows(source: torch.Tensor, rows: int) -> torch.Tensor:
    """Take the checkpoint's rows in turn (row i comes from row i mod n) to make ``rows`` rows."""
    index = torch.arange(rows) % source.shape[0]
    return source[index].clone()


def _resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, H, W, D) absolute position embedding → (1, h, w, D), bicubic as for ViT fine-tuning."""
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2), size=tuple(grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).contiguous()


def _resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """(2S - 1, C) relative position table → (length, C), linear as SAM's own ``get_rel_pos`` does."""
    resized = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear", align_corners=False)
    return resized.squeeze(0).t().contiguous()
