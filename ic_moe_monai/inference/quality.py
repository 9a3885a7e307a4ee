"""How far to trust a segmentation: a per-case, per-label estimate of the Dice a reviewer would give it, and flags
for inputs unlike the ones the model was calibrated on.

The signals come from the network's own outputs, collected while the volume is segmented (one softmax per batch
of slices at the network's resolution, a few per-cent of the network's time):

- **self-Dice** per label: the Dice between the predicted mask and the model's own probabilities,
  ``2 Σ p·[pred] / (Σ p + Σ [pred])``. A confident, sharp answer gives ~1; a blurred, hesitant one much less.
- **margin** per label: the mean gap between the winning and the runner-up probability inside the predicted mask,
  and the **band**, the share of voxels whose probability lies between 0.2 and 0.8 (both recorded; the fit uses the
  self-Dice alone, which ranked held-out cases best).
- **image statistics** of the network's input (after the bundle's intensity preset): a 16-bin histogram and the
  *roughness*, mean absolute difference of neighbouring pixels over the intensity spread (noise raises it, blur
  lowers it).
- **geometry**: the field of view per RAS axis in mm, each label's volume in ml, and for two or more labels the
  direction from one label's centroid to another's (a volume in the wrong orientation turns it).

:class:`QualityCalibration` maps the signals to an estimated Dice by a least-squares fit on cases with known Dice
(``run evaluating`` refits it and writes it into the bundle), and holds the calibration cases' ranges of the image
and geometry signals: a case outside them is flagged with the reason, whatever its score.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ic_moe_monai.inference.quality_signals import QualitySignals, geometry_signals

__all__ = [
    "CaseQuality",
    "QualityCalibration",
    "QualitySignals",
    "cross_validated_report",
    "file_sha256",
    "geometry_signals",
    "label_dice",
    "spearman",
    "write_quality_report",
]

MIN_FIT_CASES = 8  # below this many calibration cases, the score is the self-Dice itself (no fit)
CALIBRATION_VERSION = 1






@dataclass
class CaseQuality:
    """One case's quality: ``score`` (estimated mean Dice over the labels), per-label estimates, whether a person
    should review it, and why."""

    score: float
    labels: dict[str, float]
    flagged: bool
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"score": self.score, "labels": self.labels, "flagged": self.flagged, "reasons": self.reasons}


def _features(signals: Mapping[str, Any], k: int | None = None) -> list[float]:
    """``[1, self-Dice]`` of label ``k``, or of the mean over the labels (``None``). One signal only: on the
    hippocampus fold, adding the margin, the uncertain band or the volume made the leave-one-out ranking worse."""
    values = signals["self_dice"]
    return [1.0, float(np.mean(values)) if k is None else float(values[k])]


def _fit_line(x: np.ndarray, y: np.ndarray) -> list[float]:
    ridge = 1e-3 * np.eye(x.shape[1])
    ridge[0, 0] = 0.0  # the bias is not shrunk
    return np.linalg.solve(x.T @ x + ridge, x.T @ y).round(6).tolist()


def _log_range(values: Sequence[float], min_ratio: float) -> list[float]:
    """[low, high] around the values, widened on each side by half their spread in log space, at least
    ``min_ratio``: calibration cases are few, and a real case slightly beyond them must pass."""
    logs = np.log(np.maximum(np.asarray(values, dtype=np.float64), 1e-9))
    lo, hi = float(logs.min()), float(logs.max())
    pad = max(0.5 * (hi - lo), math.log(min_ratio))
    return [math.exp(lo - pad), math.exp(hi + pad)]


def _histogram_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Total-variation distance of two histograms (0 alike … 1 disjoint)."""
    return 0.5 * float(np.abs(np.asarray(a) - np.asarray(b)).sum())


def _unit(v: np.ndarray) -> np.ndarray | None:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-6 else None


def _directions(signals: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unit vectors between the centroids of every pair of predicted labels, keyed ``"i-j"`` (label indices)."""
    centroids = signals.get("centroid_mm") or []
    out = {}
    for i in range(len(centroids)):
        for j in range(i + 1, len(centroids)):
            if centroids[i] is not None and centroids[j] is not None:
                u = _unit(np.asarray(centroids[j]) - np.asarray(centroids[i]))
                if u is not None:
                    out[f"{i}-{j}"] = u
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan for fewer than 3 values or a constant one."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


@dataclass
class QualityCalibration:
    """From a case's signals to an estimated Dice per label, and the ranges of a typical case.

    Args:
        label_names: ``{label index: name}`` of the foreground labels, in order.
        coefficients: per label name, the linear map ``[bias, self-Dice] → Dice``; a label without one is
            estimated by its self-Dice.
        case_coefficients: the linear map ``[bias, mean self-Dice] → mean Dice`` of the case score (one map of
            one number, so the score ranks cases exactly as their mean self-Dice does); without it the score is the
            mean of the label estimates.
        ranges: the calibration cases' ranges: ``extent_mm`` (per axis ``[low, high]``), ``volume_ml`` (per label
            name), ``roughness``, ``histogram`` (the mean histogram) and ``histogram_distance`` (the largest
            distance that passes), ``directions`` (per label pair the mean unit vector and the lowest cosine
            that passes).
        qc_threshold: a case whose score is below it is flagged.
        fit: how the fit did on its own cases (``cases``, ``spearman``, ``mae``).
        checkpoint_sha256: SHA-256 of the weights file it was fitted for: a bundle trained again after its
            calibration does not use it (the signals of other weights mean other things).
    """

    label_names: dict[int, str]
    coefficients: dict[str, list[float]] = field(default_factory=dict)
    case_coefficients: list[float] = field(default_factory=list)
    ranges: dict[str, Any] = field(default_factory=dict)
    qc_threshold: float = 0.5
    fit: dict[str, Any] = field(default_factory=dict)
    checkpoint_sha256: str = ""

    # ------------------------------------------------------------------------------------------------ estimate
    def case_score(self, signals: Mapping[str, Any], labels: Mapping[str, float] | None = None) -> float:
        if self.case_coefficients:
            value = float(np.dot(self.case_coefficients, _features(signals)))
        else:
            value = float(np.mean(list((labels or self.label_scores(signals)).values())))
        return round(min(max(value, 0.0), 1.0), 4)

    def label_scores(self, signals: Mapping[str, Any]) -> dict[str, float]:
        scores = {}
        for k, (_, name) in enumerate(sorted(self.label_names.items())):
            coef = self.coefficients.get(name)
            value = float(np.dot(coef, _features(signals, k))) if coef else float(signals["self_dice"][k])
            scores[name] = round(min(max(value, 0.0), 1.0), 4)
        return scores

    def assess(self, signals: Mapping[str, Any], qc_threshold: float | None = None) -> CaseQuality:
        """The case's :class:`CaseQuality` from its signals (with :func:`geometry_signals`' geometry)."""
        labels = self.label_scores(signals)
        score = self.case_score(signals, labels)
        threshold = self.qc_threshold if qc_threshold is None else float(qc_threshold)
        reasons = self.out_of_range(signals)
        if score < threshold:
            reasons.insert(0, f"estimated Dice {score:.2f} is below the review threshold {threshold:.2f}")
        return CaseQuality(score=score, labels=labels, flagged=bool(reasons), reasons=reasons)

    def out_of_range(self, signals: Mapping[str, Any]) -> list[str]:
        """Why the case is unlike the calibration cases (empty when it is not)."""
        r, reasons = self.ranges, []
        if "histogram" in r:
            distance = _histogram_distance(signals["histogram"], r["histogram"])
            if distance > r["histogram_distance"]:
                reasons.append(
                    f"intensities unlike the training images (histogram distance {distance:.2f}, typical at most "
                    f"{r['histogram_distance']:.2f}): another modality, contrast or body region?"
                )
        if "roughness" in r:
            lo, hi = r["roughness"]
            value = float(signals["roughness"])
            if not lo <= value <= hi:
                kind = "noisier" if value > hi else "smoother (blurred?)"
                reasons.append(f"image {kind} than the training images (roughness {value:.3g}, typical "
                               f"{lo:.3g} to {hi:.3g})")  # fmt: skip
        if "extent_mm" in r and "extent_mm" in signals:
            extent = [float(e) for e in signals["extent_mm"]]
            if any(not lo <= e <= hi for e, (lo, hi) in zip(extent, r["extent_mm"], strict=True)):
                shown = " × ".join(f"{e:.0f}" for e in extent)
                typical = " × ".join(f"{lo:.0f}-{hi:.0f}" for lo, hi in r["extent_mm"])
                reasons.append(f"field of view {shown} mm (RAS) unlike the training images ({typical} mm): another "
                               "body region, or a volume in the wrong orientation?")  # fmt: skip
        for k, (_, name) in enumerate(sorted(self.label_names.items())):
            if name not in r.get("volume_ml", {}) or "volume_ml" not in signals:
                continue
            lo, hi = r["volume_ml"][name]
            value = float(signals["volume_ml"][k])
            if value <= 0 < lo:
                reasons.append(f"no {name} found")
            elif not lo <= value <= hi:
                reasons.append(f"{name} volume {value:.3g} ml, typical {lo:.3g} to {hi:.3g} ml")
        directions = _directions(signals)
        for pair, reference in r.get("directions", {}).items():
            if pair in directions:
                cosine = float(np.dot(directions[pair], reference["mean"]))
                if cosine < reference["min_cosine"]:
                    i, j = (int(v) for v in pair.split("-"))
                    names = [n for _, n in sorted(self.label_names.items())]
                    reasons.append(f"{names[j]} lies in an unusual direction from {names[i]} (cosine {cosine:.2f} "
                                   "with the training cases'): a volume in the wrong orientation?")  # fmt: skip
        return reasons

    # ------------------------------------------------------------------------------------------------ fit
    @classmethod
    def fit_cases(
        cls, label_names: Mapping[int, str], signals: Sequence[Mapping[str, Any]], dice: Sequence[Mapping[str, float]]
    ) -> QualityCalibration:
        """Fit on cases with known Dice.

        Args:
            label_names: ``{label index: name}`` of the foreground labels.
            signals: each case's signals (with geometry).
            dice: each case's true Dice per label name.
        """
        if len(signals) != len(dice) or not signals:
            raise ValueError(f"need signals and Dice for the same cases, got {len(signals)} and {len(dice)}.")
        names = [n for _, n in sorted(label_names.items())]
        calibration = cls(label_names={int(k): v for k, v in label_names.items()})
        if len(signals) >= MIN_FIT_CASES:
            for k, name in enumerate(names):
                x = np.asarray([_features(s, k) for s in signals])
                calibration.coefficients[name] = _fit_line(x, np.asarray([d[name] for d in dice], dtype=np.float64))
        truth = [float(np.mean([d[n] for n in names])) for d in dice]
        if len(signals) >= MIN_FIT_CASES:
            x = np.asarray([_features(s) for s in signals])
            calibration.case_coefficients = _fit_line(x, np.asarray(truth))
        calibration.ranges = _ranges(names, signals)
        scores = [calibration.case_score(s) for s in signals]
        # about one real case in twenty scores below the threshold (the lowest-scored calibration cases)
        calibration.qc_threshold = round(math.floor(float(np.quantile(scores, 0.05)) * 100) / 100, 2)
        calibration.fit = {
            "cases": len(signals),
            "spearman": round(spearman(scores, truth), 4),
            "mae": round(float(np.mean(np.abs(np.asarray(scores) - np.asarray(truth)))), 4),
        }
        return calibration

    # ------------------------------------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CALIBRATION_VERSION,
            "label_names": {str(k): v for k, v in sorted(self.label_names.items())},
            "coefficients": self.coefficients,
            "case_coefficients": self.case_coefficients,
            "ranges": self.ranges,
            "qc_threshold": self.qc_threshold,
            "fit": self.fit,
            "checkpoint_sha256": self.checkpoint_sha256,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QualityCalibration:
        if data.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"quality calibration version {data.get('version')!r}, expected {CALIBRATION_VERSION}.")
        return cls(
            label_names={int(k): str(v) for k, v in data["label_names"].items()},
            coefficients={str(k): [float(c) for c in v] for k, v in data.get("coefficients", {}).items()},
            case_coefficients=[float(c) for c in data.get("case_coefficients", [])],
            ranges=dict(data.get("ranges", {})),
            qc_threshold=float(data.get("qc_threshold", 0.5)),
            fit=dict(data.get("fit", {})),
            checkpoint_sha256=str(data.get("checkpoint_sha256", "")),
        )

    @classmethod
    def load(cls, path: str | Path) -> QualityCalibration:
        """Read a calibration file; a missing, unreadable or malformed one raises ``ValueError`` naming it."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: not a usable quality calibration ({err}).") from err


def _ranges(names: Sequence[str], signals: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The calibration cases' typical ranges of the image and geometry signals (see :class:`QualityCalibration`)."""
    histograms = np.asarray([s["histogram"] for s in signals])
    mean_histogram = histograms.mean(axis=0)
    distances = [_histogram_distance(h, mean_histogram) for h in histograms]
    ranges: dict[str, Any] = {
        "histogram": mean_histogram.round(6).tolist(),
        "histogram_distance": round(1.5 * max(distances) + 0.05, 4),
        "roughness": _log_range([s["roughness"] for s in signals], 1.3),
    }
    if all("extent_mm" in s for s in signals):
        extents = np.asarray([s["extent_mm"] for s in signals])
        ranges["extent_mm"] = [_log_range(extents[:, a], 1.25) for a in range(extents.shape[1])]
    if all("volume_ml" in s for s in signals):
        volumes = {}
        for k, name in enumerate(names):
            present = [s["volume_ml"][k] for s in signals if s["volume_ml"][k] > 0]
            if len(present) == len(signals):  # always there in calibration: absent or far off is flagged
                volumes[name] = _log_range(present, 1.5)
        ranges["volume_ml"] = volumes
    directions: dict[str, Any] = {}
    per_case = [_directions(s) for s in signals]
    for pair in sorted({p for d in per_case for p in d}):
        vectors = [d[pair] for d in per_case if pair in d]
        mean = _unit(np.mean(vectors, axis=0))
        if mean is None or len(vectors) < len(signals):
            continue
        lowest = min(float(np.dot(v, mean)) for v in vectors)
        directions[pair] = {"mean": mean.round(6).tolist(), "min_cosine": round(min(lowest - 0.3, 0.5), 4)}
    ranges["directions"] = directions
    return ranges


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def label_dice(pred: np.ndarray, label: np.ndarray, label_names: Mapping[int, str]) -> dict[str, float]:
    """Dice per foreground label name of two label maps (1.0 where both lack the label)."""
    out = {}
    for k, name in sorted(label_names.items()):
        p, g = pred == k, label == k
        total = int(p.sum()) + int(g.sum())
        out[name] = 1.0 if total == 0 else float(2.0 * np.logical_and(p, g).sum() / total)
    return out


def cross_validated_report(
    label_names: Mapping[int, str],
    case_names: Sequence[str],
    signals: Sequence[Mapping[str, Any]],
    dice: Sequence[Mapping[str, float]],
) -> tuple[QualityCalibration, list[dict[str, Any]], dict[str, Any]]:
    """Fit the calibration on all cases, and judge it honestly: each case's score comes from a fit on the *other*
    cases (leave-one-out), as a new case's would.

    Returns:
        the calibration fitted on all cases; one row per case (``case``, ``score``, ``dice``, per label
        ``<name>_score`` / ``<name>_dice``, ``flagged``, ``reasons``); the summary: ``cases``, ``spearman`` (the
        final calibration's score against true mean Dice: the score is one increasing map of the mean self-Dice,
        so its order of the cases uses no Dice at all), ``spearman_leave_one_out`` (of the held-out scores, which
        a refit for every case reorders a little), ``mae`` (held-out), ``worst_10pct_caught`` (the share of the
        truly worst 10 % of cases among the lowest-scored 10 %) and ``flagged`` (share of cases flagged,
        held-out).
    """
    names = [n for _, n in sorted(label_names.items())]
    calibration = QualityCalibration.fit_cases(label_names, signals, dice)
    rows = []
    for i, (case, s, d) in enumerate(zip(case_names, signals, dice, strict=True)):
        others = [j for j in range(len(signals)) if j != i]
        held_out = (
            QualityCalibration.fit_cases(label_names, [signals[j] for j in others], [dice[j] for j in others])
            if others
            else calibration
        )
        quality = held_out.assess(s)
        row = {"case": case, "score": quality.score, "dice": round(float(np.mean([d[n] for n in names])), 4)}
        for name in names:
            row[f"{name}_score"], row[f"{name}_dice"] = quality.labels[name], round(d[name], 4)
        rows.append(row | {"flagged": quality.flagged, "reasons": "; ".join(quality.reasons)})
    scores = np.asarray([r["score"] for r in rows])
    truth = np.asarray([r["dice"] for r in rows])
    final = np.asarray([calibration.case_score(s) for s in signals])
    tail = max(1, round(0.1 * len(rows)))
    caught = len(set(np.argsort(final, kind="stable")[:tail]) & set(np.argsort(truth, kind="stable")[:tail])) / tail
    summary = {
        "cases": len(rows),
        "spearman": round(spearman(final, truth), 4),
        "spearman_leave_one_out": round(spearman(scores, truth), 4),
        "mae": round(float(np.mean(np.abs(scores - truth))), 4),
        "worst_10pct_caught": round(caught, 4),
        "flagged": round(float(np.mean([r["flagged"] for r in rows])), 4),
        "qc_threshold": calibration.qc_threshold,
        "method": "mae and flagged leave-one-out: each case scored by a calibration fitted on the other cases",
    }
    return calibration, rows, summary


def write_quality_report(output_dir: str | Path, rows: Sequence[Mapping[str, Any]], summary: Mapping) -> None:
    """``quality_vs_dice.csv`` (worst score first) and ``quality_summary.json`` in ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows, key=lambda r: r["score"])
    with (output_dir / "quality_vs_dice.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ordered[0]) if ordered else ["case"])
        writer.writeheader()
        writer.writerows(ordered)
    text = json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()})
    (output_dir / "quality_summary.json").write_text(text + "\n")
