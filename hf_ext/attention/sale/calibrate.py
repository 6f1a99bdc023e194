"""Per-(layer, head) threshold calibration for SALE, as in the reference implementation.

For every attention layer and query head: start at ``tau = tau_init`` (0.008) and halve it until the L1
error of the head's sparse output against the dense output on a calibration prompt is below ``theta * N``
(``N`` = number of real query tokens of that prompt; the error sums ``|sparse - dense|`` over the prompt's
tokens and the head dimension). A tau that falls to ``tau_min`` (1e-4) or below becomes 0, which keeps every
block of that head (dense). Prompts are processed in turn and a head's tau only ever decreases, so the
final tau satisfies the criterion on the prompts it was tightened on. This follows BirdChristopher/SALE's
``kv_retrieve_calib.py`` (``--threshold 0.008``, ``--error`` = theta, halving, zero below 1e-4).

The per-layer q/k/v are captured inside the ``"sale"`` attention function (after RoPE / q-k norms, exactly
what the kernel sees); the model keeps running on the dense outputs so later layers see exact activations.
The result is written to ``model.config.sale_config["taus"]`` (a nested list ``[num_layers][num_heads]``),
so ``save_pretrained`` / ``from_pretrained`` keep it. Thresholds are kept per attention config: a sub-model whose
attention layers number their own ``layer_idx`` from 0 (Gemma4's vision tower next to its text model) gets its own
table, in ``sale_config["sub_taus"]["vision_config"]`` and as the ``taus`` of that sub-config's ``sale_config``.
Thresholds are kept per kind of attention too: an encoder-decoder model (BART, Whisper) keeps encoder
self-attention, decoder self-attention and cross-attention on one config with the same ``layer_idx`` values; the
encoder's table goes to ``sale_config["encoder_taus"]``, the decoder's to ``taus``, and cross-attention runs dense
(not calibrated).

Example:
    >>> import torch
    >>> from hf_ext.testing import tiny_llama
    >>> from hf_ext.attention.sale import SALEConfig, calibrate
    >>> model = tiny_llama()
    >>> ids = torch.randint(3, 500, (1, 96))
    >>> cfg = calibrate(model, ids, theta=0.4, config=SALEConfig(block_q=16, block_k=16, local_window=16))
    >>> len(cfg.taus), len(cfg.taus[0])
    (2, 4)
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import types
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch

from hf_ext.attention.sale import attention as _attn
from hf_ext.attention.sale.config import SALEConfig
from hf_ext.attention.sale.integration import (
    _attention_configs,
    _attention_modules,
    _check_taus_fit,
    _default_impl,
    _impl_tree,
    _query_heads,
    _sub_model_names,
    set_sale_config,
)

__all__ = ["calibrate", "Calibrator"]


class Calibrator:
    """Collects per-(layer, head) thresholds while a model runs dense under :func:`calibrating`.

    Attributes:
        taus: ``{(id(module.config), layer_idx, kind): tensor [H]}`` current thresholds. Keyed by the attention
            module's config too (sub-models, a vision tower and the text model, each number their layers from 0)
            and by its kind (``attention.attention_kind``: ``"causal"`` or ``"bidirectional"``; an encoder-decoder
            model's encoder and decoder self-attention share config and layer_idx values).
        configs: ``{id(config): config}`` of the keys of ``taus``.
        skipped: ``{(id(module.config), layer_idx, kind): reason}`` for layers the sparse path cannot take (they
            stay dense at run time; cross-attention among them).
        steps: number of (layer, prompt) observations.
    """

    def __init__(self, cfg: SALEConfig, theta: float, tau_init: float, tau_min: float) -> None:
        self.cfg = cfg
        self.theta = theta
        self.tau_init = tau_init
        self.tau_min = tau_min
        self.taus: dict[tuple[int, int], torch.Tensor] = {}
        self.configs: dict[int, Any] = {}
        self.skipped: dict[tuple[int, int], str] = {}
        self.steps = 0

    @torch.no_grad()
    def observe(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dense_out: torch.Tensor,
        scaling: float | None,
        is_causal: bool | None,
        kwargs: dict,
        dropout: float,
    ) -> None:
        """Tighten the thresholds of ``module.layer_idx`` (of ``module.config``, of its kind) on one prompt batch.

        ``query [B,H,Sq,D]``, ``key``/``value`` ``[B,Hkv,Sk,D]``, ``dense_out [B,Sq,H,D]`` (the dense result, which the
        model keeps; each head's error is measured against the SALE kernel run with every visible block kept).
        """
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            return
        conf = getattr(module, "config", None)
        self.configs[id(conf)] = conf
        # encoder self-attention, decoder self-attention and cross-attention may share config and layer_idx
        # (BART, Whisper): each kind gets its own slot (cross-attention runs dense: _unsupported_reason skips it)
        slot = (id(conf), layer, _attn.attention_kind(module))
        reason = _attn._unsupported_reason(module, query, key, value, dropout, kwargs, self.cfg)
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        sq, sk = query.shape[2], key.shape[2]
        kpm = None
        if reason is None and attention_mask is not None:  # None: plain causal, bottom-right
            kpm, why = _attn.decode_mask(attention_mask, query.shape[0], sq, sk, causal)
            if why is not None:
                reason = ("mask", why)
        if reason is not None:
            self.skipped[slot] = reason[1]
            return
        h = query.shape[1]
        taus = self.taus.setdefault(slot, torch.full((h,), float(self.tau_init), dtype=torch.float64))
        # the reference is the same kernel keeping every visible block (tau 0), not the model's dense output: in
        # bfloat16 the two round differently, and that rounding floor alone (~1 ulp of |out| per element, summed over
        # head_dim) passed theta * N where outputs are large (mean |out| ~5 at head_dim 128), so every head came out
        # dense while float32 calibrated tau 0.002; the criterion now measures only what the dropped blocks change
        ref, _ = _attn._run_rows(
            query,
            key,
            value,
            kpm,
            torch.zeros_like(taus),
            self.cfg,
            scaling,
            causal,
            False,
            force_sparse=True,
        )
        ref = ref.float()  # [B,H,Sq,D]
        if kpm is None:
            valid = torch.ones(query.shape[0], sq, dtype=torch.bool, device=query.device)
        else:
            valid = kpm[:, sk - sq :]  # a query row counts when its own token is real
        n = valid.sum(-1).float()  # [B]
        w = valid[:, None, :, None].float()
        while True:
            out, _ = _attn._run_rows(
                query, key, value, kpm, taus, self.cfg, scaling, causal, False, force_sparse=True
            )
            err = ((out.float() - ref).abs() * w).sum(dim=(2, 3))  # [B,H]
            # a prompt with no real token has nothing to check (0 >= theta * 0 would always fail)
            bad = (err >= self.theta * n[:, None]) & (n[:, None] > 0)
            fail = bad.any(dim=0).cpu() & (taus > 0)
            if not bool(fail.any()):
                break
            taus[fail] = taus[fail] / 2
            taus[taus <= self.tau_min] = 0.0
        self.steps += 1


@contextlib.contextmanager
def calibrating(calibrator: Calibrator) -> Iterator[Calibrator]:
    """Route every ``"sale"`` prefill call inside the block to ``calibrator`` (outputs stay dense)."""
    old = getattr(_attn._STATE, "calibrator", None)
    _attn._STATE.calibrator = calibrator
    try:
        yield calibrator
    finally:
        _attn._STATE.calibrator = old


def _batches(inputs: Any) -> list[dict[str, torch.Tensor]]:
    def one(x: Any) -> dict[str, torch.Tensor]:
        if isinstance(x, torch.Tensor):
            if x.dim() == 1:
                x = x[None]
            if x.dim() != 2 or x.is_floating_point():
                raise ValueError(
                    f"inputs: a tensor must be integer token ids [B, S] or [S], got dtype {x.dtype} shape {tuple(x.shape)}"
                )
            return {"input_ids": x}
        if hasattr(x, "keys") and "input_ids" in x:
            # every model input is kept (a processor's pixel_values, image_sizes, token_type_ids, ...): the
            # thresholds must be fitted on the activations the model really sees
            out = {
                k: x[k]
                for k in x
                if k not in ("input_ids", "attention_mask", "use_cache") and x[k] is not None
            }
            out.update(one(x["input_ids"]))
            am = x.get("attention_mask")
            if am is not None:
                out["attention_mask"] = am[None] if am.dim() == 1 else am
            return out
        raise ValueError(
            "inputs must be token ids (tensor [B, S]), a dict / BatchEncoding with 'input_ids' "
            f"(and optional 'attention_mask' and other model inputs), or a list of those; got {type(x).__name__}"
        )

    if isinstance(inputs, torch.Tensor) or (hasattr(inputs, "keys") and "input_ids" in inputs):
        items = [inputs]
    elif isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
        items = list(inputs)
    else:
        items = [inputs]
    if not items:
        raise ValueError("inputs is empty: give at least one calibration prompt")
    return [one(x) for x in items]


def calibrate(
    model: Any,
    inputs: Any,
    theta: float = 0.4,
    *,
    tau_init: float = 0.008,
    tau_min: float = 1e-4,
    config: SALEConfig | dict | None = None,
    progress: bool = False,
) -> SALEConfig:
    """Calibrate per-(layer, head) SALE thresholds on ``inputs`` and store them on the model config.

    Args:
        model: a transformers causal LM (run in eval mode, each module's training flag put back afterwards;
            any attention implementation; ``"sale"`` is used during the run and
            the previous implementation of the model and of each sub-model (``text_config``, ``vision_config``,
            ...) restored afterwards, also when the run raises; a run that raises also keeps the stored
            ``sale_config``).
        inputs: token ids ``[B, S]``, a dict/``BatchEncoding`` with ``input_ids`` (+ ``attention_mask`` and any
            other model input, e.g. a processor's ``pixel_values``: all are passed to the model), or a list of those
            (each one forward pass). Long, representative prompts give the best thresholds.
        theta: error budget per token: a head passes when ``sum |sparse - dense| < theta * N`` (> 0, finite).
        tau_init: starting threshold, in (0, 1) (the reference uses 0.008).
        tau_min: thresholds at or below this become 0 (dense head), in [0, tau_init).
        config: block sizes etc. to calibrate for (default: the model's stored config or the defaults);
            ``min_seq_len`` does not apply during calibration.
        progress: show a progress bar over the prompts.

    Returns:
        The new :class:`SALEConfig`, with ``taus`` ``[num_layers][num_heads]`` (the text model's) and, for a
        sub-model whose attention layers number their own ``layer_idx`` (e.g. Gemma4's vision tower), that
        sub-model's table in ``sub_taus`` (``{"vision_config": [num_layers][num_heads]}``); for an
        encoder-decoder model (BART, Whisper), the encoder self-attention's table in ``encoder_taus`` (``taus``:
        the decoder self-attention's; cross-attention runs dense); also written to ``model.config.sale_config``,
        and each sub-model's table to its own config's ``sale_config``.

    Raises:
        ValueError: a sub-model other than the text model holds both causal and non-causal self-attention layers
            with the same ``layer_idx`` values (only the text model has an ``encoder_taus``).
    """
    if not _is_real(theta) or not 0 < float(theta) < math.inf:
        raise ValueError(
            f"theta={theta!r} is invalid: it must be a positive finite float (the reference uses 0.4)"
        )
    if not _is_real(tau_init) or not 0.0 < float(tau_init) < 1.0:
        raise ValueError(
            f"tau_init={tau_init!r} is invalid: it must be a float in (0, 1) (the reference uses 0.008)"
        )
    if not _is_real(tau_min) or not 0.0 <= float(tau_min) < float(tau_init):
        raise ValueError(f"tau_min={tau_min!r} is invalid: it must be a float in [0, tau_init={tau_init!r})")
    if not isinstance(progress, bool):
        raise ValueError(f"progress={progress!r} is invalid: it must be True or False")
    if config is None:
        config = getattr(model.config, "sale_config", None)
    cfg = SALEConfig.from_dict(config)
    batches = _batches(inputs)

    from hf_ext.attention.sale._registration import register_now

    register_now()
    # each (sub-)model's implementation (a vision tower may run sdpa while the text model runs eager): the
    # whole tree is put back afterwards, also when a forward pass raises
    prev = _impl_tree(model.config, _default_impl(model))
    prev_sale = [(c, vars(c).get("sale_config")) for c in _attention_configs(model)]
    cal = Calibrator(cfg, float(theta), float(tau_init), float(tau_min))
    device = next(model.parameters()).device
    # the stored taus are not used while calibrating (and may be another model's: that is what re-calibrating fixes)
    set_sale_config(model, replace(cfg, taus=None, encoder_taus=None, sub_taus=None))
    ok = False
    # calibration is inference: a model left in training mode (after Trainer.train(), or built from a config) runs
    # in eval mode (no dropout; SALE takes training-mode modules dense, so none would be calibrated), then each
    # module's own flag is put back
    training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if prev != "sale":
            model.set_attn_implementation("sale")
        it = batches
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc="SALE calibration")
        with calibrating(cal), torch.no_grad():
            for b in it:
                model(
                    **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()},
                    use_cache=False,
                )
        if not cal.taus:
            raise RuntimeError(
                "calibration observed no attention layer: the model does not dispatch through transformers' "
                "AttentionInterface, or every layer is unsupported by SALE "
                f"(skipped: {cal.skipped or 'none'})"
            )
        # inside the try: a table that cannot be built or stored (ValueError) keeps the stored config too
        new = replace(cfg, **_tables(model, cal, cfg))
        set_sale_config(model, new)
        ok = True
    finally:
        for m, flag in training:
            m.training = flag
        if prev != "sale":
            model.set_attn_implementation(prev)
        if not ok:  # a failed run leaves the stored SALE config as it was too
            for c, old in prev_sale:
                if old is None:
                    vars(c).pop("sale_config", None)
                else:
                    c.sale_config = old
    return new


def _tables(model: Any, cal: Calibrator, cfg: SALEConfig) -> dict[str, Any]:
    """``taus``, ``encoder_taus`` and ``sub_taus`` from a calibration run: one table per sub-model (``None``: the text
    model, which reads ``taus``), as each attention module looks its thresholds up in its own config; where the text
    model holds both causal and non-causal self-attention (an encoder-decoder model: BART, Whisper), the non-causal
    (encoder) layers get their own table, ``encoder_taus``. Layers not observed keep the stored row where it fits,
    else get ``tau``."""
    subs = _sub_model_names(model)
    kinds: dict[str | None, set[str]] = {}
    for m in _attention_modules(model):
        kinds.setdefault(subs.get(id(getattr(m, "config", None))), set()).add(_attn.attention_kind(m))

    def table_of(name: str | None, kind: str) -> tuple[str | None, str]:
        """(sub-model, ``"main"`` or ``"encoder"``): the table a module of that sub-model and kind reads."""
        mixed = {"causal", "bidirectional"} <= kinds.get(name, set())
        return (name, "encoder" if kind == "bidirectional" and mixed else "main")

    observed: dict[tuple[str | None, str], dict[int, torch.Tensor]] = {}
    for (cid, layer, kind), t in cal.taus.items():
        rows = observed.setdefault(table_of(subs.get(cid), kind), {})
        # two configs reading the same table (the text model's and an unnamed one): the tighter value meets both
        rows[layer] = torch.minimum(rows[layer], t) if layer in rows and len(rows[layer]) == len(t) else t
    odd = sorted(name for name, which in observed if which == "encoder" and name is not None)
    if odd:
        raise ValueError(
            f"sub-model(s) {odd} hold both causal and non-causal self-attention layers with the same layer_idx "
            "values; SALE keeps separate encoder thresholds (encoder_taus) for the text model only. Calibrate with "
            "prompts that do not reach them, or run them on another attention implementation"
        )
    layers: dict[tuple[str | None, str], list[int]] = {}
    for m in model.modules():
        li = getattr(m, "layer_idx", None)
        kind = _attn.attention_kind(m)
        if isinstance(li, int) and not isinstance(li, bool) and kind != "cross":
            layers.setdefault(table_of(subs.get(id(getattr(m, "config", None))), kind), []).append(li)
    tables: dict[tuple[str | None, str], list[list[float]]] = {}
    for key, rows in observed.items():
        n_layers = max(layers.get(key, []) + list(rows)) + 1
        n_heads = len(next(iter(rows.values())))
        stored = cfg.for_sub_model(key[0])
        old = stored.encoder_taus if key[1] == "encoder" else stored.taus
        table: list[list[float]] = []
        for li in range(n_layers):
            if li in rows:
                table.append([float(t) for t in rows[li].tolist()])
            elif old is not None and li < len(old) and len(old[li]) == n_heads:
                table.append(list(old[li]))
            else:
                table.append([cfg.tau] * n_heads)
        tables[key] = table
    sub_taus = {name: v for (name, _), v in tables.items() if name is not None}
    # a sub-model the prompts did not reach (text-only prompts: no vision tower) keeps its stored table if it fits
    for name, old in (cfg.sub_taus or {}).items():
        if name not in sub_taus:
            try:
                _check_taus_fit(model, SALEConfig(sub_taus={name: old}))
            except ValueError:
                continue
            sub_taus[name] = old
    # a sub-model with attention layers of its own that the prompts did not reach and no stored table that fits
    # (text-only prompts to a vision-language model): the flat tau. Left out, its modules would read taus, the
    # text model's thresholds (and set_sale_config refuses them after the whole run when the head counts differ)
    unreached: dict[str, dict[int, int]] = {}
    for m in _attention_modules(model):
        name = subs.get(id(getattr(m, "config", None)))
        heads = _query_heads(m)
        if name is None or name in sub_taus or _attn.attention_kind(m) == "cross":
            continue
        if heads is not None:
            unreached.setdefault(name, {})[m.layer_idx] = heads
    for name, heads_of in unreached.items():
        width = max(heads_of.values())
        sub_taus[name] = [[cfg.tau] * heads_of.get(li, width) for li in range(max(heads_of) + 1)]
    return {
        "taus": tables.get((None, "main")),
        "encoder_taus": tables.get((None, "encoder")),
        "sub_taus": sub_taus or None,
    }


def _is_real(x: Any) -> bool:
    """A real number (Python, numpy or 0-d torch scalar), not a bool (``tau_init=True`` is a mistake, not 1.0)."""
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.dtype.is_complex and x.dtype != torch.bool
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class _CallableModule(types.ModuleType):
    """``hf_ext.attention.sale.calibrate`` is both this module and the function: calling the module calls it."""

    def __call__(self, *args: Any, **kwargs: Any) -> SALEConfig:
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
