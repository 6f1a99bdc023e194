"""Rollout distribution shaping as a TRL GRPOTrainer subclass. Not built yet.

This package is a home for the component; it exports nothing until the component is built.
"""
