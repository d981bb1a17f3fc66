"""Ingest benchmark: voxelflow against dcm2niix on the same archives, in one run.

    .venv/bin/python bench/ingest.py                 # CT archive + 10^4 and 10^5 small files
    .venv/bin/python bench/ingest.py --series 2 --slices 60 --many 2000   # a quick look
    .venv/bin/python bench/ingest.py --many 10000,100000,300000 --skip-ct   # memory growth
    .venv/bin/python bench/ingest.py --study --skip-ct --many ""   # one study: fixed costs

Two archives, both generated (cached in --workdir):
  * the CT archive: 10 series x 300 slices of 512x512 (3,000 files, 1.6 GB) for MB/s;
  * with --study, one CT study: 3 series x 104 slices of 512x512 (312 files, 164 MB), what a
    user tries first, where fixed costs count; its default CLI run is broken down from the
    run's log (imports and API check, flow start, cluster start, scan and conversion, catalog);
  * many-file archives: series of 100 slices of 64x64 (``--many`` files in all; 12 KB a
    file), for files/s and peak memory as the archive grows.
For each, wall time end to end and peak memory (resident set of the whole process tree,
sampled every 50 ms) of:
  * dcm2niix -z n and -z y (the reference; single process, as users run it),
  * voxelflow's library in one process, no Prefect or Dask (``run_local``),
  * ``voxelflow ingest`` (CLI) as users run it (a small input on the command's threads, a
    large one on a Dask LocalCluster), and on a Dask LocalCluster with 1 and 2 workers;
  * for a small input, also with the warm runner up (``voxelflow server start``: the command
    runs in a child of a process that has imported voxelflow and Prefect; flows/warm.py).
Prefect + Dask overhead = CLI time with 1 worker - library time (same work, same core).
The local Prefect server is started before timing and reused, as the CLI does.
Prints tables with ms/file, files/s, MB/s, peak memory and speed ratios; writes
results.json beside the data.
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

from flows import warm as warm_runner  # noqa: E402
from flows.runtime import small_input  # noqa: E402
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


def _many_series(args) -> None:
    root, i, slices, size = args
    base = ct_phantom((slices, size, size), spacing=(2.0, 4.0, 4.0), seed=i % 7, noise_hu=0).astype(np.int16)
    spec = SeriesSpec(pixel_spacing=(4.0, 4.0), slice_spacing=2.0, series_number=i % 50 + 1,
                      patient_id=f"MANY{i // 4:05d}", uid_seed=f"many-{i}",
                      study_uid=f"1.2.826.0.1.3680043.10.1011.1.{i // 4}",
                      series_uid=f"1.2.826.0.1.3680043.10.1011.2.{i}",
                      frame_uid=f"1.2.826.0.1.3680043.10.1011.3.{i // 4}")
    write_ct_series(base, Path(root) / f"p{i // 4:05d}" / f"s{i:05d}", spec)


def make_many(root: Path, files: int, slices: int = 100, size: int = 64) -> Path:
    """``files`` small CT images, in series of ``slices`` (4 series a patient); generated on
    every core, cached."""
    from multiprocessing import Pool

    archive = root / f"many-{files}"
    marker = root / f"many-{files}.done"
    if marker.exists():
        return archive
    shutil.rmtree(archive, ignore_errors=True)
    t0 = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        pool.map(_many_series, [(str(archive), i, slices, size) for i in range(-(-files // slices))],
                 chunksize=8)
    marker.write_text("ok")
    print(f"  generated {files} files in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return archive


class PeakMemory:
    """Peak resident memory of processes and all their descendants, sampled in a thread."""

    def __init__(self, *pids: int, interval: float = 0.05):
        import threading

        import psutil

        self.roots, self.interval, self.peak = [psutil.Process(p) for p in pids], interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [p for root in self.roots for p in (root, *root.children(recursive=True))]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measured(cmd: list[str], env: dict | None = None, output: dict | None = None, also: tuple[int, ...] = ()
             ) -> tuple[float, int]:
    """Run ``cmd``; its wall time and the peak memory of its process tree and of the trees of
    ``also`` (its output, its start and end times into ``output`` when given)."""
    if output is not None:
        output["start"] = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak = PeakMemory(proc.pid, *also)
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    mem = peak.stop()
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{out.decode()[-3000:]}")
    if output is not None:
        output |= {"end": time.time(), "text": out.decode(errors="replace")}
    return seconds, mem


def warm(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            f.read_bytes()


def run_dcm2niix(archive: Path, out: Path, z: str) -> tuple[float, int]:
    import dcm2niix

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return measured([dcm2niix.bin, "-z", z, "-f", "%s_%j", "-o", str(out), str(archive)])


def run_library(archive: Path, store: Path) -> tuple[float, int]:
    shutil.rmtree(store, ignore_errors=True)
    code = ("import sys; sys.path.insert(0, %r); from voxelflow.ingest import IngestConfig, run_local; "
            "run_local(IngestConfig(sources=[%r], store=%r))" % (str(ROOT), str(archive), str(store)))
    return measured([sys.executable, "-c", code])


# Seconds the Prefect server is left alone before a CLI run: right after a run it is still
# writing that run's events and logs to SQLite, which delayed the next run's first tasks by ~2 s
# (a user's first try meets an idle server).
SETTLE_S = 8.0


def run_cli(archive: Path, store: Path, workers: int | None, env: dict, output: dict | None = None,
            also: tuple[int, ...] = ()) -> tuple[float, int]:
    shutil.rmtree(store, ignore_errors=True)
    time.sleep(SETTLE_S)
    return measured([sys.executable, "-m", "flows.cli", "ingest", str(archive), "--store", str(store),
                     *(["--workers", str(workers)] if workers else [])], env, output, also)


def breakdown(output: dict) -> dict:
    """Where a CLI run's time went, from its log file's timestamps (its path is the run's
    first line): imports, the API check and the store, flow start and listing, cluster start,
    scan and conversion, catalog and artifacts, the QC gallery, exit."""
    import re
    from datetime import datetime

    log = Path(re.search(r"^log: (\S+)$", output["text"], re.M).group(1)).read_text()
    day = datetime.fromtimestamp(output["start"]).strftime("%Y-%m-%d")

    def when(pattern: str, last: bool = False) -> float | None:
        hits = [m.group(1) for m in re.finditer(r"^(\d\d:\d\d:\d\d\.\d\d\d) \|.*" + pattern, log, re.M)]
        if not hits:
            return None
        return datetime.strptime(f"{day} {hits[-1 if last else 0]}", "%Y-%m-%d %H:%M:%S.%f").timestamp()

    flow = when("Beginning flow run")
    listed = when("input files from")
    cluster, ready = when("Creating a new Dask cluster"), when("The Dask dashboard is available")
    last_task = when("Task run 'convert-series.*Finished", last=True)
    done = when("ingest done:")
    qc = when("QC gallery ")  # the step's last line
    parts = {"start: Python, imports, API check, store": flow - output["start"],
             "flow start, listing": listed - flow,
             "cluster start": (ready - cluster) if cluster and ready else 0.0,
             "scan + conversion": last_task - (ready if cluster and ready else listed),
             "catalog, artifacts": done - last_task,
             "QC gallery": (qc - done) if qc else 0.0,
             "exit": output["end"] - (qc or done)}
    return {k: round(v, 2) for k, v in parts.items()}


def bench_archive(name: str, archive: Path, work: Path, env: dict) -> dict:
    """Every tool on one archive; returns its results with ratios."""
    files = [f for f in archive.rglob("*") if f.is_file()]
    n, nbytes = len(files), sum(f.stat().st_size for f in files)
    warm(archive)
    results = []

    def record(tool, seconds_mem, out: Path):
        seconds, mem = seconds_mem
        results.append({"tool": tool, "seconds": round(seconds, 3), "ms_per_file": round(1000 * seconds / n, 3),
                        "files_per_s": round(n / seconds, 1), "MB_per_s": round(nbytes / 1e6 / seconds, 1),
                        "peak_MB": round(mem / 2**20), "output_MB": round(du(out) / 1e6, 1)})
        print(f"  {name}: {tool}: {seconds:.2f} s, peak {mem / 2**20:.0f} MB", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)  # keep the disk for the next run

    out = work / "out"
    record("dcm2niix -z n", run_dcm2niix(archive, out, "n"), out)
    record("dcm2niix -z y", run_dcm2niix(archive, out, "y"), out)
    record("voxelflow library, 1 process (no Prefect/Dask)", run_library(archive, out), out)
    default: dict = {}
    record("voxelflow ingest (CLI), as users run it", run_cli(archive, out, None, env, default), out)
    warm_run: dict = {}
    if small_input([str(archive)]) is not None:  # what the warm runner is for: imports outweigh the work
        home = Path(env["VOXELFLOW_HOME"])
        runner = warm_runner.start(home)
        if not runner:
            raise RuntimeError(f"the warm runner did not start: {(home / warm_runner.LOG_NAME).read_text()[-3000:]}")
        try:  # its memory counts the runner's too: the command runs in its child
            record("voxelflow ingest (CLI), warm runner up (`voxelflow server start`)",
                   run_cli(archive, out, None, env, warm_run, also=(runner,)), out)
        finally:
            warm_runner.stop(home)
    for w in (1, 2):
        record(f"voxelflow ingest (CLI), {w} Dask worker{'s' if w > 1 else ''}", run_cli(archive, out, w, env), out)
    ref = {z: next(r for r in results if r["tool"] == f"dcm2niix -z {z}")["seconds"] for z in "ny"}
    for r in results:
        r["speed_vs_dcm2niix_zy"] = round(ref["y"] / r["seconds"], 2)
        r["speed_vs_dcm2niix_zn"] = round(ref["n"] / r["seconds"], 2)
    lib = next(r for r in results if r["tool"].startswith("voxelflow library"))["seconds"]
    cli1 = next(r for r in results if "1 Dask worker" in r["tool"])["seconds"]
    return {"archive": name, "files": n, "input_MB": round(nbytes / 1e6, 1),
            "prefect_dask_overhead_s": round(cli1 - lib, 2), "results": results,
            "default_cli_breakdown_s": breakdown(default),
            **({"warm_cli_breakdown_s": breakdown(warm_run)} if warm_run else {})}


def print_table(b: dict) -> None:
    print(f"\n{b['archive']}: {b['files']} files, {b['input_MB']:.0f} MB, {os.cpu_count()} CPUs\n")
    print("| tool | wall s | ms/file | files/s | MB/s | peak memory MB | output MB | vs dcm2niix -z y | vs -z n |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in b["results"]:
        print(f"| {r['tool']} | {r['seconds']:.2f} | {r['ms_per_file']:.2f} | {r['files_per_s']:.0f} | "
              f"{r['MB_per_s']:.0f} | {r['peak_MB']} | {r['output_MB']:.0f} | {r['speed_vs_dcm2niix_zy']:.2f}x | "
              f"{r['speed_vs_dcm2niix_zn']:.2f}x |")
    over = b["prefect_dask_overhead_s"]
    print(f"\nPrefect + Dask overhead (CLI 1 worker - library): {over:.2f} s ({1000 * over / b['files']:.2f} ms/file)")
    for name, key in (("CLI as users run it", "default_cli_breakdown_s"), ("CLI, warm runner up", "warm_cli_breakdown_s")):
        if key in b:
            parts = b[key]
            print(f"{name}, from its log: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
                  + f"; fixed cost (all but scan + conversion) {sum(parts.values()) - parts['scan + conversion']:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=10)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--many", default="10000,100000", help="sizes of the many-file archives (comma-separated; "
                                                           "empty: none)")
    ap.add_argument("--skip-ct", action="store_true")
    ap.add_argument("--study", action="store_true", help="also one CT study: 3 series x 104 slices of 512x512")
    ap.add_argument("--workdir", default=str(ROOT / "bench-output"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    print("generating the archives (cached between runs)...", file=sys.stderr)
    archives = []
    if args.study:
        archives.append(("CT study (3 series of 104 x 512x512)", make_archive(work / "study", 3, 104, 512)))
    if not args.skip_ct:
        archives.append((f"CT archive ({args.series} series of {args.slices} x {args.size}x{args.size})",
                         make_archive(work, args.series, args.slices, args.size)))
    for size in [int(v) for v in args.many.split(",") if v.strip()]:
        archives.append((f"many-file archive ({size} files of 64x64, series of 100)", make_many(work, size)))

    from flows.runtime import ensure_prefect_api

    api = ensure_prefect_api()  # started once, reused by every CLI run below
    # a home of the bench's own: no warm runner of the user's serves the "as users run it" rows
    home = work / "home"
    os.environ["VOXELFLOW_HOME"] = str(home)
    env = {**os.environ, "PREFECT_API_URL": api.api_url}
    benches = [bench_archive(name, archive, work, env) for name, archive in archives]
    meta = {"cpus": os.cpu_count(), "python": platform.python_version()}
    (work / "results.json").write_text(json.dumps({"meta": meta, "archives": benches}, indent=2))
    for b in benches:
        print_table(b)
    print_growth([b for b in benches if b["archive"].startswith("many-file")])
    print("\nPeak memory: the whole process tree (the CLI: its Dask workers and nanny processes too).")


def print_growth(benches: list[dict]) -> None:
    """Peak memory of each tool across the many-file archives, and what each added file costs."""
    if len(benches) < 2:
        return
    sizes = [b["files"] for b in benches]
    print("\nPeak memory (MB) as the archive grows:\n")
    print("| tool | " + " | ".join(f"{n:,} files" for n in sizes) + " | bytes per added file |")
    print("|---|" + "---:|" * (len(sizes) + 1))
    for tool in [r["tool"] for r in benches[0]["results"]]:
        peaks = [next(r["peak_MB"] for r in b["results"] if r["tool"] == tool) for b in benches]
        per_file = (peaks[-1] - peaks[0]) * 2**20 / (sizes[-1] - sizes[0])
        print(f"| {tool} | " + " | ".join(str(p) for p in peaks) + f" | {per_file:.0f} |")


if __name__ == "__main__":
    main()
