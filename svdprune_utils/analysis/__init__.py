"""Analyses built on the patch: accuracy against budget (``evaluate``), fast ablations on cached tower features
(``ablation``), positional-bias statistics (``bias``) and efficiency — FLOPs, KV bytes, measured timings
(``efficiency``)."""
