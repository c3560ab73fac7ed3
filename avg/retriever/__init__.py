"""Generative retriever: voken vocabulary, datasets, constrained search, T5/LLaMA training."""
