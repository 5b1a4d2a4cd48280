"""Core maths, model-free: input validation (``validate``), leverage scores (``leverage``), the registry of
selectors — SVD-Prune and every peer, each following its authors' code (``selection``) — and metrics
(``metrics``: residual against the Eckart–Young floor, spatial/positional statistics, overlap, recall)."""
