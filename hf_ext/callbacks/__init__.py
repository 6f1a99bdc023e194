"""transformers Trainer callbacks (DataFlex)."""
