"""Helpers for the notebooks: toy matrices with known structure (``toy``) and plots (``plotting``)."""
