"""Checks an image file's header before its voxels are read: size, dimensions and voxel type.

A header states how many voxels follow; a hostile or broken file can claim far more than it holds (a 109-byte
NIfTI claiming 1200 × 1200 × 1000 float32) or more than the machine can hold, and readers allocate the claimed
array before they notice. :func:`check_image_file` (NIfTI, NRRD, MetaImage) and :func:`check_dicom_series` read
headers only and raise :class:`ImageError` with one line naming the file and the problem for:

- a volume whose float32 size (what loading holds) exceeds the limit (:func:`max_image_bytes`);
- a file too small to hold the voxels its header claims (uncompressed: less data than claimed; gzip / zlib: more
  than deflate's largest ratio, 1032 : 1, would be needed);
- complex voxels, several channels (RGB, vectors), 2D images, a single slice or plane (fewer than 3 voxels along
  an axis, as for DICOM series), 4D images with more than one volume.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "MAX_BYTES_ENV",
    "MIN_SIZE",
    "ImageError",
    "ImageHeader",
    "check_dicom_series",
    "check_image_file",
    "default_max_bytes",
    "format_bytes",
    "max_image_bytes",
    "parse_bytes",
    "read_image_header",
]

MAX_BYTES_ENV = "IC_MOE_MAX_IMAGE_BYTES"
MIN_SIZE = 3  # voxels along every axis; fewer is a slice or a plane, not a volume (as for DICOM series)
DEFAULT_CAP = 4 << 30
# Deflate (gzip, zlib) never expands data by more than 1032 : 1; a compressed file that would need more to hold the
# claimed voxels is truncated or lies.
DEFLATE_MAX_RATIO = 1032
HEADER_LIMIT = 1 << 16  # text headers (NRRD, MetaImage) longer than this are not headers

NRRD_TYPES = {
    "int8": ("signed char", "int8", "int8_t"),
    "uint8": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "int16": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "uint16": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "int32": ("int", "signed int", "int32", "int32_t"),
    "uint32": ("uint", "unsigned int", "uint32", "uint32_t"),
    "int64": ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
              "int64_t"),
    "uint64": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    "float32": ("float",),
    "float64": ("double",),
}  # fmt: skip
NRRD_DTYPES = {alias: dtype for dtype, aliases in NRRD_TYPES.items() for alias in aliases}
NRRD_SPATIAL_KINDS = {"domain", "space", "time", "???", "none", ""}
META_DTYPES = {"MET_CHAR": "int8", "MET_UCHAR": "uint8", "MET_SHORT": "int16", "MET_USHORT": "uint16",
               "MET_INT": "int32", "MET_UINT": "uint32", "MET_LONG": "int32", "MET_ULONG": "uint32",
               "MET_LONG_LONG": "int64", "MET_ULONG_LONG": "uint64", "MET_FLOAT": "float32",
               "MET_DOUBLE": "float64"}  # fmt: skip


class ImageError(ValueError):
    """An image that cannot be segmented; the message names the file and the problem in one line."""


@dataclass(frozen=True)
class ImageHeader:
    """What a header claims, before any voxel is read.

    ``shape`` lists every axis the file stores (spatial ones first for NIfTI and MetaImage); ``components`` is the
    number of values per voxel (channels, complex parts); ``data_bytes`` the size of the voxel data as stored;
    ``available_bytes`` how many bytes the file holds for it (None when it cannot be told without decompressing);
    ``compressed`` whether those bytes are deflate-compressed.
    """

    path: Path
    format: str
    shape: tuple[int, ...]
    dtype: str
    components: int = 1
    component_kind: str = ""
    data_bytes: int = 0
    available_bytes: int | None = None
    compressed: bool = False

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The shape without trailing singleton axes beyond the third (a 3D volume stored as 4D with one volume)."""
        shape = list(self.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape.pop()
        return tuple(shape)

    @property
    def float32_bytes(self) -> int:
        """Bytes of the volume once loaded as float32 (what the pipeline holds)."""
        return math.prod(self.shape) * self.components * 4


# ------------------------------------------------------------------------------------------------- the limit
def default_max_bytes() -> int:
    """An eighth of the memory this process may use (physical memory, or a smaller cgroup limit), at most 4 GiB.

    The limit is on one float32 copy of the volume; reading, preprocessing and inversion hold several at once.
    """
    memory = _memory_bytes()
    return min(memory // 8, DEFAULT_CAP) if memory else DEFAULT_CAP


def max_image_bytes(limit: int | str | None = None) -> int:
    """The size limit in bytes: ``limit`` if given, else ``$IC_MOE_MAX_IMAGE_BYTES``, else :func:`default_max_bytes`.

    ``limit`` and the variable take bytes or a size with a unit (``512M``, ``2G``, ``1.5GiB``).
    """
    if limit is None or limit == "":
        limit = os.environ.get(MAX_BYTES_ENV) or None
    return default_max_bytes() if limit is None else parse_bytes(limit)


def parse_bytes(value: int | float | str) -> int:
    """Bytes from ``1073741824``, ``1024M``, ``1G``, ``1.5 GiB`` (K, M, G, T are powers of 1024)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", str(value), flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"a size in bytes (e.g. 2G, 512M, 1073741824) is needed, got {value!r}.")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * 1024 ** " kmgt".index(unit or " "))
    if size <= 0:
        raise ValueError(f"a size in bytes must be positive, got {value!r}.")
    return size


def format_bytes(size: int) -> str:
    """``5.4 GiB``-style text."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def _memory_bytes() -> int:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (memory or 1 << 62):
            memory = int(text)
    return memory


# ------------------------------------------------------------------------------------------------- checks
def check_image_file(path: str | Path, max_bytes: int | str | None = None) -> ImageHeader:
    """Read the header of a NIfTI / NRRD / MetaImage file and check it; return what it claims.

    Args:
        path: the image file.
        max_bytes: the size limit of the volume as float32 (see :func:`max_image_bytes`).

    Raises:
        ImageError: the header cannot be read, or the image is too large, truncated, complex, multi-channel, 2D,
            a single slice, or 4D with several volumes.
    """
    header = read_image_header(path)
    _check_header(header, max_image_bytes(max_bytes))
    return header


def check_dicom_series(files: Sequence[str | Path], max_bytes: int | str | None = None) -> tuple[int, int, int]:
    """Check a DICOM series' size from its first file's header (Rows × Columns × NumberOfFrames × files).

    Discovery has checked that every file has the same matrix size. Returns the volume's shape ``(X, Y, Z)``.

    Raises:
        ImageError: the volume as float32 exceeds the limit, or its voxels have several samples (colour).
    """
    import pydicom

    if not files:
        raise ImageError("a DICOM series without files.")
    first = Path(files[0])
    try:
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
    except Exception as err:  # pydicom raises many types for broken headers
        raise ImageError(f"{first}: cannot read the DICOM header ({_one_line(err)}).") from err
    shape = (columns, rows, frames * len(files))
    where = f"DICOM series {first.parent} ({len(files)} files)"
    if samples != 1:
        raise ImageError(f"{where}: {samples} samples per pixel (colour); a single-channel volume is needed.")
    _check_size(where, shape, "as stored", math.prod(shape) * 4, max_image_bytes(max_bytes))
    return shape


def _check_header(header: ImageHeader, limit: int) -> None:
    where, shape = header.path, header.spatial_shape
    if header.component_kind == "complex" or np.dtype(header.dtype).kind == "c":
        raise ImageError(f"{where}: complex voxels ({header.dtype}); a real-valued volume is needed.")
    if header.components > 1:
        kind = f" ({header.component_kind})" if header.component_kind else ""
        raise ImageError(f"{where}: {header.components} values per voxel{kind}; a single-channel volume is needed.")
    if any(s <= 0 for s in shape):
        raise ImageError(f"{where}: an empty image of shape {_shape(shape)}.")
    if len(shape) < 3:
        raise ImageError(f"{where}: a {len(shape)}D image of shape {_shape(shape)}; a 3D volume is needed.")
    if len(shape) > 3:
        volumes = math.prod(shape[3:])
        raise ImageError(
            f"{where}: a {len(shape)}D image of shape {_shape(shape)} ({volumes} volumes); one 3D volume is needed."
        )
    if min(shape) < MIN_SIZE:
        what = "a single slice" if min(shape) == 1 else f"only {min(shape)} slices"
        raise ImageError(f"{where}: {what} (shape {_shape(shape)}); a volume needs at least {MIN_SIZE} voxels "
                         "along every axis.")  # fmt: skip
    _check_available(header)
    _check_size(where, shape, header.dtype, header.float32_bytes, limit)


def _check_size(where: object, shape: Sequence[int], dtype: str, float32_bytes: int, limit: int) -> None:
    if float32_bytes > limit:
        raise ImageError(
            f"{where}: the header claims {_shape(shape)} voxels ({dtype}), {format_bytes(float32_bytes)} as float32, "
            f"over the limit of {format_bytes(limit)} (set {MAX_BYTES_ENV} or the max image size option to raise it)."
        )


def _check_available(header: ImageHeader) -> None:
    """A file that cannot hold the voxel data its header claims is truncated, or its header lies."""
    if header.available_bytes is None:
        return
    capacity = header.available_bytes * (DEFLATE_MAX_RATIO if header.compressed else 1)
    if header.data_bytes > capacity:
        held = f"{header.available_bytes} {'compressed ' if header.compressed else ''}bytes"
        raise ImageError(
            f"{header.path}: truncated or forged header: it claims {_shape(header.shape)} {header.dtype} voxels "
            f"({header.data_bytes} bytes) but the file holds {held} of voxel data."
        )


def _shape(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape)


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[-1] if lines else type(err).__name__)[:200]


# ------------------------------------------------------------------------------------------------- headers
def read_image_header(path: str | Path) -> ImageHeader:
    """What a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``, ``.mhd``) header
    claims; no voxel is read.

    Raises:
        ImageError: the file cannot be opened or its header cannot be parsed.
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            return _nifti_header(path)
        if name.endswith((".nrrd", ".nhdr")):
            return _nrrd_header(path)
        if name.endswith((".mha", ".mhd")):
            return _meta_header(path)
    except ImageError:
        raise
    except Exception as err:  # broken headers raise many types
        raise ImageError(f"{path}: cannot read the image header ({_one_line(err)}).") from err
    raise ImageError(f"{path}: not a NIfTI, NRRD or MetaImage file.")


def _nifti_header(path: Path) -> ImageHeader:
    import nibabel as nib

    image = nib.load(str(path))  # reads the header only; the data stay on disk
    header = image.header
    dtype = header.get_data_dtype()
    shape = tuple(int(s) for s in header.get_data_shape())
    components, kind = 1, ""
    if dtype.names:  # RGB / RGBA voxels are structured dtypes
        components, kind = len(dtype.names), "RGB" if len(dtype.names) == 3 else "RGBA"
    intent = header.get("intent_code")
    if intent is not None and int(intent) in (1007, 1011, 2003, 2004) and len(shape) >= 5:  # vector / RGB intents
        components, kind = shape[4], "vector"
        shape = shape[:4]
    data_bytes = math.prod(shape) * components * dtype.itemsize
    offset = max(int(header.get_data_offset()), int(getattr(header, "sizeof_hdr", 348)) + 4)  # header + extension
    available = max(0, path.stat().st_size - offset) if not path.name.lower().endswith(".gz") else path.stat().st_size
    return ImageHeader(path=path, format="NIfTI", shape=shape, dtype=str(dtype if not dtype.names else "uint8"),
                       components=components, component_kind=kind, data_bytes=data_bytes,
                       available_bytes=available, compressed=path.name.lower().endswith(".gz"))  # fmt: skip


def _text_header(path: Path, terminator) -> tuple[dict[str, str], int, list[str]]:
    """``key → value`` of a text header, the byte length of the header and its lines."""
    with path.open("rb") as f:
        raw = f.read(HEADER_LIMIT)
    fields: dict[str, str] = {}
    lines: list[str] = []
    length = 0
    for line in raw.splitlines(keepends=True):
        length += len(line)
        text = line.decode("latin-1").strip()
        lines.append(text)
        if terminator(text, fields):
            return fields, length, lines
    if len(raw) == HEADER_LIMIT:
        raise ImageError(f"{path}: no end of the header in its first {HEADER_LIMIT} bytes.")
    return fields, length, lines


def _nrrd_header(path: Path) -> ImageHeader:
    def end(text: str, fields: dict[str, str]) -> bool:
        if not text:
            return True
        if not text.startswith("#") and ":" in text:
            key, value = text.split(":", 1)
            fields[key.strip().lower()] = value.lstrip("=").strip()
        return False

    with path.open("rb") as f:
        magic = f.read(8)
    if not magic.startswith(b"NRRD000"):
        raise ImageError(f"{path}: not a NRRD file (no NRRD magic line).")
    fields, header_length, _ = _text_header(path, end)
    if "sizes" not in fields or "type" not in fields:
        raise ImageError(f"{path}: NRRD header without sizes or type.")
    shape = tuple(int(s) for s in fields["sizes"].split())
    dtype = NRRD_DTYPES.get(fields["type"].lower())
    if dtype is None:
        raise ImageError(f"{path}: NRRD voxel type {fields['type']!r} is not supported.")
    kinds = fields.get("kinds", "").lower().split() or ["domain"] * len(shape)
    component_axes = [i for i, k in enumerate(kinds) if k not in NRRD_SPATIAL_KINDS]
    components = math.prod(shape[i] for i in component_axes) if component_axes else 1
    kind = kinds[component_axes[0]] if component_axes else ""
    spatial = tuple(s for i, s in enumerate(shape) if i not in component_axes)
    data_bytes = math.prod(shape) * np.dtype(dtype).itemsize
    encoding = fields.get("encoding", "raw").lower()
    compressed = encoding in ("gzip", "gz")
    data_file = fields.get("data file") or fields.get("datafile")
    available: int | None = None
    if encoding in ("raw", "gzip", "gz") and "byte skip" not in fields and "line skip" not in fields:
        if data_file is None:
            available = path.stat().st_size - header_length
        elif " " not in data_file and not data_file.startswith("LIST"):
            target = Path(data_file) if Path(data_file).is_absolute() else path.parent / data_file
            available = target.stat().st_size if target.is_file() else 0
    return ImageHeader(path=path, format="NRRD", shape=spatial, dtype=dtype, components=components,
                       component_kind=kind, data_bytes=data_bytes, available_bytes=available,
                       compressed=compressed)  # fmt: skip


def _meta_header(path: Path) -> ImageHeader:
    def end(text: str, fields: dict[str, str]) -> bool:
        if "=" in text:
            key, value = text.split("=", 1)
            fields[key.strip().lower()] = value.strip()
        return text.lower().replace(" ", "").startswith("elementdatafile=")

    fields, header_length, _ = _text_header(path, end)
    if "dimsize" not in fields or "elementtype" not in fields:
        raise ImageError(f"{path}: MetaImage header without DimSize or ElementType.")
    shape = tuple(int(s) for s in fields["dimsize"].split())
    dtype = META_DTYPES.get(fields["elementtype"].upper())
    if dtype is None:
        raise ImageError(f"{path}: MetaImage voxel type {fields['elementtype']!r} is not supported.")
    components = int(fields.get("elementnumberofchannels", "1") or 1)
    data_bytes = math.prod(shape) * components * np.dtype(dtype).itemsize
    compressed = fields.get("compresseddata", "false").lower() == "true"
    data_file = fields.get("elementdatafile", "LOCAL")
    available: int | None = None
    if int(fields.get("headersize", "0") or 0) == 0:
        if data_file.upper() == "LOCAL":
            available = path.stat().st_size - header_length
        elif " " not in data_file and not data_file.upper().startswith("LIST") and "%" not in data_file:
            target = Path(data_file) if Path(data_file).is_absolute() else path.parent / data_file
            available = target.stat().st_size if target.is_file() else 0
    return ImageHeader(path=path, format="MetaImage", shape=shape, dtype=dtype, components=components,
                       component_kind="channels" if components > 1 else "", data_bytes=data_bytes,
                       available_bytes=available, compressed=compressed)  # fmt: skip
