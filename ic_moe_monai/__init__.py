"""IC-MoE: Segment Anything adapted to CT and MRI by a mixture of experts, as a MONAI bundle.

The package is arranged by stage of the pipeline (see ``ic_moe_monai/README.md`` for the data flow):
``data`` (datalists, transforms), ``networks`` (IC-MoE, encoders, experts, weights), ``training`` (losses, slice
sampling, engines, handlers, resume), ``inference`` (predictor, inferers, post-processing, quality, evaluation),
``segment`` (the batch job), ``bundles`` (init, export, model card), ``io`` (readers, writers, DICOM, DICOMweb) and
``label`` (MONAI Label). Subpackages are imported on first use; the module paths from before this arrangement
(``ic_moe_monai.engines``, ``ic_moe_monai.checkpoints``, ...) still work, see :mod:`ic_moe_monai._moved`.
"""

from ic_moe_monai import _moved

__version__ = "0.1.0"

__all__ = ["__version__"]

_moved.install()


def __getattr__(name: str) -> object:
    return _moved.moved_attribute(name)
