"""Measuring generated images against references (see `metrics`, `heldout`)."""
