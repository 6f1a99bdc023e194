"""Names hf_ext registers in transformers (SALE's "sale", TIE's "tie" / "hf_ext_priority", LatentOmni's
"latent_omni") never silently replace an entry someone else registered first: it is kept with one
RegistrationClashWarning at import, an explicit enable call raises, ``overwrite=True`` replaces it; registering
our own objects again (import twice, a reload, enabling twice) is silent."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_PRELUDE = """
import warnings
warnings.simplefilter("always")
import pytest
"""


def _run(code: str, timeout: float = 300) -> str:
    res = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stdout


def test_name_clash_policy_helpers():
    from hf_ext.utils.name_clash import RegistrationClashWarning, is_ours, may_register

    def ours() -> None: ...

    def theirs() -> None: ...

    copy = type(ours)(ours.__code__, ours.__globals__, "ours")  # a reloaded copy: same module and qualname
    copy.__qualname__ = ours.__qualname__
    assert is_ours(ours, ours) and is_ours(copy, ours) and not is_ours(theirs, ours)
    assert may_register("r", "n", None, ours, fix="f()", on_clash="raise")
    assert may_register("r", "n", copy, ours, fix="f()", on_clash="raise")
    with pytest.raises(ValueError, match=r"'n' in r is already registered .* f\(\)"):
        may_register("r", "n", theirs, ours, fix="f()", on_clash="raise")
    with pytest.warns(RegistrationClashWarning, match="'clash-test' in r"):
        assert not may_register("r", "clash-test", theirs, ours, fix="f()", on_clash="warn")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert not may_register("r", "clash-test", theirs, ours, fix="f()", on_clash="warn")
    with pytest.raises(ValueError, match="on_clash must be one of"):
        may_register("r", "n", None, ours, fix="f()", on_clash="ignore")


def test_sale_keeps_a_user_attention_registered_before_import_and_enable_sale_refuses():
    _run(
        """
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        def mine(*a, **k): return None
        AttentionInterface.register("sale", mine)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import hf_ext
            from hf_ext.attention.sale import enable_sale, register_sale
            from hf_ext.testing import tiny_llama
            model = tiny_llama()
            assert AttentionInterface._global_mapping["sale"] is mine
            assert "sale" not in AttentionMaskInterface._global_mapping  # nothing half-registered
            before = model.config._attn_implementation
            with pytest.raises(ValueError, match=r"'sale' in transformers' AttentionInterface .*overwrite=True"):
                enable_sale(model)
            assert model.config._attn_implementation == before
            assert AttentionInterface._global_mapping["sale"] is mine
        clash = [w for w in caught if type(w.message).__name__ == "RegistrationClashWarning"]
        assert len(clash) == 1 and "'sale'" in str(clash[0].message), [str(w.message) for w in caught]
        assert register_sale(overwrite=True)
        from hf_ext.attention.sale.attention import sale_attention_forward
        assert AttentionInterface._global_mapping["sale"] is sale_attention_forward
        assert enable_sale(model).config._attn_implementation == "sale"
        print("ok")
        """
    )


def test_tie_keeps_a_user_scheduler_registered_before_import_and_enable_refuses():
    _run(
        """
        from transformers.generation.continuous_batching import scheduler as S
        class Mine(S.FIFOScheduler):
            pass
        S.SCHEDULER_MAPPING["tie"] = Mine
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import hf_ext
            from hf_ext.generation.tie import cb
            assert S.SCHEDULER_MAPPING["tie"] is Mine
            assert S.SCHEDULER_MAPPING["hf_ext_priority"] is cb.PriorityCBScheduler  # the free name is ours
            config_before = cb.CONTEXT.config
            with pytest.raises(ValueError, match=r"'tie' in transformers' continuous-batching .*overwrite=True"):
                hf_ext.enable_tie_scheduler()
            assert cb.CONTEXT.config is config_before and S.SCHEDULER_MAPPING["tie"] is Mine
        clash = [w for w in caught if type(w.message).__name__ == "RegistrationClashWarning"]
        assert len(clash) == 1 and "'tie'" in str(clash[0].message), [str(w.message) for w in caught]
        cb.register(overwrite=True)
        assert S.SCHEDULER_MAPPING["tie"] is cb.TIECBScheduler
        cb.unregister()  # revertible: the user's scheduler is back
        assert S.SCHEDULER_MAPPING["tie"] is Mine and "hf_ext_priority" not in S.SCHEDULER_MAPPING
        print("ok")
        """
    )


def test_tie_unregister_does_not_bring_back_a_replaced_scheduler_someone_deleted():
    # register(overwrite=True) kept the user's scheduler; after the "tie" place was emptied and registered again,
    # unregister() put back the scheduler that had been deleted (SALE and LatentOmni forget it)
    _run(
        """
        from transformers.generation.continuous_batching import scheduler as S
        class Mine(S.FIFOScheduler):
            pass
        S.SCHEDULER_MAPPING["tie"] = Mine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the import's RegistrationClashWarning (tested above)
            from hf_ext.generation.tie import cb
        cb.register(overwrite=True)
        del S.SCHEDULER_MAPPING["tie"]  # the user removes the name (and with it their scheduler)
        cb.register()
        assert S.SCHEDULER_MAPPING["tie"] is cb.TIECBScheduler
        cb.unregister()
        assert "tie" not in S.SCHEDULER_MAPPING, S.SCHEDULER_MAPPING.get("tie")
        print("ok")
        """
    )


def test_latent_omni_keeps_a_user_config_registered_before_import_and_register_now_refuses():
    _run(
        """
        from transformers import AutoConfig, PretrainedConfig
        class Mine(PretrainedConfig):
            model_type = "latent_omni"
        AutoConfig.register("latent_omni", Mine)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import hf_ext
            from transformers import AutoModelForMultimodalLM  # noqa: F401
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING
            assert type(AutoConfig.for_model("latent_omni")) is Mine
            from hf_ext.models.latent_omni import register_now
            with pytest.raises(ValueError, match=r"'latent_omni' in transformers' AutoConfig .*overwrite=True"):
                register_now()
            assert CONFIG_MAPPING["latent_omni"] is Mine
        clash = [w for w in caught if type(w.message).__name__ == "RegistrationClashWarning"]
        assert len(clash) == 1 and "'latent_omni'" in str(clash[0].message), [str(w.message) for w in caught]
        register_now(overwrite=True)
        assert type(AutoConfig.for_model("latent_omni")).__name__ == "LatentOmniConfig"
        print("ok")
        """
    )


def test_registering_our_own_objects_again_is_silent():
    _run(
        """
        import sys
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import hf_ext
            from transformers import AttentionInterface, AutoConfig, AutoModelForMultimodalLM, AutoProcessor  # noqa
            from transformers.generation.continuous_batching import scheduler as S
            import hf_ext  # noqa: F811  (a second import)
            hf_ext.enable_tie_scheduler()
            hf_ext.enable_tie_scheduler()  # enabling twice
            for k in [k for k in sys.modules if k == "hf_ext" or k.startswith("hf_ext.")]:
                del sys.modules[k]
            import hf_ext  # a reload: fresh copies of our functions and classes
            from hf_ext.attention.sale import register_sale
            from hf_ext.models.latent_omni import register_now
            assert register_sale() and register_sale()
            register_now()
            register_now()
            hf_ext.enable_tie_scheduler()
            from hf_ext.generation.tie import cb
            assert S.SCHEDULER_MAPPING["tie"] is cb.TIECBScheduler
            assert type(AutoConfig.for_model("latent_omni")).__module__.startswith("hf_ext.")
        clash = [str(w.message) for w in caught if type(w.message).__name__ == "RegistrationClashWarning"]
        assert not clash, clash
        print("ok")
        """
    )


def test_register_sale_before_transformers_is_imported_does_not_hang():
    # register_sale() imported transformers.modeling_utils while holding its lock, and that import's post-import
    # hook called register_sale again: a deadlock
    _run(
        """
        import hf_ext
        from hf_ext.attention.sale import register_sale
        assert register_sale()
        print("ok")
        """,
        timeout=120,
    )


def test_unregister_sale_puts_back_the_users_entries_and_register_works_again():
    # register_sale(overwrite=True) replaced the user's "sale" for the rest of the process: there was no undo
    _run(
        """
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        def mine(*a, **k): return None
        AttentionInterface.register("sale", mine)  # the user's attention; the mask name stays free
        attn, mask = AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping
        attn_before, mask_before = dict(attn), dict(mask)  # the user's registrations, without hf_ext
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the import's RegistrationClashWarning (tested above)
            import hf_ext
        from hf_ext.attention.sale import register_sale, unregister_sale
        from hf_ext.attention.sale.attention import sale_attention_forward, sale_mask
        assert attn == attn_before and mask == mask_before  # the import kept the user's entry, registered nothing
        for _ in range(2):  # the round trip twice: each overwrite keeps what it replaced
            assert register_sale(overwrite=True)
            assert attn["sale"] is sale_attention_forward and mask["sale"] is sale_mask
            unregister_sale()
            assert attn["sale"] is mine and "sale" not in mask
            assert attn == attn_before and mask == mask_before
            unregister_sale()  # nothing of ours left: a no-op
            assert attn == attn_before and mask == mask_before
        with pytest.raises(ValueError, match="overwrite=True"):  # the user's entry is the user's again
            register_sale()
        # someone else's entry registered over ours is not ours to remove
        assert register_sale(overwrite=True)
        def theirs(*a, **k): return None
        AttentionInterface.register("sale", theirs)
        unregister_sale()
        assert attn["sale"] is theirs and "sale" not in mask
        print("ok")
        """
    )


def test_unregister_sale_then_register_and_enable_again():
    _run(
        """
        import hf_ext
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        from hf_ext.attention.sale import disable_sale, enable_sale, register_sale, unregister_sale
        from hf_ext.attention.sale.attention import sale_attention_forward, sale_mask
        from hf_ext.testing import tiny_llama
        attn, mask = AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping
        assert attn["sale"] is sale_attention_forward  # the automatic registration of import hf_ext
        unregister_sale()
        assert "sale" not in attn and "sale" not in mask
        assert register_sale()
        assert attn["sale"] is sale_attention_forward and mask["sale"] is sale_mask
        unregister_sale()
        model = enable_sale(tiny_llama())  # enable_sale registers again
        assert model.config._attn_implementation == "sale" and attn["sale"] is sale_attention_forward
        disable_sale(model)
        print("ok")
        """
    )


def test_unregister_latent_omni_puts_back_the_users_entries_and_register_works_again():
    # register_now(overwrite=True) replaced the user's Auto entries for the rest of the process: there was no undo
    _run(
        """
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoProcessor
        from transformers import PretrainedConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
        class Mine(PretrainedConfig):
            model_type = "latent_omni"
        AutoConfig.register("latent_omni", Mine)  # the user's config; the model / processor keys stay free
        maps = [CONFIG_MAPPING, AutoModelForMultimodalLM._model_mapping, AutoModelForImageTextToText._model_mapping,
                PROCESSOR_MAPPING]
        before = [dict(m._extra_content) for m in maps]  # the user's registrations, without hf_ext
        assert before[0]["latent_omni"] is Mine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the import's RegistrationClashWarning (tested above)
            import hf_ext
        from hf_ext.models.latent_omni import register_now, unregister
        from hf_ext.models.latent_omni import LatentOmniConfig, LatentOmniForConditionalGeneration, LatentOmniProcessor
        # the import kept the user's config and registered the free model / processor keys
        assert CONFIG_MAPPING["latent_omni"] is Mine and LatentOmniConfig in AutoModelForMultimodalLM._model_mapping
        for _ in range(2):  # the round trip twice: each overwrite keeps what it replaced
            register_now(overwrite=True)
            assert CONFIG_MAPPING["latent_omni"] is LatentOmniConfig
            assert AutoModelForMultimodalLM._model_mapping[LatentOmniConfig] is LatentOmniForConditionalGeneration
            assert PROCESSOR_MAPPING[LatentOmniConfig] is LatentOmniProcessor
            unregister()
            assert [dict(m._extra_content) for m in maps] == before
            assert CONFIG_MAPPING["latent_omni"] is Mine and type(AutoConfig.for_model("latent_omni")) is Mine
            assert LatentOmniConfig not in AutoModelForMultimodalLM._model_mapping
            unregister()  # nothing of ours left: a no-op
            assert [dict(m._extra_content) for m in maps] == before
        with pytest.raises(ValueError, match="overwrite=True"):  # the user's entry is the user's again
            register_now()
        print("ok")
        """
    )


def test_unregister_latent_omni_then_register_again():
    _run(
        """
        import hf_ext
        from transformers import AutoConfig, AutoModelForMultimodalLM, AutoProcessor  # noqa: F401
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from hf_ext.models.latent_omni import LatentOmniConfig, register_now, unregister
        assert type(AutoConfig.for_model("latent_omni")) is LatentOmniConfig  # the automatic registration
        unregister()
        assert "latent_omni" not in CONFIG_MAPPING and LatentOmniConfig not in AutoModelForMultimodalLM._model_mapping
        register_now()
        assert type(AutoConfig.for_model("latent_omni")) is LatentOmniConfig
        assert AutoModelForMultimodalLM._model_mapping[LatentOmniConfig].__name__ == "LatentOmniForConditionalGeneration"
        print("ok")
        """
    )


def test_import_stays_free_of_side_effects_and_unregister_before_transformers_imports_nothing():
    # importing hf_ext (and its unregister functions) registers names only; unregistering before transformers is
    # imported imports nothing, and withdraws the registrations import hf_ext had deferred to that import
    _run(
        """
        import sys
        import hf_ext
        from hf_ext.attention.sale import register_sale, unregister_sale
        from hf_ext.models.latent_omni import register_now, unregister
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "torch"))
        assert not loaded, loaded
        unregister_sale()
        unregister()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "torch"))
        assert not loaded, loaded
        from transformers import AttentionInterface, AutoConfig, AutoModelForMultimodalLM, AutoProcessor  # noqa: F401
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        assert "sale" not in AttentionInterface._global_mapping and "sale" not in AttentionMaskInterface._global_mapping
        assert "latent_omni" not in CONFIG_MAPPING
        assert register_sale() and "sale" in AttentionInterface._global_mapping
        register_now()
        assert type(AutoConfig.for_model("latent_omni")).__name__ == "LatentOmniConfig"
        print("ok")
        """
    )
