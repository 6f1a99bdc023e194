"""Configuration dataclasses of TIE (tail-inflated-expectation scheduling).

Defaults follow the TIE paper: log-t output lengths with ν = 3.5, score
``E[X̃] + β·CVaR_0.9[X̃]`` with ``β = min(0.5, max(0.1, 0.1·L_queue/B_max))`` and aging of waiting
scores by ``γ = 0.9`` every ``τ = 30`` seconds.

Example:
    >>> cfg = TIEConfig(max_new_tokens=512)
    >>> cfg.beta(queue_len=64, batch_max=32)
    0.2
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUPPORT_MODES = ("clip", "truncate")
SCORE_MODES = ("tie", "per_token_index")
AGING_MODES = ("continuous", "step", "none")
PREDICTOR_KINDS = ("logt", "point", "ltr")
LTR_LOSSES = ("listmle", "pairwise")


def _check_int(name: str, value: Any, low: int = 1, *, allow_none: bool = False) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an int >= ``low`` (``bool`` is refused), or ``None`` with
    ``allow_none``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}an int >= {low}, got {value!r}")


def _is_number(value: Any) -> bool:
    """A real int or float (``bool`` and strings are not: a JSON config's ``"30"`` must not reach a comparison)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_pos(name: str, value: float, *, strict: bool = True) -> None:
    ok = _is_number(value) and math.isfinite(value) and (value > 0 if strict else value >= 0)
    if not ok:
        rel = "> 0" if strict else ">= 0"
        raise ValueError(f"{name} must be a finite number {rel}, got {value!r}")


@dataclass
class TIEConfig:
    """Scoring and queueing parameters of the TIE scheduler."""

    nu: float = field(
        default=3.5, metadata={"help": "Student-t degrees of freedom of log(length) (paper: 3.5)."}
    )
    alpha: float = field(
        default=0.9, metadata={"help": "Tail level of CVaR_alpha in the score (paper: 0.9)."}
    )
    beta_coef: float = field(
        default=0.1, metadata={"help": "beta = clip(beta_coef * L_queue / B_max, beta_min, beta_max)."}
    )
    beta_min: float = field(default=0.1, metadata={"help": "Lower bound of the dynamic tail weight beta."})
    beta_max: float = field(default=0.5, metadata={"help": "Upper bound of the dynamic tail weight beta."})
    batch_max: int = field(
        default=32,
        metadata={
            "help": "B_max: maximum running batch, used in beta (the CB scheduler uses max_requests_per_batch)."
        },
    )
    aging_gamma: float = field(
        default=0.9,
        metadata={"help": "Multiplicative aging factor applied to a waiting score every tau seconds."},
    )
    aging_tau: float = field(default=30.0, metadata={"help": "Aging period tau in seconds."})
    aging: str = field(
        default="continuous",
        metadata={
            "help": "'continuous': score*gamma**(wait/tau) (exact O(log n) heap); 'step': score*gamma**floor(wait/tau)"
            " (O(n) per pop); 'none': no aging."
        },
    )
    max_new_tokens: int = field(
        default=1024,
        metadata={"help": "Upper end of the truncated support [1, max_new_tokens] of the score."},
    )
    use_request_cap: bool = field(
        default=True,
        metadata={
            "help": "Use each request's own max_new_tokens as M when it has one (False: always max_new_tokens)."
        },
    )
    support: str = field(
        default="clip",
        metadata={
            "help": "'clip': X~=min(max(X,1),M), what generation cut at M produces (monotone in mu); 'truncate': "
            "X conditioned on 1<=X<=M (not monotone in mu when mu is far outside [0, log M])."
        },
    )
    quad_nodes: int = field(
        default=24, metadata={"help": "Gauss-Legendre nodes per sub-interval for E and CVaR."}
    )
    score: str = field(
        default="tie",
        metadata={
            "help": "'tie': E[X~] + beta*CVaR_alpha[X~] (the paper's score); 'per_token_index': E[X~]/E[1/X~] of "
            "the same law, the static order that minimises mean per-token latency (beta and alpha unused; aging "
            "still applies)."
        },
    )

    def __post_init__(self) -> None:
        _check_pos("nu", self.nu)
        if not (_is_number(self.alpha) and 0.0 < self.alpha < 1.0):
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        _check_pos("beta_coef", self.beta_coef, strict=False)
        _check_pos("beta_min", self.beta_min, strict=False)
        _check_pos("beta_max", self.beta_max, strict=False)
        if self.beta_min > self.beta_max:
            raise ValueError(f"beta_min ({self.beta_min}) must be <= beta_max ({self.beta_max})")
        _check_int("batch_max", self.batch_max)
        if not (_is_number(self.aging_gamma) and 0.0 < self.aging_gamma <= 1.0):
            raise ValueError(f"aging_gamma must be in (0, 1], got {self.aging_gamma!r}")
        _check_pos("aging_tau", self.aging_tau)
        if self.aging not in AGING_MODES:
            raise ValueError(f"aging must be one of {AGING_MODES}, got {self.aging!r}")
        _check_int("max_new_tokens", self.max_new_tokens)
        _check_bool("use_request_cap", self.use_request_cap)
        if self.support not in SUPPORT_MODES:
            raise ValueError(f"support must be one of {SUPPORT_MODES}, got {self.support!r}")
        _check_int("quad_nodes", self.quad_nodes, low=4)
        if self.score not in SCORE_MODES:
            raise ValueError(f"score must be one of {SCORE_MODES}, got {self.score!r}")

    def beta(self, queue_len: int, batch_max: int | None = None) -> float:
        """Dynamic tail weight ``min(beta_max, max(beta_min, beta_coef * queue_len / B_max))``."""
        b = batch_max or self.batch_max
        return float(min(self.beta_max, max(self.beta_min, self.beta_coef * queue_len / b)))


# TIE with one part of the score changed (benchmarks' ablations): which part helps which metric
ABLATION_SETTINGS: dict[str, dict[str, Any]] = {
    "tie_no_aging": {"aging": "none"},
    "tie_no_tail": {"beta_min": 0.0, "beta_max": 0.0},
    "tie_expect_only": {"beta_min": 0.0, "beta_max": 0.0, "aging": "none"},
    "tie_truncate": {"support": "truncate"},
    # not a part of TIE removed but its law ranked for the mean per-token latency: the yardstick for any score of it
    "per_token_index": {"score": "per_token_index", "aging": "none"},
    # the same with TIEConfig's aging left on: what TIEConfig(score="per_token_index") runs by default
    "per_token_index_aging": {"score": "per_token_index"},
}


def tie_config_or_default(config: Any, name: str = "config") -> TIEConfig:
    """``config`` itself, or the default :class:`TIEConfig` for ``None``; anything else (a dict of fields, a
    string) is a ``ValueError`` naming ``name``: it would be kept and fail mid-scheduling, or be dropped."""
    if config is None:
        return TIEConfig()
    if not isinstance(config, TIEConfig):
        raise ValueError(
            f"{name} must be a TIEConfig or None, got {type(config).__name__} {config!r}; "
            "build one with TIEConfig(**fields)"
        )
    return config


def ablation_config(config: TIEConfig, name: str) -> TIEConfig:
    """``config`` with the settings of TIE variant ``name`` (``"tie"`` or a key of :data:`ABLATION_SETTINGS`).

    Example:
        >>> ablation_config(TIEConfig(), "tie_expect_only").beta(queue_len=1000)
        0.0
    """
    from dataclasses import replace

    if name == "tie":
        return config
    if name not in ABLATION_SETTINGS:
        raise ValueError(f"name must be 'tie' or one of {tuple(ABLATION_SETTINGS)}, got {name!r}")
    return replace(config, **ABLATION_SETTINGS[name])


@dataclass
class PredictorConfig:
    """Architecture and training parameters of a length predictor (encoder + MLP heads)."""

    kind: str = field(
        default="logt",
        metadata={
            "help": "'logt': (mu, sigma) by log-t NLL (TIE); 'point': log-length regression (SSJF); "
            "'ltr': ranking score (LTR, Fu et al. 2024)."
        },
    )
    hidden_size: int = field(default=64, metadata={"help": "Encoder hidden size (BERT-shaped encoder)."})
    num_layers: int = field(default=2, metadata={"help": "Encoder layers."})
    num_heads: int = field(default=4, metadata={"help": "Encoder attention heads."})
    intermediate_size: int = field(default=128, metadata={"help": "Encoder MLP width."})
    max_length: int = field(default=96, metadata={"help": "Prompt tokens kept (truncation from the right)."})
    nu: float = field(default=3.5, metadata={"help": "Fixed Student-t degrees of freedom (logt)."})
    learn_nu: bool = field(default=False, metadata={"help": "Learn a global nu instead of keeping it fixed."})
    min_sigma: float = field(default=0.05, metadata={"help": "Lower bound on the predicted log-scale sigma."})
    ltr_loss: str = field(
        default="listmle", metadata={"help": "Ranking loss of the ltr kind: listmle or pairwise."}
    )
    censor_at: int | None = field(
        default=None,
        metadata={
            "help": "Generation cap of the training data: lengths >= censor_at were cut there, so the log-t "
            "NLL (kind='logt') uses log P(X >= censor_at) for them instead of the density. None: no censoring."
        },
    )
    epochs: int = field(default=4, metadata={"help": "Training epochs of fit()."})
    batch_size: int = field(
        default=64, metadata={"help": "Training batch size (also the ranking list size)."}
    )
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and shuffling."})

    @classmethod
    def tiny(cls, **overrides: Any) -> PredictorConfig:
        """A 1-layer, 32-wide encoder that trains in seconds on a CPU (tests, demos, docs); fields overridable."""
        kw: dict[str, Any] = dict(
            hidden_size=32, num_heads=2, intermediate_size=64, num_layers=1, max_length=48
        )
        kw.update(epochs=3, batch_size=32, lr=3e-3)
        return cls(**{**kw, **overrides})

    def __post_init__(self) -> None:
        if self.kind not in PREDICTOR_KINDS:
            raise ValueError(f"kind must be one of {PREDICTOR_KINDS}, got {self.kind!r}")
        if self.ltr_loss not in LTR_LOSSES:
            raise ValueError(f"ltr_loss must be one of {LTR_LOSSES}, got {self.ltr_loss!r}")
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_length",
            "epochs",
            "batch_size",
        ):
            _check_int(name, getattr(self, name))
        _check_int("seed", self.seed, low=0)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        _check_bool("learn_nu", self.learn_nu)
        _check_pos("nu", self.nu)
        _check_pos("min_sigma", self.min_sigma)
        _check_pos("lr", self.lr)
        _check_pos("weight_decay", self.weight_decay, strict=False)
        if self.censor_at is not None and (
            isinstance(self.censor_at, bool) or not isinstance(self.censor_at, int) or self.censor_at < 2
        ):
            raise ValueError(f"censor_at must be None or an int >= 2 (a token count), got {self.censor_at!r}")
