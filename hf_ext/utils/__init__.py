"""Helpers shared by two or more components (no component imports another)."""
