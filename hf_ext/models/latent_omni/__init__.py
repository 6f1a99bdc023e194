"""LatentOmni interleaved latent reasoning model (issue #10).

This package is a home for the component; it exports nothing until the component is built.
"""
