"""The embedded testbed: ShapesVQA scenes, questions and answer-region masks (``shapes``) and the tiny LLaVA
trained on them (``tiny``: model and tokenizer, training recipe, evaluation)."""
