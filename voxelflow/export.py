"""Export stored volumes as NIfTI with their exact world geometry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from voxelflow import catalog, location
from voxelflow.io.dicom.diffusion import write_fsl
from voxelflow.store import open_label, open_volume
from voxelflow.errors import NotInStoreError, SettingError


def export_volume(store: str | os.PathLike, volume_id: str, out_path: str | os.PathLike) -> Path:
    """Write one volume (level 0) as NIfTI-1; sform and qform both carry the stored affine. A
    DWI volume gets ``.bval`` / ``.bvec`` beside it (FSL's convention, this image's voxel axes),
    a DICOM volume its BIDS sidecar ``.json`` (technical attributes, dcm2niix's fields and units)."""
    vol = open_volume(store, volume_id)
    data = vol.to_nifti_order()
    if vol.channels == "RGB":  # a colour map: NIfTI's RGB24, as dcm2niix writes it
        rgb = np.empty(data.shape[:3], dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        for k, name in enumerate("RGB"):
            rgb[name] = data[..., k]
        data = rgb
    img = nib.Nifti1Image(data, vol.affine)
    img.set_sform(vol.affine, code=1)  # scanner-based anatomical coordinates
    img.set_qform(vol.affine, code=1)
    if data.ndim == 4:
        zooms = list(img.header.get_zooms()[:3]) + [float(vol.time_step or 1.0)]
        img.header.set_zooms(zooms)
        img.header.set_xyzt_units("mm", "sec")
    else:
        img.header.set_xyzt_units("mm")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial.nii.gz" if out.name.endswith(".gz") else f".{out.name}.partial.nii")
    nib.save(img, tmp)
    os.replace(tmp, out)
    stem = str(out.with_name(_stem(out.name)))
    diffusion = (vol.attributes or {}).get("diffusion")
    if diffusion and data.ndim == 4:  # DWI: FSL b-values and directions in this image's voxel frame
        write_fsl(diffusion, vol.affine, stem)
    sidecar = (vol.attributes or {}).get("sidecar")
    if sidecar:  # BIDS: technical attributes only (voxelflow.io.dicom.sidecar's allow-list)
        location.write_bytes(f"{stem}.json", (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
    return out


def _stem(name: str) -> str:
    return name.removesuffix(".gz").removesuffix(".nii")


def export_nifti(store: str | os.PathLike, outdir: str | os.PathLike,
                 volume_ids: list[str] | None = None) -> list[Path]:
    """Export volumes (all in the catalog by default) as ``OUTDIR/<volume_id>.nii.gz``."""
    ids = volume_ids or catalog.read_table(store, "volumes").column("volume_id").to_pylist()
    return [export_volume(store, vid, Path(outdir) / f"{vid}.nii.gz") for vid in ids]



def export_label(store: str | os.PathLike, volume_id: str, name: str, out_path: str | os.PathLike) -> Path:
    """Write a stored label map (e.g. a prediction) as NIfTI on its volume's exact grid."""

    vol = open_volume(store, volume_id)
    data = np.ascontiguousarray(np.transpose(open_label(store, volume_id, name)[...], (2, 1, 0)))
    img = nib.Nifti1Image(data, vol.affine)
    img.set_sform(vol.affine, code=1)
    img.set_qform(vol.affine, code=1)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, out)
    return out


def source_dicom_paths(store: str | os.PathLike, volume_id: str) -> list[Path]:
    """The DICOM files a volume was built from, in slice order, where they still are.

    Raises:
        NotInStoreError: the volume is not from DICOM, or its files are not at their
            source any more (archives are not kept: extract the archive and re-ingest).
    """
    vol = next((v for v in catalog.read_table(store, "volumes").to_pylist() if v["volume_id"] == volume_id), None)
    if vol is None or vol["kind"] != "dicom":
        raise NotInStoreError(f"volume {volume_id} is not a DICOM-sourced volume of {store}")
    sources = {r["path"]: r["source"] for r in catalog.read_table(store, "files").to_pylist()
               if r["volume_id"] == volume_id}
    paths = []
    for rel in vol["source_files"]:  # stored in slice order
        source = Path(sources[rel])
        path = source / rel if source.is_dir() else source
        if not path.is_file():
            raise NotInStoreError(f"source file {rel} of volume {volume_id} is not at {path} "
                                    "(archive sources are not kept; extract and re-ingest)")
        paths.append(path)
    return paths


def export_dicom_seg(store: str | os.PathLike, volume_id: str, name: str, out_path: str | os.PathLike,
                     properties: dict[int, str] | None = None) -> Path:
    """Write a stored label map of a DICOM-sourced volume as DICOM-SEG (highdicom) referencing
    its source images. The SEG carries the source study's identifiers, as DICOM requires: it is
    for the archive the images came from, not for the de-identified store."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes


    sources = [pydicom.dcmread(p) for p in source_dicom_paths(store, volume_id)]
    labels = open_label(store, volume_id, name)[...]
    values = [int(v) for v in np.unique(labels) if v]
    if not values:
        raise SettingError(f"label {name} of volume {volume_id} is empty: nothing to export")
    names = properties or {}
    segments = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=names.get(v, f"class {v}"),
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="voxelflow", version="1", family=codes.DCM.ArtificialIntelligence)) for i, v in enumerate(values)]
    # segment numbers are 1..n: map label values onto them
    remap = np.zeros(int(labels.max()) + 1, np.uint8)
    for i, v in enumerate(values):
        remap[v] = i + 1
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=remap[labels], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="voxelflow", manufacturer_model_name="voxelflow", software_versions="1",
        device_serial_number="0", omit_empty_frames=False)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)
    return out
