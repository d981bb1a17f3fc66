"""A deterministic, labelled synthetic archive that looks like a real export.

``build_synthetic_archive(outdir, SynthConfig(patients=20, seed=0))`` writes::

    OUTDIR/images/ct/<patient>/<series>/IM*.dcm   CT series (pydicom), some RLE / JPEG-LS /
                                                  JPEG 2000 lossless, assorted geometry
    OUTDIR/images/mr/<patient>_t1.nii.gz          MR-like T1 volumes built from the MNI ICBM152
                                                  2009a template nilearn ships
    OUTDIR/labels/ct/<patient>_seg.nii.gz         label maps on the image grid: 1 liver, 2 lesion
    OUTDIR/labels/ct/<patient>_seg.dcm            the same as DICOM-SEG (highdicom), some patients
    OUTDIR/labels/mr/<patient>_seg.nii.gz         1 grey matter, 2 white matter
    OUTDIR/labels/segmentations.csv               image -> segmentation file, under the label
                                                  name ``segmentation`` (CT: liver, lesion) or
                                                  ``brain`` (MR: tissues), never mixed
    OUTDIR/labels/labels.csv                      per-series class: lesion / no_lesion (about 1:4)

Everything derives from the seed: the same seed gives the same pixel data, UIDs and labels.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from voxelflow.geometry import dicom_affine, slice_normal
from voxelflow.phantom import SeriesSpec, oblique_orientation, write_ct_series

LIVER, LESION = 1, 2
GREY_MATTER, WHITE_MATTER = 1, 2
COMPRESSIONS = (None, None, RLELossless, JPEGLSLossless, JPEG2000Lossless)


@dataclass(frozen=True)
class SynthConfig:
    patients: int = 20  # CT patients
    mr_patients: int = 4
    seed: int = 0
    shape: tuple[int, int, int] = (48, 128, 128)  # CT (slices, rows, cols)
    positive_fraction: float = 0.2  # share of CT series with lesions (1:4)
    dicom_seg_every: int = 4  # every n-th CT patient also gets a DICOM-SEG


def _ellipsoid(grid, centre, radii) -> np.ndarray:
    z, y, x = grid
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + \
        ((x - centre[2]) / radii[2]) ** 2 <= 1.0


def synthetic_ct(shape, spacing, rng: np.random.Generator, n_lesions: int) -> tuple[np.ndarray, np.ndarray]:
    """A torso slab in HU and its label map (1 liver, 2 lesion), both ``(z, y, x)``.

    Body, fat rim, lungs, spine, kidneys and spleen (unlabelled distractors) and a liver; the
    lesions are ellipsoids of 6-15 mm radius inside the liver, hypo- or hyper-dense by
    30-70 HU.
    """
    sz, sy, sx = spacing
    grid = np.meshgrid(*(np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)), indexing="ij")
    ext = [n * s for n, s in zip(shape, spacing)]
    cz, cy, cx = (e / 2 for e in ext)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body_r = (ext[0] * 4, ext[1] * rng.uniform(0.30, 0.36), ext[2] * rng.uniform(0.40, 0.45))
    body = _ellipsoid(grid, (cz, cy, cx), body_r)
    hu[body] = -90.0  # fat
    inner = _ellipsoid(grid, (cz, cy, cx), (body_r[0], body_r[1] - 12, body_r[2] - 12))
    hu[inner] = 30.0  # muscle / soft tissue
    for side in (-1, 1):
        lung = _ellipsoid(grid, (ext[0] * 0.05, cy - 10, cx + side * ext[2] * 0.17),
                          (ext[0] * 0.35, ext[1] * 0.17, ext[2] * 0.12))
        hu[lung & inner] = -850.0
        kidney = _ellipsoid(grid, (ext[0] * 0.7, cy + ext[1] * 0.12, cx + side * ext[2] * 0.2),
                            (30, 22, 18))
        hu[kidney & inner] = 150.0
    spine = _ellipsoid(grid, (cz, cy + ext[1] * 0.22, cx), (ext[0] * 4, 14, 14))
    hu[spine] = 650.0
    spleen = _ellipsoid(grid, (ext[0] * 0.45, cy - 5, cx + ext[2] * 0.22), (35, 30, 22))
    hu[spleen & inner] = 95.0
    liver_c = (ext[0] * rng.uniform(0.45, 0.6), cy + rng.uniform(-12, 0), cx - ext[2] * rng.uniform(0.14, 0.2))
    liver_r = (ext[0] * rng.uniform(0.3, 0.4), ext[1] * rng.uniform(0.19, 0.24), ext[2] * rng.uniform(0.17, 0.21))
    liver = _ellipsoid(grid, liver_c, liver_r) & inner
    hu[liver] = rng.uniform(55, 70)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[liver] = LIVER
    placed = 0
    for _ in range(50 * max(1, n_lesions)):
        if placed == n_lesions:
            break
        r = rng.uniform(6, 15)
        radii = (max(r, sz * 0.75), r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2))
        c = [rng.uniform(lc - lr * 0.6, lc + lr * 0.6) for lc, lr in zip(liver_c, liver_r)]
        lesion = _ellipsoid(grid, c, radii)
        if lesion.sum() == 0 or not (liver[lesion]).all():
            continue  # lesions lie inside the liver
        hu[lesion] += rng.choice([-1, 1]) * rng.uniform(30, 70)
        labels[lesion] = LESION
        placed += 1
    hu += rng.normal(0, 12, size=shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), labels


def _label_nifti(labels_zyx: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.ascontiguousarray(np.transpose(labels_zyx, (2, 1, 0))), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return img


def _dicom_seg(image_paths: list[Path], labels_zyx: np.ndarray, out: Path, uid_seed: str) -> None:
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(p) for p in image_paths]
    # Files are written in instance order; map each file's slice back to the label map.
    normal = slice_normal([float(v) for v in sources[0].ImageOrientationPatient])
    origin = min(float(np.dot(normal, [float(v) for v in s.ImagePositionPatient])) for s in sources)
    step = float(np.linalg.norm(np.diff(sorted(float(np.dot(normal, [float(v) for v in s.ImagePositionPatient]))
                                                 for s in sources)[:2])))
    frames = np.stack([labels_zyx[int(round((float(np.dot(normal, [float(v) for v in s.ImagePositionPatient]))
                                             - origin) / step))] for s in sources])
    algo = hd.AlgorithmIdentificationSequence(name="voxelflow-synth", version="1",
                                              family=codes.DCM.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(segment_number=LIVER, segment_label="liver",
                                  segmented_property_category=codes.SCT.Organ,
                                  segmented_property_type=codes.SCT.Liver,
                                  algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL),
        hd.seg.SegmentDescription(segment_number=LESION, segment_label="lesion",
                                  segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                                  segmented_property_type=codes.SCT.Lesion,
                                  algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL),
    ]
    del algo
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=generate_uid(entropy_srcs=[uid_seed, "seg-series"]),
        series_number=100, sop_instance_uid=generate_uid(entropy_srcs=[uid_seed, "seg"]), instance_number=1,
        manufacturer="voxelflow", manufacturer_model_name="synth", software_versions="1",
        device_serial_number="0", omit_empty_frames=False)
    seg.save_as(out)


def _mni(name: str) -> nib.Nifti1Image:
    import nilearn

    return nib.load(Path(nilearn.__file__).parent / "datasets" / "data" /
                    f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")


def synthetic_mr(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An MR-like T1 volume from the MNI template: 2 mm, random intensity scale, smooth bias
    field and noise, a random axis flip (other orientation codes). Returns (data, labels,
    affine) in NIfTI order; labels 1 grey matter, 2 white matter."""
    t1, gm, wm = (_mni(n) for n in ("t1", "gm", "wm"))
    step = 2
    data = np.asarray(t1.dataobj, dtype=np.float32)[::step, ::step, ::step]
    g = np.asarray(gm.dataobj, dtype=np.float32)[::step, ::step, ::step]
    w = np.asarray(wm.dataobj, dtype=np.float32)[::step, ::step, ::step]
    affine = t1.affine @ np.diag([step, step, step, 1.0])
    labels = np.where((g > 0.5) & (g >= w), GREY_MATTER, np.where(w > 0.5, WHITE_MATTER, 0)).astype(np.uint8)
    shape = np.array(data.shape)
    axes = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    coef = rng.uniform(-0.15, 0.15, size=3)
    bias = np.exp(sum(c * a for c, a in zip(coef, axes)))
    data = data * bias * rng.uniform(400, 1200) / max(float(data.max()), 1.0)
    data += rng.normal(0, rng.uniform(5, 15), size=data.shape).astype(np.float32)
    data = np.clip(data, 0, None)
    flip = int(rng.integers(0, 3))
    data, labels = np.flip(data, flip), np.flip(labels, flip)
    flip_m = np.eye(4)
    flip_m[flip, flip] = -1
    flip_m[flip, 3] = shape[flip] - 1
    affine = affine @ flip_m
    return np.ascontiguousarray(np.rint(data).astype(np.int16)), np.ascontiguousarray(labels), affine


def build_synthetic_archive(outdir: str | Path, config: SynthConfig = SynthConfig()) -> Path:
    """Write the archive (see the module docstring) and return ``outdir``."""
    out = Path(outdir)
    if out.exists():
        shutil.rmtree(out)
    (out / "labels" / "ct").mkdir(parents=True)
    (out / "labels" / "mr").mkdir(parents=True)
    rng = np.random.default_rng(config.seed)
    n_pos = int(round(config.patients * config.positive_fraction))
    positive = set(rng.permutation(config.patients)[:n_pos].tolist())
    class_rows, seg_rows = [], []
    for i in range(config.patients):
        prng = np.random.default_rng([config.seed, i])
        pid = f"SYN{i:04d}"
        seed_text = f"{config.seed}-{i}"
        spacing_inplane = float(prng.choice([2.4, 2.6, 2.8, 3.0]))
        slice_spacing = float(prng.choice([2.5, 3.0, 4.0, 5.0]))
        kind = i % 4  # assorted orientation and patient position
        orientation = {0: (1, 0, 0, 0, 1, 0), 1: (1, 0, 0, 0, 1, 0),
                       2: (-1, 0, 0, 0, 1, 0), 3: oblique_orientation(float(prng.uniform(5, 15)))}[kind]
        position = "FFS" if kind == 2 else "HFS"
        hu, labels = synthetic_ct(config.shape, (slice_spacing, spacing_inplane, spacing_inplane), prng,
                                  n_lesions=int(prng.integers(1, 4)) if i in positive else 0)
        spec = SeriesSpec(
            orientation=orientation, pixel_spacing=(spacing_inplane, spacing_inplane),
            slice_spacing=slice_spacing, patient_position=position, descending=bool(i % 3 == 1),
            origin=tuple(float(v) for v in prng.uniform(-200, -150, size=2)) + (float(prng.uniform(-50, 50)),),
            patient_name=f"SYNTH^PATIENT{i:03d}", patient_id=pid,
            study_uid=generate_uid(entropy_srcs=[seed_text, "study"]),
            series_uid=generate_uid(entropy_srcs=[seed_text, "series"]),
            frame_uid=generate_uid(entropy_srcs=[seed_text, "frame"]),
            uid_seed=seed_text, series_number=2,
            transfer_syntax=COMPRESSIONS[i % len(COMPRESSIONS)] or SeriesSpec().transfer_syntax,
            extra={"StudyDescription": "CT ABDOMEN", "SeriesDescription": "PORTAL VENOUS 3mm",
                   "ConvolutionKernel": "B30f", "ManufacturerModelName": "SynthScan 64",
                   "BodyPartExamined": "ABDOMEN"})
        series_dir = out / "images" / "ct" / pid / "series002"
        paths = write_ct_series(hu, series_dir, spec)
        affine = dicom_affine(spec.orientation, spec.origin, spec.pixel_spacing,
                              np.asarray(slice_normal(spec.orientation)) * spec.slice_spacing)
        seg_path = out / "labels" / "ct" / f"{pid}_seg.nii.gz"
        nib.save(_label_nifti(labels, affine), seg_path)
        seg_rows.append({"image": spec.series_uid, "segmentation": f"ct/{pid}_seg.nii.gz",
                         "name": "segmentation"})
        if i % config.dicom_seg_every == 0:
            dcm_seg = out / "labels" / "ct" / f"{pid}_seg.dcm"
            _dicom_seg(sorted(paths), labels, dcm_seg, seed_text)
            seg_rows.append({"image": spec.series_uid, "segmentation": f"ct/{pid}_seg.dcm",
                             "name": "segmentation"})
        class_rows.append({"series_instance_uid": spec.series_uid, "patient_id": pid,
                           "label": "lesion" if i in positive else "no_lesion"})
    for j in range(config.mr_patients):
        prng = np.random.default_rng([config.seed, 10_000 + j])
        pid = f"SYNMR{j:03d}"
        data, labels, affine = synthetic_mr(prng)
        img_rel = f"mr/{pid}_t1.nii.gz"
        (out / "images" / "mr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), out / "images" / img_rel)
        nib.save(_label_nifti(np.transpose(labels, (2, 1, 0)), affine), out / "labels" / "mr" / f"{pid}_seg.nii.gz")
        seg_rows.append({"image": f"nifti:{img_rel}", "segmentation": f"mr/{pid}_seg.nii.gz", "name": "brain"})
    with open(out / "labels" / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["series_instance_uid", "patient_id", "label"])
        writer.writeheader()
        writer.writerows(class_rows)
    with open(out / "labels" / "segmentations.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "segmentation", "name"])
        writer.writeheader()
        writer.writerows(seg_rows)
    return out
