"""Structured output: grammar-constrained decoding on llguidance (JSON schemas, regexes, choices, Lark)."""

from jaxllm.structured.grammar import KINDS, GrammarCompiler, GrammarSpec, Matcher

__all__ = ["KINDS", "GrammarCompiler", "GrammarSpec", "Matcher"]
