"""Image tokenizer: the RQ-VAE training data (features, batches); its stages are avg.stages.prepare_emb, train_rqvae and generate_codes."""
