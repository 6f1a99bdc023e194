"""What ``import hf_ext`` leaves on the modules its post-import hooks watched, once they have registered."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

_PROBE = """
import sys
import hf_ext
import transformers
from transformers import AutoConfig, AutoModelForMultimodalLM, AutoProcessor  # the auto modules (LatentOmni)
import transformers.modeling_utils  # SALE
import transformers.generation.continuous_batching.scheduler  # TIE
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
assert "sale" in ALL_ATTENTION_FUNCTIONS and "tie" in SCHEDULER_MAPPING and "latent_omni" in CONFIG_MAPPING
left = []
for name, mod in list(sys.modules.items()):
    if not name.startswith("transformers"):
        continue
    spec = getattr(mod, "__spec__", None)
    for where, loader in (("__loader__", getattr(mod, "__loader__", None)), ("__spec__.loader", getattr(spec, "loader", None))):
        if loader is None:
            continue
        if type(loader).__module__.startswith("hf_ext"):
            left.append(f"{name}.{where} is {type(loader).__name__}")
        if "exec_module" in getattr(loader, "__dict__", {}):
            left.append(f"{name}.{where} has an exec_module of its own")
print(sorted(set(left)))
"""


@pytest.fixture(scope="module")
def leftovers() -> list[str]:
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return ast.literal_eval(res.stdout.strip().splitlines()[-1])


def test_when_imported_leaves_no_exec_module_on_the_loaders_it_wrapped(leftovers):
    """``when_imported`` (SALE's and TIE's registration hooks) put its wrapper on the watched module's loader as an
    ``exec_module`` instance attribute and, once run, "restored" it by setting the original bound method there:
    the loaders of ``transformers.modeling_utils`` and of the continuous-batching scheduler module kept an
    attribute of their own (a side effect of ``import hf_ext`` beyond registering names)."""
    assert [x for x in leftovers if "exec_module" in x] == []


def test_latent_omni_registration_leaves_no_loader_of_its_own_on_transformers_auto_modules(leftovers):
    """LatentOmni's deferred Auto registration wraps the loader of every ``transformers.models.auto.*`` module
    imported while it waits; the wrapper (``_RegisteringLoader``) stayed those modules' ``__loader__`` and
    ``__spec__.loader`` for good, also after the registration was done and its finder gone."""
    assert [x for x in leftovers if "_RegisteringLoader" in x] == []
