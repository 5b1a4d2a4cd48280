"""Hugging Face integration: the LLaVA patch (``patch``: the wrappers of forward/generate), one call's pre-LLM
pruning (``prune``: select, then apply) and the signals each method needs (``signals``), FastV inside the language model (``fastv``), attention
read through transformers' attention-function interface (``attention``) and the one apply step from kept image
tokens to the inputs the language model sees (``inputs``)."""
