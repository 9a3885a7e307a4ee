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
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

import requests

from ic_moe_monai.io.discovery import NON_IMAGE_MODALITIES, Skipped
from ic_moe_monai.io.guards import ImageError, _check_size

__all__ = [
    "PASSWORD_ENV",
    "TOKEN_ENV",
    "USER_ENV",
    "DicomwebClient",
    "DicomwebError",
    "DicomwebSource",
    "RemoteSeries",
    "find_series",
    "is_dicomweb_url",
    "retrieve_series",
    "stored_receipt",
]

USER_ENV = "IC_MOE_DICOMWEB_USER"
PASSWORD_ENV = "IC_MOE_DICOMWEB_PASSWORD"
TOKEN_ENV = "IC_MOE_DICOMWEB_TOKEN"
DICOM_PART = 'multipart/related; type="application/dicom"'
TIMEOUT = (10.0, 300.0)  # seconds to connect, and between bytes of an answer (a large instance on a slow PACS)
UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # also what makes a UID safe as a file name
# DICOM JSON tags of the attributes read from QIDO-RS answers
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, DESCRIPTION, NUMBER, ROWS, COLUMNS = "00080060", "0008103E", "00200011", "00280010", "00280011"
FAILED_SOPS, REFERENCED_SOPS, RETRIEVE_URL = "00081198", "00081199", "00081190"


class DicomwebError(RuntimeError):
    """A DICOMweb request that failed; one line naming the URL and the reason."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def is_dicomweb_url(text: object) -> bool:
    """Whether an input names a DICOMweb resource (``http://`` or ``https://``) rather than a path."""
    return isinstance(text, str) and text.strip().lower().startswith(("http://", "https://"))


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
                if not UID.fullmatch(uid):
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
        """A QIDO-RS search (``path`` under the root, e.g. ``studies/<uid>/series``): DICOM JSON datasets."""
        params = [(k, v) for k, values in (filters or {}).items() for v in values]
        answer = self._request("GET", path, params=params, headers={"Accept": "application/dicom+json"})
        if answer.status_code == 204 or not answer.content.strip():
            return []
        try:
            found = answer.json()
        except ValueError as err:
            raise DicomwebError(f"{answer.url}: the answer is not DICOM JSON ({_first_line(err)}).") from err
        if not isinstance(found, list):
            raise DicomwebError(f"{answer.url}: the answer is not a list of DICOM JSON datasets.")
        return found

    # --------------------------------------------------------------------------------------------- WADO-RS
    def retrieve_instance(self, study: str, series: str, instance: str, path: Path) -> None:
        """One instance as stored (no transcoding), written to ``path``."""
        where = f"studies/{study}/series/{series}/instances/{instance}"
        answer = self._request("GET", where, headers={"Accept": f"{DICOM_PART}; transfer-syntax=*"}, stream=False)
        parts = _multipart_parts(answer)
        if len(parts) != 1:
            raise DicomwebError(f"{answer.url}: {len(parts)} DICOM parts in the answer, 1 expected.")
        path.write_bytes(parts[0])

    # --------------------------------------------------------------------------------------------- STOW-RS
    def store(self, files: Sequence[str | Path], study: str | None = None) -> list[str]:
        """Store DICOM files (STOW-RS); the retrieve URLs of the stored instances.

        Raises:
            DicomwebError: the server refused the request or some instance (its reason, when it gives one).
        """
        boundary = uuid.uuid4().hex
        body = b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + Path(f).read_bytes() + b"\r\n"
            for f in files
        ) + b"--" + boundary.encode() + b"--\r\n"  # fmt: skip
        headers = {"Content-Type": f'{DICOM_PART}; boundary="{boundary}"', "Accept": "application/dicom+json"}
        answer = self._request("POST", f"studies/{study}" if study else "studies", data=body, headers=headers)
        try:
            result = answer.json() if answer.content.strip() else {}
        except ValueError:
            result = {}
        failed = result.get(FAILED_SOPS, {}).get("Value", []) if isinstance(result, dict) else []
        if failed:
            reasons = sorted({str(item.get("00081197", {}).get("Value", ["?"])[0]) for item in failed})
            raise DicomwebError(f"{answer.url}: the server did not store {len(failed)} of {len(files)} instance(s) "
                                f"(failure reason {', '.join(reasons)}).")  # fmt: skip
        stored = result.get(REFERENCED_SOPS, {}).get("Value", []) if isinstance(result, dict) else []
        return [str(item.get(RETRIEVE_URL, {}).get("Value", [""])[0]) for item in stored]

    # ---------------------------------------------------------------------------------------------- common
    def url(self, path: str) -> str:
        return f"{self.root}/{quote(path, safe='/')}"

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = self.url(path)
        try:
            answer = self.session.request(method, url, timeout=TIMEOUT, **kwargs)
        except requests.RequestException as err:
            raise DicomwebError(f"{url}: cannot reach the DICOMweb server ({_connection_reason(err)}).") from err
        if answer.status_code in (401, 403):
            given = TOKEN_ENV if os.environ.get(TOKEN_ENV) else f"{USER_ENV} / {PASSWORD_ENV}"
            hint = "" if answer.status_code == 403 else f"; set {USER_ENV} and {PASSWORD_ENV}, or {TOKEN_ENV}"
            said = f"the credentials of {given} were refused" if self._has_credentials() else "credentials needed"
            raise DicomwebError(f"{url}: {answer.status_code} {answer.reason} ({said}{hint}).", answer.status_code)
        if answer.status_code >= 400:
            detail = _first_line(ValueError(answer.text)) if answer.text.strip() else ""
            raise DicomwebError(f"{url}: {answer.status_code} {answer.reason}{f' ({detail})' if detail else ''}.",
                                answer.status_code)  # fmt: skip
        return answer

    def _has_credentials(self) -> bool:
        return self.session.auth is not None or "Authorization" in self.session.headers


def _multipart_parts(answer: requests.Response) -> list[bytes]:
    """The bodies of a ``multipart/related`` answer."""
    content_type = answer.headers.get("Content-Type", "")
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/related") or match is None:
        raise DicomwebError(f"{answer.url}: expected a multipart/related answer, got {content_type or 'none'!r}.")
    delimiter = b"--" + match.group(1).encode()
    parts = []
    for chunk in answer.content.split(delimiter)[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        _head, separator, body = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise DicomwebError(f"{answer.url}: a part of the multipart answer has no headers.")
        parts.append(body[:-2] if body.endswith(b"\r\n") else body)
    return parts


def _value(dataset: Mapping[str, Any], tag: str, default: str = "") -> str:
    values = dataset.get(tag, {}).get("Value") or [default]
    return str(values[0])


def find_series(client: DicomwebClient, source: DicomwebSource) -> tuple[list[RemoteSeries], list[Skipped]]:
    """The image series ``source`` names, and the series skipped (non-image modalities, malformed UIDs).

    Raises:
        FileNotFoundError: a study or series URL that names nothing on the server.
        DicomwebError: the server cannot be reached or refuses the query.
    """
    if source.study:
        filters = {"SeriesInstanceUID": (source.series,)} if source.series else {}
        found = client.search(f"studies/{source.study}/series", filters)
        if not found:
            what = f"series {source.series} of study {source.study}" if source.series else f"study {source.study}"
            raise FileNotFoundError(f"input {source.url}: no {what} on the server.")
        found = [{STUDY_UID: {"Value": [source.study]}, **item} for item in found]
    elif source.level == "series":
        found = client.search("series", source.filters)
    else:
        found = []
        for study in client.search("studies", source.filters):
            uid = _value(study, STUDY_UID)
            if UID.fullmatch(uid):
                found += [{STUDY_UID: {"Value": [uid]}, **item} for item in client.search(f"studies/{uid}/series")]
    series, skipped, seen = [], [], set()
    for item in found:
        study, uid, modality = _value(item, STUDY_UID), _value(item, SERIES_UID), _value(item, MODALITY).upper()
        url = client.url(f"studies/{study}/series/{uid}")
        if not UID.fullmatch(study) or not UID.fullmatch(uid):
            skipped.append(Skipped(f"{client.root} (series {uid!r:.80})", "malformed StudyInstanceUID or "
                                   "SeriesInstanceUID in the server's answer"))  # fmt: skip
        elif uid in seen:
            continue
        elif modality in NON_IMAGE_MODALITIES:
            skipped.append(Skipped(url, f"DICOM {modality} without an image volume (skipped)", failure=False))
        else:
            series.append(RemoteSeries(study, uid, modality, url, _value(item, DESCRIPTION)))
        seen.add(uid)
    return series, skipped


def retrieve_series(client: DicomwebClient, series: RemoteSeries, folder: Path, max_bytes: int,
                    workers: int = 4) -> Path:  # fmt: skip
    """Retrieve every instance of ``series`` into ``folder/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

    The instance list (QIDO-RS) comes first: a series whose instances would exceed ``max_bytes`` as float32 is
    refused before any instance is retrieved.

    Raises:
        ImageError: the series is over the size limit, or has no instances.
        DicomwebError: a request failed (the message names the URL).
    """
    instances = client.search(f"studies/{series.study}/series/{series.series}/instances",
                              {"includefield": (ROWS, COLUMNS)})  # fmt: skip
    uids = [_value(item, SOP_UID) for item in instances]
    if not uids:
        raise ImageError(f"{series.url}: the series has no instances.")
    bad = next((uid for uid in uids if not UID.fullmatch(uid)), None)
    if bad is not None:
        raise DicomwebError(f"{series.url}: malformed SOPInstanceUID {bad!r:.80} in the server's answer.")
    rows, columns = (max((int(_value(i, tag, "0") or 0) for i in instances), default=0) for tag in (ROWS, COLUMNS))
    if rows and columns:  # the server told the matrix size: check the volume before retrieving it
        shape = (columns, rows, len(uids))
        _check_size(f"{series.url} ({len(uids)} instances)", shape, "as stored", 4 * columns * rows * len(uids),
                    max_bytes)  # fmt: skip
    target = folder / series.series
    target.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="wado") as pool:
        futures = [pool.submit(client.retrieve_instance, series.study, series.series, uid, target / f"{uid}.dcm")
                   for uid in dict.fromkeys(uids)]  # fmt: skip
        for future in futures:
            future.result()
    return target


def stored_receipt(urls: Sequence[str], seg_file: Path) -> str:
    """The text of a push receipt: what was stored, where."""
    return json.dumps({"stored": str(seg_file.name), "retrieve_urls": list(urls)}, indent=2) + "\n"


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
