"""The IC-MoE MONAI Label app (needs ``monailabel``; see ``requirements-monailabel.txt``).

    python -m ic_moe_monai.label apps/ic_moe        # makes the app folder: a main.py importing ICMoEApp
    monailabel start_server --app apps/ic_moe --studies <dir> [--conf bundle <folder>] [--conf skip_trainers true]

Models: ``ic_moe`` (automatic, MONAI Label's own bundle task on the bundle's ``inference.json``) and
``ic_moe_interactive`` (the automatic mask refined by foreground / background clicks, image embeddings cached per
image and slice). Trainer: ``ic_moe`` (MONAI Label's bundle trainer: fine-tunes ``models/model.pt`` of the bundle on
the datastore's final labels). Requests for images that are not in the datastore, and malformed clicks, are
answered with 404 and 422 and a message, and the server goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import strtobool

import ic_moe_monai
from ic_moe_monai.label.interactive import ClickError

logger = logging.getLogger(__name__)

DEFAULT_BUNDLE = Path(ic_moe_monai.__file__).resolve().parents[1] / "bundle"


__all__ = ["DEFAULT_BUNDLE", "ICMoEApp"]


class ICMoEApp(MONAILabelApp):
    """IC-MoE served to annotators: automatic and click-driven segmentation, and fine-tuning."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundle = Path(conf.get("bundle", DEFAULT_BUNDLE)).resolve()
        if not (self.bundle / "configs" / "inference.json").is_file():
            raise FileNotFoundError(f"bundle {self.bundle}: no configs/inference.json (set --conf bundle <folder>).")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="IC-MoE",
                         description="IC-MoE (SAM with a mixture of experts): automatic and interactive segmentation",
                         version=ic_moe_monai.__version__)  # fmt: skip

    def init_infers(self) -> dict:
        from ic_moe_monai.label.tasks import InteractiveInferTask

        return {
            "ic_moe": BundleInferTask(str(self.bundle), self.conf),
            "ic_moe_interactive": InteractiveInferTask(self.bundle, device=self.conf.get("device", "cpu")),
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
        image = request.get("image")
        store = datastore or self.datastore()
        if not isinstance(image, str) or not image or image not in store.list_images():
            raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore.")
        if request.get("model") not in self._infers:
            raise HTTPException(status_code=404, detail=f"model {request.get('model')!r} is not served here; "
                                f"models: {sorted(self._infers)}.")  # fmt: skip
        try:
            return super().infer(request, datastore)
        except ClickError as err:
            raise HTTPException(status_code=422, detail=str(err)) from err
