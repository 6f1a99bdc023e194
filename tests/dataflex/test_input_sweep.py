"""Input sweep of DataFlex's public config: bad method fields are refused, naming the field, before training."""

from __future__ import annotations

import math

import pytest

from hf_ext.callbacks.dataflex import DataFlexCallback, build


@pytest.mark.parametrize(
    "kind, name, field",
    [
        ("weighter", "loss", "temperature"),  # NaN weights: a NaN training loss
        ("weighter", "loss", "max_weight"),  # NaN: no comparison holds, the cap was silently dropped
        ("weighter", "adapt", "beta"),
        ("mixer", "doremi", "eta"),
        ("selector", "nice", "temperature"),
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, "nan"], ids=["nan", "inf", "str_nan"])
def test_method_float_fields_must_be_finite(kind, name, field, value):
    with pytest.raises(ValueError, match=rf"{kind} {name!r} field {field!r} must be a finite float"):
        build(kind, name, **{field: value})
    with pytest.raises(ValueError, match=rf"field {field!r} must be a finite float"):
        DataFlexCallback({kind: name, f"{kind}_args": {field: value}})
