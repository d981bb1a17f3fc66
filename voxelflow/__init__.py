"""voxelflow: DICOM and NIfTI archives into a chunked OME-Zarr store, and the models on it."""

import os

# Arrow's default allocator (mimalloc) keeps the pages it frees resident for reuse, so a
# catalog merge's resident memory grew with the archive (bench/ingest.py measures the peaks;
# README, "Why the defaults"). Set before
# pyarrow is first imported, so Dask workers started from this process inherit it; an
# explicit ARROW_DEFAULT_MEMORY_POOL wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
