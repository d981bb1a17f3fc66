"""Networks and train/evaluate loops (plain PyTorch, no Prefect).

The training stage is not built yet: this package holds no model so far. See the README's
roadmap.
"""
