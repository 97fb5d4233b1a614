"""The localisation formats microscopy software writes: ThunderSTORM CSV, Picasso HDF5 + YAML sidecar,
SMAP _sml.mat (v5 and v7.3), DECODE CSV. Each file is written here as its program writes it (headers,
fields, units, sidecars, comment lines); reading it must give the same particle in nm, whatever the format,
and a file whose units cannot be known is refused with the key to set."""

from __future__ import annotations

import math
import re

import h5py
import numpy as np
import pytest
import yaml

from holly_hpc.io.localisations import LocalisationFormatError, ReadOptions, detect, inspect, load, read_localisations
from holly_hpc.io.localisations.writers import write_decode, write_picasso, write_smap, write_table, write_thunderstorm
from holly_hpc.recon.particles import load_particles

PIXEL_NM = 117.0


def _ring(n=40, radius=50.0, centre=(3000.0, 2000.0), z=False, seed=0):
    """A 100 nm ring (a particle of known size) with per-localisation precision and frames."""
    rng = np.random.default_rng(seed)
    angles = np.linspace(0, 2 * math.pi, n, endpoint=False)
    xy = np.column_stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)])
    xyz = np.column_stack([xy, rng.uniform(-30, 30, n)]) if z else xy
    return xyz, rng.uniform(3, 12, n), np.sort(rng.integers(0, 1000, n))


def _diameter(points):
    return float(np.max(np.linalg.norm(points[:, None, :2] - points[None, :, :2], axis=2)))


WRITERS = {
    "thunderstorm": lambda p, xyz, prec, fr: write_thunderstorm(p / "ts.csv", xyz, prec, fr),
    "picasso": lambda p, xyz, prec, fr: write_picasso(p / "locs.hdf5", xyz, prec, fr, PIXEL_NM),
    "smap": lambda p, xyz, prec, fr: write_smap(p / "cell_sml.mat", xyz, prec, fr),
    "smap-v73": lambda p, xyz, prec, fr: write_smap(p / "big_sml.mat", xyz, prec, fr, v73=True),
    "decode": lambda p, xyz, prec, fr: write_decode(p / "emitters.csv", xyz, prec, fr, px_size=PIXEL_NM),
    "decode-nm": lambda p, xyz, prec, fr: write_decode(p / "nm.csv", xyz, prec, fr, px_size=None, xy_unit="nm"),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_100_nm_particle_is_100_nm_in_every_format(tmp_path, name):
    xyz, precision, frame = _ring()
    path = WRITERS[name](tmp_path, xyz, precision, frame)
    fmt = name.split("-")[0]
    assert detect(path) == fmt
    locs = load(path)
    assert locs.format == fmt and len(locs) == len(xyz) and locs.particle is None  # a field: to be picked
    assert locs.has_z is False  # DECODE's z = 0 for 2D data reads as 2D
    np.testing.assert_allclose(locs.xyz, xyz, atol=0.01)  # float32 pixels (Picasso, DECODE) keep 0.01 nm
    np.testing.assert_allclose(locs.precision, precision, rtol=1e-5, atol=1e-4)
    assert _diameter(locs.xyz) == pytest.approx(100.0, abs=0.02)


@pytest.mark.parametrize("name", ["thunderstorm", "picasso", "smap", "smap-v73"])
def test_3d_files_keep_z_in_nm(tmp_path, name):
    xyz, precision, frame = _ring(z=True)
    locs = load(WRITERS[name](tmp_path, xyz, precision, frame))
    assert locs.has_z
    np.testing.assert_allclose(locs.xyz, xyz, atol=0.01)  # Picasso keeps z in nm although x, y are pixels


def test_thunderstorm_header_is_read_as_written(tmp_path):
    xyz, precision, frame = _ring()
    path = write_thunderstorm(tmp_path / "ts.csv", xyz, precision, frame)
    first = path.read_text().splitlines()[0]
    assert first.startswith('"id","frame","x [nm]","y [nm]","sigma [nm]","intensity [photon]"')
    plan = inspect(path)
    assert plan.columns == {"x": "x [nm]", "y": "y [nm]", "precision": "uncertainty [nm]"}
    assert plan.nm_per_unit == {"x": 1.0, "y": 1.0, "precision": 1.0}


def test_thunderstorm_in_pixels_or_micrometres(tmp_path):
    path = tmp_path / "px.csv"
    path.write_text(
        '"id","frame","x [px]","y [px]","sigma [px]","uncertainty [px]"\n1,1,10,20,1.1,0.05\n2,1,11,21,1.1,0.05\n3,2,12,22,1,0.1\n'
    )
    with pytest.raises(
        LocalisationFormatError, match=r"px\.csv: x: column 'x \[px\]' is in camera pixels .*camera_pixel_nm"
    ) as info:
        load(path)
    assert info.value.key == "camera_pixel_nm"
    locs = load(path, ReadOptions(camera_pixel_nm=100.0))
    np.testing.assert_allclose(locs.xyz[0], [1000, 2000])
    np.testing.assert_allclose(locs.precision, [5, 5, 10])
    um = tmp_path / "um.csv"
    um.write_text(
        '"id","frame","x [µm]","y [µm]","sigma [nm]","uncertainty [nm]"\n1,1,1.5,2,130,5\n2,1,1.6,2,130,5\n3,1,1.7,2,130,5\n'
    )
    np.testing.assert_allclose(load(um).xyz[:, 0], [1500, 1600, 1700])


def test_picasso_pixels_times_the_sidecar_pixel_size(tmp_path):
    xyz, precision, frame = _ring()
    path = write_picasso(tmp_path / "locs.hdf5", xyz, precision, frame, PIXEL_NM)
    with h5py.File(path) as f:  # as Picasso stores it: camera pixels, float32
        assert f["locs"].dtype["x"] == np.float32
        assert f["locs"]["x"][0] == pytest.approx(xyz[0, 0] / PIXEL_NM, rel=1e-6)
    documents = list(yaml.safe_load_all(path.with_suffix(".yaml").read_text()))
    assert documents[1]["Pixelsize"] == PIXEL_NM
    assert any("Pixelsize 117 nm from locs.yaml" in note for note in load(path).notes)

    # Without the sidecar the size is unknown: refused, naming the key; given, it is used.
    path.with_suffix(".yaml").unlink()
    with pytest.raises(
        LocalisationFormatError,
        match=r"locs\.hdf5: Picasso stores x, y in camera pixels.*no sidecar locs\.yaml.*camera_pixel_nm",
    ) as info:
        load(path)
    assert info.value.key == "camera_pixel_nm"
    np.testing.assert_allclose(load(path, ReadOptions(camera_pixel_nm=PIXEL_NM)).xyz, xyz, atol=0.01)


def test_picasso_sidecar_and_spec_must_agree(tmp_path):
    xyz, precision, frame = _ring()
    path = write_picasso(tmp_path / "locs.hdf5", xyz, precision, frame, PIXEL_NM)
    with pytest.raises(
        LocalisationFormatError, match=r"says a camera pixel is 117 nm, but data.localisations.camera_pixel_nm is 100"
    ):
        load(path, ReadOptions(camera_pixel_nm=100.0))
    np.testing.assert_allclose(load(path, ReadOptions(camera_pixel_nm=PIXEL_NM)).xyz, xyz, atol=0.01)


def test_picasso_picked_groups_are_particles(tmp_path):
    xyz, precision, frame = _ring(n=30)
    group = np.repeat([4, 9, 2], 10)
    path = write_picasso(tmp_path / "picked.hdf5", xyz, precision, frame, PIXEL_NM, group=group)
    table = read_localisations(path)
    assert sorted(table.particles) == [2, 4, 9] and table.counts() == {2: 10, 4: 10, 9: 10}
    np.testing.assert_allclose(table.particles[4], xyz[:10], atol=0.01)
    np.testing.assert_allclose(table.precision[9], precision[10:20], rtol=1e-5)


def test_smap_nested_struct_fields(tmp_path):
    xyz, precision, frame = _ring()
    for v73 in (False, True):
        path = write_smap(tmp_path / f"v{int(v73)}_sml.mat", xyz, precision, frame, v73=v73)
        plan = inspect(path)
        assert plan.format == "smap" and plan.raw.dataset == "saveloc.loc"
        assert plan.columns == {"x": "xnm", "y": "ynm", "precision": "locprecnm"}  # an empty znm is 2D
        with pytest.raises(LocalisationFormatError, match=r"no field 'locs' in saveloc; it holds: (file, loc|loc)"):
            load(path, ReadOptions(dataset="saveloc.locs"))


def test_decode_comment_lines_and_units(tmp_path):
    xyz, precision, frame = _ring()
    path = write_decode(tmp_path / "emitters.csv", xyz, precision, frame, px_size=PIXEL_NM)
    lines = path.read_text().splitlines()
    assert lines[0] == "# DECODE EmitterSet" and lines[2] == '# {"xy_unit": "px", "px_size": [117.0, 117.0]}'
    assert lines[3].startswith("x,y,z,phot,frame_ix") and ",," in lines[4]  # NaN written as empty cells
    plan = inspect(path)
    assert plan.format == "decode" and plan.columns["precision"] == ("x_sig", "y_sig")
    assert plan.nm_per_unit["x"] == PIXEL_NM and plan.nm_per_unit["z"] == 1.0

    unknown = write_decode(tmp_path / "nosize.csv", xyz, precision, frame, px_size=PIXEL_NM, record_px_size=False)
    with pytest.raises(LocalisationFormatError, match=r"nosize\.csv: x: column 'x' is in camera pixels") as info:
        load(unknown)
    assert info.value.key == "camera_pixel_nm"
    np.testing.assert_allclose(load(unknown, ReadOptions(camera_pixel_nm=PIXEL_NM)).xyz, xyz, atol=0.01)


def test_generic_tables_need_stated_units(tmp_path):
    xyz, precision, _ = _ring(n=12)
    named = write_table(tmp_path / "named.csv", xyz, np.repeat([0, 1, 2], 4), precision)
    table = read_localisations(named)
    assert table.counts() == {0: 4, 1: 4, 2: 4}
    np.testing.assert_allclose(table.precision[1], precision[4:8], atol=1e-3)
    bare = tmp_path / "bare.csv"
    bare.write_text("x,y,particle\n1,2,0\n3,4,0\n5,6,0\n")
    with pytest.raises(
        LocalisationFormatError, match=r"bare\.csv: x: the units of column 'x' are not known.*data.localisations.units"
    ) as info:
        load(bare)
    assert info.value.key == "units"
    np.testing.assert_allclose(load(bare, ReadOptions(units="um")).xyz[0], [1000, 2000])


def test_inspect_reads_the_header_only(tmp_path):
    lines = ['"id","frame","x [nm]","y [nm]","uncertainty [nm]"'] + [f"{i},{i},{i}.5,{i},5" for i in range(1, 5000)]
    lines[4000] = "4000,4000,oops,1,5"
    path = tmp_path / "late.csv"
    path.write_text("\n".join(lines) + "\n")
    assert inspect(path).columns["x"] == "x [nm]"  # the bad cell is not read
    with pytest.raises(
        LocalisationFormatError, match=re.escape(f"{path}:4001: column 'x [nm]': 'oops' is not a number")
    ):
        load(path)


def test_a_glob_reads_every_field_and_numbers_particles_across_them(tmp_path):
    from holly_hpc.recon.smlm_field import simulate_field

    for seed in (1, 2):
        field = simulate_field(particles=9, seed=seed)
        write_thunderstorm(tmp_path / f"fov{seed}.csv", field.xyz[:, :2], field.precision, field.frame)
    particles = load_particles({"path": "fov*.csv", "pixel_size_nm": 8.0}, tmp_path)
    assert len(particles.files) == 2 and len(particles.points) == 18
    assert {f for f, _ in particles.ids} == {0, 1}
    assert all(abs(p.mean(axis=0)).max() < 1e-9 for p in particles.points)  # centred
    with pytest.raises(LocalisationFormatError, match=r"nothing\*\.csv: no file matches this pattern"):
        load_particles({"path": "nothing*.csv", "pixel_size_nm": 8.0}, tmp_path)
