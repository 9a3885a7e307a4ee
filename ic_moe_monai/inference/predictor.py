"""The bundle runtime: the bundle's configs parsed once, its network with the trained weights, one inferer, and
``predict(volume)``; shared by the batch job (:mod:`ic_moe_monai.segment`), the MONAI Label interactive engine and
the benchmarks.

On a GPU the volume goes to the device once, right after loading (the bundle's preprocessing starts with a
``ToDeviced``): orientation, intensity, slice stacking, resizing, network, argmax and inversion all run there, and
only the uint8 labelmap comes back to the host.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Compose, Invertd, LoadImaged
from monai.utils import TraceKeys
from torch.utils.data._utils.collate import collate, default_collate, default_collate_fn_map

from ic_moe_monai.errors import config_flag
from ic_moe_monai.inference.inferers import SliceContextInferer, channel_argmax, uncertainty_map
from ic_moe_monai.inference.postprocessing import keep_largest_component
from ic_moe_monai.inference.quality import CaseQuality, QualityCalibration, file_sha256, geometry_signals
from ic_moe_monai.io.dicom_seg import SegmentCode, read_segment_codes
from ic_moe_monai.io.dicom_series import read_dicom_series
from ic_moe_monai.io.discovery import Case
from ic_moe_monai.io.guards import ImageError
from ic_moe_monai.io.readers import read_image_file
from ic_moe_monai.networks.checkpoints import CheckpointMismatchError, check_checkpoint, class_count_from_shapes

__all__ = ["BundleError", "BundleSegmenter", "check_affine", "label_names", "load_case", "one_case_collate",
           "read_metadata"]  # fmt: skip

Progress = Callable[[int, int], None]


logger = logging.getLogger(__name__)


class BundleError(ValueError):
    """A bundle that cannot be used, in one line naming it: no ``configs/inference.json``, configs that cannot be
    read or built into a network, label names that differ between the configs and ``metadata.json``, or weights that
    are missing, unreadable, do not fit the network or were trained for other classes or preprocessing."""


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
        options: config values set before anything is built, e.g. ``{"tta_mirror": False}`` (the inference-time
            options ``tta_mirror``, ``keep_largest_component`` and ``ensemble_ckpts`` of ``inference.json``).
        qc_threshold: flag a case whose estimated Dice is below it (default: the calibration's).

    Each :meth:`predict` leaves the case's :class:`~ic_moe_monai.inference.quality.CaseQuality` in :attr:`last_quality`
    (and its signals in :attr:`last_signals`) when the bundle has a quality calibration (``quality_calibration``,
    by default ``models/quality.json``, written by ``run evaluating``); else both are ``None``.

    Raises:
        BundleError: the bundle or a config is missing or cannot be read, a part cannot be built (e.g. the network
            on an unsupported device), or the weights at its ``ckpt_path`` are missing, unreadable or do not fit.
    """

    def __init__(
        self,
        bundle: str | Path,
        configs: Sequence[str] = (),
        device: torch.device | str = "cpu",
        batch_size: int | None = None,
        amp: bool | None = None,
        amp_dtype: str | None = None,
        options: Mapping[str, Any] | None = None,
        qc_threshold: float | None = None,
    ) -> None:
        bundle = Path(bundle)
        self.bundle = bundle
        self.device = torch.device(device)
        parser = _read_configs(bundle, configs)
        parser["bundle_root"] = str(bundle)
        parser["device"] = f"$torch.device('{self.device}')"
        if batch_size is not None:
            parser["inference_batch_size"] = parser["inference_batch_size_cuda"] = int(batch_size)
        if amp is not None:
            parser["amp"] = bool(amp)
        if amp_dtype is not None:
            parser["amp_dtype"] = str(amp_dtype)
        for key, value in (options or {}).items():
            parser[key] = value
        if str(parser.get("inferer", {}).get("_target_", "")).endswith("SliceContextInferer"):
            parser["inferer#argmax"] = True  # labels per slice batch: the volume's logits are never held at once
        metadata = read_metadata(bundle)
        configured = _parsed(bundle, parser, "label_names") if "label_names" in parser else None
        self.label_names = label_names(metadata, configured)
        _check_same_names(bundle, self.label_names, configured)
        self.checkpoint_info = _parsed(bundle, parser, "checkpoint_info") if "checkpoint_info" in parser else None
        try:
            self.segment_codes: dict[int, dict[str, SegmentCode]] = read_segment_codes(metadata)
        except ValueError as err:
            raise BundleError(f"bundle {bundle}: configs/metadata.json: {err}") from err
        self.version = str(metadata.get("version", ""))
        self.network = _parsed(bundle, parser, "network")
        self.ckpt_path = Path(_parsed(bundle, parser, "ckpt_path"))
        self.load_weights()
        # test-time averaging over checkpoints (and the plain network without any), as the bundle's evaluator runs
        self.prediction_network = (
            _parsed(bundle, parser, "prediction_network") if "prediction_network" in parser else self.network
        )
        self.keep_largest_component = config_flag(
            parser.get_parsed_content("keep_largest_component", default=False), "keep_largest_component"
        )
        transforms = _parsed(bundle, parser, "preprocessing").transforms
        self.preprocessing = Compose([t for t in transforms if not isinstance(t, LoadImaged)])
        self.inferer = _parsed(bundle, parser, "inferer")
        self.batch_size: int | None = getattr(self.inferer, "batch_size", None)
        self.inverter = Invertd(keys="pred", transform=self.preprocessing, orig_keys="image", nearest_interp=True)
        self.quality = _quality_calibration(bundle, parser, self.ckpt_path)
        if self.quality is not None and isinstance(self.inferer, SliceContextInferer):
            self.inferer.quality = True
        self.qc_threshold = qc_threshold
        self.last_quality: CaseQuality | None = None
        self.last_signals: dict[str, Any] | None = None
        self.last_uncertainty: np.ndarray | None = None

    def load_weights(self) -> None:
        """(Re)load the checkpoint into the network, e.g. after a training run replaced it.

        Raises:
            BundleError: the checkpoint is missing, is not a readable weights-only PyTorch checkpoint, or does not
                fit the network.
        """
        where = f"bundle {self.bundle}: {_shown(self.ckpt_path, self.bundle)}"
        if not self.ckpt_path.is_file():
            raise BundleError(f"{where}: no trained weights there (no such file).")
        try:
            state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        except Exception as err:  # torch.load raises many types for files that are not checkpoints
            raise BundleError(f"{where} is not a readable checkpoint ({_checkpoint_problem(err)}).") from err
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BundleError(f"{where} is not a state dict of tensors (it holds a {type(state).__name__}).")
        try:
            check_checkpoint(state, self.checkpoint_info, _shown(self.ckpt_path, self.bundle))
        except CheckpointMismatchError as err:
            raise BundleError(f"bundle {self.bundle}: {err}") from err
        mismatch = _state_dict_mismatch(self.network, state)
        if mismatch:
            classes = class_count_from_shapes(state)
            expected = class_count_from_shapes(self.network.state_dict())
            if classes is not None and expected is not None and classes != expected:
                mismatch = f"it has {classes} classes, the configs {expected}; {mismatch}"
            raise BundleError(f"{where} does not fit the network ({mismatch}).")
        self.network.load_state_dict(state)
        self.network.eval()

    def preprocess(self, image: MetaTensor) -> dict[str, Any]:
        """The bundle's preprocessing of a loaded ``(X, Y, Z)`` image (a channel is added), on ``device``."""
        return self.preprocessing({"image": image})

    def predict(
        self, data: Mapping[str, Any], progress: Progress | None = None, uncertainty: bool = False
    ) -> MetaTensor:
        """Labels ``(1, X, Y, Z)`` (uint8, on the CPU) of a preprocessed case, in the loaded image's geometry.

        Args:
            data: :meth:`preprocess`'s output.
            progress: called with ``(slices done, slices)`` after each batch of slices.
            uncertainty: also leave where the network is unsure in :attr:`last_uncertainty`: ``(X, Y, Z)`` uint8 in
                the same geometry, 0 where one class has all the probability, 255 where all classes have the same
                (``1 - max softmax``, scaled by its largest possible value ``1 - 1/C``). For the preview.
        """
        image = data["image"]
        self.last_quality = self.last_signals = self.last_uncertainty = None
        with torch.inference_mode():
            inputs = image[None].to(self.device)  # a no-op when the preprocessing put it there already
            if isinstance(self.inferer, SliceContextInferer):
                output = self.inferer(inputs, self.prediction_network, progress=progress, uncertainty=uncertainty)
            else:
                output = self.inferer(inputs, self.prediction_network)
            output = output.as_tensor() if isinstance(output, MetaTensor) else output
            labels = output[0] if output.shape[1] == 1 else channel_argmax(output)[0]
            pred = MetaTensor(labels.to(torch.uint8), meta=dict(image.meta),
                              applied_operations=list(image.applied_operations))  # fmt: skip
            inverted = self.inverter({**data, "pred": pred})["pred"].cpu()  # the only transfer back: uint8 labels
            if uncertainty:
                self.last_uncertainty = self._inverted_uncertainty(data, output)
        self.assess_last(image)
        return keep_largest_component(inverted) if self.keep_largest_component else inverted

    def _inverted_uncertainty(self, data: Mapping[str, Any], output: torch.Tensor) -> np.ndarray | None:
        """The uncertainty map of the last volume in the loaded image's geometry: from the logits, or from the
        inferer, which makes it batch by batch when it returns labels."""
        if output.shape[1] > 1:
            unsure = _volume_uncertainty(output[0])
        else:
            made = getattr(self.inferer, "last_uncertainty", None)
            if not made:
                return None
            unsure = made[0]
        image = data["image"]
        unsure = MetaTensor(unsure, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        return np.asarray(self.inverter({**data, "pred": unsure})["pred"].cpu()[0])

    def assess_last(self, image: MetaTensor) -> CaseQuality | None:
        """The quality of the inferer's last volume, ``image`` (preprocessed), into :attr:`last_quality` and
        :attr:`last_signals`; None without a calibration."""
        signals = getattr(self.inferer, "last_signals", None) if self.quality is not None else None
        if not signals:
            self.last_quality = self.last_signals = None
            return None
        self.last_signals = geometry_signals(signals[0], image.affine, image.shape[1:], self.inferer.slice_axis)
        self.last_quality = self.quality.assess(self.last_signals, self.qc_threshold)
        return self.last_quality

    def __call__(self, image: MetaTensor, progress: Progress | None = None) -> MetaTensor:
        """Labels ``(1, X, Y, Z)`` of a loaded image: :meth:`preprocess`, then :meth:`predict`."""
        return self.predict(self.preprocess(image), progress)


def _volume_uncertainty(scores: torch.Tensor) -> torch.Tensor:
    """:func:`~ic_moe_monai.inference.inferers.uncertainty_map` of one volume's ``(C, X, Y, Z)`` logits, slice by
    slice (slices as the batch), as ``(1, X, Y, Z)``."""
    return uncertainty_map(scores.movedim(-1, 0)).movedim(0, -1)  # (Z, C, X, Y) → (Z, 1, X, Y) → (1, X, Y, Z)


def _quality_calibration(bundle: Path, parser: ConfigParser, checkpoint: Path) -> QualityCalibration | None:
    """The bundle's quality calibration; None when it names none, the file is not there (not calibrated yet) or
    it was fitted for other weights than ``checkpoint`` (trained again since: said in a warning)."""
    if "quality_calibration" not in parser:
        return None
    path = _parsed(bundle, parser, "quality_calibration")
    if not path or not Path(path).is_file():
        return None
    try:
        calibration = QualityCalibration.load(path)
    except ValueError as err:
        raise BundleError(f"bundle {bundle}: {err}") from err
    if calibration.checkpoint_sha256 and calibration.checkpoint_sha256 != file_sha256(checkpoint):
        logger.warning("%s was fitted for other weights than %s: no quality scores until `run evaluating` "
                       "refits it", path, checkpoint)  # fmt: skip
        return None
    return calibration


def read_metadata(bundle: str | Path) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` (empty when absent).

    Raises:
        BundleError: the file is not a JSON object.
    """
    path = Path(bundle) / "configs" / "metadata.json"
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"bundle {bundle}: configs/metadata.json cannot be read ({_first_line(err)}).") from err
    if not isinstance(metadata, dict):
        raise BundleError(f"bundle {bundle}: configs/metadata.json is not a JSON object.")
    return metadata


def label_names(metadata: Mapping[str, Any], fallback: Mapping[Any, str] | None = None) -> dict[int, str]:
    """Label value → name from the bundle's ``channel_def`` (``metadata.json``'s first output), else ``fallback``
    (e.g. the config's ``label_names``)."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    names = next(iter(outputs.values()), {}).get("channel_def") or fallback
    return {int(k): str(v) for k, v in (names or {}).items()}


def _check_same_names(bundle: Path, names: Mapping[int, str], configured: Mapping[Any, str] | None) -> None:
    """The configs' ``label_names`` and ``metadata.json``'s ``channel_def`` must agree: the first decides the network,
    the second what outputs (statistics, previews, DICOM SEG, MONAI Label) call its labels."""
    if not configured:
        return
    ours = {int(k): str(v) for k, v in configured.items()}
    if ours != dict(names):
        raise BundleError(
            f"bundle {bundle}: the label names of its configs ({_names(ours)}) and of "
            f"configs/metadata.json's channel_def ({_names(names)}) differ; make them the same."
        )


def _names(names: Mapping[int, str]) -> str:
    return ", ".join(f"{v} {n}" for v, n in sorted(names.items()))


def load_case(case: Case, max_bytes: int | str | None = None) -> MetaTensor:
    """The case's image ``(X, Y, Z)`` with its RAS affine, after its header passed the size and shape guard.

    DICOM series are read by pydicom in ITK's geometry (rescaled per file, MONOCHROME1 shown as MONOCHROME2); image
    files keep their data type, and NIfTI its voxel order (see :class:`~ic_moe_monai.io.readers.LoadVolume`); any
    path name works.

    Args:
        case: the case, as discovery found it.
        max_bytes: size limit of the volume as float32 (see :func:`~ic_moe_monai.io.guards.max_image_bytes`).

    Raises:
        ValueError: naming the file, when it is too large, cannot be read, is not a finite 3D volume, or its affine
            is singular (:class:`~ic_moe_monai.io.guards.ImageError` for what the guards and readers refuse).
    """
    try:
        if case.kind == "dicom":
            tensor = read_dicom_series(case.files, max_bytes)
            tensor.meta["filename_or_obj"] = str(case.path)
        else:
            tensor = read_image_file(case.path, max_bytes, dtype=None)
    except ImageError:
        raise
    except Exception as err:  # readers raise many types for corrupt or truncated files
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"{case.path}: cannot read the image ({detail[:200]})") from err
    check_affine(tensor.affine, case.path)
    return tensor


def check_affine(affine: Any, where: object) -> None:
    """Refuse a voxel-to-world matrix that cannot be inverted: orienting, resampling and writing the labelmap back
    all need its inverse.

    Raises:
        ImageError: naming ``where`` and what is wrong (non-finite values, an axis of zero length, parallel axes).
    """
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    lengths = np.linalg.norm(matrix, axis=0) if np.isfinite(matrix).all() else None
    if lengths is None:
        problem = "it holds NaN or infinite values"
    elif (lengths < 1e-9).any():
        problem = f"voxel axis {int(np.argmin(lengths))} has zero length (zero spacing)"
    elif abs(np.linalg.det(matrix)) < 1e-6 * float(np.prod(lengths)):
        problem = "its voxel axes are (nearly) parallel"
    else:
        return
    rows = " / ".join(" ".join(f"{v:.4g}" for v in row) for row in matrix)
    raise ImageError(f"{where}: singular/degenerate affine ({problem}; voxel-to-world matrix {rows}); the image "
                     "has no usable geometry.")  # fmt: skip


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


# ------------------------------------------------------------------------------------------------ bundle errors
def _read_configs(bundle: Path, configs: Sequence[str]) -> ConfigParser:
    """The bundle's ``inference.json`` and the extra configs, merged."""
    files = [bundle / "configs" / "inference.json", *map(Path, configs)]
    if not bundle.is_dir():
        raise BundleError(f"bundle {bundle}: no such folder.")
    for path in files:
        if not path.is_file():
            what = f"bundle {bundle}: no configs/inference.json" if path == files[0] else f"config {path}: no such file"
            raise BundleError(f"{what}.")
    parser = ConfigParser()
    try:
        parser.read_config([str(f) for f in files])
    except Exception as err:  # JSON / YAML syntax errors, unreadable files
        raise BundleError(f"bundle {bundle}: cannot read its configs ({_first_line(err)}).") from err
    return parser


def _parsed(bundle: Path, parser: ConfigParser, key: str) -> Any:
    """``parser.get_parsed_content(key)``, failing with the innermost reason in one line."""
    try:
        return parser.get_parsed_content(key)
    except Exception as err:  # MONAI wraps the cause in "Failed to evaluate ..." errors
        raise BundleError(f"bundle {bundle}: cannot build '{key}' from its configs ({_innermost(err)}).") from err


def _shown(path: Path, bundle: Path) -> str:
    """``path`` relative to the bundle when it lies inside it (``models/model.pt``)."""
    try:
        return str(path.resolve().relative_to(bundle.resolve()))
    except (ValueError, OSError):
        return str(path)


def _checkpoint_problem(err: BaseException) -> str:
    """Why ``torch.load`` refused a file, in a few words."""
    text = str(err)
    if isinstance(err, EOFError):
        return "the file is empty or truncated"
    if isinstance(err, pickle.UnpicklingError):
        match = re.search(r"WeightsUnpickler error:\s*([^\n]+(?:\n(?!\n)[^\n]+)*)", text)
        detail = " ".join(match.group(1).split()) if match else _first_line(err)
        return f"not a weights-only PyTorch checkpoint: {detail[:160]}"
    if "PytorchStreamReader" in text:  # a torch zip archive, cut short or damaged
        return f"damaged or truncated archive: {text.split('. ')[0][:160]}"
    if isinstance(err, OSError) and err.errno == errno.EINVAL:  # a zip archive cut short: seeks past its end
        return "damaged or truncated archive"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {_first_line(err)}"


def _state_dict_mismatch(network: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading into ``network`` strictly: missing, unexpected and mis-shaped keys."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            parts.append(f"{len(keys)} {what} key{'s' if len(keys) > 1 else ''}, e.g. {keys[0]}")
    return "; ".join(parts)


def _innermost(err: BaseException) -> str:
    """The deepest cause of a chain of wrapped errors, as ``Type: first line``."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    return f"{type(err).__name__}: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__
