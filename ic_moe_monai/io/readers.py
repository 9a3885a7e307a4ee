"""Reading image files for inference: after the header guard, under any path name, NIfTI in its own voxel order.

- MONAI's ``LoadImage`` makes every array C-contiguous. NIfTI stores voxels in Fortran order (x fastest), so that is
  a transposing copy of the whole volume on the CPU (about a second for a 512 × 512 × 300 CT), and the MONAI
  transforms after it copy again to make tensors contiguous. :class:`LoadVolume` reads a NIfTI file in one read into
  a tensor that keeps the file's order: each axial slice stays contiguous, which is also the order in which the
  slice-wise inferer reads it, and a transfer to a GPU is then a plain copy of the buffer. Everything else (other
  formats, a chosen reader, several files, meta pruning) goes through MONAI's ``LoadImage`` unchanged, so NRRD and
  MHA files are read by MONAI's ``ITKReader`` (ITK is imported for those only; DICOM series are read by pydicom,
  :mod:`ic_moe_monai.io.dicom_series`).
- ITK's Python wrapping cannot take a path that is not valid UTF-8 (a Latin-1 file name from an old archive, say):
  it fails with a SWIG message. :func:`itk_safe_path` hands ITK a temporary link with an ASCII name instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection, PathLike
from monai.data import ImageReader, MetaTensor, NibabelReader, get_track_meta
from monai.data.utils import is_supported_format
from monai.transforms import EnsureChannelFirst, LoadImage, LoadImaged
from monai.transforms.io.array import switch_endianness
from monai.utils import ImageMetaKey, MetaKeys
from monai.utils.type_conversion import UNSUPPORTED_TYPES

from ic_moe_monai.io.guards import ImageError, _one_line, check_image_file

__all__ = ["NIFTI_SUFFIXES", "LoadVolume", "LoadVolumed", "itk_safe_path", "read_image_file"]

NIFTI_SUFFIXES = ("nii", "nii.gz")


class LoadVolume(LoadImage):
    """MONAI's ``LoadImage``, reading single NIfTI files without reordering the voxels in memory.

    The same arguments, image and metadata as ``LoadImage`` (values, shape, affine and meta keys are equal); a NIfTI
    image is returned with the file's Fortran strides instead of a C-contiguous copy. ``dtype=None`` keeps the
    file's data type (e.g. int16 CT), so a conversion to float can happen later on the GPU.
    """

    def __call__(self, filename: Sequence[PathLike] | PathLike, reader: object | None = None):
        names = tuple(str(Path(f).expanduser()) if self.expanduser else f for f in _as_tuple(filename))
        nibabel = self._nibabel_reader(names) if reader is None else None
        if nibabel is None or self.simple_keys or self.pattern is not None:
            return super().__call__(filename, reader)
        image = nibabel.read(names[0], mmap=False)  # one read of the file (or decompression) into writable memory
        array, meta = nibabel.get_data(image)  # the file's order: Fortran for NIfTI
        array = np.asarray(array)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="), order="K")
        if array.dtype in UNSUPPORTED_TYPES:
            array = array.astype(UNSUPPORTED_TYPES[array.dtype], order="K")
        if self.dtype is not None:
            array = array.astype(self.dtype, order="K", copy=False)
        meta = switch_endianness(meta, "<")
        meta[ImageMetaKey.FILENAME_OR_OBJ] = names[0]
        tensor = torch.from_numpy(array)
        if not get_track_meta():
            img = tensor
        else:  # what MetaTensor.ensure_torch_and_prune_meta does, without its contiguous copy
            img = MetaTensor(tensor)
            img.meta = meta
            img.affine = meta[MetaKeys.AFFINE] if MetaKeys.AFFINE in meta else MetaTensor.get_default_affine()
        if self.ensure_channel_first:
            img = EnsureChannelFirst()(img, meta_dict=meta)
        if self.image_only:
            return img
        return img, img.meta if isinstance(img, MetaTensor) else meta

    def _nibabel_reader(self, names: tuple) -> NibabelReader | None:
        """The reader ``LoadImage`` would pick for ``names`` when it is MONAI's own NibabelReader, else None."""
        if len(names) != 1 or not isinstance(names[0], str) or not is_supported_format(names[0], NIFTI_SUFFIXES):
            return None
        chosen = next((r for r in self.readers[::-1] if r.verify_suffix(names)), None) if self.auto_select else None
        return chosen if type(chosen) is NibabelReader and not chosen.to_gpu else None


class LoadVolumed(LoadImaged):
    """``LoadImaged`` whose loader is :class:`LoadVolume` (NIfTI read in the file's own order); same arguments.

    A subclass of ``LoadImaged``, so tools that find the loader by type (MONAI Label's bundle tasks) still do.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: type[ImageReader] | str | None = None,
        dtype: DtypeLike = np.float32,
        *args,
        **kwargs,
    ) -> None:
        super().__init__(keys, reader, dtype, *args, **kwargs)
        base = self._loader  # LoadImaged's own LoadImage: the same options and readers, read through LoadVolume
        self._loader = LoadVolume(None, base.image_only, base.dtype, base.ensure_channel_first, base.simple_keys,
                                  base.pattern, base.sep, base.expanduser)  # fmt: skip
        self._loader.readers, self._loader.auto_select = base.readers, base.auto_select


def _as_tuple(value: object) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


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


def read_image_file(
    path: str | Path, max_bytes: int | str | None = None, dtype: DtypeLike | None = np.float32
) -> MetaTensor:
    """A NIfTI / NRRD / MetaImage volume ``(X, Y, Z)`` with its RAS affine, as MONAI's ``LoadImage`` gives it, after
    :func:`~ic_moe_monai.io.guards.check_image_file` passed its header.

    Args:
        path: the image file (any path name).
        max_bytes: size limit of the volume as float32 (see :func:`~ic_moe_monai.io.guards.max_image_bytes`).
        dtype: the voxels' data type; ``None`` keeps the file's (e.g. int16 CT, converted later on the device).
            NIfTI keeps the file's voxel order (see :class:`LoadVolume`).

    Raises:
        ImageError: naming the file, when its header fails a check or its voxels cannot be read (truncated or
            corrupt data), or are not all finite.
    """
    path = Path(path)
    check_image_file(path, max_bytes)
    try:
        with itk_safe_path(path) as readable:
            tensor = LoadVolume(image_only=True, dtype=dtype)(str(readable))
    except Exception as err:  # readers raise many types for corrupt or truncated files
        raise ImageError(f"{path}: cannot read the image ({_one_line(err)}).") from err
    tensor.meta["filename_or_obj"] = str(path)
    if tensor.ndim == 4 and tensor.shape[-1] == 1:  # a 3D volume stored with a singleton 4th axis
        tensor = tensor[..., 0]
    if tensor.ndim != 3:
        raise ImageError(f"{path}: a {tensor.ndim}D image of shape {tuple(tensor.shape)}; a 3D volume is needed.")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():  # integers are always finite
        bad = int((~torch.isfinite(tensor)).sum())
        raise ImageError(f"{path}: the image holds {bad} NaN or infinite voxel values.")
    return tensor
