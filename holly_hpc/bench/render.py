"""`holly-hpc bench render`: the fast separable renderer against HOLLy's dense algorithm.

For every device, sigma and implementation it measures one forward + backward pass (render, then
`.sum().backward()` with respect to the points): the median wall time over a few repeats after
warm-up, and the peak memory that pass allocates above what was allocated before it.

Peak memory:
- cuda: the caching allocator's own counter (reset_peak_memory_stats, max_memory_allocated) minus
  memory_allocated() before the pass.
- cpu: there is no allocator counter, so the pass runs once under torch.profiler with
  profile_memory=True, which records every allocation and free of the CPU allocator as a signed
  byte count with a timestamp. Walking those records in time order with a running sum gives the
  bytes allocated above the start at every moment; its maximum is the peak. (The per-operator
  `cpu_memory_usage` of `prof.events()` is not used: it is inclusive of child operators, so summing
  it counts nested allocations twice.) The whole pass runs on this thread (autograd runs CPU
  backward on the calling thread), so no allocation is missed; frees of blocks allocated before
  profiling are not reported, which could only overstate the peak, and points.grad is cleared
  before it for that reason. Unlike max RSS this sees exactly the tensors torch asks for, is not
  blurred by malloc arenas, lazily touched pages or the interpreter, and needs no subprocess;
  tests/test_bench_render.py checks it against tensors of known size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from holly_hpc.recon.geometry import random_rotations
from holly_hpc.recon.render import render_images, render_images_reference

IMPLS: dict[str, Callable] = {"fast": render_images, "reference": render_images_reference}
DEFAULTS = {"batch": 20, "points": 230, "size": 128, "sigmas": (1.4, 3.0, 5.0, 10.0)}
REPEATS = {"fast": 5, "reference": 3}  # timed runs per measurement, unless --repeats overrides both
WARMUP = {"fast": 3, "reference": 1}  # untimed runs first (allocator, thread pools, cuBLAS handles)
TARGET_SPEEDUP, TARGET_SPEEDUP_MAX_SIGMA, TARGET_MEMORY = 100.0, 3.0, 10.0  # from the issue
MB = 1e6


def default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> float:
    """Median wall time of fn() in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Most bytes held at any moment during fn() above what was held when it started (see module doc)."""
    if device.startswith("cuda"):
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw records: one "[memory]" event per allocation (+bytes) or free (-bytes), not attributed to ops.
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    held = peak = 0
    for _, delta in records:
        held += delta
        peak = max(peak, held)
    return peak


def analytic_bytes(impl: str, batch: int, points: int, size: int) -> int:
    """Lower-bound estimate of one pass's float32 working set (from the issue)."""
    if impl == "reference":
        return batch * points * size * size * 4  # one dense (B, N, H, W) tensor
    return batch * points * (size + size) * 4 + batch * size * size * 4  # Gx, Gy and the images


def _scene(batch: int, points: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pts = (torch.rand(points, 3, generator=g) * 1.4 - 0.7).to(device).requires_grad_()
    return pts, random_rotations(batch, g).to(device)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(
    batch: int = DEFAULTS["batch"],
    points: int = DEFAULTS["points"],
    size: int = DEFAULTS["size"],
    sigmas=DEFAULTS["sigmas"],
    devices=None,
    repeats: int | None = None,
) -> list[dict]:
    """Measure both implementations; one row per (device, sigma, impl). repeats=None: REPEATS per impl."""
    devices = list(devices or default_devices())
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch.cuda.is_available() is False")
    rows = []
    for device in devices:
        pts, rot = _scene(batch, points, device)
        for sigma in sigmas:
            for impl, render in IMPLS.items():

                def step(pts=pts, rot=rot, sigma=sigma, render=render) -> None:  # bound now, not at call time
                    pts.grad = None
                    render(pts, rot, sigma, size).sum().backward()

                n = repeats or REPEATS[impl]
                _log(f"[bench render] {device} {impl:9} sigma={sigma:g}: {WARMUP[impl]} warm-up + {n} timed runs …")
                ms = median_ms(step, device, n, WARMUP[impl])
                pts.grad = None  # freed here, not inside the measured pass
                peak = peak_bytes(step, device)
                _log(f"[bench render]   {ms:.2f} ms, peak {peak / MB:.2f} MB")
                rows.append(
                    {
                        "impl": impl,
                        "device": device,
                        "batch": batch,
                        "points": points,
                        "size": size,
                        "sigma": float(sigma),
                        "fwd_bwd_ms": ms,
                        "peak_mb": peak / MB,
                    }
                )
    return rows


def _ratios(rows: list[dict]) -> dict[tuple, tuple[float, float]]:
    """(device, sigma) -> (speedup, memory ratio) of fast over reference, where both were measured."""
    ref = {(r["device"], r["sigma"]): r for r in rows if r["impl"] == "reference"}
    return {
        (f["device"], f["sigma"]): (r["fwd_bwd_ms"] / f["fwd_bwd_ms"], r["peak_mb"] / max(f["peak_mb"], 1e-9))
        for f in rows
        if f["impl"] == "fast" and (r := ref.get((f["device"], f["sigma"])))
    }


def _times(x: float) -> str:
    return f"{x:.1f}x" if x < 10 else f"{x:.0f}x"


def format_table(rows: list[dict]) -> str:
    ratios = _ratios(rows)
    headers = ["impl", "device", "batch", "points", "size", "sigma", "fwd_bwd_ms", "peak_mb", "speedup", "mem_ratio"]
    cells = []
    for r in rows:
        ratio = ratios.get((r["device"], r["sigma"])) if r["impl"] == "fast" else None
        cells.append(
            [
                r["impl"],
                r["device"],
                str(r["batch"]),
                str(r["points"]),
                str(r["size"]),
                f"{r['sigma']:g}",
                f"{r['fwd_bwd_ms']:.2f}",
                f"{r['peak_mb']:.3f}",
                _times(ratio[0]) if ratio else "-",
                _times(ratio[1]) if ratio else "-",
            ]
        )
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([*lines, "", *_footnotes(rows, ratios)])


def _load_note() -> list[str]:
    """Other processes on the CPU cores slow the many small ops of the fast path most: say so."""
    if not hasattr(os, "getloadavg"):
        return []
    load, cores, ours = os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads()
    # This benchmark itself keeps about `ours` threads busy; more load than that is someone else's.
    busy = ": other processes compete for the cores,\n  cpu timings are pessimistic" if load > ours + 0.5 else ""
    return [f"  load average over the last minute {load:.1f} on {cores} cores{busy}."]


def _footnotes(rows: list[dict], ratios: dict) -> list[str]:
    notes = [
        "fwd_bwd_ms: median wall time of render + .sum().backward() w.r.t. the points (float32), after warm-up;",
        f"  cpu with torch.get_num_threads() = {torch.get_num_threads()}; cuda timed between torch.cuda.synchronize().",
        *_load_note(),
        "peak_mb (1 MB = 1e6 B): most memory held during one forward+backward above what was held before it;",
        "  cuda: max_memory_allocated after reset_peak_memory_stats; cpu: running sum of the allocation/free",
        "  records of torch.profiler(profile_memory=True) in time order.",
        "speedup, mem_ratio: reference / fast on the same device and sigma.",
    ]
    for r in rows:
        if r["sigma"] == rows[0]["sigma"]:
            est = analytic_bytes(r["impl"], r["batch"], r["points"], r["size"]) / MB
            kind = "one (B,N,H,W) float32 tensor" if r["impl"] == "reference" else "B·N·(H+W)·4 + B·H·W·4 B"
            notes.append(
                f"analytic: {r['impl']} needs ≥ {kind} = {est:.3g} MB; measured {r['peak_mb']:.3g} MB "
                f"({r['peak_mb'] / est:.1f}x) on {r['device']} at sigma {r['sigma']:g}."
            )
    fast_cpu = [s for (d, sig), (s, _) in ratios.items() if d == "cpu" and sig <= TARGET_SPEEDUP_MAX_SIGMA]
    if fast_cpu:
        met = "MET" if min(fast_cpu) >= TARGET_SPEEDUP else "NOT MET"
        notes.append(
            f"target: fast ≥ {TARGET_SPEEDUP:.0f}x faster on cpu at sigma ≤ {TARGET_SPEEDUP_MAX_SIGMA:g} "
            f"px: {met} (lowest {_times(min(fast_cpu))})."
        )
    else:
        notes.append(f"target: speed on cpu at sigma ≤ {TARGET_SPEEDUP_MAX_SIGMA:g} px: not measured.")
    mem = [m for _, m in ratios.values()]
    if mem:
        met = "MET" if min(mem) >= TARGET_MEMORY else "NOT MET"
        notes.append(f"target: fast ≥ {TARGET_MEMORY:.0f}x less peak memory: {met} (lowest {_times(min(mem))}).")
    return notes


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="holly-hpc bench render",
        description="Median time and peak memory of one forward+backward of the fast renderer and the dense reference.",
    )
    parser.add_argument("--batch", type=_positive, default=DEFAULTS["batch"])
    parser.add_argument("--points", type=_positive, default=DEFAULTS["points"])
    parser.add_argument("--size", type=_positive, default=DEFAULTS["size"], help="image side in pixels")
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULTS["sigmas"]), help="in pixels")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument(
        "--repeats",
        type=_positive,
        default=None,
        help=f"timed runs per measurement (default {REPEATS['fast']} fast, {REPEATS['reference']} reference)",
    )
    parser.add_argument("--json", action="store_true", help="print only a JSON list of rows on stdout")
    args = parser.parse_args(argv)
    try:
        rows = run(args.batch, args.points, args.size, args.sigmas, args.devices, args.repeats)
    except ValueError as exc:
        print(f"holly-hpc bench render: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
