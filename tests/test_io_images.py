"""Image collections: exact pixels in their own dtype, labels from folders and CSVs, bad files refused or
skipped by name, and zarr / OME-Zarr items read one at a time."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from holly_hpc.io.images import (
    BadFile,
    BadImageWarning,
    FolderCollection,
    ImageCollection,
    ImageFormatError,
    OmeZarrCollection,
    ZarrCollection,
    open_collection,
    write_ome_zarr,
)


def _raises(where, reason):
    """pytest.raises for an ImageFormatError whose message names `where` and gives `reason`."""
    return pytest.raises(ImageFormatError, match=re.escape(str(where)) + ".*" + reason)


def _u16(shape, seed=0):
    # Values well above 255, so that a reader squeezing 16 bits into 8 would show.
    return np.random.default_rng(seed).integers(300, 65535, shape, dtype=np.uint16)


def _u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _tif(path, data, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, **kwargs)
    return path


def _png(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data).save(path)
    return path


def _gray_folder(root, names, size=(6, 7)):
    for i, name in enumerate(names):
        _tif(root / name, _u16(size, seed=i))
    return root


# --- TIFF and PNG files ------------------------------------------------------------------------------------


def test_16bit_single_page_tiff_keeps_its_values_and_dtype(tmp_path):
    image = _u16((9, 11))
    _tif(tmp_path / "a.tif", image)
    images = FolderCollection(tmp_path)
    assert isinstance(images, ImageCollection)
    assert (len(images), images.channels, images.shape_hw, images.ids, images.labels, images.bad) == (
        1,
        1,
        (9, 11),
        ["a.tif"],
        [None],
        [],
    )
    out = images.read(0)
    assert out.dtype == np.uint16 and out.shape == (1, 9, 11) and out.max() > 255
    np.testing.assert_array_equal(out[0], image)


def test_16bit_multipage_tiff_pages_become_channels(tmp_path):
    stack = _u16((3, 8, 5))
    _tif(tmp_path / "stack.tiff", stack, photometric="minisblack")
    images = FolderCollection(tmp_path)
    assert images.channels == 3
    out = images.read(0)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, stack)


def test_rgb_tiff_samples_become_channels_interleaved_or_planar(tmp_path):
    rgb = _u8((8, 5, 3))
    _tif(tmp_path / "a_interleaved.tif", rgb, photometric="rgb")
    _tif(tmp_path / "b_planar.tif", rgb.transpose(2, 0, 1), photometric="rgb", planarconfig="separate")
    images = FolderCollection(tmp_path)
    assert images.channels == 3 and images.shape_hw == (8, 5)
    for i in range(2):
        out = images.read(i)
        assert out.dtype == np.uint8 and out.shape == (3, 8, 5)
        np.testing.assert_array_equal(out, rgb.transpose(2, 0, 1))


def test_float32_tiff_stays_float32(tmp_path):
    image = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    _tif(tmp_path / "f.tif", image)
    out = FolderCollection(tmp_path).read(0)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], image)


@pytest.mark.parametrize(
    ("data", "mode", "channels", "dtype"),
    [
        (_u8((5, 7)), "L", 1, np.uint8),
        (_u16((5, 7)), "I;16", 1, np.uint16),
        (_u8((5, 7, 3)), "RGB", 3, np.uint8),
        (_u8((5, 7, 4)), "RGBA", 4, np.uint8),
        (_u8((5, 7, 2)), "LA", 2, np.uint8),
    ],
    ids=["gray8", "gray16", "rgb", "rgba", "gray-alpha"],
)
def test_png_modes_give_their_channels_in_their_dtype(tmp_path, data, mode, channels, dtype):
    _png(tmp_path / "a.png", data)
    with Image.open(tmp_path / "a.png") as image:
        assert image.mode == mode  # the file really is what the test claims
    images = FolderCollection(tmp_path)
    out = images.read(0)
    assert images.channels == channels and out.shape == (channels, 5, 7) and out.dtype == dtype
    np.testing.assert_array_equal(out, data.reshape(5, 7, -1).transpose(2, 0, 1))


def test_palette_png_gives_the_luminance_of_its_colours(tmp_path):
    gray = np.array([[0, 100, 200], [50, 150, 250]], dtype=np.uint8)
    Image.fromarray(gray).convert("P").save(tmp_path / "p.png")
    out = FolderCollection(tmp_path).read(0)
    assert out.shape == (1, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], np.asarray(Image.open(tmp_path / "p.png").convert("L")))


def test_files_are_found_recursively_in_natural_order(tmp_path):
    for name in ["img10.tif", "img2.TIF", "sub/img1.png", "sub2/x/img3.tiff"]:
        if name.endswith(".png"):
            _png(tmp_path / name, _u8((4, 4)))
        else:
            _tif(tmp_path / name, _u16((4, 4)))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._img3.tif").write_bytes(b"macOS resource fork")  # hidden: not an image
    _tif(tmp_path / ".cache" / "old.tif", _u16((4, 4)))
    images = FolderCollection(tmp_path)
    assert images.ids == ["img2.TIF", "img10.tif", "sub/img1.png", "sub2/x/img3.tiff"]
    assert images.read(-1).shape == (1, 4, 4)


def test_only_the_asked_extensions_are_taken(tmp_path):
    _tif(tmp_path / "a.tif", _u16((4, 4)))
    _png(tmp_path / "b.png", _u8((4, 4)))
    assert FolderCollection(tmp_path, extensions=["png"]).ids == ["b.png"]


def test_mixed_sizes_give_no_common_shape(tmp_path):
    _tif(tmp_path / "a.tif", _u16((4, 4)))
    _tif(tmp_path / "b.tif", _u16((4, 5)))
    images = FolderCollection(tmp_path)
    assert images.shape_hw is None
    assert [images.read(i).shape for i in range(2)] == [(1, 4, 4), (1, 4, 5)]


def test_4d_tiff_is_refused_naming_the_file_and_its_shape(tmp_path):
    path = _tif(tmp_path / "hyper.tif", _u16((2, 3, 4, 5)), photometric="minisblack")
    with _raises(path, re.escape("shape (2, 3, 4, 5)")):
        FolderCollection(tmp_path)


def test_missing_empty_and_non_folder_roots_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        FolderCollection(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with _raises(tmp_path / "empty", "no image files"):
        FolderCollection(tmp_path / "empty")
    with _raises(tmp_path / "empty" / "a.txt", "not a folder"):
        FolderCollection(tmp_path / "empty" / "a.txt")


def test_bad_options_are_refused(tmp_path):
    _gray_folder(tmp_path, ["a.tif"])
    with pytest.raises(ValueError, match="on_bad"):
        FolderCollection(tmp_path, on_bad="ignore")
    with pytest.raises(ValueError, match="channels"):
        FolderCollection(tmp_path, channels=0)
    with pytest.raises(ValueError, match="labels must be"):
        FolderCollection(tmp_path, labels="folder")


def test_read_refuses_an_index_out_of_range(tmp_path):
    images = FolderCollection(_gray_folder(tmp_path, ["a.tif", "b.tif"]))
    np.testing.assert_array_equal(images.read(np.int64(-2)), images.read(0))
    with pytest.raises(IndexError, match="item 2 out of range"):
        images.read(2)


def test_folder_collection_survives_pickling(tmp_path):
    images = FolderCollection(_gray_folder(tmp_path, ["a.tif", "b.tif"]))
    again = pickle.loads(pickle.dumps(images))  # DataLoader workers get a pickled copy
    np.testing.assert_array_equal(again.read(1), images.read(1))


# --- bad files ---------------------------------------------------------------------------------------------


def _folder_with_bad_files(root):
    _gray_folder(root, ["a.tif", "d.tif"])
    (root / "b_garbage.tif").write_bytes(b"this is not a TIFF file" * 20)
    _png(root / "c_rgb.png", _u8((6, 7, 3)))
    return root


def test_bad_files_stop_the_collection_by_name_under_fail(tmp_path):
    root = _folder_with_bad_files(tmp_path)
    with _raises(root / "b_garbage.tif", "cannot open as a TIFF file"):
        FolderCollection(root)
    (root / "b_garbage.tif").unlink()
    with _raises(root / "c_rgb.png", "has 3 channel\\(s\\); expected 1, like a.tif, the first usable image"):
        FolderCollection(root)
    with _raises(root / "a.tif", "has 1 channel\\(s\\); expected 3, as asked by channels"):
        FolderCollection(root, channels=3)


def test_bad_files_are_recorded_and_left_out_under_skip(tmp_path):
    root = _folder_with_bad_files(tmp_path)
    with pytest.warns(BadImageWarning, match="skipped 2 .*b_garbage.tif.*c_rgb.png"):
        images = FolderCollection(root, on_bad="skip")
    assert images.ids == ["a.tif", "d.tif"] and images.channels == 1
    assert [b.path for b in images.bad] == [str(root / "b_garbage.tif"), str(root / "c_rgb.png")]
    assert all(isinstance(b, BadFile) for b in images.bad)
    assert "cannot open as a TIFF file" in images.bad[0].reason and "3 channel(s)" in images.bad[1].reason
    np.testing.assert_array_equal(images.read(1)[0], _u16((6, 7), seed=1))


def test_a_collection_with_no_usable_file_is_refused_even_under_skip(tmp_path):
    (tmp_path / "x.tif").write_bytes(b"junk")
    with _raises(tmp_path, "none of its 1 image file\\(s\\) is usable .*x.tif: cannot open as a TIFF"):
        FolderCollection(tmp_path, on_bad="skip")


def test_truncated_files_fail_when_read_naming_the_file_and_item(tmp_path):
    full = _tif(tmp_path / "full.tif", _u16((64, 64))).read_bytes()
    (tmp_path / "cut.tif").write_bytes(full[: len(full) // 2])  # header and IFD intact, pixels cut
    png = _png(tmp_path / "png" / "full.png", _u16((64, 64), seed=3)).read_bytes()
    (tmp_path / "png" / "cut.png").write_bytes(png[: len(png) // 2])
    images = FolderCollection(tmp_path)  # headers are fine: the damage shows only when decoding
    assert images.ids == ["cut.tif", "full.tif", "png/cut.png", "png/full.png"]
    with _raises(tmp_path / "cut.tif", re.escape("(item 0): cannot decode TIFF data")):
        images.read(0)
    with _raises(tmp_path / "png" / "cut.png", re.escape("(item 2): cannot decode image data")):
        images.read(2)
    assert images.read(3).dtype == np.uint16


# --- labels ----------------------------------------------------------------------------------------------------


def test_labels_from_first_level_folders(tmp_path):
    _gray_folder(tmp_path, ["cat/a.tif", "dog/b.tif", "dog/deep/c.tif"])
    images = FolderCollection(tmp_path, labels="folders")
    assert images.labels == ["cat", "dog", "dog"]


def test_labels_from_folders_need_every_image_in_a_subfolder(tmp_path):
    _gray_folder(tmp_path, ["cat/a.tif", "loose.tif"])
    with _raises(tmp_path / "loose.tif", "labels: folders needs every image in a subfolder"):
        FolderCollection(tmp_path, labels="folders")
    with pytest.warns(BadImageWarning, match="loose.tif"):
        images = FolderCollection(tmp_path, labels="folders", on_bad="skip")
    assert images.ids == ["cat/a.tif"] and images.bad[0].path == str(tmp_path / "loose.tif")


def _csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_labels_from_a_csv(tmp_path):
    root = _gray_folder(tmp_path / "imgs", ["a.tif", "b.tif", "sub/c.tif"])
    # A byte-order mark, './' prefixes, padding, extra columns and an empty (unlabelled) label all pass.
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        "\ufefffile, label ,note\n./sub/c.tif,mitotic,x\n a.tif ,interphase,\n\nb.tif,,\n", encoding="utf-8"
    )
    images = FolderCollection(root, labels=str(csv_path))
    assert images.ids == ["a.tif", "b.tif", "sub/c.tif"]
    assert images.labels == ["interphase", None, "mitotic"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("file,label\na.tif,x\nzz.tif,y\n", "line 3: 'zz.tif': no such file under"),
        ("file,label\na.tif,x\nb.tif,y\n./a.tif,z\n", "line 4: './a.tif' is listed again \\(first on line 2\\)"),
        ("file,label\na.tif,x\n,y\n", "line 3: the 'file' column is empty"),
        ("file,label\nnotes.txt,x\n", "line 2: 'notes.txt': not among the image files found"),
        ("name,label\na.tif,x\n", "needs a header row with columns 'file' and 'label'; found \\['name', 'label'\\]"),
        ("", "found no header row"),
    ],
    ids=["missing-file", "duplicate", "empty-file", "not-an-image", "missing-column", "empty-csv"],
)
def test_csv_errors_name_the_csv_and_its_line(tmp_path, text, reason):
    root = _gray_folder(tmp_path / "imgs", ["a.tif", "b.tif"])
    (root / "notes.txt").write_text("x")
    csv_path = _csv(tmp_path / "labels.csv", text)
    for on_bad in ("fail", "skip"):  # the CSV is at fault, not an image: skipping does not help
        with _raises(csv_path, reason):
            FolderCollection(root, labels=str(csv_path), on_bad=on_bad)


def test_image_without_a_csv_row_fails_or_is_skipped(tmp_path):
    root = _gray_folder(tmp_path / "imgs", ["a.tif", "b.tif", "c.tif"])
    csv_path = _csv(tmp_path / "labels.csv", "file,label\na.tif,x\nc.tif,z\n")
    with _raises(root / "b.tif", "no row for this image in the labels CSV " + re.escape(str(csv_path))):
        FolderCollection(root, labels=csv_path)
    with pytest.warns(BadImageWarning, match="b.tif"):
        images = FolderCollection(root, labels=csv_path, on_bad="skip")
    assert images.ids == ["a.tif", "c.tif"] and images.labels == ["x", "z"]
    assert images.bad == [BadFile(str(root / "b.tif"), f"no row for this image in the labels CSV {csv_path}")]
    np.testing.assert_array_equal(images.read(1)[0], _u16((6, 7), seed=2))


def test_a_csv_row_for_a_bad_file_is_not_a_csv_error(tmp_path):
    root = _gray_folder(tmp_path / "imgs", ["a.tif"])
    (root / "b.tif").write_bytes(b"junk")
    csv_path = _csv(tmp_path / "labels.csv", "file,label\na.tif,x\nb.tif,y\n")
    with pytest.warns(BadImageWarning):
        images = FolderCollection(root, labels=csv_path, on_bad="skip")
    assert images.labels == ["x"] and images.bad[0].path == str(root / "b.tif")


def test_missing_csv_is_refused_by_name(tmp_path):
    root = _gray_folder(tmp_path / "imgs", ["a.tif"])
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gone.csv"))):
        FolderCollection(root, labels=str(tmp_path / "gone.csv"))


# --- zarr arrays ---------------------------------------------------------------------------------------


def _corrupt_chunks(array_dir, keep):
    """Overwrite with junk every chunk file of a zarr array (v2 or v3 keys) whose index `keep` refuses."""
    corrupted = 0
    for path in array_dir.rglob("*"):
        if path.is_file() and path.name not in ("zarr.json", ".zarray", ".zattrs"):
            key = path.relative_to(array_dir).as_posix().removeprefix("c/")
            if not keep(tuple(int(p) for p in re.split(r"[/.]", key))):
                path.write_bytes(b"not a compressed chunk")
                corrupted += 1
    return corrupted


def test_zarr_nchw_with_string_labels(tmp_path):
    data = _u16((5, 2, 6, 7))
    group = zarr.open_group(str(tmp_path / "cells.zarr"), mode="w")
    group.create_array("images", data=data, chunks=(1, 2, 6, 7))
    group.create_array("kinds", shape=(5,), dtype=str)[:] = np.array(list("abcab"))
    images = ZarrCollection(tmp_path / "cells.zarr", labels_array="kinds")
    assert (len(images), images.channels, images.shape_hw, images.bad) == (5, 2, (6, 7), [])
    assert images.ids[3] == "cells.zarr/images[3]" and images.labels == list("abcab")
    out = images.read(3)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, data[3])


def test_zarr_v2_nhw_with_integer_labels_and_ids(tmp_path):
    data = _u8((3, 4, 5))
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=2)
    group.create_array("x", data=data, chunks=(1, 4, 5))
    group.create_array("y", data=np.array([7, 0, 7]))
    group.create_array("names", shape=(3,), dtype=str)[:] = np.array(["p", "q", "r"])
    images = ZarrCollection(tmp_path / "s.zarr", array="x", labels_array="y", ids_array="names")
    assert images.channels == 1 and images.labels == ["7", "0", "7"] and images.ids == ["p", "q", "r"]
    np.testing.assert_array_equal(images.read(2), data[2][None])


def test_zarr_errors_name_the_store_and_key(tmp_path):
    store = tmp_path / "s.zarr"
    group = zarr.open_group(str(store), mode="w")
    group.create_array("flat", data=np.zeros((4, 4)))
    group.create_array("images", data=np.zeros((3, 4, 4)))
    group.create_array("short", data=np.array([1, 2]))
    group.create_array("floats", data=np.array([1.0, 2.0, 3.0]))
    with _raises(store, "no array 'imgs' in this zarr group; its arrays: \\['flat', 'floats', 'images', 'short'\\]"):
        ZarrCollection(store, array="imgs")
    with _raises(store, "array 'flat' has shape \\(4, 4\\); expected \\(N, C, H, W\\) or \\(N, H, W\\)"):
        ZarrCollection(store, array="flat")
    with _raises(store, "labels array 'short' has shape \\(2,\\); expected \\(3,\\)"):
        ZarrCollection(store, labels_array="short")
    with _raises(store, "labels array 'floats' has dtype float64"):
        ZarrCollection(store, labels_array="floats")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gone.zarr"))):
        ZarrCollection(tmp_path / "gone.zarr")
    (tmp_path / "plain").mkdir()
    with _raises(tmp_path / "plain", "cannot open as a zarr group"):
        ZarrCollection(tmp_path / "plain")


def test_zarr_read_touches_only_the_chunks_of_its_item(tmp_path):
    data = _u16((6, 2, 5, 5))
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.create_array("images", data=data, chunks=(1, 1, 5, 5))
    images = ZarrCollection(tmp_path / "s.zarr")
    assert _corrupt_chunks(tmp_path / "s.zarr" / "images", keep=lambda idx: idx[0] == 4) == 10
    np.testing.assert_array_equal(images.read(4), data[4])
    with _raises(tmp_path / "s.zarr", re.escape("cannot read item 1 (s.zarr/images[1])")):
        images.read(1)  # proves the corruption would have been seen


def test_zarr_collection_survives_pickling(tmp_path):
    data = _u8((2, 3, 3))
    zarr.open_group(str(tmp_path / "s.zarr"), mode="w").create_array("images", data=data)
    again = pickle.loads(pickle.dumps(ZarrCollection(tmp_path / "s.zarr")))
    np.testing.assert_array_equal(again.read(1)[0], data[1])


# --- OME-Zarr ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize(
    ("axes", "shape"),
    [("tczyx", (2, 3, 2, 20, 18)), ("cyx", (3, 20, 18)), ("zyx", (2, 17, 16))],
)
def test_ome_zarr_tiles_equal_the_source_slices(tmp_path, version, axes, shape):
    data = _u16(shape)
    store = write_ome_zarr(
        tmp_path / "img.zarr", data, axes=axes, version=version, chunks=(1,) * (len(axes) - 2) + (5, 5)
    )
    assert zarr.open_group(str(store), mode="r").metadata.zarr_format == (2 if version == "0.4" else 3)
    tiles = OmeZarrCollection(store, tile=8)
    # The source as t, c, z, y, x, to compare every layout the same way.
    full = {"tczyx": data, "cyx": data[None, :, None], "zyx": data[None, None]}[axes]
    n_t, n_c, n_z = full.shape[:3]
    n_y, n_x = full.shape[3] // 8, full.shape[4] // 8
    assert len(tiles) == n_t * n_z * n_y * n_x and tiles.channels == n_c and tiles.shape_hw == (8, 8)
    assert tiles.labels == [None] * len(tiles) and tiles.bad == []
    i = 0
    for t in range(n_t):
        for z in range(n_z):
            for y0 in range(0, n_y * 8, 8):
                for x0 in range(0, n_x * 8, 8):
                    assert tiles.ids[i] == f"img.zarr/0/t{t}z{z}y{y0}x{x0}"
                    out = tiles.read(i)
                    assert out.dtype == np.uint16
                    np.testing.assert_array_equal(out, full[t, :, z, y0 : y0 + 8, x0 : x0 + 8])
                    i += 1


def test_ome_zarr_writer_metadata(tmp_path):
    data = _u8((2, 8, 12))
    v4 = zarr.open_group(str(write_ome_zarr(tmp_path / "a.zarr", data, levels=2)), mode="r").attrs.asdict()
    v5 = zarr.open_group(str(write_ome_zarr(tmp_path / "b.zarr", data, version="0.5")), mode="r").attrs.asdict()
    ms4, ms5 = v4["multiscales"][0], v5["ome"]["multiscales"][0]
    assert ms4["version"] == "0.4" and v5["ome"]["version"] == "0.5"
    assert [a["name"] for a in ms4["axes"]] == ["c", "y", "x"] and ms4["axes"][0]["type"] == "channel"
    assert [d["coordinateTransformations"][0]["scale"] for d in ms4["datasets"]] == [[1, 1, 1], [1, 2, 2]]
    assert [d["path"] for d in ms5["datasets"]] == ["0"]
    with pytest.raises(FileExistsError):
        write_ome_zarr(tmp_path / "a.zarr", data)
    with pytest.raises(ValueError, match="axes 'ycx'"):
        write_ome_zarr(tmp_path / "c.zarr", data, axes="ycx")


def test_ome_zarr_lower_level_and_channel_selection(tmp_path):
    data = _u16((3, 16, 24))
    store = write_ome_zarr(tmp_path / "img.zarr", data, version="0.5", levels=2)
    tiles = OmeZarrCollection(store, tile=4, level=1, channels=[2, 0])
    assert len(tiles) == 2 * 3 and tiles.channels == 2 and tiles.ids[4] == "img.zarr/1/t0z0y4x4"
    half = np.rint(data.reshape(3, 8, 2, 12, 2).mean(axis=(2, 4))).astype(np.uint16)
    np.testing.assert_array_equal(tiles.read(4), half[[2, 0], 4:8, 4:8])


def test_ome_zarr_refusals_name_the_store(tmp_path):
    store = write_ome_zarr(tmp_path / "img.zarr", _u8((2, 20, 18)))
    with _raises(store, "level 0 image is 20x18 \\(height x width\\), smaller than the 32x32 tile"):
        OmeZarrCollection(store, tile=32)
    with _raises(store, "channel 2 asked, but the image has 2 channel"):
        OmeZarrCollection(store, tile=8, channels=[2])
    with _raises(store, "level 1 asked, but the multiscales metadata lists 1 level"):
        OmeZarrCollection(store, tile=8, level=1)
    with pytest.raises(ValueError, match="tile must be a positive integer"):
        OmeZarrCollection(store, tile=0)
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    plain.create_array("0", data=np.zeros((4, 4)))
    with _raises(tmp_path / "plain.zarr", "no OME-NGFF multiscales metadata"):
        OmeZarrCollection(tmp_path / "plain.zarr", tile=2)
    plain.update_attributes({"multiscales": [{"axes": ["x", "y"], "datasets": [{"path": "0"}]}]})
    with _raises(tmp_path / "plain.zarr", "axes \\['x', 'y'\\]; expected .* with y and x last"):
        OmeZarrCollection(tmp_path / "plain.zarr", tile=2)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_read_touches_only_the_chunks_of_its_tile(tmp_path, version):
    data = _u16((2, 16, 16))
    store = write_ome_zarr(tmp_path / "img.zarr", data, version=version, chunks=(1, 8, 8))
    tiles = OmeZarrCollection(store, tile=8, channels=[1])
    # Tile 3 is rows 8:16, columns 8:16; keep only the channel-1 chunk there.
    assert _corrupt_chunks(store / "0", keep=lambda idx: idx == (1, 1, 1)) == 7
    np.testing.assert_array_equal(tiles.read(3), data[1:2, 8:16, 8:16])
    with _raises(store, re.escape("cannot read tile 0 (img.zarr/0/t0z0y0x0)")):
        tiles.read(0)


# --- open_collection ---------------------------------------------------------------------------------------


def test_open_collection_resolves_relative_paths_against_base_dir(tmp_path):
    base = tmp_path / "spec"
    _gray_folder(base / "data" / "imgs", ["a.tif", "b.tif"])
    _csv(base / "data" / "labels.csv", "file,label\na.tif,x\nb.tif,y\n")
    folder = open_collection("folder", {"path": "data/imgs", "labels": "data/labels.csv", "channels": 1}, base)
    assert isinstance(folder, FolderCollection) and folder.labels == ["x", "y"]
    group = zarr.open_group(str(base / "s.zarr"), mode="w")
    group.create_array("images", data=_u8((2, 3, 3)))
    assert len(open_collection("zarr", {"path": "s.zarr"}, base)) == 2
    write_ome_zarr(base / "o.zarr", _u8((1, 8, 8)))
    tiles = open_collection("ome_zarr", {"path": "o.zarr", "tile": 4, "channels": [0]}, base)
    assert isinstance(tiles, OmeZarrCollection) and len(tiles) == 4
    absolute = open_collection(
        "folder", {"path": str(base / "data" / "imgs"), "labels": None, "channels": None}, tmp_path / "elsewhere"
    )
    assert absolute.ids == ["a.tif", "b.tif"] and absolute.labels == [None, None]


def test_open_collection_refuses_unknown_kinds_and_options(tmp_path):
    with pytest.raises(ValueError, match="unknown image collection kind 'hdf5'"):
        open_collection("hdf5", {"path": "x"}, tmp_path)
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['tiles'\\]"):
        open_collection("ome_zarr", {"path": "x", "tiles": 4}, tmp_path)
    with pytest.raises(ValueError, match="option 'path' is required"):
        open_collection("zarr", {}, tmp_path)
    with pytest.raises(ValueError, match="option 'tile' is required"):
        open_collection("ome_zarr", {"path": "x"}, tmp_path)
