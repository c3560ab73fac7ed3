"""Image tokenizer stage: CLIP features, RQ-VAE with semantic alignment, voken codes."""
