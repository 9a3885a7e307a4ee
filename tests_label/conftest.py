"""MONAI Label servers for the tests: real ``monailabel start_server`` processes on 127.0.0.1 with a free port.

These tests run in the MONAI Label environment (``requirements-monailabel.txt``), not in the core one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import shared_data_dir
from tests.orthanc import orthanc_server  # noqa: F401 (the session's Orthanc PACS, for the DICOMweb tests)

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CASES = ("hippocampus_003", "hippocampus_007")


@dataclass
class Server:
    url: str
    log: Path
    bundle: Path  # the bundle folder the server serves (a copy)
    studies: Path | str  # a folder (a copy of the test's), or the URL of a DICOMweb server

    def infer(self, model: str, image: str, params: dict | None = None, timeout: float = 300) -> requests.Response:
        import json

        return requests.post(f"{self.url}/infer/{model}", params={"image": image, "output": "image"},
                             files={"params": (None, json.dumps(params or {}))}, timeout=timeout)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def studies(tmp_path_factory) -> Path:
    """Two MSD hippocampus studies with their final labels, as MONAI Label's local datastore expects them."""
    shared = shared_data_dir() / "msd_hippocampus"
    if not shared.is_dir():
        pytest.skip(f"real data folder {shared} is absent")
    root = tmp_path_factory.mktemp("studies")
    (root / "labels" / "final").mkdir(parents=True)
    for case in CASES:
        shutil.copy(shared / "imagesTr" / f"{case}.nii.gz", root / f"{case}.nii.gz")
        shutil.copy(shared / "labelsTr" / f"{case}.nii.gz", root / "labels" / "final" / f"{case}.nii.gz")
    return root


def start_server(
    tmp: Path, studies: Path | str, app: Path, conf: dict[str, str], env: dict[str, str] | None = None
) -> Iterator[Server]:
    """Start ``monailabel start_server`` and wait until ``/info/`` answers; stop it afterwards.

    ``studies``: a folder (the server gets a copy) or a DICOMweb URL; ``env``: variables added to the server's
    environment (a ``PATH`` there replaces the default, which puts this environment's ``bin`` first).
    """
    port = _free_port()
    if isinstance(studies, Path):
        own_studies: Path | str = tmp / "studies"
        shutil.copytree(studies, own_studies)
    else:
        own_studies = studies
    log = tmp / "server.log"
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    command = [str(Path(venv_bin) / "monailabel"), "start_server", "--app", str(app), "--studies", str(own_studies),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    for key, value in conf.items():
        command += ["--conf", key, value]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"monailabel exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.5)
    else:
        process.kill()
        raise RuntimeError(f"monailabel did not start in time:\n{log.read_text()[-3000:]}")
    bundle = Path(conf["bundle"]) if "bundle" in conf else app / "model" / conf["models"]
    try:
        yield Server(url=url, log=log, bundle=bundle, studies=own_studies)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
