"""The result type every component's demo returns (the CLI prints them as a table)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DemoResult:
    """One demo outcome.

    Attributes:
        what: what ran, in a few words (e.g. "tiny Llama generate, 64-token prompt").
        key_figure: the figure that matters, formatted (e.g. "density 0.31, cos 0.9991").
        passed: whether the demo's own correctness check passed.
    """

    what: str
    key_figure: str
    passed: bool
