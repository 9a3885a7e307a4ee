"""The bundle runtime: the bundle's configs parsed once, its network with the trained weights, one inferer, and
``predict(volume)``; shared by the batch job (:mod:`ic_moe_monai.segment`), the MONAI Label interactive engine and
the benchmarks.

On a GPU the volume goes to the device once, right after loading (the bundle's preprocessing starts with a
``ToDeviced``): orientation, intensity, slice stacking, resizing, network, argmax and inversion all run there, and
only the uint8 labelmap comes back to the host.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Compose, Invertd, LoadImaged
from monai.utils import TraceKeys
from torch.utils.data._utils.collate import collate, default_collate, default_collate_fn_map

from ic_moe_monai.inferers import SliceContextInferer, channel_argmax
from ic_moe_monai.io.dicom_series import read_dicom_series
from ic_moe_monai.io.discovery import Case
from ic_moe_monai.io.guards import ImageError
from ic_moe_monai.io.readers import read_image_file

__all__ = ["BundleSegmenter", "label_names", "load_case", "one_case_collate", "read_metadata"]

Progress = Callable[[int, int], None]


class BundleSegmenter:
    """The bundle's network, preprocessing (less its loader), inferer and checkpoint, ready for one case at a time.

    The configs are parsed once and every part is built once, with what this runtime needs decided before building:
    the inferer returns labels (``argmax``), so the volume's logits are never held; ``device`` is where the
    preprocessing moves the image, where the network runs and where the labels are inverted.

    Args:
        bundle: the bundle folder (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``).
        configs: config files merged after ``inference.json`` (e.g. a profile).
        device: where the volume is preprocessed and segmented.
        batch_size: slices per network call (default: the bundle's, ``inference_batch_size`` on a CPU and
            ``inference_batch_size_cuda`` on a GPU).
        amp: autocast on CUDA (default: the bundle's ``amp``).
        amp_dtype: ``"auto"``, ``"bfloat16"`` or ``"float16"`` (default: the bundle's ``amp_dtype``).

    Raises:
        FileNotFoundError: when the bundle has no trained weights at its ``ckpt_path``.
    """

    def __init__(
        self,
        bundle: str | Path,
        configs: Sequence[str] = (),
        device: torch.device | str = "cpu",
        batch_size: int | None = None,
        amp: bool | None = None,
        amp_dtype: str | None = None,
    ) -> None:
        bundle = Path(bundle)
        self.bundle = bundle
        self.device = torch.device(device)
        parser = ConfigParser()
        parser.read_config([str(bundle / "configs" / "inference.json"), *configs])
        parser["bundle_root"] = str(bundle)
        parser["device"] = f"$torch.device('{self.device}')"
        if batch_size is not None:
            parser["inference_batch_size"] = parser["inference_batch_size_cuda"] = int(batch_size)
        if amp is not None:
            parser["amp"] = bool(amp)
        if amp_dtype is not None:
            parser["amp_dtype"] = str(amp_dtype)
        if str(parser.get("inferer", {}).get("_target_", "")).endswith("SliceContextInferer"):
            parser["inferer#argmax"] = True  # labels per slice batch: the volume's logits are never held at once
        metadata = read_metadata(bundle)
        self.label_names = label_names(metadata, parser.get_parsed_content("label_names") if "label_names" in parser
                                       else None)  # fmt: skip
        self.version = str(metadata.get("version", ""))
        self.network = parser.get_parsed_content("network")
        self.ckpt_path = Path(parser.get_parsed_content("ckpt_path"))
        if not self.ckpt_path.is_file():
            raise FileNotFoundError(f"bundle {bundle}: no trained weights at {self.ckpt_path}.")
        self.load_weights()
        transforms = parser.get_parsed_content("preprocessing").transforms
        self.preprocessing = Compose([t for t in transforms if not isinstance(t, LoadImaged)])
        self.inferer = parser.get_parsed_content("inferer")
        self.batch_size: int | None = getattr(self.inferer, "batch_size", None)
        self.inverter = Invertd(keys="pred", transform=self.preprocessing, orig_keys="image", nearest_interp=True)

    def load_weights(self) -> None:
        """(Re)load the checkpoint into the network, e.g. after a training run replaced it."""
        self.network.load_state_dict(torch.load(self.ckpt_path, map_location=self.device, weights_only=True))
        self.network.eval()

    def preprocess(self, image: MetaTensor) -> dict[str, Any]:
        """The bundle's preprocessing of a loaded ``(X, Y, Z)`` image (a channel is added), on ``device``."""
        return self.preprocessing({"image": image})

    def predict(self, data: Mapping[str, Any], progress: Progress | None = None) -> MetaTensor:
        """Labels ``(1, X, Y, Z)`` (uint8, on the CPU) of a preprocessed case, in the loaded image's geometry.

        Args:
            data: :meth:`preprocess`'s output.
            progress: called with ``(slices done, slices)`` after each batch of slices.
        """
        image = data["image"]
        with torch.inference_mode():
            inputs = image[None].to(self.device)  # a no-op when the preprocessing put it there already
            if isinstance(self.inferer, SliceContextInferer):
                output = self.inferer(inputs, self.network, progress=progress)
            else:
                output = self.inferer(inputs, self.network)
            output = output.as_tensor() if isinstance(output, MetaTensor) else output
            labels = output[0] if output.shape[1] == 1 else channel_argmax(output)[0]
            pred = MetaTensor(labels.to(torch.uint8), meta=dict(image.meta),
                              applied_operations=list(image.applied_operations))  # fmt: skip
            inverted = self.inverter({**data, "pred": pred})["pred"]
            return inverted.cpu()  # the only transfer back: the uint8 labelmap

    def __call__(self, image: MetaTensor, progress: Progress | None = None) -> MetaTensor:
        """Labels ``(1, X, Y, Z)`` of a loaded image: :meth:`preprocess`, then :meth:`predict`."""
        return self.predict(self.preprocess(image), progress)


def read_metadata(bundle: str | Path) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` (empty when absent)."""
    path = Path(bundle) / "configs" / "metadata.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def label_names(metadata: Mapping[str, Any], fallback: Mapping[Any, str] | None = None) -> dict[int, str]:
    """Label value → name from the bundle's ``channel_def`` (``metadata.json``'s first output), else ``fallback``
    (e.g. the config's ``label_names``)."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    names = next(iter(outputs.values()), {}).get("channel_def") or fallback
    return {int(k): str(v) for k, v in (names or {}).items()}


def load_case(case: Case, max_bytes: int | str | None = None) -> MetaTensor:
    """The case's image ``(X, Y, Z)`` with its RAS affine, after its header passed the size and shape guard.

    DICOM series are read by pydicom in ITK's geometry (rescaled per file, MONOCHROME1 shown as MONOCHROME2); image
    files keep their data type, and NIfTI its voxel order (see :class:`~ic_moe_monai.io.readers.LoadVolume`); any
    path name works.

    Args:
        case: the case, as discovery found it.
        max_bytes: size limit of the volume as float32 (see :func:`~ic_moe_monai.io.guards.max_image_bytes`).

    Raises:
        ValueError: naming the file, when it is too large, cannot be read, or is not a finite 3D volume.
    """
    try:
        if case.kind == "dicom":
            tensor = read_dicom_series(case.files, max_bytes)
            tensor.meta["filename_or_obj"] = str(case.path)
            return tensor
        return read_image_file(case.path, max_bytes, dtype=None)
    except ImageError:
        raise
    except Exception as err:  # readers raise many types for corrupt or truncated files
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"{case.path}: cannot read the image ({detail[:200]})") from err


def one_case_collate(batch: Sequence[Any]) -> Any:
    """MONAI's ``list_data_collate``, except that a batch of one case gets its batch dimension as a view.

    Stacking copies the volume: on a GPU that doubles its memory for a moment, and on a CPU it also reorders a NIfTI
    volume's voxels (about a second for 512 × 512 × 300). Batches of several cases are collated by MONAI.
    """
    if len(batch) != 1:
        return list_data_collate(batch)
    return collate(batch, collate_fn_map={**default_collate_fn_map, MetaTensor: _meta_tensor_view,
                                          torch.Tensor: _tensor_view})  # fmt: skip


def _tensor_view(batch: Sequence[torch.Tensor], *, collate_fn_map: dict | None = None) -> torch.Tensor:
    return batch[0].unsqueeze(0)


def _meta_tensor_view(batch: Sequence[MetaTensor], *, collate_fn_map: dict | None = None) -> MetaTensor:
    """MONAI's ``collate_meta_tensor_fn`` for one MetaTensor, with ``unsqueeze`` in place of ``stack``."""
    item = batch[0]
    collated = MetaTensor(item.as_tensor().unsqueeze(0))
    collated.meta = default_collate([dict(item.meta) if item.meta else TraceKeys.NONE])
    collated.applied_operations = [item.applied_operations or TraceKeys.NONE]
    collated.is_batch = True
    if hasattr(item, "spatial_ndim"):
        collated.spatial_ndim = min(item.spatial_ndim, max(collated.ndim - 1, 1))
    return collated
