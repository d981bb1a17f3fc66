"""Wheels for the GPU machine: what the GPU benchmarks import that its image lacks, at the
versions this checkout's virtual environment holds, for its Python (3.12, x86-64 manylinux).

    .venv/bin/python bench/gpu/wheels.py            # -> .whl/ (git-ignored), carried by bench/gpu/run.sh

The machine cannot reach PyPI; its image already holds PyTorch, pyarrow, pandas, scipy and the
rest listed in device-packages.txt (read from the workplace's notes on that image). From the
benchmarks' direct needs, each wheel's requirements are followed (markers evaluated for the
machine's Python), skipping what the image has; each is downloaded without its dependencies,
so PyTorch is never fetched again. Prints the wheels and their total size (a call carries at
most 64 MiB).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# what bench/lesion.py, ranks.py, plan_memory.py and train.py import, beyond the image (their
# synthetic archives are CT only: no nilearn; no SQL, no DICOM-SEG: no duckdb, no highdicom)
NEEDS = ["pydantic", "zarr", "numcodecs", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
         "pylibjpeg-rle", "nibabel", "monai", "pyjpegls", "dask", "distributed", "universal-pathlib", "xxhash",
         "fsspec", "pyyaml", "rich"]
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_system": "Linux",
          "sys_platform": "linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
# the image is Ubuntu 24.04 (glibc 2.39); pip matches each tag exactly
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64",
                                                                                    "manylinux1_x86_64"]


def device_packages() -> set[str]:
    lines = [line for line in (HERE / "device-packages.txt").read_text().splitlines() if not line.startswith("#")]
    return {canonicalize_name(n.strip(".")) for n in re.split(r"[,\s]+", " ".join(lines)) if n.strip(".")}


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(TARGET)]


def download(name: str, out: Path) -> Path:
    """The wheel of ``name`` at this environment's version, in ``out``."""
    version = metadata.version(name)  # the version tested here
    stem = canonicalize_name(name)
    for wheel in out.glob("*.whl"):  # from an earlier run
        dist, ver = wheel.name.split("-")[:2]
        if canonicalize_name(dist) == stem and ver == version:
            return wheel
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                           "--python-version", "3.12", "--implementation", "cp",
                           *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(out), f"{name}=={version}"],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"no wheel of {name}=={version} for the GPU machine:\n{proc.stderr[-2000:]}")
    return next(w for w in out.glob("*.whl")
                if canonicalize_name(w.name.split("-")[0]) == stem and w.name.split("-")[1] == version)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / ".whl"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    have = device_packages()
    todo, done, wheels = [canonicalize_name(n) for n in NEEDS], set(), []
    while todo:
        name = todo.pop()
        if name in done or name in have:
            continue
        done.add(name)
        wheel = download(name, out)
        wheels.append(wheel)
        todo += [canonicalize_name(r.name) for r in requirements(wheel)]
    for stale in set(out.glob("*.whl")) - set(wheels):
        stale.unlink()
    size = sum(w.stat().st_size for w in wheels)
    for w in sorted(wheels):
        print(f"{w.stat().st_size / 2 ** 20:6.1f} MiB  {w.name}")
    print(f"{len(wheels)} wheels, {size / 2 ** 20:.1f} MiB in {out}")


if __name__ == "__main__":
    main()
