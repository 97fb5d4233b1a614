"""Where reconstruct's points start (Poisson-disc fill, another run's checkpoint) and the points' plateau
learning-rate schedule, each built directly (no spec keys)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from holly_hpc.recon.initial import (
    InitFromError,
    InitState,
    init_from_problem,
    init_report,
    load_init,
    poisson_disc,
    poisson_disc_points,
    poisson_spacing,
    take_matching,
)
from holly_hpc.recon.posenet import PoseNet
from holly_hpc.recon.schedules import PlateauSchedule
from holly_hpc.runtime.checkpoint import rng_state, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _min_distance(points: torch.Tensor) -> float:
    p = points.double()
    d = torch.cdist(p, p)
    return float((d + torch.eye(len(p), dtype=p.dtype) * 1e9).min())


# ------------------------------------------------------------------------------------- poisson disc
@pytest.mark.parametrize("n", [2, 8, 60, 200, 1000])
def test_poisson_disc_points_keep_their_spacing_inside_the_cube(n):
    h = 0.35
    points, spacing = poisson_disc(n, h, torch.Generator().manual_seed(n))
    assert points.shape == (n, 3) and points.dtype == torch.float32
    assert float(points.abs().max()) <= h
    assert spacing == poisson_spacing(n, h)  # the default spacing fits: it never had to shrink
    lattice = ((2 * h) ** 3 / n) ** (1 / 3)  # the spacing of a cubic lattice of n points
    assert spacing == pytest.approx(lattice * (6 * 0.3 / math.pi) ** (1 / 3)) and spacing > 0.8 * lattice
    assert _min_distance(points) >= spacing * (1 - 1e-6)
    assert torch.equal(points, poisson_disc_points(n, h, torch.Generator().manual_seed(n)))


def test_poisson_disc_fills_the_cube_more_evenly_than_uniform_points():
    n, h = 512, 0.5
    disc = poisson_disc_points(n, h, torch.Generator().manual_seed(0))
    uniform = (torch.rand(n, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1) * h
    assert _min_distance(uniform) < 0.2 * poisson_spacing(n, h)  # what a plain cube start looks like
    # Every octant holds close to its share (64); uniform points stray further.
    octants = ((disc > 0).long() * torch.tensor([4, 2, 1])).sum(-1).bincount(minlength=8)
    assert int(octants.min()) >= 52 and int(octants.max()) <= 76, octants
    # No large holes: probes of the cube lie closer to their nearest point than they do for uniform points.
    probes = (torch.rand(4000, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1) * h

    def hole(points):
        return torch.cdist(probes, points).min(dim=1).values.quantile(0.99)

    assert hole(disc) < 0.8 * hole(uniform)


def test_poisson_disc_is_a_pure_function_of_the_generator():
    a = poisson_disc_points(300, 0.35, torch.Generator().manual_seed(5))
    b = poisson_disc_points(300, 0.35, torch.Generator().manual_seed(5))
    c = poisson_disc_points(300, 0.35, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # It draws from the generator it is given (the task's seeded one), not from the global RNG.
    torch.manual_seed(0)
    before = torch.get_rng_state()
    poisson_disc_points(50, 0.35, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before)


def test_poisson_disc_edge_cases_and_a_spacing_too_large_to_fit():
    g = torch.Generator().manual_seed(0)
    assert poisson_disc_points(0, 0.35, g).shape == (0, 3)
    one = poisson_disc_points(1, 0.35, g)
    assert one.shape == (1, 3) and float(one.abs().max()) <= 0.35
    # 50 points 0.06 apart do not fit in a cube of side 0.2 (the default spacing is 0.045): the spacing
    # shrinks by 5% at a time until they do.
    points, spacing = poisson_disc(50, 0.1, g, spacing=0.06)
    assert points.shape == (50, 3) and poisson_spacing(50, 0.1) < spacing < 0.06
    assert math.log(spacing / 0.06, 0.95) == pytest.approx(round(math.log(spacing / 0.06, 0.95)))
    assert _min_distance(points) >= spacing * (1 - 1e-6) and float(points.abs().max()) <= 0.1
    with pytest.raises(ValueError, match="half_width"):
        poisson_disc_points(10, 0.0, g)


# ------------------------------------------------------------------------------------- init_from
def _net(hypotheses: int = 1) -> PoseNet:
    torch.manual_seed(hypotheses)
    return PoseNet([4, 8], 16, 0.1, hypotheses=hypotheses)


def _save(folder, step, points, net=None, **extra):
    kind = {"net": (net or _net()).state_dict(), "points": points, "step_done": step, **extra}
    return save_checkpoint(folder, step, {"step": step, "kind": kind, "rng": rng_state(), "config_seed": 1}, keep=5)


def test_load_init_takes_the_latest_checkpoint_of_a_task_folder(tmp_path):
    task = tmp_path / "runs" / "exp" / "tasks" / "0000"
    early, late = torch.randn(30, 3), torch.randn(30, 3)
    net = _net()
    first = _save(task / "checkpoints", 10, early, net)
    _save(task / "checkpoints", 20, late, net)
    for named in (task, task / "checkpoints"):
        state = load_init(named, tmp_path)
        assert torch.equal(state.points, late) and state.step == 20
        assert state.source == task / "checkpoints" / "step_00000020.pt" and not state.from_refinement
        assert state.net_state.keys() == net.state_dict().keys()
        assert all(torch.equal(state.net_state[k], v) for k, v in net.state_dict().items())
    # A file is taken as it is; a relative path is relative to the spec's folder (base_dir).
    assert torch.equal(load_init("runs/exp/tasks/0000/checkpoints/" + first.name, tmp_path).points, early)
    assert init_from_problem(str(task), tmp_path) is None and init_from_problem(None, tmp_path) is None


def test_load_init_prefers_the_refinements_asymmetric_unit(tmp_path):
    units = [torch.randn(4, 3) for _ in range(3)]  # splits all, half1, half2
    refinement = {"symmetry": "C8", "posed": True, "units": units, "six": [], "shifts": []}
    _save(tmp_path / "checkpoints", 5, torch.randn(32, 3), refinement=refinement)
    state = load_init(tmp_path, tmp_path)
    assert torch.equal(state.points, units[0]) and state.from_refinement and state.symmetry == "C8"
    assert "refinement's asymmetric unit (symmetry C8)" in init_report(state, 4, ["a"], [])[0]


def test_load_init_errors_name_the_key_and_the_path(tmp_path):
    with pytest.raises(InitFromError, match=r"model\.init_from: .*nowhere does not exist") as info:
        load_init("nowhere", tmp_path)
    assert isinstance(info.value, ValueError) and info.value.key == "model.init_from"
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(InitFromError, match=r"model\.init_from: no checkpoint .*empty"):
        load_init(empty, tmp_path)
    # Another kind's checkpoint holds no points.
    other = save_checkpoint(tmp_path / "embed", 3, {"step": 3, "kind": {"model": {}}, "rng": rng_state()}, keep=1)
    with pytest.raises(InitFromError, match=rf"model\.init_from: {other}.* is not a reconstruct checkpoint"):
        load_init(other, tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InitFromError, match=rf"model\.init_from: {junk} is not a usable reconstruct checkpoint"):
        load_init(junk, tmp_path)
    problem = init_from_problem("junk.pt", tmp_path)
    assert problem.startswith(str(junk)) and "model.init_from" not in problem  # validate adds the key itself


def test_a_corrupt_newest_checkpoint_is_passed_over_and_left_in_place(tmp_path):
    good = torch.randn(10, 3)
    _save(tmp_path / "checkpoints", 10, good)
    bad = _save(tmp_path / "checkpoints", 20, torch.randn(10, 3))
    bad.write_bytes(bad.read_bytes()[:100])  # truncated: its sha256 no longer matches
    state = load_init(tmp_path, tmp_path)
    assert torch.equal(state.points, good) and state.step == 10
    assert bad.exists()  # another run's folder: never moved aside


def test_take_matching_loads_what_fits_and_says_what_did_not():
    source, same, wider = _net(1), _net(3), _net(2)
    taken, skipped = take_matching(same := PoseNet([4, 8], 16, 0.1), source.state_dict())
    assert not skipped and set(taken) == set(source.state_dict())
    assert all(torch.equal(same.state_dict()[k], v) for k, v in source.state_dict().items())
    assert init_report(InitState(torch.zeros(5, 3), source.state_dict(), "f"), 5, taken, skipped)[1].endswith(
        f"pose network taken whole ({len(taken)} tensors)"
    )
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    taken, skipped = take_matching(wider, source.state_dict())  # 2 hypotheses: the rotation head differs
    assert "rotation.weight" not in taken and any(s.startswith("rotation.weight (shape (6, 16) there") for s in skipped)
    assert torch.equal(wider.state_dict()["rotation.weight"], before["rotation.weight"])
    assert torch.equal(wider.state_dict()["head.0.weight"], source.state_dict()["head.0.weight"])
    lines = init_report(InitState(torch.zeros(5, 3), source.state_dict(), "f"), 7, taken, skipped)
    assert "5 points, all of them as 7" in lines[0] and f"{len(taken)} tensors taken" in lines[1]
    assert take_matching(wider, None) == ([], [f"{k} (not in the checkpoint)" for k in wider.state_dict()])


def test_points_for_fits_the_saved_points_to_the_unit_size():
    saved = torch.randn(20, 3)
    state = InitState(saved, None, "f")
    g = torch.Generator().manual_seed(0)
    assert torch.equal(state.points_for(20, g), saved)
    fewer = state.points_for(8, g)
    rows = [int((saved == p).all(-1).nonzero()) for p in fewer]  # each one of the saved, none twice
    assert len(set(rows)) == 8
    more = state.points_for(50, g, jitter=0.01)
    assert torch.equal(more[:20], saved) and _min_distance(more) > 0  # the copies are moved off their originals
    nearest = torch.cdist(more[20:], saved).min(dim=1).values
    assert float(nearest.max()) < 0.06 and float(nearest.mean()) == pytest.approx(
        0.01 * math.sqrt(8 / math.pi), rel=0.3
    )


# ------------------------------------------------------------------------------------- plateau schedule
def _optimiser(lr_points=0.01, cosine_steps=None):
    net, points = torch.nn.Linear(2, 2), torch.nn.Parameter(torch.zeros(4, 3))
    opt = torch.optim.AdamW([{"params": net.parameters(), "lr": 1e-3}, {"params": [points], "lr": lr_points}])
    if cosine_steps is None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / cosine_steps, 1.0)))
        )
    return opt, sched


def _train(opt, sched, plateau, losses, start=0):
    """The points' lr used by each step, stepping as reconstruct does (optimiser, schedule, then plateau)."""
    used = []
    for i in range(start, len(losses)):
        used.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
        plateau.step(torch.tensor(losses[i]))
    return used


def test_plateau_halves_the_points_lr_after_patience_steps_without_improvement():
    opt, sched = _optimiser()
    plateau = PlateauSchedule(opt, 1, patience=10, factor=0.5, min_lr=0.003, check_every=5, scheduler=sched)
    losses = [2 - 0.05 * i for i in range(1, 21)] + [1.0] * 40  # improves for 20 steps, then flat
    used = _train(opt, sched, plateau, losses)
    # Checks every 5 steps: the mean keeps improving up to step 25 (1.0 < 1.1), so the first drop comes 10
    # steps later, at step 35, and the next 10 steps after that, floored at min_lr (0.003, not 0.0025).
    assert used[:35] == [0.01] * 35
    assert used[35:45] == [0.005] * 10
    assert used[45:] == pytest.approx([0.003] * 15)
    assert plateau.reductions == 2 and plateau.scale == pytest.approx(0.3)
    assert opt.param_groups[0]["lr"] == 1e-3  # the network's rate is not the plateau's business


def test_plateau_reads_a_tensor_loss_only_at_its_checks(monkeypatch):
    opt, sched = _optimiser()
    plateau = PlateauSchedule(opt, 1, patience=20, check_every=10, scheduler=sched)
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    _train(opt, sched, plateau, [1.0] * 99)
    assert len(reads) == 9  # one device sync per 10 steps, not one per step
    # A float given at log intervals stands for the steps since the last call.
    opt2, sched2 = _optimiser()
    by_log = PlateauSchedule(opt2, 1, patience=20, check_every=10, scheduler=sched2)
    for _ in range(9):
        by_log.step(1.0, steps=10)
    assert (by_log.seen, by_log.best, by_log.reductions) == (90, plateau.best, plateau.reductions) == (90, 1.0, 4)


def test_plateau_composes_with_the_cosine_schedule_without_compounding():
    opt, sched = _optimiser(cosine_steps=100)
    plateau = PlateauSchedule(opt, 1, patience=5, factor=0.5, check_every=5, scheduler=sched)
    _train(opt, sched, plateau, [1.0] * 30)
    assert plateau.reductions > 0
    expected = sched.get_last_lr()[1] * plateau.scale
    assert opt.param_groups[1]["lr"] == expected
    plateau.apply()
    plateau.apply()
    assert opt.param_groups[1]["lr"] == expected  # set from the schedule, never multiplied in place


def test_plateau_resumes_exactly():
    g = torch.Generator().manual_seed(0)
    trend = (0.5 - torch.arange(300) / 120).clamp(min=0)  # improves for 60 steps, then noise about a floor
    losses = (1 + 0.3 * torch.rand(300, generator=g) + trend).tolist()

    def build():
        opt, sched = _optimiser(cosine_steps=300)
        return opt, sched, PlateauSchedule(opt, 1, patience=30, factor=0.5, min_lr=1e-4, check_every=7, scheduler=sched)

    opt, sched, plateau = build()
    whole = _train(opt, sched, plateau, losses)
    assert plateau.reductions >= 2  # the test exercises drops on both sides of the cut

    opt, sched, plateau = build()
    first = _train(opt, sched, plateau, losses[:123])  # 123: in the middle of a 7-step window
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "plateau": plateau.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    opt, sched, plateau2 = build()
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    plateau2.load_state_dict(saved["plateau"])
    assert plateau2.state_dict() == plateau.state_dict()
    rest = _train(opt, sched, plateau2, losses, start=123)
    assert first + rest == whole  # bit for bit


def test_plateau_reduce_sees_the_window_sums_and_bad_options_are_refused():
    opt, sched = _optimiser()
    seen = []
    plateau = PlateauSchedule(
        opt, 1, patience=4, check_every=4, scheduler=sched, reduce=lambda t: seen.append(float(t)) or t * 0 + 8.0
    )
    _train(opt, sched, plateau, [1.0, 2.0, 3.0, 4.0])
    assert seen == [10.0] and plateau.best == 2.0  # the reduced sum (8 over 4 steps), as every rank would see
    for bad in ({"patience": 0}, {"factor": 1.0}, {"factor": 0.0}, {"min_lr": -1.0}, {"check_every": 0}):
        with pytest.raises(ValueError, match="plateau"):
            PlateauSchedule(opt, 1, **{"patience": 5, **bad})
