"""Reading volumes for inference: NIfTI in the file's own voxel order, DICOM series through ITK (imported only then).

MONAI's ``LoadImage`` makes every array C-contiguous. NIfTI stores voxels in Fortran order (x fastest), so that is
a transposing copy of the whole volume on the CPU (about a second for a 512 × 512 × 300 CT), and the MONAI
transforms after it copy again to make tensors contiguous. :class:`LoadVolume` reads a NIfTI file in one read into
a tensor that keeps the file's order: each axial slice stays contiguous, which is also the order in which the
slice-wise inferer reads it, and a transfer to a GPU is then a plain copy of the buffer. Everything else (other
formats, a chosen reader, several files, meta pruning) goes through MONAI's ``LoadImage`` unchanged, so NRRD and
MHA files are read by MONAI's ``ITKReader``; ITK is needed only for those and for DICOM series
(:func:`read_dicom_series`).
"""

from __future__ import annotations

from collections.abc import Sequence
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

__all__ = ["NIFTI_SUFFIXES", "LoadVolume", "LoadVolumed", "read_dicom_series"]

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


def read_dicom_series(files: Sequence[PathLike]) -> MetaTensor:
    """A DICOM series ``(X, Y, Z)`` in the series' own geometry (RAS affine) and data type, read by ITK.

    ITK is imported here only, so NIfTI input needs no ITK.
    """
    import itk
    from monai.data import ITKReader

    image = itk.imread([str(f) for f in files])
    array, meta = ITKReader().get_data(image)
    meta["original_channel_dim"] = "no_channel"
    array = np.array(array, order="K", copy=True)  # ITK's buffer viewed in Fortran order; keep that order
    return MetaTensor(torch.from_numpy(array), meta=meta)


def _as_tuple(value: object) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
