"""What a run reports: one :class:`CaseResult` per case in a :class:`SegmentReport`, and the run's files
(``report.json``, ``statistics.csv``, ``quality.csv``) written at the end.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ic_moe_monai.io.atomic import atomic_output
from ic_moe_monai.io.writers import statistics_csv
from ic_moe_monai.segment.errors import first_line, os_reason

logger = logging.getLogger(__package__)


SKIPPED_EXISTS = "skipped (exists)"


SKIPPED_BUSY = "skipped (another run is writing it)"


SKIPPED_NOTHING = "skipped (nothing to write)"  # e.g. only a DICOM SEG asked for, of a NIfTI input


RUN_FILES = (("report", ".json"), ("statistics", ".csv"), ("quality", ".csv"))


@dataclass
class CaseResult:
    """What happened to one case."""

    name: str
    source: str
    status: str  # "done", "failed", SKIPPED_EXISTS, SKIPPED_BUSY or SKIPPED_NOTHING
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # load, inference, write
    slices: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    quality: dict[str, Any] | None = None  # CaseQuality.as_dict(): score, labels, flagged, reasons


@dataclass
class SegmentReport:
    """The run report written to ``report.json``."""

    input: str
    output: str
    settings: dict[str, Any]
    versions: dict[str, str]
    device: str = ""
    run_id: str = ""
    cases: list[CaseResult] = field(default_factory=list)
    not_segmented: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # of the run itself, e.g. a run file that could not be written
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every case succeeded; 1 when a case failed, an input was rejected (bad file, unusable series) or
        a run file could not be written. Cases skipped because they exist or another run writes them are no
        failures."""
        failed = any(c.status == "failed" for c in self.cases) or any(s["failure"] for s in self.not_segmented)
        return 1 if failed or self.errors else 0


# ---------------------------------------------------------------------------------------------- run files
def write_run_files(report: SegmentReport, run_files: list[Path], statistics: bool, seconds: float) -> None:
    """The report (``report.json``, ``report_part<K>.json`` for one of several parts, with the run id when another
    run holds that name) and, with statistics, ``statistics.csv`` likewise. What cannot be written is a run error:
    said on stderr, and exit code 1."""
    report_path, statistics_path, quality_path = run_files
    report.seconds = round(seconds, 3)
    scored = [c for c in report.cases if c.quality is not None and c.status != "failed"]
    if scored:
        try:
            with atomic_output(quality_path) as tmp:
                tmp.write_text(_quality_csv(scored))
        except OSError as err:
            _run_error(report, f"cannot write {quality_path}: {os_reason(err)}")
    if statistics:
        try:
            with atomic_output(statistics_path) as tmp:
                tmp.write_text(statistics_csv(_statistics_rows(report)))
        except OSError as err:
            _run_error(report, f"cannot write {statistics_path}: {os_reason(err)}")
    try:
        with atomic_output(report_path) as tmp:
            tmp.write_text(json.dumps(asdict(report) | {"exit_code": report.exit_code}, indent=2) + "\n")
    except OSError as err:
        _run_error(report, f"cannot write the report {report_path}: {os_reason(err)}")


def quality_caption(quality: dict[str, Any] | None) -> str:
    """The preview's line about the case's quality score ("" without one)."""
    if quality is None:
        return ""
    return f"quality {quality['score']:.2f}" + (" - review: " + quality["reasons"][0] if quality["flagged"] else "")


def _quality_csv(cases: list[CaseResult]) -> str:
    """One row per scored case, flagged ones first, then by score (worst first)."""
    names = list(cases[0].quality["labels"])
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["case", "score", *(f"{n}_score" for n in names), "flagged", "reasons"])
    for case in sorted(cases, key=lambda c: (not c.quality["flagged"], c.quality["score"], c.name)):
        q = case.quality
        writer.writerow([case.name, q["score"], *(q["labels"].get(n, "") for n in names), q["flagged"],
                         "; ".join(q["reasons"])])  # fmt: skip
    return out.getvalue()


def _statistics_rows(report: SegmentReport) -> list[tuple[str, dict]]:
    rows = []
    for case in report.cases:
        path = case.outputs.get("statistics_json")
        if case.status == "failed" or not path or case.status == SKIPPED_BUSY:
            continue
        try:
            rows.append((case.name, json.loads(Path(path).read_text())))
        except (OSError, ValueError) as err:  # e.g. removed or damaged since an earlier run wrote it
            case.notes.append(f"not in statistics.csv: {Path(path).name} cannot be read ({first_line(err)})")
    return rows


def _run_error(report: SegmentReport, message: str) -> None:
    report.errors.append(message)
    logger.error("%s", message)
