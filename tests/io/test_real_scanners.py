"""Real scanners: every series of the DICOM corpus (../shared/dicom-corpus: GE, Philips and
Siemens MR, classic and enhanced, mosaics, 4-D fMRI / DWI / ASL, field maps, multi-echo) is
ingested and exported, and every dcm2niix reference is compared in world space: shape
(including the time axis), affine, scaled voxels, and for DWI the b-values and directions.
Misses are allowed only where KNOWN explains them."""

from __future__ import annotations

import csv
import fnmatch
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import ingest_config
from voxelflow import catalog
from voxelflow.export import export_nifti
from voxelflow.io.dicom.diffusion import world_directions
from voxelflow.ingest import run_local

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "dicom-corpus"
pytestmark = pytest.mark.skipif(not (CORPUS / "MANIFEST.tsv").is_file(),
                                reason=f"the real-scanner DICOM corpus is not at {CORPUS}")

# reference -> why it does not match (reviewed by hand); none left
KNOWN: dict[str, str] = {}


def _manifest() -> list[dict[str, str]]:
    with open(CORPUS / "MANIFEST.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _references() -> list[tuple[str, str, str]]:
    """``(repo, series folder or pattern, reference path)`` for every reference."""
    return [(row["repo"], row["folder"], ref.split(" ")[0])
            for row in _manifest() for ref in row["references"].split("; ")]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each corpus repository ingested into a store of its own and exported: ``{repo: (files
    rows, [(volume row, exported path)])}``, and the time it took."""
    root = tmp_path_factory.mktemp("real-scanners")
    out, started = {}, time.perf_counter()
    for repo in sorted({r["repo"] for r in _manifest()}):
        store = root / repo
        run_local(ingest_config([CORPUS / repo / "In"], store))
        exported = {p.name.removesuffix(".nii.gz"): p for p in export_nifti(store, root / f"{repo}-nii")}
        volumes = catalog.read_table(store, "volumes").to_pylist()
        out[repo] = (catalog.read_table(store, "files").to_pylist(),
                     [(v, exported[v["volume_id"]]) for v in volumes])
    return out, time.perf_counter() - started


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """Voxels (scaled) and affine in the closest canonical orientation, and the file's slope."""
    raw = nib.load(path)
    slope = getattr(raw.dataobj, "slope", 1.0)
    if raw.get_data_dtype().names:  # RGB24: the colour channels as a 4th axis
        rgb = np.asanyarray(raw.dataobj)
        raw = nib.Nifti1Image(np.stack([rgb[c] for c in "RGB"], axis=-1).astype(np.float64), raw.affine)
    img = nib.as_closest_canonical(raw)
    return np.asarray(img.get_fdata(dtype=np.float64)), img.affine, abs(float(slope)) if np.isfinite(slope) else 1.0


def _of_series(folder: str, volume: dict) -> bool:
    pattern = folder.removeprefix("In/")
    return any(f == pattern or f.startswith(pattern + "/") or fnmatch.fnmatch(f, pattern)
               for f in volume["source_files"])


def _fsl(path: Path, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """b-values and world (RAS) directions of a NIfTI's .bval/.bvec, or None."""
    stem = str(path).removesuffix(".nii.gz")
    if not Path(stem + ".bval").is_file():
        return None
    bvals = np.loadtxt(stem + ".bval", ndmin=1)
    bvecs = np.loadtxt(stem + ".bvec", ndmin=2)
    return bvals, world_directions(bvecs, affine)


def _compare(ours: Path, ref: Path) -> str:
    """"" when ``ours`` equals ``ref`` in world space, else what differs."""
    a, aff_a, _ = _canonical(ours)
    b, aff_b, slope = _canonical(ref)
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    if not np.allclose(aff_a, aff_b, atol=1e-4):
        return f"affine differs by {np.abs(aff_a - aff_b).max():.3g} mm"
    diff = float(np.max(np.abs(a - b)))
    if diff > 0.5 * slope + 1e-6 * max(1.0, float(np.abs(b).max())):
        return f"voxels differ by up to {diff:.6g} (reference slope {slope:.6g})"
    fsl_ref = _fsl(ref, nib.load(ref).affine)
    if fsl_ref is not None:
        fsl_ours = _fsl(ours, nib.load(ours).affine)
        if fsl_ours is None:
            return "no .bval/.bvec written"
        if not np.allclose(fsl_ours[0], fsl_ref[0], atol=1):
            return f"b-values {fsl_ours[0].tolist()} != {fsl_ref[0].tolist()}"
        if not np.allclose(fsl_ours[1], fsl_ref[1], atol=1e-4):
            return f"diffusion directions differ by up to {np.abs(fsl_ours[1] - fsl_ref[1]).max():.3g}"
    return ""


@pytest.fixture(scope="module")
def matches(converted) -> dict[str, tuple[Path | None, str]]:
    """Each reference -> (our exported volume equal to it, or None; why not)."""
    repos, _ = converted
    out = {}
    for repo, folder, ref in _references():
        name = f"{repo}/{ref}"
        # DICOM-sourced volumes first: dcm_qa's axasc35 folder also holds a NIfTI that upstream
        # left there (a dcm2niix output, equal to the reference but without a sidecar)
        candidates = [path for vol, path in sorted(repos[repo][1], key=lambda vp: vp[0]["kind"] != "dicom")
                      if _of_series(folder, vol)]
        results = [(path, _compare(path, CORPUS / repo / ref)) for path in candidates] if name not in KNOWN else []
        same = [path for path, why in results if not why]
        out[name] = (same[0], "") if same else (
            None, KNOWN.get(name) or "; ".join(sorted({why for _, why in results})) or "no volume from its series")
    return out


def test_every_reference_matches_in_world_space(converted, matches):
    _, seconds = converted
    matched = sum(path is not None for path, _ in matches.values())
    misses = {name: why for name, (path, why) in matches.items() if path is None}
    total = len(_references())
    print(f"\n{matched}/{total} references matched (ingest + export of the corpus: {seconds:.1f} s)")
    for name, why in misses.items():
        print(f"  miss {name}: {why}")
    assert total == 63
    unexplained = {k: v for k, v in misses.items() if k not in KNOWN}
    assert not unexplained, unexplained


def test_every_input_file_has_one_row_and_no_series_is_refused_for_want_of_a_distinguisher(converted):
    repos, _ = converted
    for repo, (files, _) in repos.items():
        on_disk = sorted(p.relative_to(CORPUS / repo / "In").as_posix()
                         for p in (CORPUS / repo / "In").rglob("*") if p.is_file())
        assert sorted(r["path"] for r in files) == on_disk, repo
        assert all(r["reason"] for r in files if r["status"] != "converted")
        refused = [r for r in files if "separates them" in (r["reason"] or "")]
        assert not refused, refused[:3]


def test_sidecars_equal_dcm2niix_for_every_field_both_write(matches):
    from tests.io.test_sidecar import NOT_COMPARED, _axes_of_reference, _in_our_frame, _known, _same

    compared = same = 0
    wrong = []
    for name, (ours, _) in matches.items():
        if ours is None:
            continue
        sidecar = Path(str(ours).removesuffix(".nii.gz") + ".json")
        assert sidecar.is_file(), f"no sidecar beside the export of {name}"
        mine = json.loads(sidecar.read_text())
        ref_path = CORPUS / name.removesuffix(".nii.gz")
        ref = json.loads(Path(f"{ref_path}.json").read_text())
        orientation = nib.load(ours).affine  # our voxel axes: DICOM rows, columns, normal (RAS)
        axes = _axes_of_reference(Path(f"{ref_path}.nii.gz"), _dicom_orientation(orientation))
        for field in sorted(set(mine) & set(ref) - NOT_COMPARED):
            compared += 1
            if _same(mine[field], _in_our_frame(field, ref[field], axes)):
                same += 1
            elif not _known(ref_path.name, field):
                wrong.append(f"{name}.{field}: voxelflow {mine[field]!r} dcm2niix {ref[field]!r}")
        for field in ("Modality", "Manufacturer", "EchoTime", "RepetitionTime"):
            assert field not in ref or field in mine, f"{name}: the sidecar lacks {field}"
    print(f"\nsidecar fields through ingest + export: {same}/{compared} equal to dcm2niix's")
    assert compared > 1000
    assert not wrong, "\n".join(wrong)


def _dicom_orientation(affine: np.ndarray) -> list[float]:
    """ImageOrientationPatient (LPS row and column cosines) of an image voxelflow exported:
    its first two voxel axes run along DICOM's rows and columns."""
    axes = affine[:3, :2] / np.linalg.norm(affine[:3, :2], axis=0)
    lps = np.diag([-1.0, -1.0, 1.0]) @ axes
    return [*lps[:, 0], *lps[:, 1]]


def test_both_header_readers_give_the_same_records_on_the_corpus():
    """The fast reader and pydicom agree on real vendors' files (GE and Philips private tags
    in implicit and explicit VR, Siemens mosaics, enhanced files): 40 files of each set."""
    from voxelflow.io.dicom import scan_dicom
    from voxelflow.io.dicom.fast_header import read_header

    checked = fast = 0
    for repo in sorted({r["repo"] for r in _manifest()}):
        paths = [p for p in sorted((CORPUS / repo / "In").rglob("*"))
                 if p.is_file() and not p.name.endswith(".gz") and p.suffix not in (".txt", ".pdf", ".nii", ".md")]
        for path in paths[:: max(1, len(paths) // 40)]:
            try:
                a = scan_dicom(str(path), path.name, b"k" * 32)
            except Exception as exc:  # noqa: BLE001 - both readers must fail alike
                a = f"{type(exc).__name__}: {exc}"
            try:
                b = scan_dicom(str(path), path.name, b"k" * 32, fast=False)
            except Exception as exc:  # noqa: BLE001
                b = f"{type(exc).__name__}: {exc}"
            assert a == b, path
            checked += 1
            fast += read_header(path.read_bytes()[:1 << 20]) is not None
    assert checked > 150 and fast > 50, (checked, fast)
