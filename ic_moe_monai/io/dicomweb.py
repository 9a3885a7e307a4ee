"""DICOMweb input and output of batch segmentation: QIDO-RS to find series, WADO-RS to retrieve them into a
folder (where discovery checks them as any DICOM folder), STOW-RS to store DICOM SEGs back.

An input is a URL under a DICOMweb root (the root is found before ``/studies`` or ``/series``):

- ``<root>/studies/<StudyInstanceUID>``: every image series of the study;
- ``<root>/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``: one series;
- ``<root>/series?<filters>`` or ``<root>/studies?<filters>``: the series (of the studies) a QIDO-RS query matches,
  e.g. ``series?Modality=MR&StudyDate=20240101``. A query without filters is refused: it would be the whole server.

Credentials come from the environment only, never from the URL or the command line: ``IC_MOE_DICOMWEB_TOKEN``
(an OAuth bearer token) or ``IC_MOE_DICOMWEB_USER`` and ``IC_MOE_DICOMWEB_PASSWORD`` (HTTP basic). HTTPS
certificates are checked by ``requests`` (``REQUESTS_CA_BUNDLE`` names a hospital's own CA bundle).

Series of modalities that hold no image volume (SEG, RTSTRUCT, SR, ...) are skipped from the QIDO answer, series
whose instances would exceed the image size limit are refused before any instance is retrieved, and instances
are retrieved as stored (``transfer-syntax=*``), so the server needs no transcoder.

The server is not trusted: every answer is read up to a bound (:data:`QIDO_MAX_BYTES` for JSON, the image size
limit for a series' instances) and within :data:`ANSWER_SECONDS`; redirects are not followed (credentials never go
to another server); UIDs become file names only when they are DICOM UIDs; each retrieved instance must be DICOM and
carry the UIDs it was asked for; a STOW-RS answer must list the stored instances; and credentials are blanked out of
every message (:func:`redact`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

import pydicom
import requests
from urllib3.exceptions import HTTPError as Urllib3Error

from ic_moe_monai._moved import moved_name
from ic_moe_monai.io.guards import format_bytes

__all__ = [
    "PASSWORD_ENV",
    "TOKEN_ENV",
    "USER_ENV",
    "DicomwebClient",
    "DicomwebError",
    "DicomwebSource",
    "RemoteSeries",
    "is_dicomweb_url",
    "is_uid",
    "redact",
]

USER_ENV = "IC_MOE_DICOMWEB_USER"
PASSWORD_ENV = "IC_MOE_DICOMWEB_PASSWORD"
TOKEN_ENV = "IC_MOE_DICOMWEB_TOKEN"
DICOM_PART = 'multipart/related; type="application/dicom"'
TIMEOUT = (10.0, 300.0)  # seconds to connect, and between bytes of an answer (a large instance on a slow PACS)
ANSWER_SECONDS = 3600.0  # the longest one answer may take, however steadily it trickles in
QIDO_MAX_BYTES = 64 * 1024**2  # a QIDO-RS or STOW-RS answer (DICOM JSON) larger than this is refused
HEADER_BYTES = 1024**2  # per instance, what a series may hold beyond its voxels' size limit (DICOM headers)
DETAIL_BYTES = 4096  # of an error answer's body, read for its first line
CHUNK = 1024**2
UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # also what makes a UID safe as a file name
UID_MAX = 64  # characters (DICOM PS3.5 9.1); a longer one is refused, also as a file name
# DICOM JSON tags of the attributes read from QIDO-RS answers
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, DESCRIPTION, NUMBER, ROWS, COLUMNS = "00080060", "0008103E", "00200011", "00280010", "00280011"
FAILED_SOPS, REFERENCED_SOPS, RETRIEVE_URL = "00081198", "00081199", "00081190"


class DicomwebError(RuntimeError):
    """A DICOMweb request that failed; one line naming the URL and the reason (credentials blanked out)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(redact(message))
        self.status = status


def is_dicomweb_url(text: object) -> bool:
    """Whether an input names a DICOMweb resource (``http://`` or ``https://``) rather than a path."""
    return isinstance(text, str) and text.strip().lower().startswith(("http://", "https://"))


def is_uid(text: object) -> bool:
    """Whether ``text`` is a DICOM UID (digits and dots, at most 64 characters): only such text names files."""
    return isinstance(text, str) and len(text) <= UID_MAX and UID.fullmatch(text) is not None


def redact(text: str) -> str:
    """``text`` with the credentials of the environment (token, password, and their HTTP basic form) as ``***``."""
    token, user, password = (os.environ.get(k, "") for k in (TOKEN_ENV, USER_ENV, PASSWORD_ENV))
    secrets = [token, password]
    if user and password:
        secrets.append(base64.b64encode(f"{user}:{password}".encode()).decode())
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


@dataclass(frozen=True)
class DicomwebSource:
    """What a DICOMweb input URL names: a study, a series, or a QIDO-RS query, under the DICOMweb ``root``."""

    url: str
    root: str
    study: str | None = None
    series: str | None = None
    level: str | None = None  # "studies" or "series" for a query
    filters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str) -> DicomwebSource:
        """Read an input URL.

        Raises:
            ValueError: credentials in the URL, a URL that names no study, series or query, a malformed UID, or a
                query without filters.
        """
        url = url.strip()
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise ValueError(
                f"input {_without_userinfo(parts)}: credentials in the URL are refused (they would show in process "
                f"lists and logs); set {USER_ENV} and {PASSWORD_ENV}, or {TOKEN_ENV}."
            )
        if not parts.hostname:
            raise ValueError(f"input {url}: no server in the URL.")
        path = parts.path.rstrip("/")
        shown = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
        match = re.fullmatch(r"(?P<root>.*?)/studies/(?P<study>[^/]+)(?:/series/(?P<series>[^/]+))?", path)
        if match and not parts.query:
            for uid in filter(None, (match["study"], match["series"])):
                if not is_uid(uid):
                    raise ValueError(f"input {shown}: {uid!r} is not a DICOM UID.")
            return cls(shown, _root(parts, match["root"]), match["study"], match["series"])
        match = re.fullmatch(r"(?P<root>.*?)/(?P<level>studies|series)", path)
        if match is None:
            raise ValueError(f"input {shown}: not a DICOMweb study, series or query URL (<root>/studies/<uid>, "
                             "<root>/studies/<uid>/series/<uid>, or <root>/series?Modality=MR&...).")  # fmt: skip
        filters = {k: tuple(v) for k, v in parse_qs(parts.query, keep_blank_values=False).items()}
        if not filters:
            raise ValueError(f"input {shown}: a query without filters would segment every series on the server; "
                             "add one, e.g. ?StudyInstanceUID=... or ?Modality=MR&StudyDate=20240101.")  # fmt: skip
        return cls(shown, _root(parts, match["root"]), level=match["level"], filters=filters)


def _root(parts: Any, root_path: str) -> str:
    return urlunsplit((parts.scheme, parts.netloc, root_path, "", "")).rstrip("/")


def _without_userinfo(parts: Any) -> str:
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path, parts.query, ""))


@dataclass(frozen=True)
class RemoteSeries:
    """An image series found on the server."""

    study: str
    series: str
    modality: str
    url: str  # <root>/studies/<study>/series/<series>
    description: str = ""


class DicomwebClient:
    """The few QIDO-RS, WADO-RS and STOW-RS requests batch segmentation needs, with credentials from the
    environment (:data:`TOKEN_ENV`, or :data:`USER_ENV` and :data:`PASSWORD_ENV`).

    Args:
        root: the DICOMweb root URL, e.g. ``http://pacs:8042/dicom-web``.
        session: a ``requests`` session to use (one is made otherwise).

    Raises:
        ValueError: only one of user and password is set.
    """

    def __init__(self, root: str, session: requests.Session | None = None) -> None:
        self.root = root.rstrip("/")
        self.session = session or requests.Session()
        token, user, password = (os.environ.get(k, "") for k in (TOKEN_ENV, USER_ENV, PASSWORD_ENV))
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        elif user or password:
            if not (user and password):
                missing = PASSWORD_ENV if user else USER_ENV
                raise ValueError(f"{USER_ENV} and {PASSWORD_ENV} go together: {missing} is not set.")
            self.session.auth = (user, password)

    # --------------------------------------------------------------------------------------------- QIDO-RS
    def search(self, path: str, filters: Mapping[str, Iterable[str]] | None = None) -> list[dict[str, Any]]:
        """A QIDO-RS search (``path`` under the root, e.g. ``studies/<uid>/series``): DICOM JSON datasets (an item
        of the answer that is no JSON object is an empty dataset, so its UIDs read as malformed).

        Raises:
            DicomwebError: the request failed, or the answer is over :data:`QIDO_MAX_BYTES` or no JSON list.
        """
        params = [(k, v) for k, values in (filters or {}).items() for v in values]
        answer = self._request("GET", path, params=params, headers={"Accept": "application/dicom+json"})
        content = _body(answer, _Budget(QIDO_MAX_BYTES, "the DICOM JSON answer"))
        if answer.status_code == 204 or not content.strip():
            return []
        found = _json(answer, content)
        if not isinstance(found, list):
            raise DicomwebError(f"{answer.url}: the answer is not a list of DICOM JSON datasets.")
        return [item if isinstance(item, dict) else {} for item in found]

    # --------------------------------------------------------------------------------------------- WADO-RS
    def retrieve_instance(self, study: str, series: str, instance: str, path: Path,
                          budget: _Budget | None = None) -> None:  # fmt: skip
        """One instance as stored (no transcoding), written to ``path``: read up to ``budget`` (bytes shared by
        the instances of a series), and written only when it is DICOM and carries the UIDs it was asked for.

        Raises:
            DicomwebError: the request failed, or the answer is over the budget, not one DICOM part, or another
                instance.
        """
        where = f"studies/{study}/series/{series}/instances/{instance}"
        answer = self._request("GET", where, headers={"Accept": f"{DICOM_PART}; transfer-syntax=*"})
        delimiter = _delimiter(answer)
        parts = _multipart_parts(answer.url, _body(answer, budget or _Budget(None, "the instance")), delimiter)
        if len(parts) != 1:
            raise DicomwebError(f"{answer.url}: {len(parts)} DICOM parts in the answer, 1 expected.")
        expected = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
        _check_instance(answer.url, parts[0], expected)
        path.write_bytes(parts[0])

    # --------------------------------------------------------------------------------------------- STOW-RS
    def store(self, files: Sequence[str | Path], study: str | None = None) -> list[str]:
        """Store DICOM files (STOW-RS); the retrieve URLs of the stored instances.

        Raises:
            DicomwebError: the server refused the request or some instance (its reason, when it gives one), or its
                answer does not list every instance as stored.
        """
        boundary = uuid.uuid4().hex
        body = b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + Path(f).read_bytes() + b"\r\n"
            for f in files
        ) + b"--" + boundary.encode() + b"--\r\n"  # fmt: skip
        headers = {"Content-Type": f'{DICOM_PART}; boundary="{boundary}"', "Accept": "application/dicom+json"}
        answer = self._request("POST", f"studies/{study}" if study else "studies", data=body, headers=headers)
        content = _body(answer, _Budget(QIDO_MAX_BYTES, "the STOW-RS answer"))
        try:
            result = json.loads(content)
        except (ValueError, RecursionError):
            result = None
        if not isinstance(result, dict):
            raise DicomwebError(f"{answer.url}: {answer.status_code} {answer.reason}, but the answer is no DICOM JSON "
                                "dataset: whether the server stored the instances is unknown.")  # fmt: skip
        failed = _items(result, FAILED_SOPS)
        if failed:
            reasons = sorted({_value(item, "00081197", "?") for item in failed})
            raise DicomwebError(f"{answer.url}: the server did not store {len(failed)} of {len(files)} instance(s) "
                                f"(failure reason {', '.join(reasons)}).")  # fmt: skip
        stored = _items(result, REFERENCED_SOPS)
        if len(stored) != len(files):  # 202 (stored with warnings, e.g. coerced attributes) lists them too
            raise DicomwebError(f"{answer.url}: {answer.status_code} {answer.reason}, but the answer lists "
                                f"{len(stored)} of {len(files)} instance(s) as stored.")  # fmt: skip
        return [_value(item, RETRIEVE_URL) for item in stored]

    # ---------------------------------------------------------------------------------------------- common
    def url(self, path: str) -> str:
        return f"{self.root}/{quote(path, safe='/')}"

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """The answer (its body not read yet) to a request that succeeded (2xx); redirects are not followed."""
        url = self.url(path)
        try:
            answer = self.session.request(method, url, timeout=TIMEOUT, stream=True, allow_redirects=False, **kwargs)
        except requests.RequestException as err:
            raise DicomwebError(f"{url}: cannot reach the DICOMweb server ({_connection_reason(err)}).") from err
        if answer.status_code < 300:
            return answer
        detail = _error_detail(answer)
        answer.close()
        if answer.status_code in (401, 403):
            given = TOKEN_ENV if os.environ.get(TOKEN_ENV) else f"{USER_ENV} / {PASSWORD_ENV}"
            hint = "" if answer.status_code == 403 else f"; set {USER_ENV} and {PASSWORD_ENV}, or {TOKEN_ENV}"
            said = f"the credentials of {given} were refused" if self._has_credentials() else "credentials needed"
            raise DicomwebError(f"{url}: {answer.status_code} {answer.reason} ({said}{hint}).", answer.status_code)
        if answer.status_code < 400:
            location = _shown_url(answer.headers.get("Location", ""))
            raise DicomwebError(f"{url}: {answer.status_code} {answer.reason}: the server redirects to {location} "
                                "(not followed, so credentials never go elsewhere: use that URL).",
                                answer.status_code)  # fmt: skip
        raise DicomwebError(f"{url}: {answer.status_code} {answer.reason}{f' ({detail})' if detail else ''}.",
                            answer.status_code)  # fmt: skip

    def _has_credentials(self) -> bool:
        return self.session.auth is not None or "Authorization" in self.session.headers


class _Budget:
    """Bytes that answers may still bring (``None``: no limit), shared by the threads retrieving one series."""

    def __init__(self, limit: int | None, what: str) -> None:
        self.left, self.limit, self.what = limit, limit, what
        self._lock = threading.Lock()

    def take(self, count: int, url: str) -> None:
        """Count ``count`` more bytes read from ``url``.

        Raises:
            DicomwebError: over the limit.
        """
        if self.left is None:
            return
        with self._lock:
            self.left -= count
            if self.left < 0:
                raise DicomwebError(f"{url}: {self.what} is larger than {format_bytes(self.limit)}; not read further.")


def _body(answer: requests.Response, budget: _Budget) -> bytes:
    """The body of ``answer``, read up to ``budget`` and within :data:`ANSWER_SECONDS`; the answer is closed.

    Raises:
        DicomwebError: over the budget, too slow, or broken off.
    """
    declared = answer.headers.get("Content-Length", "")
    chunks, deadline = [], time.monotonic() + ANSWER_SECONDS
    read = getattr(answer.raw, "read1", None) or answer.raw.read  # read1: whatever arrived, so the clock is checked
    try:
        if declared.isdigit():
            budget.take(int(declared), answer.url)  # refused before it is read
        while chunk := read(CHUNK, decode_content=True):
            if not declared.isdigit():
                budget.take(len(chunk), answer.url)
            if time.monotonic() > deadline:
                raise DicomwebError(f"{answer.url}: the answer took over {ANSWER_SECONDS:.0f} s; not read further.")
            chunks.append(chunk)
    except (requests.RequestException, Urllib3Error, OSError) as err:
        raise DicomwebError(f"{answer.url}: the answer broke off ({_connection_reason(err)}).") from err
    finally:
        answer.close()
    content = b"".join(chunks)
    if declared.isdigit() and len(content) != int(declared):
        raise DicomwebError(f"{answer.url}: the answer broke off ({len(content)} of {declared} bytes).")
    return content


def _json(answer: requests.Response, content: bytes) -> Any:
    try:
        return json.loads(content)
    except (ValueError, RecursionError) as err:
        raise DicomwebError(f"{answer.url}: the answer is not DICOM JSON ({_first_line(err)}).") from err


def _error_detail(answer: requests.Response) -> str:
    """The first line of an error answer's text (its first :data:`DETAIL_BYTES`); none of an HTML page."""
    content_type = answer.headers.get("Content-Type", "").lower()
    try:
        text = answer.raw.read(DETAIL_BYTES, decode_content=True).decode("utf-8", "replace")
    except (Urllib3Error, OSError, ValueError):
        return ""
    if "html" in content_type or "xml" in content_type or text.lstrip().startswith("<"):
        return ""
    return _printable(_first_line(ValueError(text))) if text.strip() else ""


def _shown_url(url: str) -> str:
    """A URL from the server, without user info, short and printable."""
    try:
        parts = urlsplit(url)
        shown = _without_userinfo(parts) if parts.hostname else parts.path
    except ValueError:
        shown = url
    return _printable(shown)[:200] or "nowhere"


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _delimiter(answer: requests.Response) -> bytes:
    """The part delimiter of a ``multipart/related`` answer, checked before its body is read.

    Raises:
        DicomwebError: another Content-Type, or no boundary (the answer is closed).
    """
    content_type = answer.headers.get("Content-Type", "")
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/related") or match is None:
        answer.close()
        raise DicomwebError(f"{answer.url}: expected a multipart/related answer with a boundary, got "
                            f"{_printable(content_type)[:80] or 'none'!r}.")  # fmt: skip
    return b"--" + match.group(1).encode("latin-1")


def _multipart_parts(url: str, content: bytes, delimiter: bytes) -> list[bytes]:
    """The bodies of a ``multipart/related`` answer."""
    parts = []
    for chunk in content.split(delimiter)[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        _head, separator, body = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise DicomwebError(f"{url}: a part of the multipart answer has no headers.")
        parts.append(body[:-2] if body.endswith(b"\r\n") else body)
    return parts


def _check_instance(url: str, data: bytes, expected: Mapping[str, str]) -> None:
    """An instance that is not DICOM, or whose UIDs are not the ones asked for, is refused.

    Raises:
        DicomwebError: naming the UID that differs.
    """
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        found = {keyword: str(header.get(keyword, "")) for keyword in expected}
    except Exception as err:  # pydicom raises many kinds on bytes that are no DICOM
        raise DicomwebError(f"{url}: the answer is not a DICOM instance ({_first_line(err)}).") from err
    for keyword, uid in expected.items():
        if found[keyword] != uid:
            shown = _printable(found[keyword])[:80] or "missing"
            raise DicomwebError(f"{url}: the instance's {keyword} is {shown}, not the {uid} asked for.")


def _value(dataset: Mapping[str, Any], tag: str, default: str = "") -> str:
    """The first value of ``tag`` in a DICOM JSON dataset, as text; ``default`` where it is missing or is no
    string or number (a malformed answer)."""
    element = dataset.get(tag) if isinstance(dataset, Mapping) else None
    values = element.get("Value") if isinstance(element, Mapping) else None
    value = values[0] if isinstance(values, list) and values else None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return default
    return str(value)


def _items(dataset: Mapping[str, Any], tag: str) -> list[dict[str, Any]]:
    """The items of a sequence ``tag`` in a DICOM JSON dataset (an item that is no object: an empty one)."""
    element = dataset.get(tag)
    values = element.get("Value") if isinstance(element, Mapping) else None
    return [v if isinstance(v, dict) else {} for v in values] if isinstance(values, list) else []










def _connection_reason(err: BaseException) -> str:
    text = str(err)
    for reason in ("Connection refused", "Name or service not known", "timed out", "certificate verify failed",
                   "No route to host", "Temporary failure in name resolution"):  # fmt: skip
        if reason.lower() in text.lower():
            return reason
    return type(err).__name__


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__


def __getattr__(name: str) -> Any:
    # moved to dicomweb_series, which imports this module: imported on first use, not at import
    return moved_name(__name__, name)
