"""Core maths, model-free: input validation (``validate``), leverage scores (``leverage``), the registry of
selectors — SVD-Prune and every peer, each following its authors' code (``selection``, with the longer peers
in ``peer_selectors``) —, merging reductions such as VisionZip (``reduction``) and metrics (``metrics``:
residual against the Eckart–Young floor, spatial/positional statistics, overlap, recall).

Importing this package fills the selector registry: ``peer_selectors`` registers VisPruner and CDPruner."""

from .peer_selectors import cdpruner_relevance
from .reduction import REDUCERS, Reduction, reduce_tokens, reduce_visionzip, visionzip_split
from .selection import SELECTORS, register, score_tokens, select_tokens, top_k

__all__ = ["SELECTORS", "register", "select_tokens", "score_tokens", "top_k", "cdpruner_relevance", "REDUCERS",
           "Reduction", "reduce_tokens", "reduce_visionzip", "visionzip_split"]
