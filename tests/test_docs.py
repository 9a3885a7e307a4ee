"""The documentation: README.md stays a front page, every relative link (and anchor) of README.md, docs/*.md and the
model card leads somewhere, every command they show exists, and docs/own_data.md's blocks run as a user types them
(slow: on a small synthetic CT, with the first block's settings made short)."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

from .conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
MODEL_CARD = REPO_ROOT / "bundle" / "docs" / "README.md"
CONFIGS = REPO_ROOT / "bundle" / "configs"
OWN_DATA = DOCS / "own_data.md"
MAX_README_LINES = 160

FENCE = re.compile(r"^ {0,3}(```|~~~)(.*)$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
PACKAGE_COMMAND = re.compile(r"python3? -m ic_moe_monai[ \t]+([^\s`'\"]+)")
BUNDLE_RUN = re.compile(r"-m monai\.bundle[ \t]+run[ \t]+([^\s`'\"]+)([^\n`]*)")
# what the test puts in place of docs/own_data.md's first block: its dataset, and a first try short enough for CI
SHORT = ("--max_epochs 1 --steps_per_epoch 2 --volumes_per_batch 2 --slices_per_volume 2 --num_workers 0 "
                   "--cache_rate 0")  # fmt: skip


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md")), MODEL_CARD]


def _page_id(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def split_fences(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The text outside fenced code blocks (blocks blanked out, lines kept), and the blocks as (info, body)."""
    prose, blocks, fence, info, body = [], [], None, "", []
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence, info, body = match.group(1), match.group(2).strip(), []
            prose.append("")
        elif fence is not None and line.strip() == fence:
            blocks.append((info, "\n".join(body)))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, "a fenced code block is not closed"
    return "\n".join(prose), blocks


def _without_code_spans(text: str) -> str:
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without markup, lower case, without punctuation but ``-`` and
    ``_``, spaces as ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    for line in prose.splitlines():
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


def relative_links(path: Path) -> list[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    targets = LINK.findall(_without_code_spans(prose))
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t)]  # http:, mailto:, ...


def cli_commands() -> set[str]:
    """The commands of ``python -m ic_moe_monai``: the keys of the ``COMMANDS`` table that cli.py hands to fire."""
    source = (REPO_ROOT / "ic_moe_monai" / "cli.py").read_text(encoding="utf-8")
    assert "fire.Fire(" in source and "COMMANDS.items()" in source, "cli.py no longer hands COMMANDS to fire"
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign | ast.AnnAssign):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if any(isinstance(t, ast.Name) and t.id == "COMMANDS" for t in targets) and isinstance(node.value, ast.Dict):
            names = {k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            assert names, "cli.py's COMMANDS names no command"
            return names
    raise AssertionError("cli.py has no COMMANDS table")


def bundle_configs() -> dict[str, set[str]]:
    """Each config of bundle/configs with its top-level keys (the names ``monai.bundle run`` can run)."""
    return {p.name: set(json.loads(p.read_text(encoding="utf-8"))) for p in CONFIGS.glob("*.json")}


def own_data_blocks() -> list[str]:
    _, blocks = split_fences(OWN_DATA.read_text(encoding="utf-8"))
    return [body for info, body in blocks if info.split()[:1] == ["bash"]]


def _assigned(block: str) -> set[str]:
    return set(re.findall(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=", block, flags=re.M))


# ------------------------------------------------------------------------------------------------ front page
def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move reference material to docs/"


def test_readme_links_every_docs_page():
    linked = {(README.parent / unquote(t.split("#")[0])).resolve() for t in relative_links(README)}
    missing = [_page_id(p) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


# ------------------------------------------------------------------------------------------------ links
@pytest.mark.parametrize("page", pages(), ids=_page_id)
def test_relative_links_lead_to_files_and_anchors(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif not (REPO_ROOT in dest.parents or dest == REPO_ROOT):
            broken.append(f"{target}: outside the repository")
        elif anchor and (dest.suffix != ".md" or unquote(anchor).lower() not in anchors(dest)):
            broken.append(f"{target}: no heading with that anchor in {_page_id(dest)}")
    assert not broken, f"{_page_id(page)}: " + "; ".join(broken)


def test_the_link_checker_sees_links_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    headings = "## Fine-tuning (`--from`)\n\n## 2. A bundle: `init_bundle`\n\n## Notes\n\n## Notes\n\n"
    page.write_text(headings + "see [x](a.md#b), `[y](c.md)` and [w](https://x.org)\n```\n[z](d.md)\n# not one\n```\n")
    assert relative_links(page) == ["a.md#b"]
    assert anchors(page) == {"fine-tuning---from", "2-a-bundle-init_bundle", "notes", "notes-1"}


# ------------------------------------------------------------------------------------------------ commands
@pytest.mark.parametrize("page", pages(), ids=_page_id)
def test_commands_shown_exist(page):
    text = page.read_text(encoding="utf-8").replace("\\\n", " ")  # continued lines: one command
    commands, configs = cli_commands(), bundle_configs()
    runnable = set().union(*configs.values())
    wrong = [f"python -m ic_moe_monai {name}: not a command of cli.py ({', '.join(sorted(commands))})"
             for name in PACKAGE_COMMAND.findall(text) if name not in commands]  # fmt: skip
    for name, rest in BUNDLE_RUN.findall(text):
        named = re.findall(r"configs/([\w.-]+\.json)", rest)
        wrong += [f"run {name}: no bundle/configs/{c}" for c in named if c not in configs]
        keys = set().union(*(configs[c] for c in named if c in configs)) if named else runnable
        if name not in keys:
            wrong.append(f"monai.bundle run {name}: no config {'given' if named else 'in bundle/configs'} defines it")
    assert not wrong, f"{_page_id(page)}: " + "; ".join(wrong)


def test_the_docs_show_the_commands():
    text = "\n".join(p.read_text(encoding="utf-8") for p in pages())
    assert set(PACKAGE_COMMAND.findall(text)) == cli_commands(), "every command of the package has its page"
    assert {"training", "evaluating", "inference"} <= set(m[0] for m in BUNDLE_RUN.findall(text))


# ------------------------------------------------------------------------------------------------ own data
def test_own_data_blocks_take_their_settings_from_the_first_block():
    blocks = own_data_blocks()
    assert len(blocks) >= 5, "docs/own_data.md: settings, init_bundle, training, evaluation, segment"
    settings = _assigned(blocks[0])
    assert {"DATA", "FIRST_TRY", "STUDIES"} <= settings
    assert "init_bundle" in blocks[1] and "segment" in "\n".join(blocks)
    for block in blocks[1:]:
        used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", block))
        assert used <= settings, f"{used - settings} are not set in the first block"
        assert "/data/" not in block, "later blocks take the dataset from $DATA"
    assert '"${FIRST_TRY[@]}"' in "\n".join(blocks), "the training takes its budget from FIRST_TRY"


@pytest.mark.slow
def test_own_data_page_runs_as_written(tmp_path):
    """docs/own_data.md's bash blocks, in order, in one shell, in a fresh folder: its first block, then this test's
    dataset and a short first try, then every other block as it stands."""
    import nibabel as nib
    import numpy as np

    from .helpers import BUNDLE, make_ct_task, synthetic_ct, write_dicom_series

    shipped = hashlib.md5((BUNDLE / "models" / "model.pt").read_bytes()).hexdigest()
    data = make_ct_task(tmp_path / "data" / "AbdomenPhantom", count=5)
    work = tmp_path / "work"
    studies = work / "studies"  # the page's STUDIES=studies
    (studies / "nifti").mkdir(parents=True)
    (studies / "nifti" / "phantom_005.nii.gz").write_bytes((data / "imagesTs" / "phantom_005.nii.gz").read_bytes())
    image, _ = synthetic_ct(seed=7)
    write_dicom_series(studies / "dicom", np.transpose(image, (2, 1, 0)), spacing=(3.0, 3.0, 5.0), modality="CT")
    python = tmp_path / "bin"
    python.mkdir()
    (python / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')  # the page's `python`
    (python / "python").chmod(0o755)

    blocks = own_data_blocks()
    settings = [f"DATA={shlex.quote(str(data))}", f"STUDIES={shlex.quote(str(studies))}", f"FIRST_TRY=({SHORT})"]
    script = ["set -euo pipefail", blocks[0], *settings]
    for i, block in enumerate(blocks[1:], start=2):
        script += [f"echo '### block {i}' >&2", block]
    env = dict(os.environ, PATH=f"{python}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert "training finished after epoch 1" in result.stdout + result.stderr  # the first try, as the test set it

    bundle = work / "my_bundle"  # the page's BUNDLE
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "eval" / "metrics_summary.json").is_file()
    inferred = nib.load(work / "inferred" / "phantom_005.nii.gz")
    assert inferred.shape == nib.load(data / "imagesTs" / "phantom_005.nii.gz").shape
    report = json.loads((work / "segmented" / "report.json").read_text())
    assert sorted(c["status"] for c in report["cases"]) == ["done", "done"]
    assert any("dicom_seg" in c["outputs"] for c in report["cases"])
    again = nib.load(work / "from_export" / "phantom_005.nii.gz")
    np.testing.assert_array_equal(np.asarray(again.dataobj), np.asarray(inferred.dataobj))
    assert hashlib.md5((BUNDLE / "models" / "model.pt").read_bytes()).hexdigest() == shipped
