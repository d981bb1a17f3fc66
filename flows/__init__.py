"""Prefect flows: one per file, wiring tasks together."""
