"""Ingest benchmark: voxelflow against dcm2niix on the same CT archive, in one run.

    .venv/bin/python bench/ingest.py                 # 10 series x 300 slices of 512x512
    .venv/bin/python bench/ingest.py --series 2 --slices 60   # a quick look

Measures wall time end to end for:
  * dcm2niix -z n and -z y (the reference; single process, as users run it),
  * voxelflow's library in one process, no Prefect or Dask (``run_local``),
  * ``voxelflow ingest`` (CLI: Prefect flow on a Dask LocalCluster) with 1 and 2 workers.
Prefect + Dask overhead = CLI time with 1 worker - library time (same work, same core).
The local Prefect server is started before timing and reused, as the CLI does.
Prints a table with ms/file, MB/s and speed ratios; writes results.json beside the data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from voxelflow.ingest import IngestConfig, run_local  # noqa: E402
from voxelflow.phantom import SeriesSpec, ct_phantom, oblique_orientation, write_ct_series  # noqa: E402


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_archive(root: Path, n_series: int, slices: int, size: int) -> Path:
    marker = root / f"archive-{n_series}x{slices}x{size}.done"
    archive = root / "ct-archive"
    if marker.exists():
        return archive
    shutil.rmtree(archive, ignore_errors=True)
    for m in root.glob("archive-*.done"):
        m.unlink()
    spacing = (1.0, 0.7, 0.7)
    base = ct_phantom((slices, size, size), spacing=spacing, seed=0, noise_hu=0)
    rng = np.random.default_rng(1)
    for i in range(n_series):
        noisy = np.clip(base + rng.normal(0, 12, size=base.shape).round(), -1024, 3071).astype(np.int16)
        spec = SeriesSpec(pixel_spacing=(0.7, 0.7), slice_spacing=1.0, series_number=i + 1,
                          patient_id=f"BENCH{i // 2:04d}",
                          orientation=oblique_orientation(15, 10) if i % 3 == 2 else (1, 0, 0, 0, 1, 0),
                          origin=(-180.0, -180.0, -150.0 + i), descending=bool(i % 2))
        write_ct_series(noisy, archive / f"patient{i // 2:04d}" / f"series{i:02d}", spec)
        print(f"  generated series {i + 1}/{n_series}", file=sys.stderr)
    marker.write_text("ok")
    return archive


def warm(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            f.read_bytes()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_dcm2niix(archive: Path, out: Path, z: str) -> float:
    import dcm2niix

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [dcm2niix.bin, "-z", z, "-f", "%s_%j", "-o", str(out), str(archive)]
    return timed(lambda: subprocess.run(cmd, check=True, capture_output=True))


def run_cli(archive: Path, store: Path, workers: int, env: dict) -> float:
    shutil.rmtree(store, ignore_errors=True)
    cmd = [sys.executable, "-m", "voxelflow.cli", "ingest", str(archive), "--store", str(store),
           "--workers", str(workers)]
    return timed(lambda: subprocess.run(cmd, check=True, capture_output=True, env=env))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=10)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workdir", default=str(ROOT / "bench-output"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    print("generating the archive (cached between runs)...", file=sys.stderr)
    archive = make_archive(work, args.series, args.slices, args.size)
    files = sorted(f for f in archive.rglob("*.dcm"))
    n, nbytes = len(files), du(archive)
    warm(archive)

    from voxelflow.runtime import ensure_prefect_api

    api = ensure_prefect_api()  # started once, reused by every CLI run below
    env = {**os.environ, "PREFECT_API_URL": api.api_url}

    results = []

    def record(name, seconds, out_bytes):
        results.append({"tool": name, "seconds": round(seconds, 3), "ms_per_file": round(1000 * seconds / n, 3),
                        "MB_per_s": round(nbytes / 1e6 / seconds, 1), "output_MB": round(out_bytes / 1e6, 1)})
        print(f"  {name}: {seconds:.2f} s", file=sys.stderr)

    t = run_dcm2niix(archive, work / "d2n-zn", "n")
    record("dcm2niix -z n", t, du(work / "d2n-zn"))
    t = run_dcm2niix(archive, work / "d2n-zy", "y")
    record("dcm2niix -z y", t, du(work / "d2n-zy"))
    store = work / "store-lib"
    shutil.rmtree(store, ignore_errors=True)
    t_lib = timed(lambda: run_local(IngestConfig(sources=[str(archive)], store=str(store))))
    record("voxelflow library, 1 process (no Prefect/Dask)", t_lib, du(store))
    for w in (1, 2):
        t = run_cli(archive, work / f"store-cli{w}", w, env)
        record(f"voxelflow ingest (CLI), {w} Dask worker{'s' if w > 1 else ''}", t, du(work / f"store-cli{w}"))

    ref_y = next(r for r in results if r["tool"] == "dcm2niix -z y")["seconds"]
    ref_n = next(r for r in results if r["tool"] == "dcm2niix -z n")["seconds"]
    cli1 = next(r for r in results if "1 Dask worker" in r["tool"])["seconds"]
    for r in results:
        r["speed_vs_dcm2niix_zy"] = round(ref_y / r["seconds"], 2)
        r["speed_vs_dcm2niix_zn"] = round(ref_n / r["seconds"], 2)
    overhead = cli1 - t_lib
    meta = {"files": n, "input_MB": round(nbytes / 1e6, 1), "series": args.series,
            "slices": args.slices, "matrix": args.size, "cpus": os.cpu_count(),
            "python": platform.python_version(), "prefect_dask_overhead_s": round(overhead, 2),
            "prefect_dask_overhead_ms_per_file": round(1000 * overhead / n, 3)}
    (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))

    print(f"\n{n} files, {nbytes / 1e6:.0f} MB ({args.series} CT series of {args.slices} x "
          f"{args.size}x{args.size}), {os.cpu_count()} CPUs\n")
    print("| tool | wall s | ms/file | MB/s | output MB | speed vs dcm2niix -z y | vs -z n |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['tool']} | {r['seconds']:.2f} | {r['ms_per_file']:.2f} | {r['MB_per_s']:.0f} | "
              f"{r['output_MB']:.0f} | {r['speed_vs_dcm2niix_zy']:.2f}x | {r['speed_vs_dcm2niix_zn']:.2f}x |")
    print(f"\nPrefect + Dask overhead (CLI 1 worker - library): {overhead:.2f} s "
          f"({1000 * overhead / n:.2f} ms/file), of which process start + imports + cluster start "
          "are a fixed cost per run.")


if __name__ == "__main__":
    main()
