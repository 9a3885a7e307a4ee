"""What every benchmark reports about the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def machine_info() -> dict[str, object]:
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def public_settings(settings: dict[str, object]) -> dict[str, object]:
    """A benchmark's settings as a results file may show them: a path inside the repository relative to it, any
    other path by its last two parts (``msd_hippocampus/imagesTr``), so no machine's folders end up in results."""
    shown: dict[str, object] = {}
    for key, value in settings.items():
        if isinstance(value, str) and os.sep in value and Path(value).is_absolute():
            path = Path(value).resolve()
            value = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(Path(*path.parts[-2:]))
        shown[key] = value
    return shown
