"""The tiny decoding pair: a target and a draft causal LM sharing one character tokenizer.

``task.py`` (the procedural QA task and tokenizer), ``train.py`` (training, resumable),
``evaluate.py`` (accuracy per decoding strategy into the model cards); checkpoints in
``target/`` and ``draft/`` (``save_pretrained`` folders, loaded by ``backend=decoding``).
"""
