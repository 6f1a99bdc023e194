"""Accelerate-facing distributed components: FSEP and automatic parallelism."""
