"""Evaluation: how well a loaded model predicts text (perplexity)."""
