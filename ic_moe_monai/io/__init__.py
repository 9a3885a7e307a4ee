"""Input and output: discovery of cases and DICOM series (``discovery``), guarded reading (``guards``, ``readers``,
``dicom_series``), outputs written whole or not at all (``atomic``, ``writers``, ``dicom_seg``, ``saving``) and a PACS
over DICOMweb (``dicomweb``, ``dicomweb_series``)."""

from ic_moe_monai.io.dicom_series import read_dicom_series
from ic_moe_monai.io.discovery import Case, Skipped, discover_cases
from ic_moe_monai.io.guards import ImageError, check_dicom_series, check_image_file, max_image_bytes
from ic_moe_monai.io.readers import itk_safe_path, read_image_file

__all__ = [
    "Case",
    "ImageError",
    "Skipped",
    "check_dicom_series",
    "check_image_file",
    "discover_cases",
    "itk_safe_path",
    "max_image_bytes",
    "read_dicom_series",
    "read_image_file",
]
