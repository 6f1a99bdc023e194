"""SALE sparse prefill attention for transformers (issue #5).

This package is a home for the component; it exports nothing until the component is built.
"""
