"""Input discovery and output writing for batch segmentation."""

from ic_moe_monai.io.discovery import Case, Skipped, discover_cases

__all__ = ["Case", "Skipped", "discover_cases"]
