"""Writers: temporary files of concurrent runs, DICOM SEG of series with jittered orientations, coded segments."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from ic_moe_monai.io import discover_cases, read_dicom_series
from ic_moe_monai.io.atomic import PARTIAL_MARK, atomic_output, exclusive_lock, remove_partial_outputs, run_id
from ic_moe_monai.io.dicom_seg import read_segment_codes, write_dicom_seg

from .helpers import BUNDLE, write_dicom_series

REPO = Path(__file__).resolve().parents[1]

# The writers module alone (importing the package would load torch and MONAI: seconds per process).
LOAD_WRITERS = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('writers', {str(REPO / 'ic_moe_monai' / 'io' / 'writers.py')!r})\n"
    "writers = sys.modules['writers'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(writers)\n"
)
WRITER = LOAD_WRITERS + textwrap.dedent(
    """
    import time
    from pathlib import Path
    atomic_output = writers.atomic_output
    out, name = Path(sys.argv[1]), sys.argv[2]
    with atomic_output(out / name) as tmp:
        tmp.write_text(name)
        (out / f"{name}.ready").touch()
        while not (out / "go").exists():
            time.sleep(0.02)
    """
)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_concurrent_runs_keep_each_others_temporary_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), name]) for name in ("a.nii.gz", "b.json")]
    host = run_id().split("~")[0]
    stale = out / f".c.nii.gz{PARTIAL_MARK}~{host}~{_dead_pid()}~0badc0de.nii.gz"  # a killed run's leftover
    legacy = out / f".d.nii.gz{PARTIAL_MARK}.nii.gz"  # left by a version without run ids
    elsewhere = out / f".e.nii.gz{PARTIAL_MARK}~another-host~1~12345678.nii.gz"  # a run on another machine
    for leftover in (stale, legacy, elsewhere):
        leftover.write_text("partial")
    deadline = time.monotonic() + 60
    while not all((out / f"{n}.ready").exists() for n in ("a.nii.gz", "b.json")):
        assert time.monotonic() < deadline, "the writers did not start"
        time.sleep(0.02)
    live = sorted(p.name for p in out.glob(f".*{PARTIAL_MARK}~{host}~*") if p != stale)
    assert len(live) == 2  # each writer's temporary file, named with its own run id

    removed = remove_partial_outputs(out)  # what a third run does at start-up

    assert sorted(removed) == sorted([stale, legacy])
    assert sorted(p.name for p in out.glob(f".*{PARTIAL_MARK}~{host}~*")) == live and elsewhere.exists()
    (out / "go").touch()
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    assert (out / "a.nii.gz").read_text() == "a.nii.gz" and (out / "b.json").read_text() == "b.json"
    assert sorted(p.name for p in out.glob(f".*{PARTIAL_MARK}*")) == [elsewhere.name]


def test_atomic_output_names_carry_the_run_and_clean_up_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "x.nii.gz") as tmp:
        assert tmp.name == f".x.nii.gz{PARTIAL_MARK}~{run_id()}.nii.gz"
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_exclusive_lock_is_held_once(tmp_path):
    code = LOAD_WRITERS + "with writers.exclusive_lock(sys.argv[1]) as held: print(held)"
    with exclusive_lock(tmp_path / "case.lock") as held:
        assert held
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "case.lock")], capture_output=True,
                               text=True, check=True)  # fmt: skip
        assert other.stdout.strip() == "False"
    with exclusive_lock(tmp_path / "case.lock") as held:
        assert held  # released with the block


def _jitter_orientation(files, delta=1e-7):
    """Orientation strings that differ in the 7th decimal between files, as some scanners write them."""
    for k, f in enumerate(sorted(files)):
        ds = pydicom.dcmread(f)
        iop = [float(v) for v in ds.ImageOrientationPatient]
        ds.ImageOrientationPatient = [f"{v + (delta if k % 2 else -delta) * (i % 2 == 0):.8f}" for i, v in
                                      enumerate(iop)]  # fmt: skip
        ds.save_as(f)


@pytest.fixture(scope="module")
def segment_codes():
    return read_segment_codes(json.loads((BUNDLE / "configs" / "metadata.json").read_text()))


def test_seg_of_a_series_with_jittered_orientation_and_coded_segments(tmp_path, segment_codes):
    oblique = np.array([[0.9396926, 0.3420201, 0.0], [-0.3303661, 0.9076734, 0.2588190]])
    pixels = np.random.default_rng(4).integers(0, 1000, (6, 10, 12)).astype(np.int16)
    write_dicom_series(tmp_path / "series", pixels, tuple(oblique[0]), tuple(oblique[1]))
    _jitter_orientation(list((tmp_path / "series").glob("*.dcm")))
    (case,), skipped = discover_cases(tmp_path / "series")
    assert skipped == []  # within the geometry check's tolerance: one volume
    image = read_dicom_series(case.files)
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[2:6, 3:7, 1:4], labels[6:9, 2:5, 3:5] = 1, 2
    affine = image.affine.numpy()
    write_dicom_seg(labels, affine, case.files, {0: "background", 1: "anterior", 2: "posterior"},
                    tmp_path / "seg.dcm", "0.1.0", segment_codes)  # fmt: skip
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    expected = {1: ("anterior", "255549009", "Anterior"), 2: ("posterior", "255551008", "Posterior")}
    for number, (label, modifier_code, modifier) in expected.items():
        description = seg.get_segment_description(number)
        assert description.segment_label == label
        category, kind = description.segmented_property_category, description.segmented_property_type
        assert (category.value, category.scheme_designator, category.meaning) == ("91723000", "SCT",
                                                                                 "Anatomical Structure")  # fmt: skip
        assert (kind.value, kind.scheme_designator, kind.meaning) == ("5366008", "SCT", "Hippocampus")
        (mod,) = description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
        assert (mod.CodeValue, mod.CodingSchemeDesignator, mod.CodeMeaning) == (modifier_code, "SCT", modifier)
    sources = {pydicom.dcmread(f).SOPInstanceUID: k for k, f in enumerate(case.files)}
    frames = seg.get_pixels_by_source_instance(list(sources), combine_segments=True)
    for uid, k in sources.items():
        np.testing.assert_array_equal(frames[list(sources).index(uid)], labels[:, :, k].T)
    on_disk = {tuple(pydicom.dcmread(f, stop_before_pixels=True).ImageOrientationPatient) for f in case.files}
    assert len(on_disk) == 2  # the source files keep their own (jittered) orientations


def test_labels_without_a_code_get_the_generic_one(tmp_path):
    files = write_dicom_series(tmp_path / "s", np.zeros((3, 8, 8), dtype=np.int16))
    (case,), _ = discover_cases(tmp_path / "s")
    image = read_dicom_series(case.files)
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[1:3, 1:3, 1] = 1
    write_dicom_seg(labels, image.affine.numpy(), files, {1: "lesion"}, tmp_path / "seg.dcm")
    description = hd.seg.segread(tmp_path / "seg.dcm").get_segment_description(1)
    assert description.segmented_property_type.value == "91723000"
    assert description.segmented_property_category.meaning == "Anatomical Structure"


def test_segment_codes_in_metadata_are_checked():
    assert read_segment_codes({}) == {}
    with pytest.raises(ValueError, match=r"segment_codes\['1'\]: a label value with 'category' and 'type'"):
        read_segment_codes({"segment_codes": {"1": {"type": {"code": "1", "scheme": "SCT", "meaning": "x"}}}})
    with pytest.raises(ValueError, match=r"segment_codes\['1'\].type: a code needs 'code', 'scheme' and 'meaning'"):
        read_segment_codes({"segment_codes": {"1": {"category": {"code": "1", "scheme": "SCT", "meaning": "x"},
                                                     "type": {"code": "2"}}}})  # fmt: skip


def test_preview_marks_where_the_network_is_unsure(tmp_path):
    """A checkerboard of the unsure colour where the uncertainty reaches the threshold, and a legend entry."""
    from PIL import Image

    from ic_moe_monai.io import writers

    image = np.zeros((20, 20, 20), np.float32)
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[5:15, 5:15, 5:15] = 1
    unsure = np.zeros((20, 20, 20), np.uint8)
    unsure[:10] = 255  # the patient's left half (RAS x < 10): drawn on the right of the axial view
    writers.write_preview(image, labels, np.eye(4), tmp_path / "sure.png", {0: "background", 1: "organ"}, height=100)
    writers.write_preview(image, labels, np.eye(4), tmp_path / "unsure.png", {0: "background", 1: "organ"},
                          height=100, uncertainty=unsure)  # fmt: skip
    sure = np.asarray(Image.open(tmp_path / "sure.png").convert("RGB")).astype(int)
    marked = np.asarray(Image.open(tmp_path / "unsure.png").convert("RGB")).astype(int)
    white = (marked[:100].min(axis=-1) > 200) & (sure[:100].min(axis=-1) < 200)
    axial = white[:, :100]
    assert axial[:, 50:].mean() > 0.3 and axial[:, :50].sum() == 0
    assert (marked[100:] != sure[100:]).any()  # the legend names it
