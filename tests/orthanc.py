"""A real Orthanc PACS with its DICOMweb plugin for the tests, started from the installed ``Orthanc`` binary.

The server listens on 127.0.0.1 with a free port, accepts no remote clients, keeps its database in a temporary
folder and asks for HTTP basic authentication with test-only credentials. Where no Orthanc is installed the tests
that need one are skipped, unless ``IC_MOE_REQUIRE_ORTHANC=1`` (set by CI) says it must be there: then they fail.
``IC_MOE_ORTHANC_PIDS`` names a file the server's process id is appended to, so a CI script can stop whatever a
killed test run left behind.

Debian's packages: ``apt-get install orthanc orthanc-dicomweb``. Debian's own ``dicomweb.json`` sets ``"Host"``,
which drops the port from the plugin's retrieve URLs: the config written here leaves it out.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
import requests

__all__ = ["PLUGIN_FOLDERS", "USER", "Orthanc", "orthanc_server", "start_orthanc"]

USER = ("ic-moe-test", "test-only-password")  # never a real credential: this server lives for one test run
PLUGIN_FOLDERS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")
REQUIRE_ENV = "IC_MOE_REQUIRE_ORTHANC"


@dataclass
class Orthanc:
    """A running test Orthanc: its REST root, its DICOMweb root and the credentials it accepts."""

    url: str
    auth: tuple[str, str]
    log: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, files: Iterable[str | Path]) -> list[str]:
        """Store DICOM files through the REST API (``POST /instances``); their Orthanc ids."""
        ids = []
        for path in files:
            answer = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), auth=self.auth, timeout=60)
            answer.raise_for_status()
            ids.append(answer.json()["ID"])
        return ids

    def series(self, modality: str | None = None) -> list[dict]:
        """QIDO-RS series of the server (optionally of one modality), as DICOM JSON."""
        params = {"Modality": modality} if modality else {}
        answer = requests.get(f"{self.dicomweb}/series", params=params, auth=self.auth, timeout=60)
        answer.raise_for_status()
        return answer.json() if answer.content else []

    def retrieve(self, study: str, series: str) -> list[pydicom.Dataset]:
        """The instances of a series, through WADO-RS."""
        answer = requests.get(f"{self.dicomweb}/studies/{study}/series/{series}", auth=self.auth, timeout=120,
                              headers={"Accept": 'multipart/related; type="application/dicom"'})  # fmt: skip
        answer.raise_for_status()
        boundary = answer.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"').encode()
        parts = answer.content.split(b"--" + boundary)[1:-1]
        return [pydicom.dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n"))) for part in parts]

    def segs_of(self, series_uid: str) -> list[pydicom.Dataset]:
        """The DICOM SEG instances on the server that reference the image series ``series_uid``."""
        segs = []
        for item in self.series("SEG"):
            for ds in self.retrieve(item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]):
                if ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid:
                    segs.append(ds)
        return segs

    def delete_series(self, uids: Iterable[str]) -> None:
        """Remove the series with these SeriesInstanceUIDs (e.g. the SEGs a test stored)."""
        for uid in uids:
            found = requests.post(f"{self.url}/tools/lookup", data=uid, auth=self.auth, timeout=60).json()
            for hit in found:
                if hit["Type"] == "Series":
                    requests.delete(f"{self.url}/series/{hit['ID']}", auth=self.auth, timeout=60).raise_for_status()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plugin() -> Path | None:
    folders = [os.environ["IC_MOE_ORTHANC_PLUGINS"]] if os.environ.get("IC_MOE_ORTHANC_PLUGINS") else PLUGIN_FOLDERS
    for folder in folders:
        for name in ("libOrthancDicomWeb.so", "libOrthancDicomWeb.so.1"):
            if (Path(folder) / name).is_file():
                return Path(folder) / name
    return None


def _binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).is_file()),
                                           None)  # fmt: skip


def start_orthanc(folder: Path) -> Iterator[Orthanc]:
    """Start Orthanc with a config of its own in ``folder`` and yield it once its REST API answers; stop it after.

    Skips the calling test when Orthanc or its DICOMweb plugin is not installed, unless ``IC_MOE_REQUIRE_ORTHANC=1``.
    """
    binary, plugin = _binary(), _plugin()
    if binary is None or plugin is None:
        missing = "the Orthanc binary" if binary is None else "Orthanc's DICOMweb plugin"
        message = f"{missing} is not installed (apt-get install orthanc orthanc-dicomweb)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message}, and {REQUIRE_ENV}=1 says the PACS tests must run")
        pytest.skip(message)
    port = _free_port()
    config = {
        "Name": "ic-moe-test",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,  # clients on this host only
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER[0]: USER[1]},
        "DicomServerEnabled": False,  # DICOMweb and REST only: no DICOM port to listen on
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "HttpCompressionEnabled": False,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False},  # no "Host"
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = folder / "orthanc.log"
    with log.open("w") as out:
        process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    if os.environ.get("IC_MOE_ORTHANC_PIDS"):
        with open(os.environ["IC_MOE_ORTHANC_PIDS"], "a") as pids:
            pids.write(f"{process.pid}\n")
    server = Orthanc(url=f"http://127.0.0.1:{port}", auth=USER, log=log, process=process)
    try:
        _wait_until_up(server, process, log)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _wait_until_up(server: Orthanc, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{server.url}/system", auth=server.auth, timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"Orthanc did not answer within {seconds:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory) -> Iterator[Orthanc]:
    """One Orthanc for the test session (empty; tests upload what they need)."""
    yield from start_orthanc(tmp_path_factory.mktemp("orthanc"))
