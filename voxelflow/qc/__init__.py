"""A QC gallery of a store: a static HTML report inside it, one card per volume.

Layout::

    STORE/qc/
      index.html                 the page: inline CSS and vanilla JavaScript, nothing fetched
                                 from outside (opens from disk or any static file server)
      index.json                 the report's data: every volume (catalog facts, image paths,
                                 render keys) and every file not converted, with its reason
      index.js                   the same data as ``window.QC_INDEX = {...};``; a page opened
                                 from disk (``file://``) may not fetch JSON, it may load a script
      img/<volume_id>-<view>.png three orthogonal mid-planes per volume (axial, coronal,
                                 sagittal), ``size`` x ``size`` px each

The page builds the DOM of one page of cards at a time from the index (``page_size`` volumes),
so a store of 10^4 volumes loads a few MB of text and at most ``3 * page_size`` images; the
search box filters volumes and files by id, modality, warnings, labels, models and reasons.

Each panel is drawn as a radiologist reads it, whatever the voxel order on disk (the affine,
RAS, decides): axial seen from the feet (patient right on the image's left, anterior up),
coronal seen from the front (right on the left, superior up), sagittal seen from the patient's
left (anterior on the left, superior up); pixels are square millimetres at one scale for the
three panels of a volume. CT is shown at a soft-tissue window (W400/L40 HU), anything else
between the 1st and 99th percentiles of the three planes. Labels (``catalog/labels.parquet``)
are drawn as outlines, one colour per label value; each model's predicted labels
(``prediction-<model>``) as outlines in one colour per model.

Rendering reads only the three planes (a slice of the lazy Zarr array reads only the chunks it
crosses), from the coarsest pyramid level still at least ``size`` voxels across. A volume is
drawn again only when what its images show changed: its content digest, its labels' digests,
its predictions, or the drawing itself (:data:`RENDER_VERSION`, ``size``).

    >>> write_report("store")           # doctest: +SKIP
    PosixPath('store/qc/index.html')
"""

from voxelflow.qc.planes import (
    CT_WINDOW, LABEL_COLOURS, MODEL_COLOURS, VIEWS, PlaneCut, display_window, inferno, orthogonal_cuts, panel, scale_for,
)
from voxelflow.qc.report import (
    RENDER_VERSION, REPORT_FORMAT, ReportPlan, _hex, draw_volumes, finish_report, plan_report, write_report,
)  # noqa: F401 - _hex: the legend's colours

__all__ = ["CT_WINDOW", "LABEL_COLOURS", "MODEL_COLOURS", "RENDER_VERSION", "REPORT_FORMAT", "VIEWS", "PlaneCut",
           "display_window", "inferno", "orthogonal_cuts", "panel", "scale_for", "write_report", "ReportPlan",
           "plan_report", "draw_volumes", "finish_report"]
