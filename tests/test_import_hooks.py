"""hf_ext.utils.import_hooks: callbacks run after (never before) the watched module executes."""

from __future__ import annotations

import subprocess
import sys


def test_when_imported_runs_now_for_loaded_modules():
    from hf_ext.utils.import_hooks import when_imported

    seen = []
    when_imported("json", lambda m: seen.append(m.dumps([1])))
    assert seen == ["[1]"]


def test_when_imported_defers_until_import_and_cleans_up():
    code = (
        "import sys\n"
        "from hf_ext.utils import import_hooks as ih\n"
        "assert 'colorsys' not in sys.modules\n"
        "seen = []\n"
        "ih.when_imported('colorsys', lambda m: seen.append(hasattr(m, 'rgb_to_hsv')))\n"
        "assert seen == [] and ih._FINDER in sys.meta_path\n"
        "import colorsys\n"
        "assert seen == [True], seen\n"
        "assert 'colorsys' not in ih._PENDING\n"
        "ih.when_imported('wave', lambda m: seen.append('wave'))\n"
        "ih.cancel('wave')\n"
        "import wave\n"
        "assert seen == [True] and 'wave' not in ih._PENDING\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_plain_import_hf_ext_then_transformers_registers_everything():
    code = (
        "import hf_ext\n"
        "from transformers import AttentionInterface, AutoConfig\n"
        "from transformers.generation.continuous_batching.continuous_api import SCHEDULER_MAPPING\n"
        "assert 'sale' in AttentionInterface._global_mapping\n"
        "assert 'tie' in SCHEDULER_MAPPING\n"
        "assert type(AutoConfig.for_model('latent_omni')).__name__ == 'LatentOmniConfig'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
    assert "failed" not in res.stderr, res.stderr


def test_importing_hf_ext_again_after_purging_its_modules_keeps_one_finder_each_and_registers():
    # test runners and notebook reloaders drop a package's modules from sys.modules and import it again: the old
    # copies' meta-path finders called each other (RecursionError on the first transformers Auto import)
    code = (
        "import sys\n"
        "import hf_ext\n"
        "for k in [k for k in sys.modules if k == 'hf_ext' or k.startswith('hf_ext.')]:\n"
        "    del sys.modules[k]\n"
        "import hf_ext\n"
        "names = [type(f).__name__ for f in sys.meta_path if type(f).__module__.startswith('hf_ext')]\n"
        "assert sorted(names) == ['_AutoRegistrationFinder', '_PostImportFinder'], names\n"
        "from transformers import AttentionInterface, AutoConfig\n"
        "from transformers.generation.continuous_batching.continuous_api import SCHEDULER_MAPPING\n"
        "assert type(AutoConfig.for_model('latent_omni')).__name__ == 'LatentOmniConfig'\n"
        "assert 'sale' in AttentionInterface._global_mapping and 'tie' in SCHEDULER_MAPPING\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
    assert "failed" not in res.stderr, res.stderr
