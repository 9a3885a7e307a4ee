"""The quality score: signals from the network's outputs, their calibration against true Dice, and the flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ic_moe_monai.inference.inferers import SliceContextInferer
from ic_moe_monai.inference.quality import (
    QualityCalibration,
    cross_validated_report,
    geometry_signals,
    label_dice,
    spearman,
)

NAMES = {1: "anterior", 2: "posterior"}


def blob_volume(rng: np.random.Generator, shape=(40, 48, 36), noise: float = 0.02) -> tuple[torch.Tensor, np.ndarray]:
    """An image in [0, 1] with two touching boxes (labels 1 and 2, label 2 further along y) and its label map."""
    label = np.zeros(shape, dtype=np.int64)
    x0, y0, z0 = (int(rng.integers(8, 12)) for _ in range(3))
    label[x0 : x0 + 14, y0 : y0 + 10, z0 : z0 + 14] = 1
    label[x0 : x0 + 14, y0 + 10 : y0 + 22, z0 : z0 + 14] = 2
    image = 0.2 + 0.3 * label + rng.normal(0, noise, shape)
    return torch.as_tensor(image.clip(0, 1), dtype=torch.float32), label


class OracleNet(torch.nn.Module):
    """A 2.5D "network" whose logits are sharp where the middle channel is clearly one class, soft elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, 1:2]
        fg = (centre - 0.35) * 20  # foreground evidence
        second = (centre - 0.65) * 40  # evidence for label 2 over label 1
        return torch.cat([-fg, fg - second.clamp(min=0), second], dim=1)


def signals_of(image: torch.Tensor, img_size: int = 32) -> dict:
    inferer = SliceContextInferer(img_size=img_size, batch_size=8, quality=True, argmax=True)
    inferer(image[None, None], OracleNet())
    assert len(inferer.last_signals) == 1
    return inferer.last_signals[0]


def test_signals_are_collected_per_volume_and_scaled_to_native_voxels():
    rng = np.random.default_rng(0)
    image, label = blob_volume(rng)
    s = signals_of(image)
    assert set(s) >= {"self_dice", "margin", "voxels", "centroid_voxel", "histogram", "roughness"}
    # the oracle predicts the boxes: voxel counts in native voxels, despite the 32 px network grid
    for k in (1, 2):
        assert s["voxels"][k - 1] == pytest.approx((label == k).sum(), rel=0.15)
        assert 0.8 < s["self_dice"][k - 1] <= 1.0
    assert sum(s["histogram"]) == pytest.approx(1.0)
    # label 2 lies further along y (axis 1) than label 1
    assert s["centroid_voxel"][1][1] > s["centroid_voxel"][0][1]
    geometry = geometry_signals(s, np.diag([2.0, 1.0, 1.5, 1.0]), image.shape, slice_axis=2)
    assert geometry["extent_mm"] == pytest.approx([80.0, 48.0, 54.0])
    assert geometry["volume_ml"][0] == pytest.approx(s["voxels"][0] * 3.0 / 1000)


def test_noise_raises_roughness_and_blur_lowers_it():
    rng = np.random.default_rng(1)
    image, _ = blob_volume(rng)
    noisy, _ = blob_volume(np.random.default_rng(1), noise=0.3)
    blurred = torch.nn.functional.avg_pool3d(image[None, None], 7, stride=1, padding=3, count_include_pad=False)[0, 0]
    base = signals_of(image)["roughness"]
    assert signals_of(noisy)["roughness"] > 2 * base
    assert signals_of(blurred)["roughness"] < 0.7 * base


def calibration_cases(n: int = 24):
    rng = np.random.default_rng(2)
    signals, dice = [], []
    for _ in range(n):
        image, _ = blob_volume(rng)
        s = geometry_signals(signals_of(image), np.eye(4), image.shape)
        signals.append(s)
        # a true Dice that follows the self-Dice, with scatter
        dice.append({name: float(np.clip(s["self_dice"][k] - 0.05 + rng.normal(0, 0.01), 0, 1))
                     for k, name in enumerate(NAMES.values())})  # fmt: skip
    return signals, dice


def test_calibration_ranks_and_estimates_and_flags_the_unusual(tmp_path):
    signals, dice = calibration_cases()
    calibration, _, summary = cross_validated_report(NAMES, [f"c{i}" for i in range(len(signals))], signals, dice)
    assert summary["mae"] < 0.03
    assert summary["flagged"] <= 0.1
    assert calibration.fit["cases"] == len(signals)
    path = tmp_path / "quality.json"
    calibration.save(path)
    loaded = QualityCalibration.load(path)
    typical = loaded.assess(signals[0])
    assert not typical.flagged and set(typical.labels) == set(NAMES.values())
    assert abs(typical.score - np.mean(list(dice[0].values()))) < 0.05

    rng = np.random.default_rng(3)
    image, _ = blob_volume(rng)
    noise = torch.rand(image.shape)
    cases = {
        "noise": geometry_signals(signals_of(noise), np.eye(4), image.shape),
        "big field of view": geometry_signals(signals_of(image), np.diag([4.0, 4.0, 4.0, 1.0]), image.shape),
        "turned": geometry_signals(signals_of(image.flip(1)), np.eye(4), image.shape),
    }
    for what, s in cases.items():
        quality = loaded.assess(s)
        assert quality.flagged and quality.reasons, what
    assert any("direction" in r for r in loaded.assess(cases["turned"]).reasons)
    assert any("field of view" in r for r in loaded.assess(cases["big field of view"]).reasons)
    assert loaded.assess(signals[0], qc_threshold=1.01).flagged  # the threshold is the user's to set


def test_a_broken_calibration_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "quality.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"quality\.json: not a usable quality calibration"):
        QualityCalibration.load(path)
    path.write_text('{"version": 99}')
    with pytest.raises(ValueError, match="version 99"):
        QualityCalibration.load(path)


def test_spearman_and_label_dice():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    pred = np.array([0, 1, 1, 2, 0])
    truth = np.array([0, 1, 2, 2, 0])
    assert label_dice(pred, truth, NAMES) == {"anterior": pytest.approx(2 / 3), "posterior": pytest.approx(2 / 3)}
    assert label_dice(np.zeros(3), np.zeros(3), {1: "a"}) == {"a": 1.0}


def test_segment_reports_each_case_quality_and_lists_the_flagged_first(tmp_path, caplog):
    """``segment`` with a calibrated bundle: ``quality`` per case in report.json, ``quality.csv`` flagged cases
    first, the last console line counts them; ``--qc_threshold`` overrides the calibration's."""
    import json

    import nibabel as nib

    from ic_moe_monai.segment import segment

    from .helpers import BUNDLE, threshold_bundle_config

    config = json.loads(threshold_bundle_config(tmp_path / "threshold", img_size=16).read_text())
    calibration = QualityCalibration(label_names=NAMES, ranges={"extent_mm": [[8.0, 40.0]] * 3}, qc_threshold=0.0)
    calibration.save(tmp_path / "quality.json")
    config["quality_calibration"] = str(tmp_path / "quality.json")
    (tmp_path / "config.json").write_text(json.dumps(config))
    studies = tmp_path / "studies"
    studies.mkdir()
    rng = np.random.default_rng(0)
    for name, spacing in (("typical", 1.0), ("huge", 10.0)):
        data = (rng.random((16, 16, 16)) * 400).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0])), studies / f"{name}.nii.gz")

    with caplog.at_level("INFO", logger="ic_moe_monai.segment"):
        report = segment(str(studies), str(tmp_path / "out"), bundle=str(BUNDLE), config=str(tmp_path / "config.json"),
                         preview=True)  # fmt: skip
    quality = {c.name: c.quality for c in report.cases}
    assert set(quality["typical"]) == {"score", "labels", "flagged", "reasons"}
    assert set(quality["typical"]["labels"]) == set(NAMES.values())
    assert not quality["typical"]["flagged"]
    assert quality["huge"]["flagged"] and "field of view" in quality["huge"]["reasons"][0]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {c["name"]: c["quality"]["flagged"] for c in saved["cases"]} == {"typical": False, "huge": True}
    rows = (tmp_path / "out" / "quality.csv").read_text().splitlines()
    assert rows[0].startswith("case,score,anterior_score,posterior_score,flagged")
    assert rows[1].startswith("huge,") and rows[2].startswith("typical,")
    assert caplog.records[-1].getMessage() == "1 of 2 case(s) flagged for review (quality.csv)"
    assert (tmp_path / "out" / "huge_preview.png").stat().st_size > 0  # its caption says to review it

    strict = segment(str(studies), str(tmp_path / "strict"), bundle=str(BUNDLE), config=str(tmp_path / "config.json"),
                     qc_threshold=1.0, quiet=True)  # fmt: skip
    assert all(c.quality["flagged"] for c in strict.cases)
    assert any("below the review threshold 1.00" in r for r in strict.cases[0].quality["reasons"])

    # a calibration fitted for other weights (the bundle was trained again since) is not used
    calibration.checkpoint_sha256 = "0" * 64
    calibration.save(tmp_path / "quality.json")
    stale = segment(str(studies), str(tmp_path / "stale"), bundle=str(BUNDLE), config=str(tmp_path / "config.json"),
                    quiet=True)  # fmt: skip
    assert all(c.quality is None for c in stale.cases) and not (tmp_path / "stale" / "quality.csv").exists()
