"""``segment`` from a hostile or broken DICOMweb server: QIDO-RS answers of the wrong shape or size, WADO-RS answers
that are no single DICOM instance of the series asked for, too large, stalled or trickling, redirects to another
server, error pages, UIDs that would escape the temporary folder, STOW-RS answers that do not say the SEG was stored,
and credentials echoed back. Each ends as one failed series (or case) with one line naming the URL, the run going on.

The server is a small ``http.server`` in a thread on 127.0.0.1, so these tests need no PACS."""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ic_moe_monai.cli import main
from ic_moe_monai.io import dicomweb
from ic_moe_monai.io.dicomweb import (
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    DicomwebClient,
    DicomwebError,
    DicomwebSource,
    RemoteSeries,
)
from ic_moe_monai.io.dicomweb_series import find_series, retrieve_series

from .helpers import BUNDLE, threshold_bundle_config, write_dicom_series

SIZE = 16
TOKEN = "s3cret-token-value"
Route = Callable[[BaseHTTPRequestHandler, re.Match], None]


class FakePacs:
    """A DICOMweb server of one study, whose answers a test replaces route by route (``routes``: method, path
    pattern, handler; the first match answers), and which records each request's method, path and headers."""

    def __init__(self, root: Path) -> None:
        self.study = pydicom.uid.generate_uid()
        self.series: dict[str, list[Path]] = {}
        self.routes: list[tuple[str, str, Route]] = []
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.stored: list[bytes] = []
        self.stop = threading.Event()
        self._root = root
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client that hangs up is no server error
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.dicomweb = f"{self.url}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_series(self, slices: int = 4, number: int = 1, description: str | None = None) -> str:
        """A 16×16 MR series of the study; its SeriesInstanceUID."""
        pixels = (np.arange(slices * SIZE * SIZE).reshape(slices, SIZE, SIZE) % 400).astype(np.int16)
        files = write_dicom_series(self._root / f"s{number}", pixels, series_number=number, study_uid=self.study)
        if description is not None:
            for path in files:
                ds = pydicom.dcmread(path)
                ds.SeriesDescription = description
                ds.save_as(path)
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        self.series[uid] = files
        return uid

    def instances(self, series: str) -> dict[str, Path]:
        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in self.series[series]}

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------------------------------- default answers
    def answer(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        for method, pattern, route in self.routes:
            match = re.fullmatch(pattern, path)
            if method == request.command and match:
                route(request, match)
                return
        uid = r"([0-9.]+)"
        study, series = rf"/dicom-web/studies/{uid}", rf"/dicom-web/studies/{uid}/series/{uid}"
        defaults: list[tuple[str, str, Route]] = [
            ("GET", f"{study}/series", self._series_list),
            ("GET", f"{series}/instances", self._instance_list),
            ("GET", f"{series}/instances/{uid}", self._instance),
            ("POST", study, self._stow),
        ]
        for method, pattern, route in defaults:
            match = re.fullmatch(pattern, path)
            if method == request.command and match:
                route(request, match)
                return
        send(request, 404, b"not found", "text/plain")

    def _series_list(self, request: BaseHTTPRequestHandler, match: re.Match) -> None:
        items = [{"0020000E": {"vr": "UI", "Value": [uid]}, "00080060": {"vr": "CS", "Value": ["MR"]}}
                 for uid in self.series]  # fmt: skip
        send_json(request, items)

    def _instance_list(self, request: BaseHTTPRequestHandler, match: re.Match) -> None:
        items = [{"00080018": {"vr": "UI", "Value": [sop]}, "00280010": {"vr": "US", "Value": [SIZE]},
                  "00280011": {"vr": "US", "Value": [SIZE]}} for sop in self.instances(match[2])]  # fmt: skip
        send_json(request, items)

    def _instance(self, request: BaseHTTPRequestHandler, match: re.Match) -> None:
        send_multipart(request, [self.instances(match[2])[match[3]].read_bytes()])

    def _stow(self, request: BaseHTTPRequestHandler, match: re.Match) -> None:
        self.stored.append(request.rfile.read(int(request.headers["Content-Length"])))
        item = {
            "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.66.4"]},
            "00081190": {"vr": "UR", "Value": [f"{self.dicomweb}/studies/{match[1]}/series/1/instances/2"]},
        }
        send_json(request, {"00081199": {"vr": "SQ", "Value": [item]}})  # fmt: skip

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        pacs = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                pacs.seen.append((self.command, self.path, dict(self.headers)))
                pacs.answer(self)

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def send(request: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str, **headers: str) -> None:
    request.send_response(status)
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        request.send_header(name.replace("_", "-"), value)
    request.end_headers()
    request.wfile.write(body)


def send_json(request: BaseHTTPRequestHandler, value: object, status: int = 200) -> None:
    send(request, status, json.dumps(value).encode(), "application/dicom+json")


def multipart(parts: list[bytes], boundary: str = "b0undary") -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts)  # fmt: skip
    return body + b"--" + boundary.encode() + b"--\r\n"


def send_multipart(request: BaseHTTPRequestHandler, parts: list[bytes], boundary: str = "b0undary") -> None:
    send(request, 200, multipart(parts, boundary), f'multipart/related; type="application/dicom"; boundary={boundary}')


@pytest.fixture
def pacs(tmp_path) -> Iterator[FakePacs]:
    server = FakePacs(tmp_path / "pacs")
    yield server
    server.close()


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.delenv(USER_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)


@pytest.fixture(scope="module")
def threshold_config(tmp_path_factory) -> str:
    return str(threshold_bundle_config(tmp_path_factory.mktemp("threshold"), img_size=SIZE))


def _retrieve(pacs: FakePacs, series: str, tmp_path: Path, max_bytes: int = 1024**3) -> Path:
    remote = RemoteSeries(pacs.study, series, "MR", f"{pacs.dicomweb}/studies/{pacs.study}/series/{series}")
    return retrieve_series(DicomwebClient(pacs.dicomweb), remote, tmp_path / "retrieved", max_bytes)


def _leftover_downloads() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("ic_moe_dicomweb_*")}


def _route(pacs: FakePacs, method: str, pattern: str, route: Route) -> None:
    pacs.routes.insert(0, (method, pattern, route))


def _reply(status: int, body: bytes, content_type: str, **headers: str) -> Route:
    return lambda request, match: send(request, status, body, content_type, **headers)


def _stalled(request: BaseHTTPRequestHandler, match: re.Match, stop: threading.Event, every: float | None) -> None:
    """Headers promising 100 KiB, then a few bytes, then nothing (``every`` None) or a byte every ``every`` s."""
    request.send_response(200)
    request.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b0undary')
    request.send_header("Content-Length", str(100 * 1024))
    request.end_headers()
    try:
        request.wfile.write(b"--b0undary\r\n")
        request.wfile.flush()
        while not stop.wait(every or 30):
            request.wfile.write(b"x")
            request.wfile.flush()
    except OSError:  # the client gave up
        pass


# ------------------------------------------------------------------------------------------------ 1. QIDO-RS
def test_qido_answers_of_the_wrong_shape_are_malformed_series_not_crashes(pacs):
    good = pacs.add_series()
    uid = {"vr": "UI", "Value": [good]}
    answer = [
        {"0020000E": uid, "00080060": {"vr": "CS", "Value": ["MR"]}},
        "a string", None, 42, [],
        {"0020000E": "1.2.3"},  # a tag that is no {"vr", "Value"} object
        {"0020000E": {"vr": "UI", "Value": []}},
        {"0020000E": {"vr": "UI", "Value": [{"nested": "object"}]}},
        {"0020000E": {"vr": "UI", "Value": [123]}},  # a number: a UID without a dot, but not of this study
        {"0020000E": {"vr": "UI", "Value": ["1.2.4"]}, "00080060": "MR"},  # Modality malformed: an image series
        {"0020000E": {"vr": "UI", "Value": ["1.2.5"]}},  # no Modality
    ]  # fmt: skip
    _route(pacs, "GET", r"/dicom-web/studies/[0-9.]+/series", lambda request, match: send_json(request, answer))
    client = DicomwebClient(pacs.dicomweb)
    series, skipped = find_series(client, DicomwebSource.parse(f"{pacs.dicomweb}/studies/{pacs.study}"))
    assert [s.series for s in series] == [good, "123", "1.2.4", "1.2.5"]
    assert len(skipped) == 7 and all("malformed" in s.reason and s.failure for s in skipped)

    _route(pacs, "GET", r"/dicom-web/studies/[0-9.]+/series", lambda request, match: send_json(request, {"a": 1}))
    with pytest.raises(DicomwebError, match="not a list of DICOM JSON datasets"):
        find_series(client, DicomwebSource.parse(f"{pacs.dicomweb}/studies/{pacs.study}"))


@pytest.mark.parametrize("length", [True, False], ids=["content_length", "chunked"])
def test_a_huge_qido_answer_is_refused_not_read(pacs, monkeypatch, length):
    monkeypatch.setattr(dicomweb, "QIDO_MAX_BYTES", 1024**2)
    sent = []

    def huge(request: BaseHTTPRequestHandler, match: re.Match) -> None:
        item = json.dumps({"0020000E": {"vr": "UI", "Value": ["1.2.3"]}}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/dicom+json")
        request.send_header(*(("Content-Length", str(64 * 1024**2)) if length else ("Connection", "close")))
        request.end_headers()
        try:
            request.wfile.write(b"[" + item)
            for _ in range(64 * 1024):  # 64 MiB, in 1 KiB pieces
                request.wfile.write((b"," + item) * (1024 // (len(item) + 1)))
                sent.append(1)
        except OSError:
            pass

    _route(pacs, "GET", r"/dicom-web/series", huge)
    with pytest.raises(DicomwebError, match=r"/dicom-web/series\S*: the DICOM JSON answer is larger than 1.0 MiB"):
        DicomwebClient(pacs.dicomweb).search("series", {"Modality": ["MR"]})
    assert len(sent) < 32 * 1024  # the client stopped reading long before the end


def test_a_json_nesting_bomb_is_no_dicom_json(pacs):
    _route(pacs, "GET", r"/dicom-web/series", _reply(200, b"[" * 100_000, "application/dicom+json"))
    with pytest.raises(DicomwebError, match="the answer is not DICOM JSON"):
        DicomwebClient(pacs.dicomweb).search("series", {"Modality": ["MR"]})


# ------------------------------------------------------------------------------------------------ 2. WADO-RS
def _instance_attacks(pacs: FakePacs, other: FakePacs, series: str) -> dict[str, tuple[Route, str]]:
    """Answers to one instance of ``series``, each with what the error says."""
    sops = pacs.instances(series)
    first, second = list(sops.values())[:2]
    elsewhere = pacs.add_series(number=2)
    foreign = next(iter(pacs.instances(elsewhere).values())).read_bytes()
    padded = multipart([first.read_bytes() + b"\0" * 12 * 1024**2])
    part = 'multipart/related; type="application/dicom"; boundary=b0undary'
    return {
        "content_type": (_reply(200, first.read_bytes(), "application/dicom"), "expected a multipart/related answer"),
        "no_boundary": (_reply(200, multipart([first.read_bytes()]), 'multipart/related; type="application/dicom"'),
                        "expected a multipart/related answer with a boundary"),
        "no_parts": (_reply(200, multipart([]), part), "0 DICOM parts in the answer, 1 expected"),
        "two_parts": (_reply(200, multipart([first.read_bytes()] * 2), part), "2 DICOM parts in the answer"),
        "not_dicom": (_reply(200, multipart([b"<html>not dicom</html>" * 50]), part), "not a DICOM instance"),
        "other_instance": (_reply(200, multipart([second.read_bytes()]), part), "SOPInstanceUID is "),
        "other_series": (_reply(200, multipart([foreign]), part), f"SeriesInstanceUID is {elsewhere}, not the"),
        "too_large": (_reply(200, padded, part), "the series (4 instances) is larger than 5.0 MiB"),
        "too_large_chunked": (lambda r, m: _chunked(r, padded, part), "the series (4 instances) is larger than"),
        "html_500": (_reply(500, b"<!DOCTYPE html>\n<html><body><pre>Traceback (most recent call last):\n"
                             b"  File secret.py</pre></body></html>", "text/html"), "500 Internal Server Error."),
        "echoed_token": (_reply(500, f"bad token Bearer {TOKEN}".encode(), "text/plain"), "bad token Bearer ***"),
        "redirect": (_reply(302, b"", "text/plain", Location=f"http://localhost:{other.url.rsplit(':', 1)[1]}/x"),
                     "302 Found: the server redirects to http://localhost:"),
        "stalled": (lambda r, m: _stalled(r, m, pacs.stop, None), "the answer broke off (timed out)"),
        "trickle": (lambda r, m: _stalled(r, m, pacs.stop, 0.05), "the answer took over 1 s"),
    }  # fmt: skip


def _chunked(request: BaseHTTPRequestHandler, body: bytes, content_type: str) -> None:
    request.send_response(200)
    request.send_header("Content-Type", content_type)
    request.send_header("Connection", "close")
    request.end_headers()
    try:
        for start in range(0, len(body), 65536):
            request.wfile.write(body[start : start + 65536])
    except OSError:
        pass


ATTACKS = ["content_type", "no_boundary", "no_parts", "two_parts", "not_dicom", "other_instance", "other_series",
           "too_large", "too_large_chunked", "html_500", "echoed_token", "redirect", "stalled", "trickle"]  # fmt: skip


@pytest.mark.parametrize("attack", ATTACKS)
def test_wado_answers_that_are_not_the_instance_fail_the_series(tmp_path, pacs, credentials, monkeypatch, attack):
    monkeypatch.setattr(dicomweb, "TIMEOUT", (2.0, 0.5 if attack == "stalled" else 5.0))
    monkeypatch.setattr(dicomweb, "ANSWER_SECONDS", 1.0 if attack == "trickle" else 60.0)
    other = FakePacs(tmp_path / "other")
    try:
        series = pacs.add_series()
        route, message = _instance_attacks(pacs, other, series)[attack]
        sop = next(iter(pacs.instances(series)))
        _route(pacs, "GET", rf"/dicom-web/studies/[0-9.]+/series/[0-9.]+/instances/{re.escape(sop)}", route)
        started = time.monotonic()
        with pytest.raises(DicomwebError) as caught:
            _retrieve(pacs, series, tmp_path, max_bytes=1024**2)
        text = str(caught.value)
        assert message in text, text
        assert text.startswith(f"{pacs.dicomweb}/studies/{pacs.study}/series/{series}/instances/{sop}: "), text
        assert "\n" not in text and "<" not in text and TOKEN not in text and len(text) < 600, text
        assert time.monotonic() - started < 15
        assert not other.seen  # nothing, credentials least of all, went to the server redirected to
    finally:
        other.close()


def test_credentials_never_follow_a_redirect(tmp_path, pacs, monkeypatch):
    """Basic credentials, and a STOW-RS that a 302 would have turned into a GET of another server."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(USER_ENV, "user")
    monkeypatch.setenv(PASSWORD_ENV, "pass-word-1")
    other = FakePacs(tmp_path / "other")
    try:
        elsewhere = f"http://localhost:{other.url.rsplit(':', 1)[1]}/dicom-web/studies"
        for method in ("GET", "POST"):
            _route(pacs, method, r"/dicom-web/.*", _reply(302, b"", "text/plain", Location=elsewhere))
        client = DicomwebClient(pacs.dicomweb)
        with pytest.raises(DicomwebError, match="redirects to"):
            client.search("series", {"Modality": ["MR"]})
        seg = tmp_path / "seg.dcm"
        seg.write_bytes(b"DICM")
        with pytest.raises(DicomwebError, match="redirects to"):
            client.store([seg], study="1.2.3")
        assert not other.seen
    finally:
        other.close()


# ------------------------------------------------------------------------------------ 3. UIDs that are no paths
def test_server_uids_never_become_paths_outside_the_folder(tmp_path, pacs):
    good = pacs.add_series()
    hostile = ["../../escaped", "/tmp/absolute", "1.2/../../3", "1.2.3\n4", "1." * 40 + "1", "9" * 300]
    answer = [{"0020000E": {"vr": "UI", "Value": [uid]}} for uid in [good, *hostile]]
    _route(pacs, "GET", r"/dicom-web/studies/[0-9.]+/series", lambda request, match: send_json(request, answer))
    series, skipped = find_series(DicomwebClient(pacs.dicomweb),
                                  DicomwebSource.parse(f"{pacs.dicomweb}/studies/{pacs.study}"))  # fmt: skip
    assert [s.series for s in series] == [good] and len(skipped) == len(hostile)
    for sop in hostile:
        items = [{"00080018": {"vr": "UI", "Value": [sop]}}]
        _route(pacs, "GET", r"/dicom-web/studies/[0-9.]+/series/[0-9.]+/instances",
               lambda request, match, items=items: send_json(request, items))  # fmt: skip
        with pytest.raises(DicomwebError, match="malformed SOPInstanceUID"):
            _retrieve(pacs, good, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} <= {"pacs", "retrieved"}
    assert not (tmp_path / "retrieved" / good).exists() or not any((tmp_path / "retrieved" / good).iterdir())


# ------------------------------------------------------------------------------------------------ 4. STOW-RS
def _stow_attacks(other: FakePacs) -> dict[str, tuple[Route, str]]:
    failed = {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [272]}}]}}
    referenced = {"00081199": {"vr": "SQ", "Value": [{"00081190": {"vr": "UR", "Value": ["http://x/1"]}}]}}
    return {
        "not_json": (_reply(200, b"<html>stored?</html>", "text/html"), "200 OK, but the answer is no DICOM JSON"),
        "empty_200": (_reply(200, b"", "application/dicom+json"), "200 OK, but the answer is no DICOM JSON"),
        "json_list": (lambda r, m: send_json(r, [referenced]), "200 OK, but the answer is no DICOM JSON"),
        "nothing_listed": (lambda r, m: send_json(r, {}), "200 OK, but the answer lists 0 of 1 instance(s) as stored"),
        "failed_sop": (lambda r, m: send_json(r, failed), "did not store 1 of 1 instance(s) (failure reason 272)"),
        "failed_item_string": (lambda r, m: send_json(r, {"00081198": {"vr": "SQ", "Value": ["x"]}}),
                               "did not store 1 of 1 instance(s) (failure reason ?)"),
        "accepted_202": (_reply(202, b"", "application/dicom+json"), "202 Accepted, but the answer is no DICOM JSON"),
        "partial_202": (lambda r, m: send_json(r, {**referenced, **failed}, 202), "did not store 1 of 1"),
        "conflict_409": (lambda r, m: send_json(r, failed, 409), "409 Conflict"),
        "redirect": (_reply(303, b"", "text/plain", Location=f"{other.url}/elsewhere"), "303 See Other: the server "
                     "redirects to http://127.0.0.1"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "attack",
    [
        "not_json",
        "empty_200",
        "json_list",
        "nothing_listed",
        "failed_sop",
        "failed_item_string",
        "accepted_202",
        "partial_202",
        "conflict_409",
        "redirect",
    ],
)
def test_a_stow_answer_that_does_not_say_stored_is_a_failure(tmp_path, pacs, credentials, attack):
    other = FakePacs(tmp_path / "other")
    try:
        _route(pacs, "POST", r"/dicom-web/studies/[0-9.]+", _stow_attacks(other)[attack][0])
        seg = tmp_path / "seg.dcm"
        seg.write_bytes(b"DICM")
        with pytest.raises(DicomwebError) as caught:
            DicomwebClient(pacs.dicomweb).store([seg], study=pacs.study)
        text = str(caught.value)
        assert text.startswith(f"{pacs.dicomweb}/studies/{pacs.study}: ") and _stow_attacks(other)[attack][1] in text
        assert "\n" not in text and TOKEN not in text and not other.seen
    finally:
        other.close()


def test_a_stow_answer_listing_the_instance_gives_its_url(tmp_path, pacs, credentials):
    seg = tmp_path / "seg.dcm"
    seg.write_bytes(b"DICM")
    (url,) = DicomwebClient(pacs.dicomweb).store([seg], study=pacs.study)
    assert url.startswith(pacs.dicomweb) and pacs.seen[-1][2]["Authorization"] == f"Bearer {TOKEN}"
    warned = {"00081199": {"vr": "SQ", "Value": [{"00081190": {"vr": "UR", "Value": ["http://x/1"]}}]},
              "00081196": {"vr": "US", "Value": [45056]}}  # fmt: skip
    _route(pacs, "POST", r"/dicom-web/studies/[0-9.]+", lambda request, match: send_json(request, warned, 202))
    assert DicomwebClient(pacs.dicomweb).store([seg], study=pacs.study) == ["http://x/1"]  # coerced, but stored


# --------------------------------------------------------------------------------------------- 5. end to end
def _cli(capsys, *argv: object) -> tuple[int, str]:
    """``python -m ic_moe_monai segment ...`` in this process: exit code and stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["segment", *map(str, argv)])
    return exited.value.code, capsys.readouterr().err


def test_segment_fails_each_hostile_series_in_one_line_and_goes_on(tmp_path, pacs, credentials, capsys,
                                                                   threshold_config):  # fmt: skip
    good = pacs.add_series(number=1, description="../../evil/" + "x" * 300)
    other = FakePacs(tmp_path / "other")
    attacks = _instance_attacks(pacs, other, good)  # adds series 2, whose files stand in for "another series"
    bad = {name: pacs.add_series(number=3 + i) for i, name in
           enumerate(["not_dicom", "other_series", "echoed_token", "too_large", "redirect"])}  # fmt: skip
    for name, uid in bad.items():
        pattern = rf"/dicom-web/studies/[0-9.]+/series/{re.escape(uid)}/instances/[0-9.]+"
        _route(pacs, "GET", pattern, attacks[name][0])
    listed = [{"0020000E": {"vr": "UI", "Value": [uid]}, "00080060": {"vr": "CS", "Value": ["MR"]}}
              for uid in pacs.series] + ["junk", {"0020000E": {"vr": "UI", "Value": ["../../x"]}}]  # fmt: skip
    _route(pacs, "GET", r"/dicom-web/studies/[0-9.]+/series", lambda request, match: send_json(request, listed))
    before, out = _leftover_downloads(), tmp_path / "out"
    try:
        code, err = _cli(capsys, f"{pacs.dicomweb}/studies/{pacs.study}", out, "--bundle", BUNDLE, "--config",
                         threshold_config, "--max_image_size", "1M", "--quiet")  # fmt: skip
    finally:
        other.close()
    report = json.loads((out / "report.json").read_text())
    assert code == 1 == report["exit_code"] and "Traceback" not in err and TOKEN not in err
    assert TOKEN not in (out / "report.json").read_text() and not other.seen
    done = {c["source"].rsplit("/", 1)[1] for c in report["cases"] if c["status"] == "done"}
    assert done == set(pacs.series) - set(bad.values())  # the good series and series 2
    reasons = {r["path"]: r["reason"] for r in report["not_segmented"] if r["failure"]}
    assert len(reasons) == len(bad) + 2  # and the two malformed QIDO items
    for name, uid in bad.items():
        reason = reasons[f"{pacs.dicomweb}/studies/{pacs.study}/series/{uid}"]
        assert reason.startswith("cannot retrieve the series: http://") and "/instances/" in reason, reason
        assert attacks[name][1] in reason and "\n" not in reason and "ic_moe_dicomweb_" not in reason, reason
    assert _leftover_downloads() == before
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") or "partial" in p.name)
    assert names == sorted([f"{c['name']}.nii.gz" for c in report["cases"]] + ["report.json"]), names
    assert all(len(n) <= 255 and "/" not in n and ".." not in n for n in names)


def test_push_whose_answer_does_not_say_stored_fails_the_case_and_keeps_no_outputs(
    tmp_path, pacs, credentials, capsys, threshold_config
):
    series = pacs.add_series()
    _route(pacs, "POST", r"/dicom-web/studies/[0-9.]+", _reply(200, b"<html>ok</html>", "text/html"))
    out = tmp_path / "out"
    code, err = _cli(capsys, f"{pacs.dicomweb}/studies/{pacs.study}/series/{series}", out, "--bundle", BUNDLE,
                     "--config", threshold_config, "--push", "--quiet")  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    (case,) = report["cases"]
    assert code == 1 and case["status"] == "failed" and "Traceback" not in err and TOKEN not in err
    assert (
        f"cannot push the DICOM SEG ({pacs.dicomweb}/studies/{pacs.study}: 200 OK, but the answer is no"
        in case["error"]
    )
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["report.json"]
    assert [method for method, _, _ in pacs.seen].count("POST") == 1
