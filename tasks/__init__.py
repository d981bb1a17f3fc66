"""Prefect tasks: thin wrappers over the voxelflow library (retries, logging, artifacts)."""
