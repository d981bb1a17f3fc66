"""DICOM: header scanning, series assembly and pixel loading.

Each step is a pure function so it runs anywhere (a Dask worker, a test, a notebook), and
each lives in the module named after it:

1. :mod:`.header` — :func:`scan_dicom` reads one file's header (no pixel data) into a flat
   record (:class:`~voxelflow.io.dicom.record.ScanRecord`) holding technical values and keyed
   pseudonyms only; :mod:`.fast_header` reads plain files fast, :mod:`.vendor` the private
   attributes of GE, Philips and Siemens that tell images apart.
2. :mod:`.frames` — enhanced multi-frame files and Siemens mosaics become one record per frame.
3. :mod:`.assembly` — :func:`plan_series` splits one series' records into stacks
   (:class:`StackPlan`): echoes, image types and repeats over time apart, 4-D series ordered.
4. :mod:`.pixels` — :func:`load_stack` decodes the pixels of a planned stack, applies the
   rescale and returns a lossless array; :mod:`.stack` makes it a volume (tilt, diffusion
   (:mod:`.diffusion`), BIDS sidecar (:mod:`.sidecar`)).
"""

from voxelflow.io.dicom.assembly import StackPlan, not_part_of_a_volume, plan_series, resample_slices
from voxelflow.io.dicom.frames import unmosaic
from voxelflow.io.dicom.header import HEAD_BYTES, looks_like_dicom, scan_dicom
from voxelflow.io.dicom.pixels import load_stack
from voxelflow.io.dicom.stack import stack_volume

__all__ = ["HEAD_BYTES", "StackPlan", "load_stack", "looks_like_dicom", "not_part_of_a_volume", "plan_series",
           "resample_slices", "scan_dicom", "stack_volume", "unmosaic"]
