"""FITS images: exact values in, stacks summed, and every bad file or folder refused by name."""

from __future__ import annotations

import re

import numpy as np
import pytest
from astropy.io import fits

from holly_hpc.io.fits import (
    ImageFormatError,
    list_fits,
    read_fits_folder,
    read_fits_folders_by_sigma,
    read_fits_image,
)


def _write(path, data):
    fits.PrimaryHDU(np.asarray(data)).writeto(path)
    return path


def _image(size=8, seed=0):
    return np.random.default_rng(seed).uniform(0.1, 5.0, (size, size)).astype(np.float32)


def _folder(path, names, size=8, seed=0):
    path.mkdir()
    for i, name in enumerate(names):
        _write(path / name, _image(size, seed + i))
    return path


def _raises(path, reason):
    """pytest.raises for an ImageFormatError whose message names `path` and gives `reason`."""
    return pytest.raises(ImageFormatError, match=re.escape(str(path)) + ".*" + reason)


# --- one image -------------------------------------------------------------------------------------------


def test_float32_image_round_trips_exactly(tmp_path):
    image = _image(16)
    out = read_fits_image(_write(tmp_path / "a.fits", image))
    assert out.dtype == np.float32 and out.shape == (16, 16)
    np.testing.assert_array_equal(out, image)


def test_integer_and_big_endian_images_become_float32(tmp_path):
    counts = np.arange(1, 17, dtype=">i2").reshape(4, 4)
    out = read_fits_image(_write(tmp_path / "counts.fits", counts))
    assert out.dtype == np.float32 and out.dtype.isnative
    np.testing.assert_array_equal(out, np.arange(1, 17).reshape(4, 4))


def test_image_in_an_extension_when_the_primary_hdu_is_empty(tmp_path):
    image = _image(8)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image)]).writeto(tmp_path / "ext.fits")
    np.testing.assert_array_equal(read_fits_image(tmp_path / "ext.fits"), image)


def test_cube_is_summed_over_its_first_axis(tmp_path):
    cube = np.stack([_image(8, seed) for seed in range(5)])
    out = read_fits_image(_write(tmp_path / "stack.fits", cube))
    assert out.shape == (8, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out, cube.astype(np.float64).sum(axis=0).astype(np.float32))
    np.testing.assert_allclose(out[2, 3], sum(float(cube[k, 2, 3]) for k in range(5)), rtol=1e-6)


def _nan_image():
    image = _image(8)
    image[3, 4] = np.nan
    return image


def _inf_image():
    image = _image(8)
    image[0, 0] = np.inf
    return image


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (np.arange(1.0, 9.0), "expected a 2D image or a 3D stack, got 1D"),
        (np.ones((2, 2, 4, 4)), "expected a 2D image or a 3D stack, got 4D"),
        (_nan_image(), "1 NaN or infinite pixel"),
        (_inf_image(), "1 NaN or infinite pixel"),
        (np.zeros((8, 8)), "empty \\(every pixel is zero\\)"),
        (np.zeros((4, 8, 8)), "empty"),
    ],
    ids=["1d", "4d", "nan", "inf", "all-zero", "all-zero-cube"],
)
def test_unusable_image_data_is_refused_naming_the_file(tmp_path, data, reason):
    path = _write(tmp_path / "bad.fits", data)
    with _raises(path, reason):
        read_fits_image(path)


def test_sum_that_overflows_float32_is_refused(tmp_path):
    path = _write(tmp_path / "huge.fits", np.full((2, 4, 4), 3e38, dtype=np.float32))
    with _raises(path, "16 NaN or infinite"):
        read_fits_image(path)


@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_corrupt_truncated_missing_and_dataless_files_are_refused(tmp_path):
    good = _write(tmp_path / "good.fits", _image(8)).read_bytes()
    (tmp_path / "junk.fits").write_bytes(b"not a FITS file " * 300)
    (tmp_path / "empty.fits").write_bytes(b"")
    (tmp_path / "truncated.fits").write_bytes(good[: 2880 + 10])
    fits.HDUList(
        [fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=np.ones(3))])]
    ).writeto(tmp_path / "table.fits")
    for name, reason in [
        ("junk.fits", "cannot read FITS file"),
        ("empty.fits", "cannot read FITS file"),
        ("truncated.fits", "cannot read FITS file"),
        ("missing.fits", "cannot read FITS file"),
        ("table.fits", "no image data"),
    ]:
        with _raises(tmp_path / name, reason):
            read_fits_image(tmp_path / name)


# --- folders ---------------------------------------------------------------------------------------------


def test_list_fits_takes_every_fits_suffix_in_natural_order(tmp_path):
    _folder(tmp_path / "f", ["img10.fits", "img2.FITS", "img1.fit", "img3.fts"])
    (tmp_path / "f" / "notes.txt").write_text("not an image")
    (tmp_path / "f" / "sub.fits").mkdir()  # a folder is not a file, whatever its name
    assert [p.name for p in list_fits(tmp_path / "f")] == ["img1.fit", "img2.FITS", "img3.fts", "img10.fits"]


def test_list_fits_refuses_missing_and_fitsless_folders(tmp_path):
    with _raises(tmp_path / "nope", "no such folder"):
        list_fits(tmp_path / "nope")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    with _raises(tmp_path / "texts", "no FITS files"):
        list_fits(tmp_path / "texts")


def test_read_fits_folder_stacks_images_in_order(tmp_path):
    folder = _folder(tmp_path / "f", ["p0.fits", "p1.fits", "p2.fits"], size=8, seed=10)
    stack = read_fits_folder(folder, expected_shape=(8, 8))
    assert stack.shape == (3, 8, 8) and stack.dtype == np.float32
    for i in range(3):
        np.testing.assert_array_equal(stack[i], _image(8, 10 + i))


def test_read_fits_folder_names_the_first_image_of_another_size(tmp_path):
    folder = _folder(tmp_path / "f", ["a.fits", "b.fits"], size=8)
    _write(folder / "c.fits", _image(16))
    _write(folder / "d.fits", _image(4))
    with _raises(folder / "c.fits", r"image is 16x16 \(height x width\); expected 8x8 like a.fits"):
        read_fits_folder(folder)


def test_read_fits_folder_checks_the_expected_size(tmp_path):
    folder = _folder(tmp_path / "f", ["a.fits"], size=8)
    with _raises(folder / "a.fits", r"image is 8x8 \(height x width\); expected 32x32"):
        read_fits_folder(folder, expected_shape=(32, 32))


def test_non_square_images_are_read_and_checked_as_height_by_width(tmp_path):
    # HOLLy's --image-height/--image-width: non-square images are data, not errors.
    folder = tmp_path / "wide"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = [rng.random((8, 12)).astype(np.float32) + 0.1 for _ in range(2)]
    for i, image in enumerate(images):
        _write(folder / f"w{i}.fits", image)
    _write(folder / "w2.fits", np.stack([images[0], images[1]]))  # a stack of 8x12 frames, summed
    stack = read_fits_folder(folder, expected_shape=(8, 12))
    assert stack.shape == (3, 8, 12)
    np.testing.assert_allclose(stack[2], images[0] + images[1], rtol=1e-6)
    with _raises(folder / "w0.fits", r"image is 8x12 \(height x width\); expected 12x8"):
        read_fits_folder(folder, expected_shape=(12, 8))


def test_read_fits_folder_passes_on_a_bad_image_by_name(tmp_path):
    folder = _folder(tmp_path / "f", ["a.fits"])
    _write(folder / "b.fits", np.zeros((8, 8)))
    with _raises(folder / "b.fits", "empty"):
        read_fits_folder(folder)


# --- one folder per sigma ----------------------------------------------------------------------------------


def test_folders_by_sigma_read_every_folder_in_sigma_order(tmp_path):
    names = ["p1.fits", "p2.fits"]
    folders = {2.0: _folder(tmp_path / "s2", names, seed=20), 0.5: _folder(tmp_path / "s05", names, seed=5)}
    stacks = read_fits_folders_by_sigma(folders)
    assert list(stacks) == [0.5, 2.0]
    np.testing.assert_array_equal(stacks[0.5][1], _image(8, 6))
    np.testing.assert_array_equal(stacks[2.0][0], _image(8, 20))
    assert stacks[2.0].shape == (2, 8, 8)


def test_folders_by_sigma_need_the_same_number_of_files(tmp_path):
    a = _folder(tmp_path / "a", ["p1.fits", "p2.fits"])
    b = _folder(tmp_path / "b", ["p1.fits"])
    with pytest.raises(
        ImageFormatError, match=re.escape(f"{b} (sigma 2.0) and {a} (sigma 1.0) hold 1 and 2 FITS files")
    ):
        read_fits_folders_by_sigma({1.0: a, 2.0: b})


def test_folders_by_sigma_name_the_first_mismatching_file(tmp_path):
    a = _folder(tmp_path / "a", ["p1.fits", "p2.fits", "p3.fits"])
    b = _folder(tmp_path / "b", ["p1.fits", "q2.fits", "q3.fits"])
    with pytest.raises(ImageFormatError, match=re.escape(str(b)) + r".*first mismatch 'q2.fits' vs 'p2.fits'"):
        read_fits_folders_by_sigma({1.0: a, 2.0: b})


def test_folders_by_sigma_need_one_image_size(tmp_path):
    a = _folder(tmp_path / "a", ["p1.fits"], size=8)
    b = _folder(tmp_path / "b", ["p1.fits"], size=16)
    with pytest.raises(
        ImageFormatError, match=re.escape(f"{b} (sigma 3.0): images are 16x16, but those of {a} (sigma 1.0) are 8x8")
    ):
        read_fits_folders_by_sigma({3.0: b, 1.0: a})


def test_folders_by_sigma_refuse_an_empty_mapping_and_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no folders given"):
        read_fits_folders_by_sigma({})
    a = _folder(tmp_path / "a", ["p1.fits"])
    with _raises(tmp_path / "gone", "no such folder"):
        read_fits_folders_by_sigma({1.0: a, 2.0: tmp_path / "gone"})
