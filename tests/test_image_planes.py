"""Image stacks with Z and T axes, and channel names: TIFF axes as tifffile reads them (ImageJ hyperstacks,
OME-TIFF), OME-Zarr TCZYX, the data.planes options (plane, projection, z_as, time), channel names from
metadata or the spec, and the spec check that refuses two ways of reducing Z at once, at the key's line."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from holly_hpc.embed.data import EmbedDataset, make_collection
from holly_hpc.embed.synthetic import InfectedRedCells, SyntheticCells
from holly_hpc.io.images import (
    FolderCollection,
    ImageFormatError,
    OmeZarrCollection,
    Planes,
    ZarrCollection,
    open_collection,
    write_ome_zarr,
)
from holly_hpc.runtime.captions import channel_legend
from holly_hpc.spec import SpecError, apply_defaults, load_spec

H, W = 8, 9


def _u16(shape, seed=0):
    # Values well above 255 and different in every plane, so a wrong plane or a squeeze to 8 bits shows.
    return np.random.default_rng(seed).integers(300, 65535, shape, dtype=np.uint16)


def _tif(path: Path, data, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, **kwargs)
    return path


def _imagej(path: Path, data, axes: str) -> Path:
    return _tif(path, data, imagej=True, metadata={"axes": axes})


def _ome(path: Path, data, axes: str, names=None) -> Path:
    metadata = {"axes": axes, **({"Channel": {"Name": list(names)}} if names else {})}
    return _tif(path, data, ome=True, metadata=metadata)


def _raises(where, *reasons):
    """pytest.raises for an ImageFormatError naming `where` and giving each of `reasons` (literal text)."""
    return pytest.raises(ImageFormatError, match=re.escape(str(where)) + ".*" + ".*".join(map(re.escape, reasons)))


# --- TIFF: axes from the file -----------------------------------------------------------------------------


def test_imagej_zyx_stack_is_refused_without_an_option_naming_axes_shape_and_keys(tmp_path):
    path = _imagej(tmp_path / "stack.tif", _u16((5, H, W)), "ZYX")
    # Before: read as 5 channels. Z planes are not channels, and no option says what to make of them.
    with _raises(path, "5 Z planes", "axes ZYX, shape (5, 8, 9)", "data.planes.plane", "data.planes.projection") as err:
        FolderCollection(tmp_path)
    assert "data.planes.z_as" in str(err.value)


def test_one_z_plane_of_an_imagej_stack(tmp_path):
    stack = _u16((5, H, W))
    _imagej(tmp_path / "stack.tif", stack, "ZYX")
    images = FolderCollection(tmp_path, planes={"plane": 3})
    assert (len(images), images.channels, images.ids, images.shape_hw) == (1, 1, ["stack.tif"], (H, W))
    out = images.read(0)
    assert out.dtype == np.uint16 and out.shape == (1, H, W)
    np.testing.assert_array_equal(out[0], stack[3])


@pytest.mark.parametrize("projection", ["max", "mean", "sum"])
def test_projections_of_an_imagej_zcyx_stack_equal_numpys(tmp_path, projection):
    stack = _u16((4, 2, H, W))  # Z, C, Y, X
    _imagej(tmp_path / "s.tif", stack, "ZCYX")
    images = FolderCollection(tmp_path, planes={"projection": projection})
    out = images.read(0)
    assert images.channels == 2 and out.shape == (2, H, W)
    expected = getattr(stack.astype(np.float64), projection)(axis=0)
    if projection == "max":
        assert out.dtype == np.uint16  # a max is one of the values: the file's own dtype
        np.testing.assert_array_equal(out, stack.max(axis=0))
    else:
        assert out.dtype == np.float32  # a sum of 16-bit planes does not fit 16 bits
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    if projection == "sum":
        assert expected.max() > np.iinfo(np.uint16).max  # the sum would overflow the file's dtype


def test_z_as_channels_is_channel_major(tmp_path):
    stack = _u16((3, 2, H, W))  # Z, C, Y, X
    _imagej(tmp_path / "s.tif", stack, "ZCYX")
    images = FolderCollection(tmp_path, planes={"z_as": "channels"})
    out = images.read(0)
    assert images.channels == 6 and out.shape == (6, H, W) and out.dtype == np.uint16
    for c in range(2):
        for k in range(3):
            np.testing.assert_array_equal(out[c * 3 + k], stack[k, c])
    assert images.channel_names == ["ch0 z0", "ch0 z1", "ch0 z2", "ch1 z0", "ch1 z1", "ch1 z2"]


def test_z_as_items_makes_every_plane_an_image_of_one_split(tmp_path):
    stack = _u16((4, 2, H, W))
    _imagej(tmp_path / "a.tif", stack, "ZCYX")
    _tif(tmp_path / "b.tif", _u16((2, H, W), seed=1), photometric="minisblack")  # 2 pages, no Z: one item
    images = FolderCollection(tmp_path, planes={"z_as": "items"})
    assert images.ids == ["a.tif#z0", "a.tif#z1", "a.tif#z2", "a.tif#z3", "b.tif"]
    assert images.channels == 2 and images.labels == [None] * 5
    for k in range(4):
        np.testing.assert_array_equal(images.read(k), stack[k])
    # Neighbouring planes show the same cells: held-out scores must not be measured on them.
    data = apply_defaults({"experiment": "e", "kind": "embed", "data": {"split": {"val": 0.4, "test": 0.3}}})["data"]
    splits = EmbedDataset(images, data, seed=0).split_names
    assert len(set(splits[:4])) == 1


def test_ome_tiff_czyx_with_channel_names(tmp_path):
    stack = _u16((2, 5, H, W))  # C, Z, Y, X
    _ome(tmp_path / "c.ome.tif", stack, "CZYX", ["DNA", "actin"])
    images = FolderCollection(tmp_path, planes={"plane": 4})
    assert images.channel_names == ["DNA", "actin"]
    np.testing.assert_array_equal(images.read(0), stack[:, 4])
    folded = FolderCollection(tmp_path, planes={"z_as": "channels"})
    assert folded.channel_names[:6] == ["DNA z0", "DNA z1", "DNA z2", "DNA z3", "DNA z4", "actin z0"]
    np.testing.assert_array_equal(folded.read(0), stack.reshape(10, H, W))  # CZ already channel-major
    np.testing.assert_array_equal(FolderCollection(tmp_path, planes={"projection": "max"}).read(0), stack.max(axis=1))


def test_ome_tiff_tzcyx_needs_a_time_point(tmp_path):
    stack = _u16((3, 4, 2, H, W))  # T, Z, C, Y, X
    path = _ome(tmp_path / "t.ome.tif", stack, "TZCYX", ["DNA", "actin"])
    with _raises(path, "3 time points", "axes TZCYX, shape (3, 4, 2, 8, 9)", "data.planes.time"):
        FolderCollection(tmp_path, planes={"plane": 1})
    images = FolderCollection(tmp_path, planes={"plane": 1, "time": 2})
    assert images.channel_names == ["DNA", "actin"]
    np.testing.assert_array_equal(images.read(0), stack[2, 1])
    items = FolderCollection(tmp_path, planes={"z_as": "items", "time": 0})
    assert len(items) == 4 and items.ids[3] == "t.ome.tif#z3"
    np.testing.assert_array_equal(items.read(3), stack[0, 3])
    np.testing.assert_allclose(
        FolderCollection(tmp_path, planes={"projection": "mean", "time": 1}).read(0),
        stack[1].astype(np.float64).mean(axis=0),
        rtol=1e-6,
    )


def test_a_plane_or_time_point_out_of_range_is_refused_by_name(tmp_path):
    path = _imagej(tmp_path / "s.tif", _u16((3, H, W)), "ZYX")
    with _raises(path, "data.planes.plane 3 asked, but it has 3 Z plane(s) (0 to 2)", "axes ZYX"):
        FolderCollection(tmp_path, planes={"plane": 3})
    with _raises(path, "data.planes.time 1 asked, but it has 1 time point(s)"):
        FolderCollection(tmp_path, planes={"plane": 0, "time": 1})


def test_files_that_cannot_be_reduced_are_skipped_by_name_under_skip(tmp_path):
    _tif(tmp_path / "a.tif", _u16((H, W)))
    path = _imagej(tmp_path / "b.tif", _u16((3, H, W)), "ZYX")
    with pytest.warns(UserWarning, match="skipped 1"):
        images = FolderCollection(tmp_path, on_bad="skip")
    assert images.ids == ["a.tif"] and images.bad[0].path == str(path) and "axes ZYX" in images.bad[0].reason


def test_pages_of_unknown_meaning_stay_channels_and_real_channel_axes_are_honoured(tmp_path):
    pages = _u16((3, H, W))
    _tif(tmp_path / "plain" / "p.tif", pages, photometric="minisblack")  # tifffile: axes QYX
    _imagej(tmp_path / "ij" / "c.tif", pages, "CYX")
    for folder in ("plain", "ij"):
        images = FolderCollection(tmp_path / folder)
        assert images.channels == 3 and images.channel_names == ["ch0", "ch1", "ch2"]
        np.testing.assert_array_equal(images.read(0), pages)
    path = _tif(tmp_path / "q" / "q.tif", _u16((2, 3, H, W)), photometric="minisblack")  # QQYX
    with _raises(path, "shape (2, 3, 8, 9)", "ImageJ hyperstack or an OME-TIFF"):
        FolderCollection(tmp_path / "q")


def test_z_as_channels_refuses_stacks_whose_channels_and_planes_differ(tmp_path):
    _imagej(tmp_path / "a.tif", _u16((3, 2, H, W)), "ZCYX")  # 2 channels x 3 planes
    path = _imagej(tmp_path / "b.tif", _u16((2, 3, H, W)), "ZCYX")  # 3 channels x 2 planes: also 6
    with _raises(path, "has 6 channel(s) (3 x 2 Z planes); expected 6 (2 x 3 Z planes), like a.tif"):
        FolderCollection(tmp_path, planes={"z_as": "channels"})


# --- OME-Zarr ---------------------------------------------------------------------------------------------


@pytest.fixture
def tczyx(tmp_path):
    data = _u16((2, 3, 4, 8, 12))  # T, C, Z, Y, X: two 6 x 6 tiles per plane
    store = write_ome_zarr(tmp_path / "img.zarr", data, axes="tczyx", channel_names=["DNA", "actin", "tubulin"])
    return store, data


def test_ome_zarr_default_keeps_one_item_per_t_z_plane(tczyx):
    store, data = tczyx
    tiles = OmeZarrCollection(store, tile=6)
    assert len(tiles) == 2 * 4 * 2 and tiles.channels == 3
    assert tiles.ids[:3] == ["img.zarr/0/t0z0y0x0", "img.zarr/0/t0z0y0x6", "img.zarr/0/t0z1y0x0"]
    np.testing.assert_array_equal(tiles.read(2 * 4 + 2 + 1), data[1, :, 1, :6, 6:])
    assert tiles.channel_names == ["DNA", "actin", "tubulin"]
    same = OmeZarrCollection(store, tile=6, planes={"z_as": "items"})
    assert same.ids == tiles.ids


def test_ome_zarr_time_plane_and_projections(tczyx):
    store, data = tczyx
    one = OmeZarrCollection(store, tile=6, planes={"time": 1, "plane": 2})
    assert one.ids == ["img.zarr/0/t1z2y0x0", "img.zarr/0/t1z2y0x6"]
    np.testing.assert_array_equal(one.read(1), data[1, :, 2, :6, 6:])
    for projection in ("max", "mean", "sum"):
        tiles = OmeZarrCollection(store, tile=6, planes={"projection": projection})
        assert len(tiles) == 2 * 2 and tiles.ids[2] == f"img.zarr/0/t1z{projection}y0x0"
        expected = getattr(data[1, :, :, :6, :6].astype(np.float64), projection)(axis=1)
        np.testing.assert_allclose(tiles.read(2), expected, rtol=1e-6)
    assert OmeZarrCollection(store, tile=6, planes={"projection": "max"}).read(0).dtype == np.uint16


def test_ome_zarr_z_as_channels_with_a_channel_selection(tczyx):
    store, data = tczyx
    tiles = OmeZarrCollection(store, tile=6, channels=[2, 0], planes={"z_as": "channels", "time": 0})
    assert len(tiles) == 2 and tiles.channels == 8 and tiles.ids[0] == "img.zarr/0/t0y0x0"
    out = tiles.read(0)
    for i, c in enumerate([2, 0]):
        for k in range(4):
            np.testing.assert_array_equal(out[i * 4 + k], data[0, c, k, :6, :6])
    assert tiles.channel_names[:5] == ["tubulin z0", "tubulin z1", "tubulin z2", "tubulin z3", "DNA z0"]


def test_ome_zarr_out_of_range_options_and_v05_labels(tmp_path, tczyx):
    store, _ = tczyx
    with _raises(store, "data.planes.time 2 asked, but it has 2 time point(s)", "axes tczyx"):
        OmeZarrCollection(store, tile=6, planes={"time": 2})
    with _raises(store, "data.planes.plane 4 asked, but it has 4 Z plane(s)"):
        OmeZarrCollection(store, tile=6, planes={"plane": 4})
    v05 = write_ome_zarr(tmp_path / "v5.zarr", _u16((2, 8, 8)), axes="cyx", version="0.5", channel_names=["a", "b"])
    assert OmeZarrCollection(v05, tile=8).channel_names == ["a", "b"]
    plain = write_ome_zarr(tmp_path / "plain.zarr", _u16((8, 8)), axes="yx")
    assert OmeZarrCollection(plain, tile=8).channel_names == ["ch0"]


# --- options, names, the spec ----------------------------------------------------------------------------


def test_planes_refuse_two_ways_of_reducing_z_and_bad_values():
    with pytest.raises(ValueError, match="sets plane and projection: set at most one"):
        Planes.of({"plane": 1, "projection": "max", "z_as": None})
    with pytest.raises(ValueError, match="projection must be one of max, mean, sum"):
        Planes(projection="median")
    with pytest.raises(ValueError, match="unknown key"):
        Planes.of({"planes": 1})


def test_channel_names_from_the_spec_win_and_must_match_the_count(tmp_path):
    stack = _u16((2, 5, H, W))
    _ome(tmp_path / "imgs" / "c.ome.tif", stack, "CZYX", ["DNA", "actin"])
    data = apply_defaults(
        {
            "experiment": "e",
            "kind": "embed",
            "data": {
                "source": "folder",
                "folder": {"path": "imgs"},
                "planes": {"z_as": "channels"},
                "channel_names": ["nucleus", "cortex"],
            },
        }
    )["data"]
    images = make_collection(data, seed=0, base_dir=tmp_path)  # planes reach the folder through make_collection
    assert images.channels == 10 and images.channel_names[4:6] == ["nucleus z4", "cortex z0"]
    data["channel_names"] = ["nucleus"]
    with pytest.raises(ValueError, match=r"data.channel_names: 1 name\(s\) \['nucleus'\] given, but .* has 2 channel"):
        make_collection(data, seed=0, base_dir=tmp_path)
    write_ome_zarr(tmp_path / "o.zarr", _u16((2, 3, 8, 8)), axes="czyx", channel_names=["DNA", "actin"])
    tiles = open_collection(
        "ome_zarr", {"path": "o.zarr", "tile": 8, "planes": {"plane": 1}, "channel_names": ["x", "y"]}, tmp_path
    )
    assert len(tiles) == 1 and tiles.channel_names == ["x", "y"]
    with pytest.raises(ValueError, match="option 'channel_names'"):
        open_collection("ome_zarr", {"path": "o.zarr", "tile": 8, "channel_names": ["x"]}, tmp_path)


def test_every_collection_has_channel_names(tmp_path):
    import zarr

    group = zarr.open_group(str(tmp_path / "z.zarr"), mode="w")
    group.create_array("images", data=_u16((3, 2, 4, 4)))
    assert ZarrCollection(tmp_path / "z.zarr").channel_names == ["ch0", "ch1"]
    assert SyntheticCells(2, 16).channel_names == ["body", "nucleus"]
    assert InfectedRedCells(2, 16).channel_names == ["brightfield", "DNA"]
    assert channel_legend(["body", "nucleus"]) == "green: body, magenta: nucleus"
    assert channel_legend(["a", "b", "c", "d"]) == "red: a, green: b, blue: c (of 4 channels)"


def _folder_spec(write_spec, tmp_path, planes_yaml: str, source: str = "folder") -> Path:
    _imagej(tmp_path / "imgs" / "s.tif", _u16((3, H, W)), "ZYX")
    return write_spec(
        raw=(
            "experiment: planes\nkind: embed\n"
            f"data:\n  source: {source}\n  folder:\n    path: imgs\n  planes:\n{planes_yaml}"
        ),
        name="planes.yaml",
    )


def test_validate_reports_two_z_options_at_the_line_of_the_second(write_spec, tmp_path, cli):
    path = _folder_spec(write_spec, tmp_path, "    plane: 1\n    projection: max\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "planes.yaml:9:17: data.planes.projection" in str(err.value)
    assert "plane is set too: set at most one of plane, projection, z_as" in str(err.value)
    code, _, stderr = cli("validate", path)
    assert code == 1 and "planes.yaml:9:17: data.planes.projection" in stderr
    path.write_text(path.read_text().replace("    projection: max\n", "    time: 0\n"))
    load_spec(path)  # one Z option and a time point: fine


def test_validate_reports_planes_for_a_source_without_z(write_spec, tmp_path):
    path = _folder_spec(write_spec, tmp_path, "    projection: max\n", source="synthetic")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "planes.yaml:8:5: data.planes" in str(err.value) and "data.source is synthetic" in str(err.value)


def test_validate_checks_the_count_of_channel_names_of_generated_cells(write_spec):
    path = write_spec(raw="experiment: e\nkind: embed\ndata:\n  channel_names: [a, b, c]\n", name="names.yaml")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "names.yaml:4:18: data.channel_names" in str(err.value) and "2 channels (body, nucleus)" in str(err.value)


def test_the_reconstruction_grid_is_captioned_with_the_channel_names(monkeypatch):
    from holly_hpc.embed import task as embed_task

    from .test_embed_task import _config

    captured = {}

    def caption(grid, row_labels=None, col_labels=None, title=None, pad=2):
        captured.update(rows=row_labels, title=title, grid=grid.shape)
        return grid

    monkeypatch.setattr(embed_task, "caption_grid", caption)
    kind = embed_task.EmbedTask(_config({"data": {"channel_names": ["cyto", "DNA"]}}), torch.device("cpu"), None)
    grids = kind.image_grids()
    assert captured["rows"] == ["cyto input", "cyto reconstruction", "DNA input", "DNA reconstruction"]
    assert "inputs vs reconstructions" in captured["title"]
    assert list(grids) == ["eval/inputs_vs_reconstructions"]
    monkeypatch.undo()
    picture = kind.image_grids()["eval/inputs_vs_reconstructions"]  # the real captions: wider and taller
    assert picture.shape[0] == 3 and picture.shape[1] > captured["grid"][1] and picture.shape[2] > captured["grid"][2]


def test_holly_hpc_embed_reads_new_stacks_with_the_runs_planes(tmp_path):
    from holly_hpc.embed.infer import open_input

    stack = _u16((4, H, W))
    _imagej(tmp_path / "new" / "a.tif", stack, "ZYX")
    config = {"data": {"image_size": 16, "planes": {"projection": "max"}}}
    collection = open_input(tmp_path / "new", config, channels=None, labels="none", on_bad="fail")
    np.testing.assert_array_equal(collection.read(0), stack.max(axis=0)[None])
    with _raises(tmp_path / "new" / "a.tif", "ZYX"):
        open_input(tmp_path / "new", {"data": {"image_size": 16}}, channels=None, labels="none", on_bad="fail")
