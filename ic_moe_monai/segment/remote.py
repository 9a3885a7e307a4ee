"""DICOMweb input: the series of a study or series URL retrieved into a temporary folder and shown by their URLs."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ic_moe_monai.io import Skipped
from ic_moe_monai.io.dicomweb import DicomwebClient, DicomwebError, DicomwebSource, redact
from ic_moe_monai.io.dicomweb_series import find_series, retrieve_series
from ic_moe_monai.io.guards import ImageError
from ic_moe_monai.segment.loader import progress_bar
from ic_moe_monai.segment.options import UsageError
from ic_moe_monai.segment.report import SegmentReport

logger = logging.getLogger(__package__)


def remote_input(url: str) -> tuple[DicomwebSource, DicomwebClient]:
    """The study, series or query a DICOMweb input URL names, and a client of its server.

    Raises:
        UsageError: a URL that names none, carries credentials, or credentials in the environment that are half set.
    """
    try:
        source = DicomwebSource.parse(url)
        return source, DicomwebClient(source.root)
    except ValueError as err:
        raise UsageError(str(err)) from err


@contextmanager
def retrieved_series(
    source: DicomwebSource, client: DicomwebClient, max_bytes: int, quiet: bool, num_parts: int = 1, part_id: int = 0
) -> Iterator[tuple[Path, PathsShown, list[Skipped]]]:
    """Retrieve the image series ``source`` names (of part ``part_id`` of ``num_parts``, in UID order) into a
    temporary folder, removed after the block; yield it, how its paths are shown (as the URLs they came from), and
    the series not retrieved with the reason.

    Raises:
        UsageError: the server cannot be reached or refuses the query or the credentials (nothing is retrieved).
        FileNotFoundError: a study or series URL that names nothing on the server.
    """
    try:
        series, skipped = find_series(client, source)
    except DicomwebError as err:
        raise UsageError(str(err)) from err
    series = sorted(series, key=lambda s: (s.study, s.series))[part_id::num_parts]
    folder = Path(tempfile.mkdtemp(prefix="ic_moe_dicomweb_"))
    try:
        shown = PathsShown(folder, series)
        logger.info("retrieving %d series from %s", len(series), client.root)
        progress = progress_bar(quiet, total=len(series), desc="retrieving", unit="series")
        for item in series:
            try:
                retrieve_series(client, item, folder, max_bytes)
            except (DicomwebError, ImageError, OSError, ValueError) as err:
                shutil.rmtree(folder / item.series, ignore_errors=True)  # a part of a series is no series
                reason = str(err).removeprefix(f"{item.url}: ")
                skipped.append(Skipped(item.url, f"cannot retrieve the series: {reason}"))
            progress.update(1)
        progress.close()
        yield folder, shown, skipped
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class PathsShown:
    """Paths of retrieved series (``<folder>/<series uid>/<instance uid>.dcm``) shown as the URLs they came from,
    in the report and the run's log lines, and the DICOMweb credentials blanked out (a server may echo them)."""

    def __init__(self, folder: Path | None = None, series: Sequence[Any] = ()) -> None:
        self.urls = {s.series: s.url for s in series}
        uid = r"[0-9]+(?:\.[0-9]+)*"
        self.pattern = (
            re.compile(re.escape(str(folder)) + rf"/(?P<series>{uid})(?:/(?P<sop>{uid})\.dcm)?") if folder else None
        )

    def __call__(self, text: str) -> str:
        if self.pattern is None or not isinstance(text, str):
            return text
        return redact(self.pattern.sub(self._url, text))

    def _url(self, match: re.Match) -> str:
        url = self.urls.get(match["series"])
        if url is None:
            return match[0]
        return f"{url}/instances/{match['sop']}" if match["sop"] else url

    def in_report(self, report: SegmentReport) -> None:
        """Rewrite the report's paths of retrieved files and folders as URLs."""
        if self.pattern is None:
            return
        for case in report.cases:
            case.source = self(case.source)
            case.error = self(case.error) if case.error else case.error
            case.notes = [self(n) for n in case.notes]
        for item in report.not_segmented:
            item["path"], item["reason"] = self(item["path"]), self(item["reason"])
        report.errors = [self(e) for e in report.errors]

    @contextmanager
    def in_logs(self, log: logging.Logger) -> Iterator[None]:
        """Rewrite ``log``'s lines for the block."""
        if self.pattern is None:
            yield
            return
        shown = self

        class _Rewrite(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                record.msg, record.args = shown(record.getMessage()), ()
                return True

        rewrite = _Rewrite()
        log.addFilter(rewrite)
        try:
            yield
        finally:
            log.removeFilter(rewrite)
