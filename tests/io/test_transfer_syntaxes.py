"""Every transfer syntax pydicom (with pylibjpeg) decodes gives the same voxels."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import PYDICOM_DATA
from voxelflow.io.dicom import load_stack, plan_series, scan_dicom

KEY = b"k" * 32
LOSSLESS_VARIANTS = [
    "MR_small_implicit.dcm",  # implicit VR little endian
    "MR_small_expb.dcm",  # explicit VR big endian
    "MR_small_bigendian.dcm",
    "MR_small_padded.dcm",
    "MR_small_RLE.dcm",  # RLE lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
]


def _load(name: str) -> np.ndarray:
    return _load_path(PYDICOM_DATA / name)


def test_reference_is_what_pydicom_reads():
    import pydicom

    ds = pydicom.dcmread(PYDICOM_DATA / "MR_small.dcm")
    ref = _load("MR_small.dcm")
    np.testing.assert_array_equal(ref[0], ds.pixel_array)
    assert ref.dtype == np.int16


@pytest.mark.parametrize("name", LOSSLESS_VARIANTS)
def test_lossless_variant_equals_uncompressed(name):
    np.testing.assert_array_equal(_load(name), _load("MR_small.dcm"))


def test_deflated_explicit_vr_decodes():
    # image_dfl.dcm: Deflated Explicit VR Little Endian; compared with pydicom's own reading.
    import pydicom

    ds = pydicom.dcmread(PYDICOM_DATA / "image_dfl.dcm")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    path = PYDICOM_DATA / "image_dfl.dcm"
    rec = scan_dicom(str(path), "image_dfl.dcm", KEY) | {"source": "t", "path": "x", "local": str(path)}
    rec.update(orientation=[1, 0, 0, 0, 1, 0], position=[0, 0, 0], pixel_spacing=[1, 1])
    (plan,) = plan_series(rec["series"], [rec])
    np.testing.assert_array_equal(load_stack(plan)[0], ds.pixel_array)


def _encode(tmp_path, syntax, **kwargs):
    import pydicom

    ds = pydicom.dcmread(PYDICOM_DATA / "MR_small.dcm")
    ds.compress(syntax, **kwargs)
    path = tmp_path / f"{syntax.name}.dcm"
    ds.save_as(path)
    return path


def _load_path(path) -> np.ndarray:
    rec = scan_dicom(str(path), path.name, KEY) | {"source": "t", "path": path.name, "local": str(path)}
    (plan,) = plan_series(rec["series"], [rec])
    return load_stack(plan)


@pytest.mark.parametrize("near", [1, 3])
def test_jpeg_ls_near_lossless_within_its_bound(tmp_path, near):
    """JPEG-LS near-lossless guarantees |error| <= NEAR for every voxel."""
    from pydicom.uid import JPEGLSNearLossless

    ref = _load("MR_small.dcm").astype(np.int64)
    got = _load_path(_encode(tmp_path, JPEGLSNearLossless, jls_error=near)).astype(np.int64)
    err = np.abs(got - ref)
    assert err.max() <= near
    assert err.max() > 0  # really lossy: the bound is what is being tested


def test_jpeg2000_lossy_within_tolerance(tmp_path):
    """JPEG 2000 lossy at 4:1 stays above 45 dB PSNR (over the value range)."""
    from pydicom.uid import JPEG2000

    ref = _load("MR_small.dcm").astype(np.float64)
    got = _load_path(_encode(tmp_path, JPEG2000, j2k_cr=[4])).astype(np.float64)
    mse = np.mean((got - ref) ** 2)
    assert mse > 0
    assert 10 * np.log10((ref.max() - ref.min()) ** 2 / mse) > 45


@pytest.mark.parametrize("name,uid_name", [
    ("JPGExtended.dcm", "JPEG Extended (Process 2 and 4)"),
    ("JPEG2000.dcm", "JPEG 2000 Image Compression"),
])
def test_real_lossy_files_decode_like_pydicom(name, uid_name):
    """Real lossy files (no uncompressed twin): voxels equal pydicom's decoded pixels after
    the modality rescale, so voxelflow adds no error of its own."""
    import pydicom

    path = PYDICOM_DATA / name
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.name == uid_name
    rec = scan_dicom(str(path), name, KEY) | {"source": "t", "path": name, "local": str(path)}
    rec.update(orientation=rec["orientation"] or [1, 0, 0, 0, 1, 0], position=rec["position"] or [0, 0, 0],
               pixel_spacing=rec["pixel_spacing"] or [1, 1], samples=1)
    (plan,) = plan_series(rec["series"], [rec])
    got = load_stack(plan)[0].astype(np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
    np.testing.assert_array_equal(got, ds.pixel_array.astype(np.float64) * slope + inter)


@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("bits_stored", [12, 16])
def test_direct_read_equals_pydicom_decode(tmp_path, signed, bits_stored):
    """The fast path (pixels read by offset) has pydicom's semantics, including masking and
    sign extension when BitsStored < BitsAllocated (high bits may hold garbage)."""
    import pydicom

    ds = pydicom.dcmread(PYDICOM_DATA / "MR_small.dcm")
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = signed, bits_stored, bits_stored - 1
    raw = np.random.default_rng(0).integers(0, 1 << 16, size=(64, 64), dtype=np.uint16)
    ds.PixelData = raw.tobytes()
    path = tmp_path / "x.dcm"
    ds.save_as(path)
    rec = scan_dicom(str(path), "x.dcm", KEY) | {"source": "t", "path": "x.dcm", "local": str(path)}
    assert rec["pixel_offset"] is not None
    (plan,) = plan_series(rec["series"], [rec])
    direct, decoded = load_stack(plan, direct=True), load_stack(plan, direct=False)
    np.testing.assert_array_equal(direct, decoded)
    np.testing.assert_array_equal(decoded[0], pydicom.dcmread(path).pixel_array)
