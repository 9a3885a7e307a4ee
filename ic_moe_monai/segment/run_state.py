"""What every case of a run shares (the bundle runtime, the output folder and the run's settings)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ic_moe_monai.inference.predictor import BundleSegmenter
from ic_moe_monai.io.dicomweb import DicomwebClient
from ic_moe_monai.segment.logs import ReaderNotes


# ------------------------------------------------------------------------------------------------- the cases
@dataclass
class JobContext:
    """What every case of a run shares."""

    segmenter: BundleSegmenter
    out_dir: Path
    overwrite: bool
    max_bytes: int
    reader_notes: ReaderNotes
    push: DicomwebClient | None = None  # where the DICOM SEGs are stored, with --push
