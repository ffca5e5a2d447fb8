"""Checkpoints (ours, and the HF / DeepSeek release layout) and tokenizers."""
