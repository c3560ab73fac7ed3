"""Reranker: LLaMA-family LM with an MLP scoring head over the retriever top-k."""
