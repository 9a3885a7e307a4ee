"""Inference: from a volume to a labelmap, and how far to trust it.

``predictor`` (a bundle's configs, weights and inferer behind one ``predict(volume)``), ``inferers`` (slice-wise
inference with test-time mirroring), ``postprocessing``, ``quality`` (the per-case quality score) and
``evaluation`` (Dice and HD95 reports).
"""

from ic_moe_monai.inference.evaluation import CONVENTIONS, case_metrics, json_safe, summarize, write_reports
from ic_moe_monai.inference.inferers import SliceContextInferer, channel_argmax, neighbor_stack
from ic_moe_monai.inference.postprocessing import KeepLargestComponentd, keep_largest_component
from ic_moe_monai.inference.predictor import (
    BundleError,
    BundleSegmenter,
    check_affine,
    label_names,
    load_case,
    one_case_collate,
    read_metadata,
)
from ic_moe_monai.inference.quality import (
    CaseQuality,
    QualityCalibration,
    QualitySignals,
    cross_validated_report,
    file_sha256,
    geometry_signals,
    label_dice,
    spearman,
    write_quality_report,
)

__all__ = [
    "CONVENTIONS",
    "BundleError",
    "BundleSegmenter",
    "CaseQuality",
    "KeepLargestComponentd",
    "QualityCalibration",
    "QualitySignals",
    "SliceContextInferer",
    "case_metrics",
    "channel_argmax",
    "check_affine",
    "cross_validated_report",
    "file_sha256",
    "geometry_signals",
    "json_safe",
    "keep_largest_component",
    "label_dice",
    "label_names",
    "load_case",
    "neighbor_stack",
    "one_case_collate",
    "read_metadata",
    "spearman",
    "summarize",
    "write_quality_report",
    "write_reports",
]
