"""Bundles: making, exporting and describing bundles.

``initialize`` (``init_bundle``: a new bundle for a user's own data), ``export`` (``export_bundle``: a self-contained
bundle for MONAI's model zoo), ``card`` (the model card) and ``folders`` (output folders written whole or not at all).
"""

from ic_moe_monai.bundles.card import (
    PERFORMANCE_END,
    PERFORMANCE_START,
    ZOO_HEADINGS,
    fill_performance,
    markdown_text,
    missing_headings,
    model_card,
    performance_table,
)
from ic_moe_monai.bundles.export import PACKAGE, VENDORED_NAME, export_bundle, package_modules, third_party_requirements
from ic_moe_monai.bundles.folders import check_new_folder, staged_folder
from ic_moe_monai.bundles.initialize import PROFILES, InitResult, bundle_info, init_bundle, parse_label_names

__all__ = [
    "PACKAGE",
    "PERFORMANCE_END",
    "PERFORMANCE_START",
    "PROFILES",
    "VENDORED_NAME",
    "ZOO_HEADINGS",
    "InitResult",
    "bundle_info",
    "check_new_folder",
    "export_bundle",
    "fill_performance",
    "init_bundle",
    "markdown_text",
    "missing_headings",
    "model_card",
    "package_modules",
    "parse_label_names",
    "performance_table",
    "staged_folder",
    "third_party_requirements",
]
