"""Galvatron-style automatic parallelism (issue #8).

This package is a home for the component; it exports nothing until the component is built.
"""
