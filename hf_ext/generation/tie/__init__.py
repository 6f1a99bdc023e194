"""TIE tail-aware SJF scheduling with log-t length prediction (issue #6).

This package is a home for the component; it exports nothing until the component is built.
"""
