"""The PACS datastore of the IC-MoE MONAI Label app (``--studies http://<pacs>/dicom-web``; needs ``monailabel``).

MONAI Label's own DICOMweb datastore, with what annotation on a hospital PACS needs:

- **The series the model is for.** The series listed are those of the bundle's modality (``metadata.json``'s
  input ``modality``, e.g. MR), not MONAI Label's default CT. ``--conf dicomweb_search_filter '<JSON>'`` or an
  explicitly set ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` wins. Several modalities (or a list of filters) are
  searched one query each: some servers (Orthanc) answer ``Modality=MR\\CT`` with nothing.
- **Lists that follow the annotation.** The series lists are kept :data:`DEFAULT_CACHE_EXPIRY` seconds (MONAI
  Label: 7200) and dropped whenever a label is saved or removed, so *next sample* and *completed* change with each
  submit. ``--conf dicomweb_cache_expiry <s>`` or an explicitly set ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` wins.
  Which image series a SEG references is asked once per SEG, not at every listing.
- **Labels stored as they are meant.** A submitted final label goes to the PACS as a DICOM SEG written here
  (highdicom), not by MONAI Label's converter (which needs dcmqi, numbers segments by their rank among the values
  present and codes every segment alike): segment number = label value, segment names and coded concepts from the
  bundle's metadata, the label placed on the series' own grid by its geometry. A label that is empty, holds values
  that are not the bundle's labels, or lies outside the series is refused with 422, before anything is stored.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from fastapi import HTTPException
from monai.data import MetaTensor
from monai.transforms import LoadImage
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.interfaces.datastore import DefaultLabelTag

from ic_moe_monai.data.transforms import label_to_image_grid
from ic_moe_monai.inference.predictor import label_names, read_metadata
from ic_moe_monai.io.dicom_seg import SegmentCode, read_segment_codes, write_dicom_seg
from ic_moe_monai.io.dicom_series import dicom_series_affine
from ic_moe_monai.label.ids import check_id

__all__ = ["DEFAULT_CACHE_EXPIRY", "ICMoEDicomwebDatastore", "bundle_modalities", "cache_expiry", "search_filters"]

logger = logging.getLogger(__name__)

# Seconds a series list is reused. Short, because annotators see it change; a QIDO-RS series search every half
# minute (per list) is nothing for a PACS. Labels saved through this server drop the lists at once anyway.
DEFAULT_CACHE_EXPIRY = 30.0
FILTER_SETTING, EXPIRY_SETTING = "MONAI_LABEL_DICOMWEB_SEARCH_FILTER", "MONAI_LABEL_DICOMWEB_CACHE_EXPIRY"
MODALITY_ALIASES = {"MRI": "MR"}


def _user_set(name: str) -> bool:
    """Whether MONAI Label's setting ``name`` was given (environment or ``.env``) rather than left at its default.

    ``monailabel start_server`` exports every setting to the environment after reading them, so the environment
    cannot tell; the settings object, read before that, can.
    """
    return name in settings.model_fields_set


def bundle_modalities(bundle: Path) -> list[str]:
    """The DICOM modalities the bundle is for: ``metadata.json``'s first input ``modality`` (e.g. ``MR``, or ``CT|MR``),
    else ``inference.json``'s ``modality`` setting; empty when neither says."""
    inputs = read_metadata(bundle).get("network_data_format", {}).get("inputs", {})
    text = str(next(iter(inputs.values()), {}).get("modality", "") or "")
    if not text:
        try:
            text = str(json.loads((bundle / "configs" / "inference.json").read_text()).get("modality", "") or "")
        except (OSError, ValueError):
            text = ""
    codes = [MODALITY_ALIASES.get(t.upper(), t.upper()) for t in re.findall(r"[A-Za-z]+", text)]
    return list(dict.fromkeys(codes))


def search_filters(conf: Mapping[str, str], bundle: Path) -> tuple[list[dict[str, Any]], str]:
    """The QIDO-RS series filters of the listing (one query each) and where they come from.

    Raises:
        ValueError: ``--conf dicomweb_search_filter`` is not a JSON object or a list of objects.
    """
    text = conf.get("dicomweb_search_filter", "")
    if text:
        try:
            value = json.loads(text)
        except ValueError as err:
            raise ValueError(f"--conf dicomweb_search_filter is not JSON ({err}): {text!r:.200}") from err
        filters = value if isinstance(value, list) else [value]
        if not filters or not all(isinstance(f, dict) for f in filters):
            raise ValueError(f"--conf dicomweb_search_filter must be a JSON object or a list of objects, got {text!r}.")
        return filters, "--conf dicomweb_search_filter"
    if _user_set(FILTER_SETTING):
        return [dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER)], FILTER_SETTING
    modalities = bundle_modalities(bundle)
    if modalities:
        return [{"Modality": m} for m in modalities], f"the bundle's modality ({', '.join(modalities)})"
    return [dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER)], "MONAI Label's default"


def cache_expiry(conf: Mapping[str, str]) -> tuple[float, str]:
    """Seconds a series list is reused, and where that comes from.

    Raises:
        ValueError: ``--conf dicomweb_cache_expiry`` is not a number ≥ 0.
    """
    text = conf.get("dicomweb_cache_expiry", "")
    if text:
        try:
            seconds = float(text)
        except ValueError:
            seconds = -1.0
        if not seconds >= 0:
            raise ValueError(f"--conf dicomweb_cache_expiry must be a number of seconds ≥ 0, got {text!r}.")
        return seconds, "--conf dicomweb_cache_expiry"
    if _user_set(EXPIRY_SETTING):
        return float(settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY), EXPIRY_SETTING
    return DEFAULT_CACHE_EXPIRY, "the app's default"


class ICMoEDicomwebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with the bundle's series filter, short-lived series lists that a saved label
    refreshes, id checks, and final labels stored as the app's own DICOM SEG (see the module docstring).

    MONAI Label builds its datastore itself: the app turns the one it built into this class and calls
    :meth:`configure`.
    """

    def configure(self, bundle: Path, conf: Mapping[str, str]) -> None:
        """Take the series filter, the list expiry and the labels' names and codes from the bundle and ``conf``.

        Raises:
            ValueError: a ``--conf`` value that cannot be used, or the bundle's ``segment_codes`` cannot be read.
        """
        self._filters, filter_source = search_filters(conf, bundle)
        self._expiry, expiry_source = cache_expiry(conf)
        metadata = read_metadata(bundle)
        self._label_names: dict[int, str] = label_names(metadata, _config_label_names(bundle))
        self._segment_codes: dict[int, dict[str, SegmentCode]] = read_segment_codes(metadata)
        self._version = str(metadata.get("version", ""))
        self._lists: dict[str, tuple[float, list[str]]] = {}
        self._generation = 0  # bumped when the lists are dropped: a search begun before may not refill them
        self._seg_references: dict[str, str] = {}  # SEG series -> the image series it labels (never changes)
        self._lists_lock = threading.Lock()
        logger.info("DICOMweb series filter %s (%s); series lists kept %.0f s (%s)", self._filters, filter_source,
                    self._expiry, expiry_source)  # fmt: skip

    # ------------------------------------------------------------------------------------------ listings
    def list_images(self) -> list[str]:
        return self._cached("images", self._search_images)

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return self._cached("labeled", self._search_labeled)

    def forget_lists(self) -> None:
        """Drop the series lists: the next request asks the PACS."""
        with self._lists_lock:
            self._lists.clear()
            self._generation += 1

    def _cached(self, key: str, search: Callable[[], list[str]]) -> list[str]:
        with self._lists_lock:
            hit, generation = self._lists.get(key), self._generation
        if hit is not None and time.monotonic() - hit[0] < self._expiry:
            return list(hit[1])
        found = search()
        with self._lists_lock:
            if generation == self._generation:
                self._lists[key] = (time.monotonic(), found)
        return list(found)

    def _search_images(self) -> list[str]:
        series: dict[str, None] = {}
        for search_filter in self._filters:
            for item in self._client.search_for_series(search_filters=search_filter):
                uid = _json_value(item, "0020000E")
                if uid:
                    series[uid] = None
        return list(series)

    def _search_labeled(self) -> list[str]:
        images, labeled = set(self.list_images()), {}
        for item in self._client.search_for_series(search_filters={"Modality": "SEG"}):
            seg, study = _json_value(item, "0020000E"), _json_value(item, "0020000D")
            if seg and seg not in self._seg_references:
                try:
                    metadata = self._client.retrieve_series_metadata(study, seg)
                    referenced = metadata[0]["00081115"]["Value"][0]["0020000E"]["Value"][0]
                except Exception as err:  # a SEG without the reference, or one the PACS cannot describe now
                    logger.warning("SEG series %s: no referenced image series (%s)", seg, err)
                    continue
                self._seg_references[seg] = str(referenced)
            if self._seg_references.get(seg) in images:
                labeled[self._seg_references[seg]] = None
        return list(labeled)

    # ------------------------------------------------------------------------------------------ labels
    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        """Save a label in the local cache; a final one is first stored on the PACS as a DICOM SEG.

        Raises:
            HTTPException: 404 for an image the datastore does not list; 422 for ids that would leave the datastore
                and for labels that cannot be stored (empty, values that are not the bundle's labels, outside the
                series, unreadable); 502 when the PACS does not store the SEG.
        """
        check_id(image_id, "image id")
        check_id(label_tag, "label tag")
        if image_id not in self.list_images():
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore.")
        image_uri = self.get_image_uri(image_id)  # retrieves the series when it is not cached yet
        converted = binary_to_image(image_uri, label_filename) if label_filename.endswith(".bin") else ""
        label_file = converted or label_filename
        label_info = dict(label_info or {})
        try:
            if label_tag == DefaultLabelTag.FINAL:
                series_uid = self._store_seg(image_id, label_file)
                image_info = self.get_image_info(image_id)
                label_info.update({"SeriesInstanceUID": series_uid, "Modality": image_info.get("Modality"),
                                   "PatientID": image_info.get("PatientID"),
                                   "StudyInstanceUID": image_info.get("StudyInstanceUID")})  # fmt: skip
                self.forget_lists()
            return LocalDatastore.save_label(self, image_id, label_file, label_tag, label_info)
        finally:
            if converted:
                Path(converted).unlink(missing_ok=True)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_id(label_id, "label id")
        check_id(label_tag, "label tag")
        super().remove_label(label_id, label_tag)
        self.forget_lists()

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        check_id(image_id, "image id")
        return super().add_image(image_id, image_filename, image_info)

    def _store_seg(self, image_id: str, label_file: str) -> str:
        """Write the label as a DICOM SEG of the cached series and store it on the PACS; its SeriesInstanceUID."""
        files, affine, shape = self._series_grid(image_id)
        labels = _read_label(label_file)
        reference = MetaTensor(torch.zeros(()).expand(1, *shape), affine=torch.as_tensor(affine))
        try:
            placed = label_to_image_grid(labels, reference)
        except ValueError as err:
            raise _unusable(f"the label lies outside the image series ({err})") from err
        _check_values(np.asarray(placed[0]), self._label_names)  # before the uint8 cast could wrap a value
        labelmap = np.asarray(placed[0]).astype(np.uint8)
        if not labelmap.any():
            raise _unusable("the label is empty (no voxel holds a label): there is nothing to store")
        with tempfile.TemporaryDirectory(prefix="ic_moe_seg_") as folder:
            path = Path(folder) / "seg.dcm"
            try:
                write_dicom_seg(labelmap, affine, files, self._label_names, path, self._version,
                                segment_codes=self._segment_codes, algorithm_type="SEMIAUTOMATIC",
                                series_description="IC-MoE annotation")  # fmt: skip
            except ValueError as err:
                raise _unusable(f"no DICOM SEG can be made of it ({err})") from err
            seg = pydicom.dcmread(path)
            try:
                answer = self._client.store_instances([seg])
            except Exception as err:  # requests' HTTPError and connection errors
                raise HTTPException(status_code=502, detail=f"the PACS did not store the SEG ({err})") from err
        if answer is not None and answer.get("FailedSOPSequence"):
            raise HTTPException(status_code=502, detail="the PACS refused the SEG (FailedSOPSequence in its answer)")
        logger.info("label of %s stored on the PACS as SEG series %s", image_id, seg.SeriesInstanceUID)
        return str(seg.SeriesInstanceUID)

    def _series_grid(self, image_id: str) -> tuple[list[Path], np.ndarray, tuple[int, int, int]]:
        """The cached series' files in slice order, its RAS affine and shape, as ITK (and the cached image) has it."""
        folder = Path(self._datastore.image_path()) / image_id
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        if len(headers) < 2 or any("ImagePositionPatient" not in h for h in headers):
            raise _unusable(f"image {image_id} is not a series of slices a SEG can reference")
        orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        order = np.argsort([np.dot([float(v) for v in h.ImagePositionPatient], normal) for h in headers])
        headers, files = [headers[i] for i in order], [files[i] for i in order]
        shape = (int(headers[0].Columns), int(headers[0].Rows), len(headers))
        return files, dicom_series_affine(headers), shape


def _read_label(path: str) -> MetaTensor:
    """A submitted label as ``(1, X, Y, Z)`` with its affine; 422 for files that are not one labelmap."""
    try:
        label = LoadImage(image_only=True, ensure_channel_first=True)(path)
    except Exception as err:  # readers raise many types
        raise _unusable(f"cannot read the label ({type(err).__name__})") from err
    if label.ndim != 4 or label.shape[0] != 1:
        raise _unusable(f"the label has shape {tuple(label.shape[1:])} with {label.shape[0]} channel(s); one 3D "
                        "labelmap is needed")  # fmt: skip
    values = torch.unique(label.as_tensor())
    if not torch.equal(values, values.round()) or bool((values < 0).any()):
        raise _unusable("the label holds values that are not label numbers (0, 1, 2, ...)")
    return label


def _config_label_names(bundle: Path) -> dict[str, str] | None:
    for name in ("inference.json", "train.json"):
        try:
            names = json.loads((bundle / "configs" / name).read_text()).get("label_names")
        except (OSError, ValueError):
            continue
        if isinstance(names, dict):
            return names
    return None


def _json_value(item: Mapping[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _unusable(reason: str) -> HTTPException:
    return HTTPException(status_code=422, detail=f"label not stored: {reason}.")


def _check_values(labels: np.ndarray, names: Mapping[int, str]) -> None:
    """422 for label values the bundle has no name for."""
    unknown = sorted(set(np.unique(labels).tolist()) - set(names) - {0})
    if unknown:
        known = ", ".join(f"{v} {n}" for v, n in sorted(names.items()) if v)
        raise _unusable(f"value(s) {', '.join(map(str, unknown))} are not labels of the bundle ({known})")
