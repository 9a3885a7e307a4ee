"""The IC-MoE MONAI Label app (needs ``monailabel``; see ``requirements-monailabel.txt``).

    python -m ic_moe_monai.label apps/ic_moe        # makes the app folder: a main.py importing ICMoEApp
    monailabel start_server --app apps/ic_moe --studies <dir> [--conf bundle <folder>] [--conf skip_trainers true]
        [--conf max_clicks 256] [--conf max_image_mb 1024]
    monailabel start_server --app apps/ic_moe --studies http://<pacs>/dicom-web [--conf dicomweb_search_filter <JSON>]
        [--conf dicomweb_cache_expiry 30]

Models: ``ic_moe`` (automatic, MONAI Label's own bundle task on the bundle's ``inference.json``) and
``ic_moe_interactive`` (the automatic mask refined by foreground / background clicks, image embeddings cached per
image and slice). Trainer: ``ic_moe`` (MONAI Label's bundle trainer: fine-tunes ``models/model.pt`` of the bundle on
the datastore's final labels).

Both models take a datastore image id, an uploaded file (``POST /infer/<model>`` with ``file``) or a session
(``PUT /session/``, then ``session_id``). Every image is checked from its header before it is read (size limit,
2D / 4D / complex / multi-channel), and requests that cannot be served are answered with a message that names
no server path: 404 for unknown images or models, 422 for bad images, too many or malformed clicks, 409 for a
second training run while one is queued or running. Image and label ids with path separators or ``..`` are
refused (422) before they reach the datastore.

With a DICOMweb server as the studies (a PACS), the datastore is :class:`~ic_moe_monai.label.dicomweb.
ICMoEDicomwebDatastore`: the series of the bundle's modality, series lists that follow the annotation, and
submitted labels stored as the app's own DICOM SEG (so the app never needs dcmqi, which MONAI Label would download).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.async_tasks.task import AsyncTask
from monailabel.utils.others.generic import strtobool

import ic_moe_monai
from ic_moe_monai.io.guards import (
    MAX_BYTES_ENV,
    ImageError,
    check_dicom_series,
    check_image_file,
    max_image_bytes,
    parse_bytes,
)
from ic_moe_monai.label.ids import check_id
from ic_moe_monai.label.interactive import MAX_CLICKS, ClickError

logger = logging.getLogger(__name__)

DEFAULT_BUNDLE = Path(ic_moe_monai.__file__).resolve().parents[1] / "bundle"
# An annotation server holds several images and their embeddings at once: 1 GiB of float32 per image by default
# (e.g. 512 × 512 × 1024), unless --conf max_image_mb or IC_MOE_MAX_IMAGE_BYTES says otherwise.
SERVER_IMAGE_CAP = 1 << 30
_PATH = re.compile(r"(?<![\w.])(?:/[^\s/'\"(),:;]+){2,}/?")

__all__ = ["DEFAULT_BUNDLE", "ICMoEApp", "SafeIdDatastore"]


class ICMoEApp(MONAILabelApp):
    """IC-MoE served to annotators: automatic and click-driven segmentation, and fine-tuning."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundle = Path(conf.get("bundle", DEFAULT_BUNDLE)).resolve()
        if not (self.bundle / "configs" / "inference.json").is_file():
            raise FileNotFoundError(f"bundle {self.bundle}: no configs/inference.json (set --conf bundle <folder>).")
        self.max_clicks = int(conf.get("max_clicks", MAX_CLICKS))
        if self.max_clicks < 1:
            raise ValueError(f"--conf max_clicks must be a positive number, got {conf['max_clicks']!r}.")
        self.max_image_bytes = _image_limit(conf.get("max_image_mb"))
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="IC-MoE",
                         description="IC-MoE (SAM with a mixture of experts): automatic and interactive segmentation",
                         version=ic_moe_monai.__version__)  # fmt: skip
        _one_training_at_a_time()

    def init_datastore(self):
        store = super().init_datastore()
        if type(store) is LocalDatastore:  # same state, id checks added (MONAI Label builds the store itself)
            store.__class__ = SafeIdDatastore
        elif type(store) is DICOMWebDatastore:  # same client and cache, the app's listing and SEG writing
            from ic_moe_monai.label.dicomweb import ICMoEDicomwebDatastore

            store.__class__ = ICMoEDicomwebDatastore
            store.configure(self.bundle, self.conf)
        return store

    def _download_dcmqi_tools(self) -> None:
        """Nothing: MONAI Label downloads dcmqi at start-up to convert labels to DICOM SEG, which fails offline;
        this app writes its SEGs itself (:class:`~ic_moe_monai.label.dicomweb.ICMoEDicomwebDatastore`)."""

    def init_infers(self) -> dict:
        from ic_moe_monai.label.tasks import AutomaticInferTask, InteractiveInferTask

        return {
            "ic_moe": AutomaticInferTask(str(self.bundle), self.conf),
            "ic_moe_interactive": InteractiveInferTask(
                self.bundle,
                device=self.conf.get("device", "cpu"),
                max_clicks=self.max_clicks,
                max_image_bytes=self.max_image_bytes,
            ),
        }

    def init_trainers(self) -> dict:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        trainer = BundleTrainTask(str(self.bundle), self.conf)
        return {"ic_moe": trainer} if trainer.is_valid() else {}

    def init_strategies(self) -> dict:
        return {"random": Random(), "first": First()}

    def infer(self, request, datastore=None):
        """MONAI Label's inference, with 4xx answers for requests that cannot be served as asked."""
        store = datastore or self.datastore()
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"model {model!r} is not served here; "
                                f"models: {sorted(self._infers)}.")  # fmt: skip
        path, shown = self._image_source(request, store)
        try:
            task = self._infers[model]
            if hasattr(task, "segmenter"):  # clicks are counted before the image is touched
                task.segmenter.check_click_count(request.get("foreground"), request.get("background"))
            _check_image(path, self.max_image_bytes)
            return super().infer(request, datastore)
        except (ClickError, ImageError) as err:
            raise HTTPException(status_code=422, detail=_without_paths(str(err), path, shown)) from err
        except FileNotFoundError as err:  # e.g. an upload removed or a session expired meanwhile
            raise HTTPException(status_code=404, detail=_without_paths(str(err), path, shown)) from err

    def _image_source(self, request: dict[str, Any], store) -> tuple[Path, str]:
        """The image file a request refers to and how to name it in answers; 404 for anything else.

        A datastore id; the image of a live session (``session_id``); or a file MONAI Label's ``/infer`` endpoint
        has just written from an upload (a ``tmp*`` file directly in the temporary folder).
        """
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise HTTPException(status_code=404, detail="no image given (an image id, an uploaded file or a session).")
        session = request.get("session")
        if isinstance(session, dict) and self.sessions() is not None:
            name = str(session.get("name", ""))
            live = self.sessions().get_session(name, update_ts=False) if name else None
            if live is not None and Path(live.image).resolve() == Path(image).resolve():
                return Path(image), f"the image of session {name}"
        if image in store.list_images():
            return Path(store.get_image_uri(image)), f"image {image!r}"
        if _is_upload(image):
            return Path(image), "the uploaded image"
        raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore.")


class SafeIdDatastore(LocalDatastore):
    """MONAI Label's local datastore, refusing image ids and label tags that would leave its folders."""

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        check_id(image_id, "image id")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_id(image_id, "image id")
        check_id(label_tag, "label tag")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_image(self, image_id: str) -> None:
        check_id(image_id, "image id")
        return super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_id(label_id, "label id")
        check_id(label_tag, "label tag")
        return super().remove_label(label_id, label_tag)


def _image_limit(max_image_mb: str | None) -> int:
    """``--conf max_image_mb`` (MiB), else ``IC_MOE_MAX_IMAGE_BYTES``, else the guard's default capped at 1 GiB."""
    if max_image_mb not in (None, ""):
        return parse_bytes(f"{max_image_mb}M")
    limit = max_image_bytes()
    return limit if os.environ.get(MAX_BYTES_ENV) else min(limit, SERVER_IMAGE_CAP)


def _check_image(path: Path, limit: int) -> None:
    """The guard, before any voxel is read: an image file, or a DICOM series folder (a session of several files)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        check_dicom_series(files, limit)
    else:
        check_image_file(path, limit)


def _is_upload(image: str) -> bool:
    path = Path(image)
    return (
        path.is_absolute()
        and path.parent == Path(tempfile.gettempdir())
        and path.name.startswith("tmp")
        and path.is_file()
        and not path.is_symlink()
    )


def _without_paths(message: str, path: Path, shown: str) -> str:
    """The message with the server's paths replaced: the image's by how the client named it, others by a mark."""
    for text in sorted({str(path), str(path.resolve())}, key=len, reverse=True):
        message = message.replace(text, shown)
    message = _PATH.sub("<server path>", message)
    return message if message.startswith(shown) else f"{shown}: {message}"


# ------------------------------------------------------------------------------------------------- training
_SYNC_TRAINING = threading.Lock()


class _OneTrainingAtATime(AsyncTask):
    """MONAI Label's task runner, refusing a training request while a training run is queued or running.

    Without it a second ``/train`` sent before the first has started its process is accepted and queued.
    """

    @staticmethod
    def run(method: str, request=None, params=None, force_sync=False, enqueue=False):
        if method != "train":
            return AsyncTask.run(method, request, params, force_sync, enqueue)
        from monailabel.utils.async_tasks.utils import processes, tasks

        busy = [t for t in tasks("train") if t.get("status") in ("SUBMITTED", "RUNNING")]
        if busy or processes("train") or _SYNC_TRAINING.locked():
            since = f" (started {busy[-1].get('start_ts')})" if busy else ""
            raise HTTPException(status_code=409, detail=f"a training run is in progress{since}; wait for it to "
                                "finish or stop it (DELETE /train/).")  # fmt: skip
        if not force_sync:
            return AsyncTask.run(method, request, params, force_sync, enqueue)
        with _SYNC_TRAINING:
            return AsyncTask.run(method, request, params, force_sync, enqueue)


def _one_training_at_a_time() -> None:
    """Route MONAI Label's ``/train`` endpoints through :class:`_OneTrainingAtATime` (they look ``AsyncTask`` up
    in their module at each request; MONAI Label has no hook between a request and its task queue)."""
    from monailabel.endpoints import train as train_endpoints

    train_endpoints.AsyncTask = _OneTrainingAtATime
