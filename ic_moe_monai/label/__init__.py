"""MONAI Label glue: the interactive engine (no MONAI Label needed) and the IC-MoE MONAI Label app.

``python -m ic_moe_monai.label DIR`` writes the app folder DIR for ``monailabel start_server --app DIR``: MONAI Label
keeps its models, logs and caches there, not in this package.
"""

from pathlib import Path

from ic_moe_monai.label.interactive import ClickError, InteractiveSegmenter, parse_clicks

__all__ = ["ClickError", "InteractiveSegmenter", "make_app_folder", "parse_clicks"]

APP_MAIN = '''"""IC-MoE MONAI Label app: ``monailabel start_server --app <this folder> --studies <dir>``."""

from ic_moe_monai.label.app import ICMoEApp  # noqa: F401 (MONAI Label finds the app class in this module)
'''


def make_app_folder(folder: str | Path) -> Path:
    """Create (or refresh) a MONAI Label app folder whose ``main.py`` serves the IC-MoE app."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.py").write_text(APP_MAIN)
    return folder.resolve()
