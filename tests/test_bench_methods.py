"""`holly-hpc bench methods`: each method option runs as a real task and lands in one table (a few steps
only: this checks the wiring and the columns, not the figures the README quotes)."""

from __future__ import annotations

import json


def test_bench_methods_runs_the_spec_per_method_and_tabulates(cli, tmp_path):
    code, out, err = cli(
        "bench", "methods", "--methods", "refine-C8", "--settings", "storm", "--steps", "4",
        "--seed", "7", "--out", tmp_path / "runs", "--json", tmp_path / "rows.json",
    )  # fmt: skip
    assert code == 0, err
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["method"] == "refine-C8" and row["setting"] == "storm" and row["completed"]
    assert row["symmetry_n"] % 8 == 0  # imposed C8: only multiples of 8 have power (16 after 4 steps: 2 per corner)
    assert row["fsc_resolution_nm"] > 0 and row["cpu_s"] > 0 and row["structure_error"] > 0
    header, _rule, line = out.strip().splitlines()
    assert "FSC nm" in header and "| storm | refine-C8 |" in line
    assert "running storm / refine-C8" in err
    spec = (tmp_path / "runs" / "bench-storm-refine-C8.yaml").read_text()
    assert "nup107/storm/particles.csv" in spec and "symmetry: C8" in spec and "seed: 7\n" in spec
