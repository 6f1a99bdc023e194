"""DataFlex configuration: which method, when to update, where the domains are.

A config is a dataclass that loads from YAML or JSON so a training script switches methods
without code changes::

    selector: less            # or mixer: doremi / weighter: loss
    selector_args: {budget: 0.5, proj_dim: 256}
    warmup_step: 10           # first update after this many optimizer steps
    update_step: 20           # then every update_step steps
    update_times: 3           # at most this many updates (null: unlimited)
    domain_column: domain

Example:
    >>> cfg = DataFlexConfig.from_dict({"mixer": "odm", "update_step": 5})
    >>> cfg.mixer, cfg.update_step
    ('odm', 5)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class DataFlexConfig:
    """Settings of one DataFlex run (see the module docstring for the file format)."""

    selector: str | None = field(
        default=None,
        metadata={"help": "Selector name (less, nice, loss, delta_loss, cluster_less, near, random)."},
    )
    selector_args: dict[str, Any] = field(default_factory=dict, metadata={"help": "Fields of the selector."})
    mixer: str | None = field(default=None, metadata={"help": "Mixer name (doremi, odm, dynamic)."})
    mixer_args: dict[str, Any] = field(default_factory=dict, metadata={"help": "Fields of the mixer."})
    weighter: str | None = field(default=None, metadata={"help": "Weighter name (loss, adapt)."})
    weighter_args: dict[str, Any] = field(default_factory=dict, metadata={"help": "Fields of the weighter."})
    warmup_step: int = field(
        default=0,
        metadata={"help": "Optimizer steps of plain training before the first update (0: update at start)."},
    )
    update_step: int = field(default=100, metadata={"help": "Steps between two updates (> 0)."})
    update_times: int | None = field(
        default=None, metadata={"help": "Maximum number of updates (None: no limit; weighters ignore it)."}
    )
    domain_column: str = field(
        default="domain", metadata={"help": "Dataset column naming each sample's domain (mixers need it)."}
    )
    num_samples: int | None = field(
        default=None, metadata={"help": "Samples per epoch the sampler yields (None: len(train_dataset))."}
    )
    ops_batch_size: int = field(
        default=8,
        metadata={"help": "Batch size of the scoring passes (losses, embeddings; gradients use 1)."},
    )
    seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the sampler and of the methods' randomness (None: the Trainer's data_seed, else its "
            "seed, as a stock Trainer's sampler; 42 outside a Trainer)."
        },
    )

    def __post_init__(self) -> None:
        from hf_ext.callbacks.dataflex.registry import coerce_value, get_class

        for f in fields(self):  # YAML strings such as "8" / numbers of the wrong kind
            setattr(self, f.name, coerce_value("DataFlexConfig", f.name, f.type, getattr(self, f.name)))
        for kind in ("selector", "mixer", "weighter"):
            name = getattr(self, kind)
            if name is not None:
                get_class(kind, name)  # raises listing the registered names
            args = getattr(self, f"{kind}_args")
            if args is None:
                setattr(self, f"{kind}_args", {})
            elif not isinstance(args, dict):
                raise ValueError(
                    f"{kind}_args must be a mapping of field -> value, got {type(args).__name__}"
                )
            elif args and name is None:
                raise ValueError(
                    f"{kind}_args={args!r} is given but no {kind} is set; set {kind}: <name> or drop {kind}_args"
                )
        if self.selector is not None and self.mixer is not None:
            raise ValueError(
                f"selector={self.selector!r} and mixer={self.mixer!r} are both set; choose one of them "
                "(a weighter may be combined with either)"
            )
        if self.selector is None and self.mixer is None and self.weighter is None:
            raise ValueError("DataFlexConfig needs at least one of selector, mixer or weighter")
        if not isinstance(self.update_step, int) or self.update_step <= 0:
            raise ValueError(
                f"update_step must be a positive integer (steps between updates), got {self.update_step!r}"
            )
        if not isinstance(self.warmup_step, int) or self.warmup_step < 0:
            raise ValueError(f"warmup_step must be an integer >= 0, got {self.warmup_step!r}")
        if self.update_times is not None and (
            not isinstance(self.update_times, int) or self.update_times <= 0
        ):
            raise ValueError(
                f"update_times must be None (no limit) or a positive integer, got {self.update_times!r}"
            )
        if self.num_samples is not None and self.num_samples <= 0:
            raise ValueError(f"num_samples must be None or > 0, got {self.num_samples!r}")
        if not isinstance(self.domain_column, str) or not self.domain_column:
            raise ValueError(
                f"domain_column must be a non-empty string (a dataset column name), got {self.domain_column!r}"
            )
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.ops_batch_size <= 0:
            raise ValueError(f"ops_batch_size must be > 0, got {self.ops_batch_size!r}")

    # ------------------------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataFlexConfig:
        """Build from a mapping; a nested ``dataflex:`` section is accepted. Unknown keys are an error."""
        if "dataflex" in d and isinstance(d["dataflex"], dict):
            d = d["dataflex"]
        d = dict(d)
        # Accept {"selector": {"name": "less", "budget": 0.3}} as a shorthand.
        for kind in ("selector", "mixer", "weighter"):
            v = d.get(kind)
            if isinstance(v, dict):
                v = dict(v)
                if "name" not in v:
                    raise ValueError(f"{kind} given as a mapping needs a 'name' key, got keys {sorted(v)}")
                d[kind] = v.pop("name")
                extra = d.get(f"{kind}_args") or {}
                clash = sorted(k for k in set(v) & set(extra) if v[k] != extra[k])
                if clash:
                    raise ValueError(
                        f"{kind} field(s) {clash} are given both in the {kind} mapping and in {kind}_args with "
                        f"different values ({ {k: v[k] for k in clash} } vs { {k: extra[k] for k in clash} }); "
                        "give each field once"
                    )
                d[f"{kind}_args"] = {**v, **extra}
        allowed = {f.name for f in fields(cls)}
        bad = sorted(set(d) - allowed)
        if bad:
            raise ValueError(f"unknown DataFlex config key(s) {bad}; allowed keys: {sorted(allowed)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> DataFlexConfig:
        """Load a ``.yaml``/``.yml`` or ``.json`` file."""
        path = os.fspath(path)
        if not path.endswith((".yaml", ".yml", ".json")):
            raise ValueError(f"config path must end in .yaml, .yml or .json, got {path!r}")
        with open(path) as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.endswith(".json"):
            data = json.loads(text)
        else:
            raise ValueError(f"config path must end in .yaml, .yml or .json, got {path!r}")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def coerce(cls, obj: DataFlexConfig | dict | str | os.PathLike) -> DataFlexConfig:
        """Accept a config, a mapping or a file path."""
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, dict):
            return cls.from_dict(obj)
        if isinstance(obj, (str, os.PathLike)):
            return cls.from_file(obj)
        raise ValueError(
            f"dataflex config must be a DataFlexConfig, dict or file path, got {type(obj).__name__}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write as YAML or JSON (by extension: ``.yaml`` / ``.yml`` / ``.json``, what :meth:`from_file` reads).

        numpy scalars are written as Python numbers and tuples as lists; a value neither format can hold raises
        before anything is written, and the file is replaced whole (a failed save leaves the old one)."""
        from hf_ext.utils.atomic import atomic_write_text
        from hf_ext.utils.jsonable import to_jsonable

        path = os.fspath(path)
        if not path.endswith((".yaml", ".yml", ".json")):
            raise ValueError(f"config path must end in .yaml, .yml or .json, got {path!r}")
        data = to_jsonable(self.to_dict())
        if path.endswith((".yaml", ".yml")):
            import yaml

            try:
                text = yaml.safe_dump(data, sort_keys=False)
            except yaml.representer.RepresenterError as exc:
                raise TypeError(f"DataFlexConfig.save: {exc.args[1]!r} cannot be written to YAML") from exc
        else:
            text = json.dumps(data, indent=2) + "\n"
        atomic_write_text(path, text)

    # ------------------------------------------------------------------------------- schedule
    def is_update_step(self, step: int, updates_done: int) -> bool:
        """Whether an update runs after optimizer step ``step`` (``step`` 0 = before training)."""
        if self.update_times is not None and updates_done >= self.update_times:
            return False
        if step < self.warmup_step:
            return False
        return (step - self.warmup_step) % self.update_step == 0
