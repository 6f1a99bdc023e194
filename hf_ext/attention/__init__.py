"""Attention implementations: SALE (transformers) and AdaSpa (diffusers)."""
