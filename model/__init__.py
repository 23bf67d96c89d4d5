"""The Transformer, its config, sampling and Hugging Face conversion."""
