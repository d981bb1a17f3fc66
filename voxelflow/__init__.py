"""voxelflow: DICOM and NIfTI archives into a chunked OME-Zarr store, and the models on it."""

import os

# Arrow's default allocator (mimalloc) keeps the pages it frees resident for reuse: merging
# the catalog of a 10^5-file ingest held ~40 MB more resident memory than on the system
# allocator, and more as the archive grew (bench/ingest.py measures the peaks). Set before
# pyarrow is first imported, so Dask workers started from this process inherit it; an
# explicit ARROW_DEFAULT_MEMORY_POOL wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
