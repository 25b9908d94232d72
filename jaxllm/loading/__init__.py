"""Resolve a model reference to files and read them into a config, a param tree and a tokenizer."""
