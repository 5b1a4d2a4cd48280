"""Hugging Face integration: the patch (``patch``: the wrappers of forward/generate, ``patch_llava`` and
``patch_model``), one call's pre-LLM pruning (``prune``: select, then apply), the layouts of LLaVA-NeXT and
Qwen2.5-VL (``families``), the signals each method needs (``signals``), FastV inside the language model (``fastv``),
attention read through transformers' attention-function interface (``attention``) and the one apply step from kept
image tokens to the inputs the language model sees (``inputs``)."""
