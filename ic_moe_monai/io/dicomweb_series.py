"""Series on a DICOMweb server: found by QIDO-RS (image series only, sizes checked before anything is
retrieved), retrieved by WADO-RS into a folder instance by instance, and the receipt of a STOW-RS store.

The client, the URL forms and the limits on what the server may answer are :mod:`ic_moe_monai.io.dicomweb`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ic_moe_monai.io.dicomweb import (
    COLUMNS,
    DESCRIPTION,
    HEADER_BYTES,
    MODALITY,
    ROWS,
    SERIES_UID,
    SOP_UID,
    STUDY_UID,
    DicomwebClient,
    DicomwebError,
    DicomwebSource,
    RemoteSeries,
    _Budget,
    _value,
    is_uid,
)
from ic_moe_monai.io.discovery import NON_IMAGE_MODALITIES, Skipped
from ic_moe_monai.io.guards import ImageError, _check_size

__all__ = ["find_series", "retrieve_series", "stored_receipt"]


def _count(dataset: Mapping[str, Any], tag: str) -> int:
    """A non-negative integer attribute (Rows, Columns); 0 where it is missing or malformed."""
    text = _value(dataset, tag, "0").strip()
    return int(text) if text.isdigit() and len(text) < 10 else 0


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
            if is_uid(uid):
                found += [{STUDY_UID: {"Value": [uid]}, **item} for item in client.search(f"studies/{uid}/series")]
    series, skipped, seen = [], [], set()
    for item in found:
        study, uid, modality = _value(item, STUDY_UID), _value(item, SERIES_UID), _value(item, MODALITY).upper()
        url = client.url(f"studies/{study}/series/{uid}")
        if not is_uid(study) or not is_uid(uid):
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
    refused before any instance is retrieved. The instances together may bring at most ``max_bytes`` and
    :data:`HEADER_BYTES` per instance, whatever the server said of their size.

    Raises:
        ImageError: the series is over the size limit, or has no instances.
        DicomwebError: a request failed (the message names the URL).
    """
    instances = client.search(f"studies/{series.study}/series/{series.series}/instances",
                              {"includefield": (ROWS, COLUMNS)})  # fmt: skip
    uids = [_value(item, SOP_UID) for item in instances]
    if not uids:
        raise ImageError(f"{series.url}: the series has no instances.")
    bad = next((uid for uid in uids if not is_uid(uid)), None)
    if bad is not None:
        raise DicomwebError(f"{series.url}: malformed SOPInstanceUID {bad!r:.80} in the server's answer.")
    rows, columns = (max((_count(i, tag) for i in instances), default=0) for tag in (ROWS, COLUMNS))
    if rows and columns:  # the server told the matrix size: check the volume before retrieving it
        shape = (columns, rows, len(uids))
        _check_size(f"{series.url} ({len(uids)} instances)", shape, "as stored", 4 * columns * rows * len(uids),
                    max_bytes)  # fmt: skip
    if not is_uid(series.series):  # the folder is named after it
        raise DicomwebError(f"{series.url}: malformed SeriesInstanceUID.")
    target = folder / series.series
    target.mkdir(parents=True, exist_ok=True)
    unique = list(dict.fromkeys(uids))
    budget = _Budget(max_bytes + HEADER_BYTES * len(unique), f"the series ({len(unique)} instances)")
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="wado") as pool:
        futures = [pool.submit(client.retrieve_instance, series.study, series.series, uid, target / f"{uid}.dcm",
                               budget) for uid in unique]  # fmt: skip
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:  # one failed instance fails the series: the others are not retrieved
                future.cancel()
            raise
    return target


def stored_receipt(urls: Sequence[str], seg_file: Path) -> str:
    """The text of a push receipt: what was stored, where."""
    return json.dumps({"stored": str(seg_file.name), "retrieve_urls": list(urls)}, indent=2) + "\n"
