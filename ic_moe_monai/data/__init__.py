"""Data: datalists of image/label folders (MSD, nnU-Net and plain layouts) and the transforms that prepare them.

``datasets`` finds cases and splits folds; ``transforms`` holds the intensity presets, slice context and
MONAI-style dictionary transforms the bundle's configs chain.
"""

from ic_moe_monai.data.datasets import (
    IMAGE_SUFFIXES,
    DatasetError,
    DatasetInfo,
    case_name,
    check_dataset_labels,
    check_label_names,
    datalist,
    dataset_info,
    find_cases,
    find_images,
    one_line_text,
    read_dataset_json,
    split_folds,
)
from ic_moe_monai.data.transforms import (
    CT_WINDOWS,
    MODALITIES,
    IntensityPresetd,
    LabelToImageGridd,
    SliceNeighborsd,
    ct_window,
    label_to_image_grid,
    modality_name,
    percentile,
)

__all__ = [
    "CT_WINDOWS",
    "IMAGE_SUFFIXES",
    "MODALITIES",
    "DatasetError",
    "DatasetInfo",
    "IntensityPresetd",
    "LabelToImageGridd",
    "SliceNeighborsd",
    "case_name",
    "check_dataset_labels",
    "check_label_names",
    "ct_window",
    "datalist",
    "dataset_info",
    "find_cases",
    "find_images",
    "label_to_image_grid",
    "modality_name",
    "one_line_text",
    "percentile",
    "read_dataset_json",
    "split_folds",
]
