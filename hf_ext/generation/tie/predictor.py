"""Output-length predictors: a small HF encoder with MLP heads, three training objectives.

* ``kind="logt"`` (TIE): heads give ``(μ, σ)`` of ``log X ~ μ + σ·T_ν`` (ν fixed, or one learned
  global ν), trained by the log-t negative log-likelihood of the observed ``log(output_len)``.
* ``kind="point"`` (SSJF, Qiu et al. 2024): one head regresses ``log(output_len)`` (MSE); its
  point estimate ``exp(μ̂)`` orders the queue.
* ``kind="ltr"`` (learning to rank, Fu et al. NeurIPS'24): one head gives a score trained with a
  listwise (ListMLE, each training batch is one list) or pairwise logistic ranking loss so that
  ``score`` increases with the output length; only the order is meaningful.

The encoder is a ``BertModel`` built from a config (random init, no download), mean-pooled over
non-padding tokens: ``input_ids[B, S] -> pooled[B, H] -> head -> [B, 2]`` (logt) or ``[B, 1]``.
Targets are standardised internally (``y_mean``, ``y_std`` saved in the config).

Example:
    >>> from hf_ext.generation.tie.data import generate_workload, to_dataset
    >>> pred = LengthPredictor(PredictorConfig(epochs=1, hidden_size=32, num_heads=2, intermediate_size=64))
    >>> _ = pred.fit(to_dataset(generate_workload(64)))
    >>> out = pred.predict(["What is the capital of France?"])
    >>> out["mu"].shape, out["sigma"].shape
    ((1,), (1,))
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertModel, PretrainedConfig, PreTrainedModel

from hf_ext.generation.tie.config import PredictorConfig, _check_int
from hf_ext.generation.tie.scheduler import (
    heuristic_prediction,  # noqa: F401  (re-export)
    validate_prompts,
)


def _checked_rows(dataset: Any, prompt_column: str, who: str) -> list[str]:
    """The prompts of ``dataset[prompt_column]``; ``ValueError`` if one is empty or there are none (``who``: the
    method, in the message)."""
    prompts = validate_prompts(dataset[prompt_column])
    if not prompts:
        raise ValueError(f"dataset: {who} needs at least one row, got an empty {prompt_column!r} column")
    return prompts


def _checked_lengths(values: Any, n: int, column: str) -> np.ndarray:
    """``values`` as a float array of ``n`` finite lengths >= 1 (``ValueError`` naming ``column`` otherwise)."""
    lengths = np.asarray(values, dtype=np.float64)
    if lengths.shape != (n,) or not np.all(np.isfinite(lengths)) or np.any(lengths < 1):
        raise ValueError(f"{column} must hold one finite length >= 1 per prompt")
    return lengths


# what ``LengthPredictor.predict`` returns per kind
_PREDICT_KEYS: dict[str, tuple[str, ...]] = {
    "logt": ("mu", "sigma", "nu"),
    "point": ("mu",),
    "ltr": ("score",),
}


class LengthPredictorConfig(PretrainedConfig):
    """``PretrainedConfig`` of :class:`LengthPredictorModel` (an encoder config dict plus head settings)."""

    model_type = "hf_ext_tie_length_predictor"

    def __init__(
        self,
        kind: str = "logt",
        encoder: dict | None = None,
        nu: float = 3.5,
        learn_nu: bool = False,
        min_sigma: float = 0.05,
        y_mean: float = 0.0,
        y_std: float = 1.0,
        max_prompt_tokens: int = 96,
        **kwargs: Any,
    ) -> None:
        self.kind = kind
        self.encoder = dict(encoder or {})
        self.nu = float(nu)
        self.learn_nu = bool(learn_nu)
        self.min_sigma = float(min_sigma)
        self.y_mean = float(y_mean)
        self.y_std = float(y_std)
        self.max_prompt_tokens = int(max_prompt_tokens)
        super().__init__(**kwargs)


class LengthPredictorModel(PreTrainedModel):
    """Encoder + MLP head. ``forward(input_ids[B,S], attention_mask[B,S]) -> dict`` of ``[B]`` tensors.

    Outputs (natural-log token units): ``mu``, ``sigma``, ``nu`` for ``logt``; ``mu`` for ``point``;
    ``score`` for ``ltr``. Also ``raw[B, k]``: the head output in standardised units.
    """

    config_class = LengthPredictorConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"

    def __init__(self, config: LengthPredictorConfig) -> None:
        super().__init__(config)
        enc_cfg = BertConfig(**config.encoder)
        self.encoder = BertModel(enc_cfg, add_pooling_layer=False)
        h = enc_cfg.hidden_size
        out = 2 if config.kind == "logt" else 1
        self.head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, out))
        self.log_nu = nn.Parameter(torch.tensor(math.log(config.nu)), requires_grad=config.learn_nu)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B,S,H]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # [B,H]
        raw = self.head(pooled)  # [B,k]
        c = self.config
        out: dict[str, torch.Tensor] = {"raw": raw}
        if c.kind == "logt":
            out["mu"] = c.y_mean + c.y_std * raw[:, 0]
            out["sigma"] = c.y_std * (nn.functional.softplus(raw[:, 1]) + c.min_sigma / max(c.y_std, 1e-6))
            out["nu"] = self.log_nu.exp().expand_as(out["mu"])
        elif c.kind == "point":
            out["mu"] = c.y_mean + c.y_std * raw[:, 0]
        else:
            out["score"] = raw[:, 0]
        return out


# ----------------------------------------------------------------------------------------- losses
def logt_nll(y: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood of ``y`` under ``μ + σ·T_ν`` (all ``[B]``), nats."""
    z = (y - mu) / sigma
    return -(
        torch.lgamma((nu + 1) / 2)
        - torch.lgamma(nu / 2)
        - 0.5 * torch.log(nu * math.pi)
        - torch.log(sigma)
        - (nu + 1) / 2 * torch.log1p(z * z / nu)
    )


_GL_NODES, _GL_WEIGHTS = (
    torch.as_tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(64)
)


def student_t_log_sf(z: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """``log P(T_ν >= z)`` of a standard Student-t, differentiable in ``z`` and ``ν`` (shapes broadcast).

    Torch has no t CDF; the upper tail ``∫_a^∞ f`` (``a = |z|``) is a 64-node Gauss–Legendre sum after
    ``t = a + s/(1-s)`` (the integrand falls like ``(1-s)^(ν-1)`` at ``s → 1``, smooth for ``ν > 1``), and
    ``z < 0`` uses ``1 - tail(|z|)``. Relative error < 1e-6 against scipy for ``ν ≥ 2`` (tests).
    """
    z, nu = torch.broadcast_tensors(z, nu)
    dt = z.dtype
    a = z.abs().to(torch.float64)
    v = nu.to(torch.float64)
    s = (_GL_NODES + 1.0) / 2.0  # [K] in (0, 1)
    w = _GL_WEIGHTS / 2.0
    t = a[..., None] + s / (1.0 - s)
    logpdf = (torch.lgamma((v + 1) / 2) - torch.lgamma(v / 2) - 0.5 * torch.log(v * math.pi))[..., None] - (
        v[..., None] + 1
    ) / 2 * torch.log1p(t * t / v[..., None])
    tail = (w * torch.exp(logpdf) / (1.0 - s) ** 2).sum(-1).clamp(1e-300, 0.5)
    out = torch.where(z >= 0, torch.log(tail), torch.log1p(-tail))
    return out.to(dt)


def listmle_loss(score: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ListMLE (Xia et al. 2008) for ascending order of ``y``: the shortest request should have the lowest score.

    ``score``, ``y``: ``[B]``; the whole batch is one list.
    """
    order = torch.argsort(y)  # shortest first
    s = -score[order]  # highest "priority" first
    # log-likelihood of the permutation under Plackett-Luce: sum_i s_i - logsumexp(s_i..n)
    rev_lse = torch.logcumsumexp(s.flip(0), 0).flip(0)
    return (rev_lse - s).mean()


def pairwise_loss(score: torch.Tensor, y: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """Logistic pairwise ranking loss over pairs whose ``|Δ log length| > margin``."""
    dy = y[:, None] - y[None, :]
    ds = score[:, None] - score[None, :]
    mask = dy > margin
    if not bool(mask.any()):
        return score.sum() * 0.0
    return nn.functional.softplus(-ds[mask]).mean()


# -------------------------------------------------------------------------------------- predictor
class LengthPredictor:
    """Prompt text → output-length prediction, with ``fit``, ``predict``, ``evaluate`` and save/load.

    Args:
        config: architecture and training settings (:class:`PredictorConfig`).
        tokenizer: any HF tokenizer (defaults to the local ``hf_ext.testing.tiny_tokenizer()``).
    """

    def __init__(
        self,
        config: PredictorConfig | None = None,
        tokenizer: Any = None,
        model: LengthPredictorModel | None = None,
    ) -> None:
        self.config = config or PredictorConfig()
        if tokenizer is None:
            from hf_ext.testing import tiny_tokenizer

            tokenizer = tiny_tokenizer()
        self.tokenizer = tokenizer
        if model is None:
            c = self.config
            torch.manual_seed(c.seed)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            enc = dict(
                vocab_size=len(tokenizer),
                hidden_size=c.hidden_size,
                num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads,
                intermediate_size=c.intermediate_size,
                max_position_embeddings=max(c.max_length, 16),
                pad_token_id=pad,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
            model = LengthPredictorModel(
                LengthPredictorConfig(
                    kind=c.kind,
                    encoder=enc,
                    nu=c.nu,
                    learn_nu=c.learn_nu,
                    min_sigma=c.min_sigma,
                    max_prompt_tokens=c.max_length,
                )
            )
        # ν is trained only with learn_nu: a loaded model comes back with every parameter trainable
        model.log_nu.requires_grad_(bool(model.config.learn_nu))
        self.model = model.eval()
        self.fitted = False

    @property
    def kind(self) -> str:
        return self.model.config.kind

    def _encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.model.config.max_prompt_tokens,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    # ------------------------------------------------------------------------------------ train
    def fit(
        self,
        dataset: Any,
        prompt_column: str = "prompt",
        length_column: str = "output_len",
        progress: bool = False,
        censored_column: str | None = None,
    ) -> dict[str, list[float]]:
        """Train on a ``datasets.Dataset`` (or dict of lists) of ``(prompt, output_len)`` pairs.

        Args:
            censored_column: a column of booleans, True where ``output_len`` is only a lower bound (generation was
                cut by the request's ``max_new_tokens`` or the client cancelled it), as in a
                :class:`~hf_ext.generation.tie.lengthlog.LengthLog` of served requests. Those rows enter the log-t
                NLL as ``log P(X >= output_len)``, like lengths at ``PredictorConfig.censor_at``. ``kind="logt"``
                only: a point or ranking objective has no way to use "at least" (``ValueError`` if a row is
                censored; drop such rows to train those baselines).

        Calling ``fit`` on a fitted predictor continues training from its weights (fine-tuning, e.g. on a newer
        length log): its length normalisation is kept, so its heads start from what they learned.

        Returns ``{"loss": [per-epoch mean loss]}``.
        """
        prompts = _checked_rows(dataset, prompt_column, "fit")
        lengths = _checked_lengths(dataset[length_column], len(prompts), length_column)
        cens_all = censored_flags(dataset, censored_column, len(prompts))
        if cens_all.any() and self.kind != "logt":
            raise ValueError(
                f"censored_column={censored_column!r} has {int(cens_all.sum())} censored rows, but a kind="
                f"{self.kind!r} predictor cannot use a lower bound; train kind='logt', or drop the censored rows"
            )
        if any(q.requires_grad and q.dtype == torch.float16 for q in self.model.parameters()):
            # AdamW's eps (1e-8) is 0 in float16: every parameter with a zero gradient (unused embedding rows) became
            # 0/0 = NaN at the first step, and fit returned a NaN predictor without a word
            raise ValueError(
                "LengthPredictor.fit cannot train float16 parameters (AdamW's eps of 1e-8 is 0 in float16: the weights "
                "turn NaN at the first step); train in float32 or bfloat16 (predictor.model.float()) and cast afterwards"
            )
        c = self.config
        y_all = np.log(lengths)
        mcfg = self.model.config
        if not self.fitted:  # a fitted predictor keeps the normalisation its heads were trained with
            mcfg.y_mean, mcfg.y_std = float(y_all.mean()), float(max(y_all.std(), 1e-3))
        enc = self._encode(prompts)
        y_fit = y_all
        if c.censor_at is not None and self.kind == "logt":  # cut at the global cap: only "at least" is known
            cens_all |= lengths >= c.censor_at
            y_fit = np.minimum(y_all, math.log(c.censor_at))
        y_t = torch.tensor(y_fit, dtype=torch.float32)
        cens_t = torch.tensor(cens_all)
        gen = torch.Generator().manual_seed(c.seed)
        opt = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=c.lr, weight_decay=c.weight_decay
        )
        n = len(prompts)
        steps = c.epochs * math.ceil(n / c.batch_size)
        if steps >= 20:  # one-cycle schedule; too few steps for it: constant learning rate
            sched: Any = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=c.lr, total_steps=steps, pct_start=0.1
            )
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        history: list[float] = []
        self.model.train()
        it = range(c.epochs)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"fit {self.kind} predictor")
        for _ in it:
            perm = torch.randperm(n, generator=gen)
            tot, cnt = 0.0, 0
            for s in range(0, n, c.batch_size):
                idx = perm[s : s + c.batch_size]
                ids, mask = enc["input_ids"][idx], enc["attention_mask"][idx]
                keep = int(mask.sum(1).max())
                out = self.model(ids[:, :keep], mask[:, :keep])
                loss = self._loss(out, y_t[idx], cens_t[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                opt.step()
                sched.step()
                tot += loss.item() * len(idx)
                cnt += len(idx)
            history.append(tot / cnt)
        self.model.eval()
        self.fitted = True
        return {"loss": history}

    def _loss(self, out: dict[str, torch.Tensor], y: torch.Tensor, cens: torch.Tensor) -> torch.Tensor:
        """Training loss of one batch; ``cens[B]`` (logt): ``y`` is a lower bound, scored as ``log P(Y >= y)``."""
        mcfg = self.model.config
        ys = (y - mcfg.y_mean) / mcfg.y_std
        if self.kind == "logt":
            mu_s = out["raw"][:, 0]
            sigma_s = out["sigma"] / mcfg.y_std
            nll = logt_nll(ys, mu_s, sigma_s, out["nu"])
            if bool(cens.any()):
                z = (ys - mu_s) / sigma_s
                nll = torch.where(cens, -student_t_log_sf(z, out["nu"].expand_as(z)), nll)
            return nll.mean()
        if self.kind == "point":
            return nn.functional.mse_loss(out["raw"][:, 0], ys)
        if self.config.ltr_loss == "listmle":
            return listmle_loss(out["score"], ys)
        return pairwise_loss(out["score"], ys)

    # ---------------------------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(self, prompts: Sequence[str], batch_size: int = 256) -> dict[str, np.ndarray]:
        """Predictions for ``prompts`` (list of N non-empty strings) as ``[N]`` float arrays.

        ``logt``: ``mu``, ``sigma``, ``nu``; ``point``: ``mu`` (log of the point estimate);
        ``ltr``: ``score``. Raises ``ValueError`` on empty prompts or non-finite outputs.
        """
        prompts = validate_prompts(prompts)
        _check_int("batch_size", batch_size)  # <= 0 gave an empty result (or range()'s error)
        if not self.fitted:
            warnings.warn("LengthPredictor.predict called on an untrained predictor", stacklevel=2)
        keys: dict[str, list[np.ndarray]] = {}
        for s in range(0, len(prompts), batch_size):
            out = self.model(**self._encode(prompts[s : s + batch_size]))
            for k, v in out.items():
                if k != "raw":
                    keys.setdefault(k, []).append(v.float().cpu().numpy().astype(np.float64))
        if not keys:  # no prompts: the documented keys, empty
            return {k: np.zeros(0) for k in _PREDICT_KEYS[self.kind]}
        res = {k: np.concatenate(v) for k, v in keys.items()}
        for k, v in res.items():
            if not np.all(np.isfinite(v)):
                raise ValueError(
                    f"predictor produced non-finite {k!r} values (NaN/inf); check the model weights"
                )
        return res

    def evaluate(
        self,
        dataset: Any,
        prompt_column: str = "prompt",
        length_column: str = "output_len",
        max_new_tokens: int | None = None,
        censored_column: str | None = None,
    ) -> dict[str, float]:
        """Quality on held-out pairs: ``nll`` (log-t, nats of log length; logt only; with ``censor_at`` or
        ``censored_column`` (see :meth:`fit`) also ``nll_censored``, the training objective: censored lengths
        scored as ``log P(X >= length)``; the other metrics take every length as observed), ``coverage50``,
        ``coverage90``, ``mae_log`` (|μ - log L|, logt/point) and ``spearman`` / ``kendall`` rank correlation.

        CRPS (logt/point; a point forecast's CRPS is its absolute error, so the two kinds compare):
        ``crps_log`` (nats of log length) and, with ``max_new_tokens`` (the generation cap ``M``),
        ``crps_tokens`` on lengths clipped to ``[1, M]``."""
        from scipy import stats

        prompts = _checked_rows(dataset, prompt_column, "evaluate")
        lengths = _checked_lengths(dataset[length_column], len(prompts), length_column)
        if max_new_tokens is not None:
            _check_int("max_new_tokens", max_new_tokens)
        cens = censored_flags(dataset, censored_column, len(prompts))
        pred = self.predict(prompts)
        y = np.log(lengths)
        key = pred.get("score", pred.get("mu"))
        res = {
            "spearman": float(stats.spearmanr(key, lengths).statistic),
            "kendall": float(stats.kendalltau(key, lengths).statistic),
        }
        if "mu" in pred:
            res["mae_log"] = float(np.mean(np.abs(pred["mu"] - y)))
            if self.kind == "point":
                res["crps_log"] = res["mae_log"]
                if max_new_tokens is not None:
                    clip = np.clip(np.exp(pred["mu"]), 1, max_new_tokens)
                    res["crps_tokens"] = float(np.mean(np.abs(clip - np.clip(lengths, 1, max_new_tokens))))
        if self.kind == "logt":
            res.update(
                logt_scores(
                    lengths,
                    pred["mu"],
                    pred["sigma"],
                    pred["nu"],
                    max_new_tokens,
                    censor_at=self.config.censor_at,
                    censored=cens if censored_column is not None else None,
                )
            )
        return res

    # ---------------------------------------------------------------------------------- save/load
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save model (safetensors + config), tokenizer and training config to a local directory."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
        with open(os.path.join(path, "tie_predictor.json"), "w") as f:
            json.dump({"predictor_config": asdict(self.config), "fitted": self.fitted}, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LengthPredictor:
        """Load a predictor saved with :meth:`save_pretrained` (local directory only)."""
        from transformers import AutoTokenizer

        meta_path = os.path.join(path, "tie_predictor.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path!r} is not a saved LengthPredictor (no tie_predictor.json)")
        with open(meta_path) as f:
            meta = json.load(f)
        model = LengthPredictorModel.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
        obj = cls(PredictorConfig(**meta["predictor_config"]), tokenizer=tok, model=model)
        obj.fitted = bool(meta.get("fitted", True))
        return obj


def logt_scores(
    lengths: Any,
    mu: Any,
    sigma: Any,
    nu: Any,
    max_new_tokens: int | None = None,
    censor_at: int | None = None,
    censored: Any = None,
) -> dict[str, float]:
    """How well log-t laws ``(μ, σ, ν)`` (each ``[N]`` or scalar) describe observed ``lengths[N]``: ``nll`` (nats of log
    length), ``coverage50`` / ``coverage90`` (central intervals), ``crps_log`` (``inf`` if some ``ν <= 1``) and, with
    ``max_new_tokens``, ``crps_tokens`` on lengths clipped to ``[1, M]``; with ``censor_at`` and/or ``censored``
    (``[N]`` booleans: that length is a lower bound) also ``nll_censored`` (lengths at the cap or flagged scored as
    ``log P(X >= length)``). Shared by :meth:`LengthPredictor.evaluate` and the bench's
    reference laws (constant, true)."""
    from hf_ext.generation.tie.distribution import crps_length, crps_log, interval_coverage

    lengths = np.asarray(lengths, dtype=np.float64)
    mu, sigma, nu = (np.broadcast_to(np.asarray(a, dtype=np.float64), lengths.shape) for a in (mu, sigma, nu))
    y = np.log(lengths)
    t_mu, t_sigma, t_nu = torch.tensor(mu), torch.tensor(sigma), torch.tensor(nu)
    nll = logt_nll(torch.tensor(y), t_mu, t_sigma, t_nu)
    res = {"nll": float(nll.mean())}
    if censor_at is not None or censored is not None:  # the training objective: cut lengths as "at least"
        cens = np.zeros(lengths.shape, dtype=bool) if censored is None else np.asarray(censored, dtype=bool)
        if cens.shape != lengths.shape:
            raise ValueError(f"censored must have one flag per length ({lengths.shape}), got {cens.shape}")
        if censor_at is not None:
            cens = cens | (lengths >= censor_at)
        y_c = torch.tensor(np.log(np.minimum(lengths, censor_at) if censor_at is not None else lengths))
        lsf = student_t_log_sf((y_c - t_mu) / t_sigma, t_nu)
        res["nll_censored"] = float(torch.where(torch.tensor(cens), -lsf, nll).mean())
    res["coverage50"] = interval_coverage(lengths, mu, sigma, nu, 0.5)
    res["coverage90"] = interval_coverage(lengths, mu, sigma, nu, 0.9)
    heavy = bool(np.any(nu <= 1.0))  # E|Y|, and so the CRPS, is infinite for nu <= 1 (e.g. a learned nu)
    res["crps_log"] = math.inf if heavy else float(np.mean(crps_log(y, mu, sigma, nu)))
    if max_new_tokens is not None:
        res["crps_tokens"] = float(np.mean(crps_length(lengths, mu, sigma, nu, max_new_tokens)))
    return res


def censored_flags(dataset: Any, column: str | None, n: int) -> np.ndarray:
    """``[n]`` booleans from ``dataset[column]`` (all False when ``column`` is None); ``ValueError`` naming the
    column unless it holds one bool (or 0/1) per row."""
    if column is None:
        return np.zeros(n, dtype=bool)
    try:
        raw = list(dataset[column])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"censored_column={column!r} is not a column of the dataset") from exc
    if len(raw) != n or any(isinstance(v, float) or v not in (0, 1) for v in raw):
        raise ValueError(f"censored_column {column!r} must hold one bool (or 0/1) per prompt ({n} rows)")
    return np.asarray(raw, dtype=bool)


def constant_logt_baseline(train_lengths: Sequence[float], nu: float = 3.5) -> tuple[float, float, float]:
    """Best prompt-independent log-t (MLE on the training lengths): the baseline a predictor must beat."""
    from hf_ext.generation.tie.distribution import LogT

    d = LogT.fit(np.asarray(train_lengths, dtype=np.float64), nu=nu)
    return float(d.mu), float(d.sigma), float(d.nu)
