"""Real nuclei from the images the mnfinder wheel ships (bench/nuclei.py): the crops, their labels and
groups, and the embed kind trained on them with a grouped evaluation. CI installs the wheel (.ci/run); under
CI=true a missing wheel fails these tests instead of skipping them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile

from holly_hpc.bench.nuclei import GROUP_REGEX, build_crops, instance_ids, mnfinder_root
from holly_hpc.bench.ssl import spec_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    try:
        mnfinder_root()
    except FileNotFoundError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))  # outside CI=true only
    out = tmp_path_factory.mktemp("nuclei") / "crops"
    return out, build_crops(out, 48)


def test_instance_ids_give_one_id_per_colour_and_zero_for_transparent_pixels():
    mask = np.zeros((3, 4, 4), dtype=np.uint8)
    mask[0, :2] = (255, 0, 0, 255)
    mask[2, 2:] = (0, 0, 255, 255)
    mask[1, 1] = (9, 9, 9, 0)  # transparent: background whatever its colour
    ids = instance_ids(mask)
    assert ids[1, 1] == 0 and ids[0, 0] == ids[0, 1] != 0 and ids[2, 2] == ids[2, 3] not in (0, ids[0, 0])
    assert len(np.unique(ids)) == 3


def test_crops_of_real_nuclei_are_16_bit_labelled_by_cell_line_and_grouped_by_field(crops):
    import re

    out, counts = crops
    assert counts == {"RPE1": 1254, "U2OS": 856}  # every nucleus far enough from its field's border
    files = sorted(out.glob("*/*.tif"))
    assert len(files) == 2110 and {f.parent.name for f in files} == {"RPE1", "U2OS"}
    crop = tifffile.imread(files[0])
    assert crop.shape == (48, 48) and crop.dtype == np.uint16 and crop.max() > crop.min()
    fields = {re.search(GROUP_REGEX, f"{f.parent.name}/{f.name}")["key"] for f in files}
    assert len(fields) == 23  # 15 RPE-1 fields (five dates), 8 U2OS fields


def test_the_embed_kind_trains_on_real_nuclei_and_probes_them_grouped_by_field(crops, tmp_path):
    from holly_hpc.bench.ssl import run_family

    out, _ = crops
    spec = spec_for("simclr", out, tmp_path, steps=4, batch=16, width=4, size=48, seed=0)
    spec["train"]["eval_max_images"] = 400
    result = run_family(spec, tmp_path)
    report = result["report"]
    assert report["split"]["name"] == "grouped" and report["images"] == 400
    assert report["embedding"]["dim"] == 64 and report["features"]["dim"] == 32
    for readout in ("embedding", "features"):
        for probe in ("logreg", "knn", "forest"):
            assert 0 <= report[readout][f"{probe}_balanced_accuracy"] <= 1
    runs = tmp_path / "runs" / "bench-ssl-simclr" / "tasks"
    (task_dir,) = list(runs.iterdir())
    assert json.loads((task_dir / "final" / "metrics.json").read_text())["step"] == 4
