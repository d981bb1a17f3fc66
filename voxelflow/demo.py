"""The demo archive: real DICOM/NIfTI files that PyPI packages ship, a generated CT study,
and the kinds of junk real exports contain, packed as a zip, a tar.gz and a folder."""

from __future__ import annotations

import gzip
import shutil
import tarfile
import zipfile
from pathlib import Path

from voxelflow.phantom import SeriesSpec, ct_phantom, oblique_orientation, write_ct_series


def _pydicom_files() -> Path:
    import pydicom.data

    return Path(pydicom.data.get_testdata_file("MR_small.dcm")).parent


def _nibabel_files() -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data"


def build_demo_archive(outdir: str | Path, shape: tuple[int, int, int] = (80, 192, 192)) -> list[str]:
    """Create the demo sources under ``outdir`` and return them (zip, tar.gz, folder)."""
    out = Path(outdir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    # 1. A generated CT study: an axial chest series and an oblique reformat, in one zip,
    #    with a readme and a truncated copy of one slice (as broken transfers leave them).
    study = out / "_ct"
    hu = ct_phantom(shape, spacing=(2.5, 0.8, 0.8), seed=1)
    axial = SeriesSpec(series_number=1, origin=(-76.8, -76.8, -100.0))
    write_ct_series(hu, study / "axial", axial)
    oblique = SeriesSpec(series_number=2, study_uid=axial.study_uid, orientation=oblique_orientation(20, 25),
                         origin=(-70.0, -80.0, -90.0), slice_spacing=3.0, descending=True)
    write_ct_series(hu[::2, ::2, ::2], study / "oblique", oblique)
    (study / "README.txt").write_text("Export from the demo PACS.\n")
    first = sorted((study / "axial").iterdir())[0].read_bytes()
    (study / "broken").mkdir()
    (study / "broken" / "IM_truncated.dcm").write_bytes(first[: len(first) // 3])
    zip_path = out / "ct-study.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(study.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(study).as_posix())
    shutil.rmtree(study)

    # 2. Real DICOM shipped with pydicom: multi-slice CT series, scouts, several MR series in
    #    a folder, a DICOMDIR, a structured report, compressed single images, a truncated file.
    pyd = _pydicom_files()
    tar_path = out / "pydicom-samples.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        for sub in ("98892001/CT5N", "98892001/CT2N", "77654033/CT2", "98892003/MR1",
                    "98892003/MR2"):
            tf.add(pyd / "dicomdirtests" / sub, arcname=f"dicomdir/{sub}")
        tf.add(pyd / "dicomdirtests" / "DICOMDIR", arcname="dicomdir/DICOMDIR")
        for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm",
                     "rtstruct.dcm", "test-SR.dcm", "MR_truncated.dcm", "SC_rgb_rle.dcm"):
            tf.add(pyd / name, arcname=f"singles/{name}")

    # 3. A folder of NIfTI from nibabel's tests (big-endian, 4-D, NIfTI-2) and a corrupt one.
    nif = out / "nifti"
    nif.mkdir()
    nib_dir = _nibabel_files()
    for name in ("anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz"):
        shutil.copy(nib_dir / name, nif / name)
    good = gzip.compress((nib_dir / "anatomical.nii").read_bytes())
    (nif / "corrupt.nii.gz").write_bytes(good[: len(good) // 2])
    return [str(zip_path), str(tar_path), str(nif)]
