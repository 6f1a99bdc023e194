"""KV-cache components: PBKV."""
