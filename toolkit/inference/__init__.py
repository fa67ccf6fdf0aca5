"""Inference: generation with the Mamba recurrent state and the attention KV cache."""
