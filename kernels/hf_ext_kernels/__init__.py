"""Triton kernels of hf_ext (imports nothing from ``hf_ext``).

``kernels/`` itself is not a package on purpose: transformers and diffusers import Hugging Face's
own ``kernels`` package, which a top-level ``kernels`` of ours would shadow.
"""
