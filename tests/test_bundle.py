"""The MONAI bundle end to end: MONAI's own checks, training (single, resumed, 2-process gloo), MLflow tracking,
evaluation reports and inference geometry."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from ic_moe_monai.networks import ICMoE
from ic_moe_monai.networks.checkpoints import read_info

from .conftest import REPO_ROOT
from .helpers import BUNDLE, CONFIGS, expected_threshold_labels, make_msd_folder

TINY = ["--max_train_cases", "4", "--max_val_cases", "2", "--slices_per_volume", "2", "--volumes_per_batch", "2",
        "--steps_per_epoch", "3", "--num_workers", "0", "--cache_rate", "0"]  # fmt: skip


def bundle_cli(*args: str, torchrun: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle ...`` (or under torchrun) from the repository root, as a user would."""
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            f"--nproc_per_node={torchrun}",
        ]
        cmd += ["-m", "monai.bundle", *args]
    else:
        cmd = [sys.executable, "-m", "monai.bundle", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1" if torchrun else os.environ.get("OMP_NUM_THREADS", ""))
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def configs(*names: str) -> str:
    return "[" + ",".join(f"'{CONFIGS / n}'" for n in names) + "]"


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory, hippocampus_dir) -> Path:
    return make_msd_folder(hippocampus_dir, tmp_path_factory.mktemp("data") / "Task04_Hippocampus", 6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_task) -> Path:
    """One epoch of the bundle's own training command on real cases; returns the run folder."""
    run = tmp_path_factory.mktemp("run")
    bundle_cli(
        "run", "training", "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(tiny_task),
        "--ckpt_dir", str(run / "models"), "--output_dir", str(run / "eval"), "--max_epochs", "1", *TINY,
    )  # fmt: skip
    return run


# ------------------------------------------------------------------------------------------------ MONAI's checks
def test_verify_metadata(shared_data):
    schema = shared_data.parent / "monai_bundle_schemas" / "meta_schema_20240725.json"
    result = bundle_cli("verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"), "--filepath", str(schema))
    assert "metadata is verified with no error" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("files", "workflow_type"),
    [(["train.json"], "train"), (["train.json", "evaluate.json"], "eval"), (["inference.json"], "infer")],
)
def test_check_properties(tmp_path, tiny_task, files, workflow_type):
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        dataset_dir=str(tiny_task),
        ckpt_dir=str(tmp_path / "models"),
        cache_rate=0.0,
        ckpt_path=str(_random_lite_checkpoint(tmp_path)),
    )
    workflow.initialize()
    assert not workflow.check_properties()


def _random_lite_checkpoint(folder: Path) -> Path:
    path = folder / "random_lite.pt"
    torch.save(ICMoE(num_classes=2, img_size=64, encoder="lite").state_dict(), path)
    return path


def test_profiles_build_their_networks():
    from monai.bundle import ConfigParser

    for profile, encoder in (("lite.json", "lite"), ("sam_vit_b.json", "vit_b")):
        for base in ("train.json", "inference.json"):
            parser = ConfigParser()
            parser.read_config([str(CONFIGS / base), str(CONFIGS / profile)])
            parser["sam_checkpoint"] = None  # the SAM file is fetched on request, not shipped
            net = parser.get_parsed_content("network_def")
            assert isinstance(net, ICMoE) and net.encoder_name == encoder
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "baseline_unet.json")])
    assert type(parser.get_parsed_content("network_def")).__name__ == "UNet"


def test_verify_net_in_out():
    bundle_cli(
        "verify_net_in_out", "network_def", "--meta_file", str(CONFIGS / "metadata.json"),
        "--config_file", str(CONFIGS / "inference.json"),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.slow
def test_training_writes_model_checkpoint_and_logs(trained):
    assert (trained / "models" / "model.pt").is_file()
    assert (trained / "models" / "checkpoint_epoch=1.pt").is_file()
    assert list((trained / "eval").glob("events.out.tfevents.*"))
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    model = ICMoE(num_classes=2, img_size=64, encoder="lite")
    model.load_state_dict(state)  # the key-metric checkpoint is a plain state dict of the network
    info = read_info(state)  # … carrying what it was trained for
    assert info["label_names"] == {"0": "background", "1": "anterior", "2": "posterior"}
    assert info["preprocessing"]["modality"] == "mr" and info["preprocessing"]["img_size"] == 64


@pytest.mark.slow
def test_training_resumes_from_last_checkpoint(tmp_path, tiny_task, trained):
    import shutil

    shutil.copytree(trained / "models", tmp_path / "models")
    result = bundle_cli(
        "run", "training", "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(tiny_task),
        "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"), "--max_epochs", "2", *TINY,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert "resume: loading" in log and "checkpoint_epoch=1.pt" in log
    assert "Epoch: 1/2" not in log and "Epoch: 2/2" in log  # epoch 1 was not trained again
    assert (tmp_path / "models" / "checkpoint_epoch=2.pt").is_file()


@pytest.mark.slow
def test_multi_process_gloo_training(tmp_path, tiny_task):
    """Two ranks fine-tune the shipped weights with click prompts on every batch (the extra no-grad forward that
    places the clicks must run on both ranks alike)."""
    result = bundle_cli(
        "run", "training", "--config_file", configs("train.json", "multi_gpu_train.json"),
        "--dataset_dir", str(tiny_task), "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"),
        "--max_epochs", "1", *TINY, "--click_prob", "1.0", "--pretrained_ckpt", str(BUNDLE / "models" / "model.pt"),
        torchrun=2,
    )  # fmt: skip
    assert "fine-tuning from" in result.stdout + result.stderr
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    ICMoE(num_classes=2, img_size=64, encoder="lite").load_state_dict(state)


@pytest.mark.slow
def test_baseline_unet_trains_with_the_same_pipeline(tmp_path, tiny_task):
    """The plain 2D U-Net profile: same device slice sampling, trainer and loss (Dice + CE on its logits)."""
    result = bundle_cli(
        "run", "training", "--config_file", configs("train.json", "baseline_unet.json"), "--dataset_dir",
        str(tiny_task), "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"),
        "--max_epochs", "1", *TINY,
    )  # fmt: skip
    assert "loss_dice_ce" in result.stdout + result.stderr
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "baseline_unet.json")])
    parser.get_parsed_content("network_def").load_state_dict(state)


@pytest.mark.slow
def test_mlflow_tracking_local_store(tmp_path, tiny_task):
    bundle_cli(
        "run", "training", "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(tiny_task),
        "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"), "--max_epochs", "1",
        "--tracking", "mlflow", *TINY,
    )  # fmt: skip
    import mlflow

    db = tmp_path / "eval" / "mlruns.db"
    assert db.is_file()
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) >= 1
    assert any(c.startswith("metrics.train_loss") or c.startswith("metrics.loss_dice_ce") for c in runs.columns)
    params = runs.iloc[0]  # the run's settings, not only MONAI's max_epochs and epoch_length
    assert params["params.learning_rate"] == "0.001" and params["params.steps_per_epoch"] == "3"
    assert json.loads(params["params.label_names"]) == {"0": "background", "1": "anterior", "2": "posterior"}
    assert params["params.modality"] == "mr" and params["params.profile"] == "lite"


# ------------------------------------------------------------------------------------------------ evaluation
@pytest.mark.slow
@pytest.mark.parametrize("convention", ["monai", "samed"])
def test_evaluation_reports(tmp_path, tiny_task, trained, convention):
    bundle_cli(
        "run", "evaluating", "--config_file", configs("train.json", "evaluate.json"), "--dataset_dir", str(tiny_task),
        "--ckpt_path", str(trained / "models" / "model.pt"), "--output_dir", str(tmp_path),
        "--metric_convention", convention, "--eval_section", "all", "--num_workers", "0",
        "--quality_calibration", str(tmp_path / "quality.json"),
    )  # fmt: skip
    # the quality score is calibrated on the evaluated cases, and its predictions compared with their Dice
    from ic_moe_monai.inference.quality import QualityCalibration

    assert set(QualityCalibration.load(tmp_path / "quality.json").label_names.values()) == {"anterior", "posterior"}
    summary = json.loads((tmp_path / "quality_summary.json").read_text())
    assert summary["cases"] == 6 and 0.0 <= summary["mae"] <= 1.0
    with (tmp_path / "quality_vs_dice.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    with (tmp_path / "metrics_per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert set(rows[0]) == {"case", "anterior_dice", "anterior_hd95", "posterior_dice", "posterior_hd95"}
    assert {r["case"] for r in rows} == {p.name.removesuffix(".nii.gz") for p in (tiny_task / "imagesTr").iterdir()}
    for row in rows:
        assert 0.0 <= float(row["anterior_dice"]) <= 1.0
        assert float(row["posterior_hd95"]) >= 0.0 or np.isnan(float(row["posterior_hd95"]))
    summary = json.loads((tmp_path / "metrics_summary.json").read_text())
    assert summary["convention"] == convention
    assert summary["hd95_unit"] == ("voxels" if convention == "samed" else "mm")
    means = [float(r["anterior_dice"]) for r in rows]
    assert abs(summary["summary"]["anterior_dice"]["mean"] - np.mean(means)) < 1e-9
    assert (tmp_path / "metrics_summary.csv").read_text().startswith("metric,mean,std,median,cases,undefined")


# ------------------------------------------------------------------------------------------------ inference
def _write_volume(path: Path, affine: np.ndarray, shape=(64, 64, 64), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.random(shape).astype(np.float32) * 1000
    nib.save(nib.Nifti1Image(data, affine), path)
    return data


def test_inference_geometry_round_trip(tmp_path):
    """Output labelmaps keep each input's exact shape and affine, with the voxels in the right place (RAS, LPS,
    oblique and permuted-axes inputs), using a pixel-wise threshold network whose answer is known."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    rotation = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # stored axes are S, R, A
    theta = np.deg2rad(20)
    oblique = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affines = {
        "ras": np.diag([1.0, 1.0, 2.0, 1.0]),
        "lps": np.diag([-0.8, -0.8, 2.5, 1.0]),
        "permuted": np.block(
            [[rotation * 1.5, np.array([[10.0], [-5.0], [3.0]])], [np.zeros((1, 3)), np.ones((1, 1))]]
        ),
        "oblique": np.block([[oblique, np.array([[1.0], [2.0], [3.0]])], [np.zeros((1, 3)), np.ones((1, 1))]]),
    }
    data = {
        name: _write_volume(inputs / f"{name}.nii.gz", aff, seed=i) for i, (name, aff) in enumerate(affines.items())
    }
    torch.save(ThresholdState(), tmp_path / "threshold.pt")
    bundle_cli(
        "run", "inference", "--config_file", str(CONFIGS / "inference.json"), "--dataset_dir", str(inputs),
        "--output_dir", str(outputs), "--ckpt_path", str(tmp_path / "threshold.pt"),
        "--network_def", "{'_target_': 'tests.helpers.ThresholdNet'}", "--img_size", "64",
        "--keep_largest_component", "false",  # labels known voxel by voxel: no component cleaning
    )  # fmt: skip
    for name, affine in affines.items():
        out = nib.load(outputs / f"{name}.nii.gz")
        assert out.shape == (64, 64, 64)
        np.testing.assert_allclose(out.affine, affine, atol=1e-4)
        assert out.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(out.dataobj), expected_threshold_labels(data[name]))


def ThresholdState() -> dict[str, torch.Tensor]:  # noqa: N802 - reads like the class it stands for
    from .helpers import ThresholdNet

    return ThresholdNet().state_dict()


@pytest.mark.slow
def test_inference_with_trained_lite_on_real_volumes(tmp_path, tiny_task, trained, shared_data):
    """Real MR volumes of other shapes and orientation (RAS hippocampus, LPS abdomen): same shape and affine."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    sources = sorted((tiny_task / "imagesTr").iterdir())[:2] + sorted(
        (shared_data / "mr_multiorgan" / "imagesTr").iterdir()
    )
    for src in sources:
        (inputs / src.name).write_bytes(src.read_bytes())
    bundle_cli(
        "run", "inference", "--config_file", str(CONFIGS / "inference.json"), "--dataset_dir", str(inputs),
        "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(trained / "models" / "model.pt"),
    )  # fmt: skip
    for src in sources:
        out, ref = nib.load(tmp_path / "out" / src.name), nib.load(src)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out.affine, ref.affine, atol=1e-4)
        assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1, 2}


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.slow
def test_ckpt_export_traced_and_loadable(tmp_path, trained):
    ts = tmp_path / "model.ts"
    bundle_cli(
        "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(trained / "models" / "model.pt"),
        "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.json"),
        "--use_trace", "True", "--input_shape", "[1, 3, 64, 64]",
    )  # fmt: skip
    loaded = torch.jit.load(str(ts))
    model = ICMoE(num_classes=2, img_size=64, encoder="lite").eval()
    model.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() <= 1e-4


def test_bundle_files_present():
    for rel in ("LICENSE", "large_files.yml", "docs/README.md", "docs/data_license.txt", "configs/logging.conf"):
        assert (BUNDLE / rel).is_file(), rel


@pytest.mark.slow
def test_multi_process_gloo_evaluation(tmp_path, tiny_task, trained):
    bundle_cli(
        "run", "evaluating",
        "--config_file", configs("train.json", "evaluate.json", "multi_gpu_evaluate.json"),
        "--dataset_dir", str(tiny_task), "--ckpt_path", str(trained / "models" / "model.pt"),
        "--output_dir", str(tmp_path), "--eval_section", "all", "--num_workers", "0",
        "--quality_calibration", str(tmp_path / "quality.json"), torchrun=2,
    )  # fmt: skip
    assert json.loads((tmp_path / "quality_summary.json").read_text())["cases"] == 6  # gathered too
    with (tmp_path / "metrics_per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6  # both ranks' cases, gathered on rank 0
    assert len({r["case"] for r in rows}) == 6


@pytest.mark.slow
def test_quick_start_with_shipped_model(tmp_path):
    """The README's quick start: the shipped model on the shipped sample volumes finds both hippocampus parts."""
    bundle_cli(
        "run", "inference", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(BUNDLE),
        "--output_dir", str(tmp_path),
    )  # fmt: skip
    samples = sorted((BUNDLE / "sample_data").glob("*.nii.gz"))
    assert len(samples) == 2
    for sample in samples:
        out, ref = nib.load(tmp_path / sample.name), nib.load(sample)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out.affine, ref.affine, atol=1e-4)
        labels = np.asarray(out.dataobj)
        for value in (1, 2):  # each part is found, at a plausible size (hundreds to a few thousand voxels)
            assert 200 < (labels == value).sum() < 5000, (sample.name, value, (labels == value).sum())
