"""DataFlex dynamic data selection, mixture and reweighting callbacks (issue #9).

This package is a home for the component; it exports nothing until the component is built.
"""
