"""Networks and train/evaluate loops (plain PyTorch + MONAI, no Prefect)."""
