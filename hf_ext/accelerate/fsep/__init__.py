"""FSEP fully sharded expert parallelism (LAER-MoE) (issue #7).

This package is a home for the component; it exports nothing until the component is built.
"""
