"""Broken and hostile inputs of ``init_bundle`` and ``export_bundle``: each ends with exit code 2 and one line naming
the file and the problem, writes nothing, and copies nothing from outside the bundle."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ic_moe_monai import cli
from ic_moe_monai.bundles.export import export_bundle
from ic_moe_monai.data.datasets import dataset_info

from .helpers import BUNDLE, make_ct_task


@pytest.fixture(scope="module")
def ct_template(tmp_path_factory) -> Path:
    return make_ct_task(tmp_path_factory.mktemp("data") / "Phantom", count=3, shape=(32, 32, 6))


@pytest.fixture
def ct_task(tmp_path, ct_template) -> Path:
    """A fresh copy of the CT task, free to change."""
    return Path(shutil.copytree(ct_template, tmp_path / "Phantom"))


def _command(capsys, *argv: object) -> tuple[int, str]:
    """Run the command line in this process: (exit code, stderr)."""
    try:
        cli.main([str(a) for a in argv])
    except SystemExit as done:
        return int(done.code or 0), capsys.readouterr().err
    return 0, capsys.readouterr().err


def _refused(capsys, *argv: object, match: str) -> str:
    """The command fails as a usage error: exit code 2, one line ``error: ...`` matching ``match``."""
    code, err = _command(capsys, *argv)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert match in err, err
    return err


def _with_manifest(task: Path, **changes: object) -> Path:
    """``task``'s dataset.json with keys changed (``...``: removed)."""
    manifest = json.loads((task / "dataset.json").read_text())
    manifest.update(changes)
    manifest = {k: v for k, v in manifest.items() if v is not ...}
    (task / "dataset.json").write_text(json.dumps(manifest))
    return task


# ------------------------------------------------------------------------------------------------ dataset.json
@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\xff\xfe{}", "not a UTF-8 text file"),
        (b"[" * 100_000 + b"]" * 100_000, "not a readable JSON file (nested too deeply)"),
        (b'{"numTraining": ' + b"1" * 5000 + b"}", "not a readable JSON file"),
        (b"[1, 2]", "not a JSON object (it holds a list)"),
    ],
)
def test_dataset_json_that_cannot_be_read_is_one_line(tmp_path, capsys, ct_task, content, problem):
    (ct_task / "dataset.json").write_bytes(content)
    _refused(capsys, "init_bundle", ct_task, tmp_path / "b", match=f"{ct_task / 'dataset.json'}: {problem}")
    assert not (tmp_path / "b").exists()


def test_dataset_json_with_a_byte_order_mark_is_read(ct_task):
    text = (ct_task / "dataset.json").read_text()
    (ct_task / "dataset.json").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert dataset_info(ct_task).label_names[1] == "liver"


def test_huge_dataset_json_is_refused_before_it_is_read(tmp_path, capsys, ct_task):
    with open(ct_task / "dataset.json", "r+b") as f:  # sparse: no disk or memory needed
        f.truncate(64 * 1024 * 1024 + 1)
    _refused(capsys, "init_bundle", ct_task, tmp_path / "b", match="is too big for a dataset.json (at most 64 MiB)")


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        (
            {"0": "background", "1": "liver", "2": "Liver ", "3": "kidney"},
            "label 2 'Liver ': label 1 has the same name",
        ),
        ({"0": "background", "1": 5}, "label 1: the name 5 is not text"),
        ({"0": "background", "1": None}, "label 1: the name None is not text"),
        ({"0": "background", "1": ""}, "label 1 '': the name is empty"),
        ({"0": "background", "1": "liver\n# Injected"}, "control character or a backslash"),
        ({"0": "background", "1": "liver\x00"}, "control character or a backslash"),
        ({"0": "background", "1": "a\\b"}, "control character or a backslash"),
        ({"0": "background", "1": "x" * 65}, "the name is 65 characters long (at most 64)"),
        ({"0": "background", "1": "Mean"}, "the name is reserved"),
        ({"0": "background", "²": "liver"}, "label '²': 'liver' is not a label value and name"),
        ({"0": "background", "١": "liver"}, "label '١': 'liver' is not a label value and name"),
        ({"background": 0, "liver": 1, "1": "spleen"}, "label value 1 is given twice"),
        ({str(v): f"l{v}" for v in range(300)}, "label 256 'l256': its value is not in 0 … 255"),
        ({"0": "background", "1": "liver", "3": "kidney"}, "label values [0, 1, 3]: the values must be 0"),
    ],
)
def test_label_names_outputs_cannot_carry_are_refused(tmp_path, capsys, ct_task, labels, problem):
    _with_manifest(ct_task, labels=labels)
    err = _refused(capsys, "init_bundle", ct_task, tmp_path / "b", "--from", "none", match=problem)
    assert str(ct_task / "dataset.json") in err
    assert not (tmp_path / "b").exists()


def test_bad_label_names_on_the_command_line_name_the_option(tmp_path, capsys, ct_task):
    _with_manifest(ct_task, labels=...)
    _refused(capsys, "init_bundle", ct_task, tmp_path / "b", "--from", "none", "--label_names", "liver,LIVER",
             match="--label_names: label 2 'LIVER': label 1 has the same name")  # fmt: skip
    _refused(capsys, "init_bundle", ct_task, tmp_path / "b", "--from", "none", "--label_names", "[" * 5000,
             match="--label_names")  # fmt: skip


@pytest.mark.parametrize(("key", "value"), [("name", ["a", "b"]), ("reference", {"doi": "x"}), ("licence", [1])])
def test_free_text_of_dataset_json_must_be_text(tmp_path, capsys, ct_task, key, value):
    _with_manifest(ct_task, **{key: value})
    _refused(capsys, "init_bundle", ct_task, tmp_path / "b", "--from", "none", match=f"'{key}' must be text")


def test_text_from_dataset_json_cannot_add_markup_or_lines_to_the_card(tmp_path, capsys, ct_task):
    labels = {"0": "background", "1": "a|b", "2": "<script>x</script>", "3": "kidney"}
    _with_manifest(ct_task, labels=labels, name="Evil\n# License\nnone", description="*x*\r\n## Data")
    code, err = _command(capsys, "init_bundle", ct_task, tmp_path / "b", "--from", "none")
    assert code == 0, err
    card = (tmp_path / "b" / "docs" / "README.md").read_text()
    assert "| 1 | a\\|b |" in card and "<script>" not in card and "&lt;script&gt;" in card
    assert [line for line in card.splitlines() if line.startswith("#")].count("# License") == 1
    metadata = json.loads((tmp_path / "b" / "configs" / "metadata.json").read_text())
    assert metadata["name"] == "IC-MoE Evil # License none segmentation"


# ------------------------------------------------------------------------------------------------ OUT_BUNDLE
def test_out_bundle_inside_the_dataset_or_the_shipped_bundle_is_refused(tmp_path, capsys, ct_task):
    _refused(capsys, "init_bundle", ct_task, ct_task / "bundle", "--from", "none", match="is inside the dataset folder")
    assert not (ct_task / "bundle").exists()
    _refused(capsys, "init_bundle", ct_task, BUNDLE / "models" / "mine", "--from", "none",
             match="is inside the shipped bundle")  # fmt: skip
    assert not (BUNDLE / "models" / "mine").exists()


def test_out_bundle_that_is_a_link_or_under_a_file_is_refused(tmp_path, capsys, ct_task):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for link in ("link", "dangling"):
        _refused(capsys, "init_bundle", ct_task, tmp_path / link, "--from", "none", match="is a symbolic link")
    assert not any((tmp_path / "elsewhere").iterdir()) and not (tmp_path / "nowhere").exists()
    (tmp_path / "file").write_text("x")
    _refused(capsys, "init_bundle", ct_task, tmp_path / "file" / "b", "--from", "none", match="is a file, not a folder")


def _start_bundle(folder: Path, weights: bytes | None = None) -> Path:
    """A copy of the shipped bundle's configs with ``weights`` as models/model.pt."""
    shutil.copytree(BUNDLE / "configs", folder / "configs")
    (folder / "models").mkdir()
    (folder / "models" / "model.pt").write_bytes(weights if weights is not None else b"")
    return folder


class _Code:
    def __reduce__(self):
        return (os.system, ("touch ran-code",))


@pytest.mark.parametrize("kind", ["empty", "corrupt", "code", "list"])
def test_from_bundle_with_unusable_weights_is_one_line_and_leaves_nothing(tmp_path, capsys, ct_task, kind,
                                                                         monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    source = _start_bundle(tmp_path / "source")
    weights = source / "models" / "model.pt"
    if kind == "corrupt":
        weights.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    elif kind == "code":
        torch.save({"model": _Code()}, weights)
    elif kind == "list":
        torch.save([torch.zeros(2)], weights)
    out = tmp_path / "out"
    out.mkdir()  # an empty folder given for the bundle stays as it was
    problem = "not a state dict of tensors" if kind == "list" else "not a weights file that torch.load(weights_only"
    _refused(capsys, "init_bundle", ct_task, out, "--from", source, match=f"{weights}: {problem}")
    assert not (tmp_path / "ran-code").exists()
    assert out.is_dir() and not any(out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


@pytest.mark.parametrize("config", ["{bad", "[]", "{}"])
def test_from_bundle_with_unusable_configs_is_one_line(tmp_path, capsys, ct_task, config):
    source = _start_bundle(tmp_path / "source")
    (source / "configs" / "inference.json").write_text(config)
    _refused(capsys, "init_bundle", ct_task, tmp_path / "out", "--from", source,
             match=f"bundle {source}: configs/inference.json cannot be used")  # fmt: skip
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ export_bundle
@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    """A copy of the shipped bundle (it has numbers to export), free to change."""
    return Path(shutil.copytree(BUNDLE, tmp_path / "bundle"))


def test_export_into_its_own_bundle_is_refused(tmp_path, capsys, bundle_copy):
    for out in (bundle_copy / "export", bundle_copy / "docs" / "export"):
        _refused(capsys, "export_bundle", bundle_copy, out, match="is inside the bundle")
        assert not out.exists()


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("metadata.json", b"{bad", "metadata.json: not valid JSON"),
        ("metadata.json", b"[]", "metadata.json: not a JSON object"),
        ("metadata.json", b"\xff\xfe", "metadata.json: cannot be read as UTF-8 text"),
        ("train.json", b"[1", "train.json: not valid JSON"),
    ],
)
def test_export_of_a_bundle_with_broken_configs_is_one_line(tmp_path, capsys, bundle_copy, name, content, problem):
    (bundle_copy / "configs" / name).write_bytes(content)
    _refused(capsys, "export_bundle", bundle_copy, tmp_path / "out", match=problem)
    assert not (tmp_path / "out").exists()


def test_export_of_a_bundle_with_corrupt_weights_is_one_line(tmp_path, capsys, bundle_copy):
    (bundle_copy / "models" / "model.pt").write_bytes(b"")
    _refused(capsys, "export_bundle", bundle_copy, tmp_path / "out", match="model.pt: not a weights file")


@pytest.mark.parametrize("link", ["docs/notes.txt", "LICENSE", "large_files.yml", "configs/extra.json", "sample_data"])
def test_export_copies_nothing_from_outside_the_bundle(tmp_path, capsys, bundle_copy, link):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwords.txt").write_text('{"password": "hunter2"}')
    path = bundle_copy / link
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.symlink_to(secret if link == "sample_data" else secret / "passwords.txt")
    _refused(capsys, "export_bundle", bundle_copy, tmp_path / "out", match=f"{path} is a link to")
    assert not (tmp_path / "out").exists()


def test_export_leaves_logs_checkpoints_and_hidden_files_out(tmp_path, bundle_copy):
    (bundle_copy / "eval").mkdir()
    (bundle_copy / "eval" / "log.txt").write_text("x")
    for junk in ("models/checkpoint_epoch=3.pt", "models/pretrained.pt", "docs/run.log", "docs/.DS_Store",
                 "sample_data/checkpoint.pt", "sample_data/.cache/x.nii.gz"):  # fmt: skip
        (bundle_copy / junk).parent.mkdir(parents=True, exist_ok=True)
        (bundle_copy / junk).write_bytes(b"x")
    (bundle_copy / "docs" / "inside.md").symlink_to(bundle_copy / "docs" / "README.md")  # a link within: fine
    out = export_bundle(bundle_copy, tmp_path / "out")
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.parts[-2:][0] != "__pycache__"}
    assert {f for f in files if not f.startswith(("scripts/", "configs/"))} == {
        "LICENSE", "large_files.yml", "models/model.pt", "models/quality.json", "docs/README.md",
        "docs/data_license.txt", "docs/inside.md",
        "sample_data/README.md", "sample_data/hippocampus_003.nii.gz", "sample_data/hippocampus_007.nii.gz",
    }  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
