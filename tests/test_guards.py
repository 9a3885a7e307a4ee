"""Header guards: tiny hostile files are refused from their header, before any voxel is read, with one clear line."""

from __future__ import annotations

import gzip
import os
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ic_moe_monai.io import ImageError, check_dicom_series, check_image_file, max_image_bytes, read_image_file
from ic_moe_monai.io.guards import MAX_BYTES_ENV, default_max_bytes, parse_bytes

from .helpers import write_dicom_series

BOMB_SHAPE = (1200, 1200, 1000)  # 5.4 GiB as float32


def _nifti_header_only(path: Path, shape, dtype=np.float32, compress: bool = False) -> Path:
    """A NIfTI file holding its header and no voxels (what a memory-bomb upload looks like)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    block = header.binaryblock + b"\x00" * 4  # the 4 extension bytes before vox_offset 352
    path.write_bytes(gzip.compress(block) if compress else block)
    return path


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_memory_bomb_nifti_is_refused_from_its_header_without_allocating(tmp_path, compress):
    path = _nifti_header_only(tmp_path / ("bomb.nii.gz" if compress else "bomb.nii"), BOMB_SHAPE, compress=compress)
    assert path.stat().st_size < 400
    tracemalloc.start()
    with pytest.raises(ImageError) as err:
        check_image_file(path, max_bytes="64G")  # a limit the bomb fits in: the file cannot hold its claim
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak
    message = str(err.value)
    assert str(path) in message and "1200×1200×1000" in message and "float32" in message
    assert "truncated or forged header" in message and "\n" not in message
    with pytest.raises(ImageError, match="truncated or forged header"):
        read_image_file(path)  # the reader checks first


def test_size_limit_names_shape_dtype_bytes_and_limit(tmp_path, monkeypatch):
    path = _nifti(tmp_path / "big.nii.gz", np.zeros((64, 64, 64), dtype=np.int16))
    with pytest.raises(ImageError) as err:
        check_image_file(path, max_bytes=512 << 10)
    assert str(err.value) == (
        f"{path}: the header claims 64×64×64 voxels (int16), 1.0 MiB as float32, over the limit of 512.0 KiB "
        f"(set {MAX_BYTES_ENV} or the max image size option to raise it)."
    )
    monkeypatch.setenv(MAX_BYTES_ENV, "512K")
    with pytest.raises(ImageError, match=r"over the limit of 512\.0 KiB"):
        check_image_file(path)
    monkeypatch.setenv(MAX_BYTES_ENV, "2M")
    assert check_image_file(path).spatial_shape == (64, 64, 64)


def test_limit_parsing_and_default():
    assert parse_bytes("2G") == 2 << 30 and parse_bytes("512 MiB") == 512 << 20 and parse_bytes(1000) == 1000
    assert parse_bytes("1.5g") == 3 << 29
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    assert 0 < default_max_bytes() <= 4 << 30
    assert max_image_bytes("3G") == 3 << 30


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((64, 64), np.float32, "a 2D image of shape 64×64; a 3D volume is needed"),
        ((64, 64, 1), np.float32, "a single slice (shape 64×64×1)"),
        ((1, 64, 64), np.int16, "a single slice (shape 1×64×64)"),
        ((64, 64, 2), np.int16, "only 2 slices"),
        ((16, 16, 16, 3), np.float32, "a 4D image of shape 16×16×16×3 (3 volumes); one 3D volume is needed"),
        ((16, 16, 16), np.complex64, "complex voxels (complex64); a real-valued volume is needed"),
    ],
)
def test_unusable_nifti_headers_are_refused(tmp_path, shape, dtype, message):
    path = _nifti(tmp_path / "x.nii.gz", np.zeros(shape, dtype=dtype))
    with pytest.raises(ImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_image_file(path)


def test_rgb_nifti_and_single_volume_4d(tmp_path):
    rgb = np.zeros((16, 16, 16), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(ImageError, match=r"3 values per voxel \(RGB\)"):
        check_image_file(_nifti(tmp_path / "rgb.nii", rgb))
    one_volume = _nifti(tmp_path / "t1.nii.gz", np.ones((8, 9, 10, 1), dtype=np.float32))
    assert check_image_file(one_volume).spatial_shape == (8, 9, 10)
    assert tuple(read_image_file(one_volume).shape) == (8, 9, 10)


def test_truncated_uncompressed_nifti(tmp_path):
    path = _nifti(tmp_path / "cut.nii", np.ones((16, 16, 16), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ImageError, match=r"cut.nii: truncated or forged header: .* \(16384 bytes\) but the file "
                                         r"holds 4648 bytes"):  # fmt: skip
        check_image_file(path)


def test_truncated_gzip_nifti_fails_at_read_with_one_line(tmp_path):
    path = _nifti(tmp_path / "cut.nii.gz", np.random.default_rng(0).random((32, 32, 32)).astype(np.float32))
    path.write_bytes(path.read_bytes()[:20000])
    check_image_file(path)  # the header is fine and 20 kB of deflate could hold 128 kB
    with pytest.raises(ImageError, match=r"cut.nii.gz: cannot read the image \(") as err:
        read_image_file(path)
    assert "\n" not in str(err.value)


def test_not_an_image_and_unknown_suffix(tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ImageError, match=r"junk.nii.gz: cannot read the image header"):
        check_image_file(tmp_path / "junk.nii.gz")
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(ImageError, match="not a NIfTI, NRRD or MetaImage file"):
        check_image_file(tmp_path / "x.png")


def test_nrrd_headers(tmp_path):
    bomb = tmp_path / "bomb.nrrd"
    bomb.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 1200 1200 1000\nencoding: gzip\n\n" + b"\x1f\x8b")
    with pytest.raises(ImageError, match=r"bomb.nrrd: truncated or forged header: it claims 1200×1200×1000 float32"):
        check_image_file(bomb, max_bytes="64G")
    bz2 = tmp_path / "bomb_bz2.nrrd"  # bzip2 has no bounded ratio: the size limit answers
    bz2.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 1200 1200 1000\nencoding: bzip2\n\nBZh")
    with pytest.raises(ImageError, match=r"bomb_bz2.nrrd: the header claims 1200×1200×1000 voxels \(float32\), 5.4 "):
        check_image_file(bz2, max_bytes="1G")
    complex_ = tmp_path / "complex.nrrd"
    complex_.write_bytes(b"NRRD0004\ntype: double\ndimension: 4\nsizes: 2 8 8 8\nkinds: complex domain domain "
                         b"domain\nencoding: raw\n\n" + bytes(2 * 8 * 8 * 8 * 8))  # fmt: skip
    with pytest.raises(ImageError, match="complex voxels"):
        check_image_file(complex_)
    flat = tmp_path / "flat.nrrd"
    flat.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 1\nencoding: raw\n\n" + bytes(128))
    with pytest.raises(ImageError, match="a single slice"):
        check_image_file(flat)
    good = tmp_path / "good.nrrd"
    good.write_bytes(b"NRRD0004\n# comment\ntype: short\ndimension: 3\nsizes: 4 5 6\nencoding: raw\n\n" + bytes(240))
    header = check_image_file(good)
    assert header.spatial_shape == (4, 5, 6) and header.dtype == "int16"


def test_metaimage_headers(tmp_path):
    bomb = tmp_path / "bomb.mha"
    bomb.write_text("ObjectType = Image\nNDims = 3\nDimSize = 1200 1200 1000\nElementType = MET_FLOAT\n"
                    "ElementDataFile = LOCAL\n")  # fmt: skip
    with pytest.raises(ImageError, match=r"bomb.mha: truncated or forged header: .* but the file holds 0 bytes"):
        check_image_file(bomb, max_bytes="64G")
    rgb = tmp_path / "rgb.mhd"
    rgb.write_text("NDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\nElementNumberOfChannels = 3\n"
                   "ElementDataFile = rgb.raw\n")  # fmt: skip
    (tmp_path / "rgb.raw").write_bytes(bytes(8 * 8 * 8 * 3))
    with pytest.raises(ImageError, match="3 values per voxel"):
        check_image_file(rgb)
    four = tmp_path / "four.mha"
    four.write_bytes(b"NDims = 4\nDimSize = 8 8 8 2\nElementType = MET_SHORT\nElementDataFile = LOCAL\n" + bytes(2048))
    with pytest.raises(ImageError, match=r"a 4D image of shape 8×8×8×2 \(2 volumes\)"):
        check_image_file(four)


def test_dicom_series_size_from_headers(tmp_path):
    files = write_dicom_series(tmp_path / "s", np.zeros((4, 10, 12), dtype=np.int16))
    assert check_dicom_series(files) == (12, 10, 4)
    with pytest.raises(ImageError, match=r"DICOM series .* \(4 files\): the header claims 12×10×4 voxels"):
        check_dicom_series(files, max_bytes=1000)


def test_non_utf8_file_names_are_read(tmp_path):
    """ITK's wrapping refuses such paths; NRRD and MetaImage go through an ASCII link, NIfTI through nibabel."""
    import itk

    folder = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9"))
    folder.mkdir()
    data = np.random.default_rng(1).random((5, 6, 7)).astype(np.float32)
    _nifti(folder / "x\udce9.nii.gz", data)
    for suffix in (".nrrd", ".mha"):
        itk.imwrite(itk.image_from_array(np.ascontiguousarray(data.T)), str(tmp_path / f"ascii{suffix}"))
        os.replace(tmp_path / f"ascii{suffix}", folder / f"x\udce9{suffix}")
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        path = folder / f"x\udce9{suffix}"
        image = read_image_file(path)
        assert tuple(image.shape) == (5, 6, 7), suffix
        np.testing.assert_array_equal(np.asarray(image), data)
        assert image.meta["filename_or_obj"] == str(path)
