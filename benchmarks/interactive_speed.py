"""First click against further clicks on the same slice, for the interactive IC-MoE model with the shipped weights.

    python benchmarks/interactive_speed.py --input <folder of volumes> [--limit 5] [--http]
        [--out benchmarks/results/interactive_speed.json]

The first request on an image runs the automatic segmentation and caches every slice's image embedding; a further
click on a slice runs only SAM's prompt encoder and mask decoder there. In process: ``InteractiveSegmenter`` calls
(the engine). With ``--http`` (in the MONAI Label environment): the same through a real IC-MoE MONAI Label server on
127.0.0.1, request to answer, labelmap file included. Each image gets one first click and 5 further clicks on the
same slice; the report gives medians over images and the ratio first / further. It also records how many voxels
a single click changes on the bundle's sample volume (``click_effect``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info

REPO = Path(__file__).resolve().parents[1]
FURTHER_CLICKS = 5


def _click_plan(shape: tuple[int, ...]) -> list[list[list[int]]]:
    """Growing foreground click lists on the middle slice (a client sends every click so far)."""
    x, y, z = (s // 2 for s in shape)
    clicks = [[x + i % 3, y + i // 3, z] for i in range(FURTHER_CLICKS + 1)]
    return [clicks[: n + 1] for n in range(FURTHER_CLICKS + 1)]


def in_process(images: list[Path]) -> dict:
    import nibabel as nib

    from ic_moe_monai.label import InteractiveSegmenter

    engine = InteractiveSegmenter(REPO / "bundle", max_images=len(images) + 1)
    first, further = [], []
    for image in images:
        plan = _click_plan(nib.load(image).shape)
        for n, clicks in enumerate(plan):
            start = time.perf_counter()
            engine(image, foreground=clicks)
            (first if n == 0 else further).append(time.perf_counter() - start)
    return _summary(first, further)


def click_effect(image: Path) -> dict:
    """How many voxels one click changes against the automatic answer, with the shipped weights: a foreground click
    on a background voxel and a background click on an ``anterior`` voxel, each at the middle such voxel."""
    import numpy as np

    from ic_moe_monai.label import InteractiveSegmenter

    engine = InteractiveSegmenter(REPO / "bundle")
    auto = np.asarray(engine(image)[0][0])
    effect = {"image": image.name}
    for name, where, key in (("foreground_click_on_background", auto == 0, "foreground"),
                             ("background_click_on_anterior", auto == 1, "background")):  # fmt: skip
        voxels = np.argwhere(where)
        click = voxels[len(voxels) // 2].tolist()
        refined = np.asarray(engine(image, label=1, **{key: [click]})[0][0])
        effect[name] = {"click": click, "changed_voxels": int((refined != auto).sum())}
    return effect


def over_http(images: list[Path]) -> dict:
    import nibabel as nib
    import requests

    from ic_moe_monai.label import make_app_folder

    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        studies.mkdir()
        for image in images:
            shutil.copy(image, studies / image.name)
        bundle = Path(tmp) / "bundle"
        shutil.copytree(REPO / "bundle", bundle, ignore=shutil.ignore_patterns("eval", "logs"))
        app = make_app_folder(Path(tmp) / "app")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(app), "--studies",
             str(studies), "--conf", "bundle", str(bundle), "--conf", "skip_trainers", "true", "--host",
             "127.0.0.1", "--port", str(port)],
            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(480):
                try:
                    if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.5)
            first, further = [], []
            for image in images:
                image_id = image.name.split(".")[0]
                for n, clicks in enumerate(_click_plan(nib.load(image).shape)):
                    form = {"params": (None, json.dumps({"foreground": clicks}))}
                    query = {"image": image_id, "output": "image"}
                    start = time.perf_counter()
                    answer = requests.post(f"{url}/infer/ic_moe_interactive", params=query, files=form, timeout=600)
                    answer.raise_for_status()
                    (first if n == 0 else further).append(time.perf_counter() - start)
        finally:
            server.terminate()
            server.wait(timeout=30)
    return _summary(first, further)


def _summary(first: list[float], further: list[float]) -> dict:
    first_s, further_s = statistics.median(first), statistics.median(further)
    return {"images": len(first), "first_click_s": round(first_s, 4), "further_click_s": round(further_s, 4),
            "ratio_first_to_further": round(first_s / further_s, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a folder of volumes (e.g. MSD Task04 imagesTr)")
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--http", action="store_true", help="also through a MONAI Label server (needs monailabel)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "interactive_speed.json"))
    args = parser.parse_args()
    images = sorted(p for p in Path(args.input).iterdir() if p.name.endswith((".nii.gz", ".nii")))[: args.limit]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["in_process"] = in_process(images) | {"machine": machine_info(), "date": time.strftime("%Y-%m-%d")}
    print("in process", json.dumps(results["in_process"]), flush=True)
    results["click_effect"] = click_effect(REPO / "bundle" / "sample_data" / "hippocampus_003.nii.gz")
    print("click effect", json.dumps(results["click_effect"]), flush=True)
    if args.http:
        results["http"] = over_http(images) | {"machine": machine_info(), "date": time.strftime("%Y-%m-%d")}
        print("http", json.dumps(results["http"]), flush=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
