"""Helpers for the notebooks: toy matrices with known structure (``toy``), plots (``plotting``) and the setup
that notebooks 02–04 share (``setup``: parameters from environment variables, model, dataset, prompt)."""
