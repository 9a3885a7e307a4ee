"""Read image files (NIfTI, NRRD, MetaImage) after their header passed the guard, under any path name.

ITK's Python wrapping cannot take a path that is not valid UTF-8 (a Latin-1 file name from an old archive, say):
it fails with a SWIG message. :func:`itk_safe_path` hands ITK a temporary link with an ASCII name instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from ic_moe_monai.io.guards import ImageError, _one_line, check_image_file

__all__ = ["itk_safe_path", "read_image_file"]


@contextmanager
def itk_safe_path(path: str | Path) -> Iterator[Path]:
    """A path to ``path`` that ITK can open, for the block.

    ``path`` itself when it is valid UTF-8; else a symbolic link with an ASCII name in a temporary folder, with
    links to a detached data file (``.mhd`` / ``.nhdr`` headers name it relative to themselves) beside it. The
    file is never copied or changed.
    """
    path = Path(path)
    try:
        str(path).encode("utf-8")
        yield path
        return
    except UnicodeEncodeError:  # undecodable bytes are held as surrogates, which ITK's wrapping refuses
        pass
    folder = Path(tempfile.mkdtemp(prefix="ic_moe_itk_"))
    try:
        suffix = "".join(s for s in path.suffixes if s.isascii())[-16:] or ".img"
        link = folder / f"image{suffix}"
        os.symlink(path.resolve(), link)
        for data_file in _detached_data_files(path):
            target = folder / data_file
            if not target.exists() and data_file.parent == Path("."):
                os.symlink((path.parent / data_file).resolve(), target)
        yield link
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _detached_data_files(path: Path) -> list[Path]:
    """Data files a MetaImage (``ElementDataFile``) or NRRD (``data file``) header names relative to itself."""
    if not path.name.lower().endswith((".mhd", ".nhdr")):
        return []
    with path.open("rb") as f:
        head = f.read(1 << 16).decode("utf-8", "surrogateescape")
    names = []
    for line in head.splitlines():
        key, _, value = line.replace("=", ":", 1).partition(":")
        if key.strip().lower() in ("elementdatafile", "data file", "datafile") and value.strip():
            name = value.strip()
            if name.upper() != "LOCAL" and not Path(name).is_absolute():
                names.append(Path(name))
    return names


def read_image_file(path: str | Path, max_bytes: int | str | None = None) -> MetaTensor:
    """A NIfTI / NRRD / MetaImage volume as a float32 MetaTensor ``(X, Y, Z)`` with its RAS affine, as MONAI's
    ``LoadImage`` gives it, after :func:`~ic_moe_monai.io.guards.check_image_file` passed its header.

    Args:
        path: the image file (any path name).
        max_bytes: size limit of the volume as float32 (see :func:`~ic_moe_monai.io.guards.max_image_bytes`).

    Raises:
        ImageError: naming the file, when its header fails a check or its voxels cannot be read (truncated or
            corrupt data), or are not all finite.
    """
    from monai.transforms import LoadImage

    path = Path(path)
    check_image_file(path, max_bytes)
    try:
        with itk_safe_path(path) as readable:
            tensor = LoadImage(image_only=True, dtype=np.float32)(str(readable))
    except Exception as err:  # readers raise many types for corrupt or truncated files
        raise ImageError(f"{path}: cannot read the image ({_one_line(err)}).") from err
    tensor.meta["filename_or_obj"] = str(path)
    if tensor.ndim == 4 and tensor.shape[-1] == 1:  # a 3D volume stored with a singleton 4th axis
        tensor = tensor[..., 0]
    if tensor.ndim != 3:
        raise ImageError(f"{path}: a {tensor.ndim}D image of shape {tuple(tensor.shape)}; a 3D volume is needed.")
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ImageError(f"{path}: the image holds {bad} NaN or infinite voxel values.")
    return tensor
