"""Registered model classes: LatentOmni."""
