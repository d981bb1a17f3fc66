"""Real-scanner corpus benchmark: voxelflow against dcm2niix on ../shared/dicom-corpus (GE,
Philips and Siemens MR: mosaics, enhanced multi-frame, 4-D fMRI / DWI / ASL), in one run.

    .venv/bin/python bench/corpus.py [--repeat 3]

Times, best of ``--repeat`` runs, end to end:
  * dcm2niix ``-b y -z y`` and ``-z n`` (with sidecars, as the references were made), one
    process per corpus set;
  * voxelflow's library (``run_local``: scan, plan, convert, catalog) over all six sets in one
    run, and the export of every volume as NIfTI + sidecar (+ bval/bvec).
dcm2niix cannot read gzip-compressed DICOM, so ``dcm_qa_philips_enh`` is given to it
gunzipped (the decompression is not timed); voxelflow reads the ``.dcm.gz`` files as they are.
Prints seconds, files/s and ratios against dcm2niix.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from voxelflow.export import export_nifti  # noqa: E402
from voxelflow.ingest import IngestConfig, run_local  # noqa: E402

CORPUS = ROOT.parent / "shared" / "dicom-corpus"
SETS = ("dcm_qa", "dcm_qa_enh", "dcm_qa_ge", "dcm_qa_philips", "dcm_qa_philips_enh", "dcm_qa_xa30")


def _gunzipped(src: Path, dest: Path) -> Path:
    for p in src.rglob("*"):
        if p.is_file():
            target = dest / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if p.name.endswith(".gz"):
                target.with_name(p.name[:-3]).write_bytes(gzip.decompress(p.read_bytes()))
            else:
                shutil.copy(p, target)
    return dest


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    import dcm2niix

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not CORPUS.is_dir():
        sys.exit(f"no corpus at {CORPUS}")
    work = Path(tempfile.mkdtemp(prefix="vf-corpus-bench-"))
    inputs = {s: CORPUS / s / "In" for s in SETS}
    plain = dict(inputs, dcm_qa_philips_enh=_gunzipped(inputs["dcm_qa_philips_enh"], work / "philips_enh"))
    files = sum(1 for s in SETS for p in inputs[s].rglob("*") if p.is_file())

    def run_dcm2niix(z: str) -> None:
        out = work / f"d2n-{z}"
        shutil.rmtree(out, ignore_errors=True)
        for s in SETS:
            (out / s).mkdir(parents=True)
            subprocess.run([dcm2niix.bin, "-b", "y", "-z", z, "-o", str(out / s), str(plain[s])],
                           check=True, capture_output=True)

    def run_library() -> None:
        store = work / "store"
        shutil.rmtree(store, ignore_errors=True)
        run_local(IngestConfig(sources=[str(inputs[s]) for s in SETS], store=str(store)))

    def run_export() -> None:
        shutil.rmtree(work / "nii", ignore_errors=True)
        export_nifti(work / "store", work / "nii")

    rows = [("dcm2niix -z y", _best(lambda: run_dcm2niix("y"), args.repeat)),
            ("dcm2niix -z n", _best(lambda: run_dcm2niix("n"), args.repeat)),
            ("voxelflow library ingest", _best(run_library, args.repeat)),
            ("voxelflow export (NIfTI .gz + sidecar + bval/bvec)", _best(run_export, args.repeat))]
    ingest_export = rows[2][1] + rows[3][1]
    rows.append(("voxelflow ingest + export", ingest_export))
    print(f"\nreal-scanner corpus: {files} files, best of {args.repeat}\n")
    print("| tool | seconds | files/s | vs dcm2niix -z y | vs dcm2niix -z n |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {files / seconds:.0f} | {rows[0][1] / seconds:.2f}x | "
              f"{rows[1][1] / seconds:.2f}x |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
