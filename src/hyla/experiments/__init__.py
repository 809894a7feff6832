"""Experiments that orchestrate training, evaluation and serving: sweeps of runs (``hyla sweep``) and the
scaling-law fits over them. They sit above ``train/`` and ``serve/``, which know nothing of them."""
