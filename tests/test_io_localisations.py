"""Localisation tables: CSV, HDF5 and MATLAB v5/v7.3 in, exact values out, grouped by particle;
every bad file refused with its name (and line or row)."""

from __future__ import annotations

import csv
import re

import h5py
import numpy as np
import pytest
import scipy.io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from holly_hpc.io.localisations import (
    LocalisationFormatError,
    LocalisationTable,
    centre_particles,
    read_localisations,
)

# Three particles, interleaved as instruments write them; particle 7 keeps its rows in file order.
ROWS = [
    # x, y, z, particle
    (10.5, -3.25, 100.0, 7),
    (1.0, 2.0, 3.0, 2),
    (11.5, -4.25, 101.0, 7),
    (4.0, 5.0, 6.0, 2),
    (12.5, -5.25, 102.0, 7),
    (7.0, 8.0, 9.0, 2),
    (0.1, 0.2, 0.3, 9),
    (0.4, 0.5, 0.6, 9),
    (0.7, 0.8, 0.9, 9),
    (13.5, -6.25, 103.0, 7),
]
TABLE = np.array(ROWS)
EXPECTED = {pid: TABLE[TABLE[:, 3] == pid, :3] for pid in (2, 7, 9)}


def _write_csv(path, header, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_mat73(path, variables: dict, extra=None):
    """Lay an HDF5 file out as MATLAB -v7.3 does: a 512-byte header, every array transposed, MATLAB_class set."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, given in variables.items():
            value = np.asarray(given, dtype=np.float64)
            value = value.reshape(-1, 1) if value.ndim == 1 else value  # MATLAB has no 1D arrays: a column vector
            f.create_dataset(name, data=value.T).attrs["MATLAB_class"] = np.bytes_("double")
        if extra:
            extra(f)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"  # subsystem offset, version, endianness
    with path.open("r+b") as handle:
        handle.write(header.ljust(512, b"\x00"))
    return path


def _assert_particles(table: LocalisationTable, expected: dict, has_z: bool):
    assert list(table.particles) == sorted(expected)
    assert table.has_z is has_z
    for pid, points in expected.items():
        assert table.particles[pid].dtype == np.float64
        np.testing.assert_array_equal(table.particles[pid], points)


def _raises(path, reason):
    return pytest.raises(LocalisationFormatError, match=re.escape(str(path)) + reason)


# --- CSV -----------------------------------------------------------------------------------------------------


def test_csv_groups_rows_by_particle_exactly(tmp_path):
    path = _write_csv(tmp_path / "locs.csv", ["x", "y", "z", "particle"], ROWS)
    table = read_localisations(str(path), units="nm")
    _assert_particles(table, EXPECTED, has_z=True)
    np.testing.assert_array_equal(table.particles[7][:, 0], [10.5, 11.5, 12.5, 13.5])  # file order kept
    assert table.counts() == {2: 3, 7: 4, 9: 3}
    assert table.source == str(path) and table.dropped == []


def test_csv_without_z_is_2d_and_without_particle_is_one_particle(tmp_path):
    path = _write_csv(tmp_path / "xy.csv", ["x", "y", "frame"], [(r[0], r[1], 5) for r in ROWS])
    table = read_localisations(path, units="nm")
    assert table.has_z is False and list(table.particles) == [0]
    np.testing.assert_array_equal(table.particles[0], TABLE[:, :2])


@pytest.mark.parametrize("x_name", ["x", "X", "x [nm]", "X (nm)", "x_nm", "xnm", "x nm", " x "])
def test_column_name_variants_match(tmp_path, x_name):
    path = _write_csv(tmp_path / "v.csv", [x_name, "Y [nm]", "Particle"], [(r[0], r[1], r[3]) for r in ROWS])
    table = read_localisations(path, units="nm")
    _assert_particles(table, {pid: p[:, :2] for pid, p in EXPECTED.items()}, has_z=False)


def test_exact_name_wins_over_variants_and_ambiguous_variants_are_refused(tmp_path):
    path = _write_csv(tmp_path / "two.csv", ["x_nm", "x", "y"], [(99, 1, 2), (99, 3, 4), (99, 5, 6)])
    np.testing.assert_array_equal(read_localisations(path, units="nm").particles[0][:, 0], [1, 3, 5])
    path = _write_csv(tmp_path / "amb.csv", ["x_nm", "x [nm]", "y"], [(1, 1, 2)] * 3)
    with _raises(path, r": x: several columns match 'x': x_nm, x \[nm\]"):
        read_localisations(path, units="nm")


def test_coordinates_in_pixels_need_the_camera_pixel_size(tmp_path):
    path = _write_csv(tmp_path / "px.csv", ["x [px]", "y [px]"], [(1, 2), (3, 4), (5, 6)])
    with _raises(path, r": x: column 'x \[px\]' is in camera pixels .* set data.localisations.camera_pixel_nm"):
        read_localisations(path)
    table = read_localisations(path, camera_pixel_nm=100.0)
    np.testing.assert_array_equal(table.particles[0], [[100, 200], [300, 400], [500, 600]])
    um = _write_csv(tmp_path / "um.csv", ["x (µm)", "y_um"], [(1.5, 2), (3, 4), (5, 6)])
    np.testing.assert_array_equal(read_localisations(um).particles[0][0], [1500, 2000])


def test_units_are_never_guessed(tmp_path):
    path = _write_csv(tmp_path / "bare.csv", ["x", "y"], [(1, 2)] * 3)
    with _raises(path, r": x: the units of column 'x' are not known .* set data.localisations.units to nm, px or um"):
        read_localisations(path)
    photons = _write_csv(tmp_path / "ph.csv", ["x [photon]", "y [nm]"], [(1, 2)] * 3)
    with _raises(photons, r": x: column 'x \[photon\]' is in 'photon', not a length"):
        read_localisations(photons)
    named = _write_csv(tmp_path / "named.csv", ["x [px]", "y [px]"], [(1, 2)] * 3)
    with _raises(named, r": x: its name 'x \[px\]' says px, but data.localisations.units is nm"):
        read_localisations(named, units="nm", camera_pixel_nm=100.0)


def test_an_optional_column_in_its_own_unit_is_scaled_on_its_own(tmp_path):
    path = _write_csv(tmp_path / "zpx.csv", ["x [nm]", "y [nm]", "z [um]"], [(1, 2, 3), (4, 5, 6), (7, 8, 9)])
    np.testing.assert_array_equal(read_localisations(path).particles[0][:, 2], [3000, 6000, 9000])
    assert read_localisations(path, columns={"z": None}).has_z is False


def test_custom_names_and_positions(tmp_path):
    path = _write_csv(tmp_path / "c.csv", ["id", "xc", "yc", "zc"], [(r[3], r[0], r[1], r[2]) for r in ROWS])
    by_name = read_localisations(path, units="nm", columns={"x": "xc", "y": "yc", "z": "zc", "particle": "id"})
    by_position = read_localisations(path, units="nm", columns={"x": 1, "y": 2, "z": 3, "particle": 0})
    _assert_particles(by_name, EXPECTED, has_z=True)
    _assert_particles(by_position, EXPECTED, has_z=True)


def test_an_explicitly_named_optional_column_is_required(tmp_path):
    path = _write_csv(tmp_path / "xy.csv", ["x", "y"], [(1, 2)] * 3)
    with _raises(path, r": z: no column 'height'; the columns are: x, y"):
        read_localisations(path, columns={"z": "height"})
    with _raises(path, r": particle: no column at position 5; the table has 2 columns"):
        read_localisations(path, columns={"particle": 5})


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("x,y\n1,2\n3,4\n5,abc\n", r":4: column 'y': 'abc' is not a number"),
        ("x,y\n1,2\n\n3,\n5,6\n", r":4: column 'y': nan is not a finite number"),  # empty = missing; blank lines count
        ("x,y\n1,2\n3,nan\n", r":3: column 'y': nan is not a finite number"),
        ("x,y\n1,2\n-inf,4\n", r":3: column 'x': -inf is not a finite number"),
        ("x,y\n1,2\n3,4,5\n", r":3: 3 fields, but the header \(line 1\) has 2"),
        ("x,y,particle\n1,2,0\n3,4,0.5\n", r":3: particle id 0.5 is not a whole number"),
        ("x,y,x\n1,2,3\n", r":1: the header repeats a column name"),
        ("", r": empty file"),
        ("x,y\n", r": the table has no localisations"),
        ("x,y,particle\n1,2,0\n3,4,1\n", r": every particle \(2\) has fewer than 3 localisations"),
    ],
    ids=["text", "empty-cell", "nan", "inf", "fields", "fractional-id", "repeated", "empty", "no-rows", "all-small"],
)
def test_bad_csv_is_refused_with_file_and_line(tmp_path, text, reason):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with _raises(path, reason):
        read_localisations(path, units="nm")


def test_small_particles_are_dropped_and_listed(tmp_path):
    rows = [*ROWS, (50.0, 50.0, 50.0, 4), (60.0, 60.0, 60.0, 4), (70.0, 70.0, 70.0, 1)]
    table = read_localisations(_write_csv(tmp_path / "small.csv", ["x", "y", "z", "particle"], rows), units="nm")
    assert table.dropped == [1, 4]
    _assert_particles(table, EXPECTED, has_z=True)


def test_unknown_extension_missing_file_and_bad_roles_are_refused(tmp_path):
    with _raises(
        tmp_path / "locs.txt", r": unknown localisation file type '.txt'; expected one of .csv, .h5, .hdf5, .mat"
    ):
        read_localisations(tmp_path / "locs.txt")
    with _raises(tmp_path / "gone.csv", ": no such file"):
        read_localisations(tmp_path / "gone.csv")
    path = _write_csv(tmp_path / "ok.csv", ["x", "y"], [(1, 2)] * 3)
    with pytest.raises(ValueError, match=r"unknown column role\(s\) \['frame'\]"):
        read_localisations(path, columns={"frame": "t"})
    with pytest.raises(ValueError, match="'x' is required"):
        read_localisations(path, columns={"x": None})
    with pytest.raises(ValueError, match=r"`dataset` applies to HDF5 and .mat files"):
        read_localisations(path, dataset="locs")


# --- HDF5 ----------------------------------------------------------------------------------------------------


def test_hdf5_columns_as_datasets_of_the_root_or_of_a_group(tmp_path):
    path = tmp_path / "cols.h5"
    with h5py.File(path, "w") as f:
        for i, name in enumerate(["x", "y", "z", "particle"]):
            f[name] = TABLE[:, i]
            f[f"run1/{name}_nm" if name != "particle" else "run1/particle"] = TABLE[:, i] + 1000 * (name != "particle")
    _assert_particles(read_localisations(path, units="nm"), EXPECTED, has_z=True)
    shifted = {pid: p + 1000 for pid, p in EXPECTED.items()}
    _assert_particles(read_localisations(path, dataset="run1", units="nm"), shifted, has_z=True)


def test_hdf5_compound_dataset_is_read_by_default_when_it_is_the_only_one(tmp_path):
    records = np.rec.fromarrays(
        [TABLE[:, 0], TABLE[:, 1], TABLE[:, 2], TABLE[:, 3].astype(np.int32)],
        names=["x [nm]", "y [nm]", "z [nm]", "particle"],
    )
    with h5py.File(tmp_path / "rec.hdf5", "w") as f:
        f["locs"] = records
    _assert_particles(read_localisations(tmp_path / "rec.hdf5"), EXPECTED, has_z=True)


def test_hdf5_compound_or_matrix_dataset_at_a_path(tmp_path):
    path = tmp_path / "nested.h5"
    with h5py.File(path, "w") as f:
        f["meta/pixel_size"] = 100.0
        f["data/matrix"] = TABLE[:, [3, 0, 1]]  # particle, x, y
    table = read_localisations(path, columns={"particle": 0, "x": 1, "y": 2}, dataset="data/matrix", units="nm")
    _assert_particles(table, {pid: p[:, :2] for pid, p in EXPECTED.items()}, has_z=False)
    with _raises(path, r": no dataset or group 'data/nope'; the root holds: data, meta"):
        read_localisations(path, dataset="data/nope")
    with _raises(path, r": '/meta/pixel_size' is not a table"):
        read_localisations(path, dataset="meta/pixel_size")


def test_bad_hdf5_is_refused_with_file_and_row(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5" * 100)
    with _raises(tmp_path / "junk.h5", ": cannot read HDF5 file"):
        read_localisations(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f["x"] = [1.0, 2.0, np.nan, 4.0]
        f["y"] = [1.0, 2.0, 3.0, 4.0]
    with _raises(tmp_path / "nan.h5", r": row 3: column 'x': nan is not a finite number"):
        read_localisations(tmp_path / "nan.h5", units="nm")
    with h5py.File(tmp_path / "text.h5", "w") as f:
        f["x"] = np.array([b"a", b"b", b"c"], dtype=object)
        f["y"] = [1.0, 2.0, 3.0]
    with _raises(tmp_path / "text.h5", r": column 'x' is not numeric"):
        read_localisations(tmp_path / "text.h5", units="nm")
    with h5py.File(tmp_path / "ragged.h5", "w") as f:
        f["x"] = [1.0, 2.0, 3.0]
        f["y"] = [1.0, 2.0, 3.0, 4.0]
    with _raises(tmp_path / "ragged.h5", r": columns differ in length: \{'x': 3, 'y': 4\}"):
        read_localisations(tmp_path / "ragged.h5", units="nm")


# --- MATLAB --------------------------------------------------------------------------------------------------


def test_mat_v5_column_vectors(tmp_path):
    path = tmp_path / "cep152.mat"
    scipy.io.savemat(path, {"x": TABLE[:, :1], "y": TABLE[:, 1:2], "particle": TABLE[:, 3:4], "note": "nm"})
    _assert_particles(read_localisations(path, units="nm"), {pid: p[:, :2] for pid, p in EXPECTED.items()}, has_z=False)


def test_mat_v5_matrix_by_position(tmp_path):
    path = tmp_path / "matrix.mat"
    scipy.io.savemat(path, {"locs": TABLE, "pixel_size": 100.0})
    table = read_localisations(path, columns={"x": 0, "y": 1, "z": 2, "particle": 3}, units="nm")
    _assert_particles(table, EXPECTED, has_z=True)
    with _raises(path, r": x: no column 'x'; the columns are: locs, pixel_size"):
        read_localisations(path)  # names look for vector variables


def test_mat_v5_several_matrices_need_dataset(tmp_path):
    path = tmp_path / "two.mat"
    scipy.io.savemat(path, {"a": TABLE, "b": TABLE + 1})
    positions = {"x": 0, "y": 1, "particle": 3}
    with _raises(
        path, r": columns given by position need one numeric matrix variable, found: a, b; name it with dataset="
    ):
        read_localisations(path, columns=positions)
    table = read_localisations(path, columns=positions, dataset="b", units="nm")
    np.testing.assert_array_equal(table.particles[3][:, 0], EXPECTED[2][:, 0] + 1)  # ids shift with the values
    with _raises(path, r": no variable 'c'; the file holds: a, b"):
        read_localisations(path, columns=positions, dataset="c")


def test_mat_v73_column_vectors_and_matrix_are_untransposed(tmp_path):
    def matlab_extras(f):
        f.create_group("#refs#")
        name = f.create_dataset("label", data=np.frombuffer(b"c\x00e\x00p\x00", dtype=np.uint16).reshape(3, 1))
        name.attrs["MATLAB_class"] = np.bytes_("char")

    vectors = _write_mat73(
        tmp_path / "v73.mat",
        {"x": TABLE[:, 0], "y": TABLE[:, 1], "z": TABLE[:, 2], "particle": TABLE[:, 3]},
        extra=matlab_extras,
    )
    with pytest.raises(NotImplementedError):
        scipy.io.loadmat(vectors)  # the file really is one that scipy hands over to HDF5
    with h5py.File(vectors) as f:
        assert f["x"].shape == (1, len(ROWS))  # stored transposed, as MATLAB does
    _assert_particles(read_localisations(vectors, units="nm"), EXPECTED, has_z=True)
    with _raises(vectors, r": z: no column 'label'; the columns are: particle, x, y, z"):  # a char array is no column
        read_localisations(vectors, columns={"z": "label"})

    matrix = _write_mat73(tmp_path / "m73.mat", {"locs": TABLE})
    _assert_particles(
        read_localisations(matrix, columns={"x": 0, "y": 1, "z": 2, "particle": 3}, units="nm"), EXPECTED, has_z=True
    )


def test_corrupt_mat_is_refused(tmp_path):
    (tmp_path / "junk.mat").write_bytes(b"junk" * 100)
    with _raises(tmp_path / "junk.mat", ": cannot read MATLAB file"):
        read_localisations(tmp_path / "junk.mat")


# --- centring ------------------------------------------------------------------------------------------------


def test_centre_particles_moves_each_centroid_to_the_origin(tmp_path):
    table = read_localisations(_write_csv(tmp_path / "locs.csv", ["x", "y", "z", "particle"], ROWS), units="nm")
    table.dropped.append(99)
    centred = centre_particles(table)
    assert centred.counts() == table.counts() and centred.has_z and centred.dropped == [99]
    for pid, points in centred.particles.items():
        np.testing.assert_allclose(points.mean(axis=0), 0.0, atol=1e-12)
        np.testing.assert_allclose(points, EXPECTED[pid] - EXPECTED[pid].mean(axis=0))
    np.testing.assert_array_equal(centred.particles[7][:, 0], [-1.5, -0.5, 0.5, 1.5])
    np.testing.assert_array_equal(table.particles[7], EXPECTED[7])  # the input is left as it was


# --- property: any table survives CSV and HDF5 ----------------------------------------------------------------

coordinate = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
particle_sizes = st.dictionaries(st.integers(-1000, 1000), st.integers(1, 6), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=particle_sizes, has_z=st.booleans(), data=st.data())
def test_random_tables_round_trip_through_csv_and_hdf5(tmp_path, sizes, has_z, data):
    if all(n < 3 for n in sizes.values()):
        sizes = {**sizes, next(iter(sizes)): 3}  # at least one particle survives
    dims = 3 if has_z else 2
    ids = [pid for pid, n in sizes.items() for _ in range(n)]
    ids = data.draw(st.permutations(ids))
    points = np.array([data.draw(st.tuples(*[coordinate] * dims)) for _ in ids], dtype=np.float64).reshape(-1, dims)
    names = [*["x", "y", "z"][:dims], "particle"]
    expected = {pid: points[np.array(ids) == pid] for pid in sizes if sizes[pid] >= 3}

    csv_path = _write_csv(
        tmp_path / "prop.csv", names, [(*map(repr, p), pid) for p, pid in zip(points.tolist(), ids, strict=True)]
    )
    h5_path = tmp_path / "prop.h5"
    with h5py.File(h5_path, "w") as f:
        for i, name in enumerate(names[:dims]):
            f[name] = points[:, i]
        f["particle"] = np.array(ids, dtype=np.int64)
    for path in (csv_path, h5_path):
        table = read_localisations(path, units="nm")
        _assert_particles(table, expected, has_z=has_z)
        assert table.dropped == sorted(pid for pid, n in sizes.items() if n < 3)
