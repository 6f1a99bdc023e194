"""The one place where components are listed: CLI demo/bench/doctor read this table.

Adding a component touches only this file: add a :class:`Component` entry naming the module
functions for its demo and benchmark (imported lazily), its switch-on snippet and requirements.

Example:
    >>> from hf_ext.registry import get
    >>> get("sale").title
    'SALE sparse prefill attention'
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Component:
    """A registered component.

    Attributes:
        name: short CLI name (``hf-ext demo <name>``).
        title: human title.
        status: ``"built"`` when its issue has landed, ``"planned"`` otherwise (the demo then
            says "not built yet").
        demo: ``"module:function"`` returning a :class:`hf_ext.utils.demo.DemoResult`; runs on CPU
            in seconds with tiny embedded models.
        bench: ``"module:function"`` taking ``argv: list[str]`` (GPU benchmark entry).
        switch_on: the one line that turns the component on.
        requires: importable module names the component needs beyond the core dependencies.
        needs_gpu: the component's fast path needs CUDA (a CPU reference path may still exist).
        min_gpus: GPUs needed for the real (non-simulated) multi-device path.
        example: path of the runnable example.
        optional: ``(modules, what they enable and how to install them)`` pairs; ``hf-ext doctor`` names those
            with a module missing here.
    """

    name: str
    title: str
    status: str
    demo: str | None = None
    bench: str | None = None
    switch_on: str = ""
    requires: tuple[str, ...] = field(default_factory=tuple)
    needs_gpu: bool = False
    min_gpus: int = 0
    example: str | None = None
    optional: tuple[tuple[tuple[str, ...], str], ...] = field(default_factory=tuple)


COMPONENTS: tuple[Component, ...] = (
    Component(
        name="simulate",
        title="Serving / rollout simulator (shared core)",
        status="built",
        demo="hf_ext.simulate.demo:run_demo",
        bench="hf_ext.simulate.bench:main",
        switch_on="from hf_ext.simulate import Simulator",
        example="examples/simulate_serving.py",
    ),
    Component(
        name="sale",
        title="SALE sparse prefill attention",
        status="built",
        demo="hf_ext.attention.sale.demo:run_demo",
        bench="hf_ext.attention.sale.bench:main",
        switch_on='AutoModelForCausalLM.from_pretrained(name, attn_implementation="sale")',
        requires=("triton",),
        needs_gpu=True,
        example="examples/sale_long_context.py",
    ),
    Component(
        name="adaspa",
        title="AdaSpa sparse attention for diffusers video DiTs",
        status="planned",
        switch_on="hf_ext.apply_adaspa(pipe)",
        requires=("diffusers", "triton"),
        needs_gpu=True,
    ),
    Component(
        name="rollout_shaping",
        title="Rollout distribution shaping for TRL GRPO",
        status="planned",
        switch_on="ShapedGRPOTrainer(model, reward_funcs, args=ShapedGRPOConfig(...))",
        requires=("trl",),
    ),
    Component(
        name="fsep",
        title="FSEP fully sharded expert parallelism (LAER-MoE)",
        status="built",
        demo="hf_ext.accelerate.fsep.demo:run_demo",
        bench="hf_ext.accelerate.fsep.bench:main",
        switch_on="model = prepare_fsep(model, FSEPConfig())",
        min_gpus=2,
        example="examples/fsep_moe_accelerate.py",
    ),
    Component(
        name="autoparallel",
        title="Galvatron-style automatic parallelism",
        status="built",
        demo="hf_ext.accelerate.autoparallel.demo:run_demo",
        bench="hf_ext.accelerate.autoparallel.bench:main",
        switch_on="runner = apply_plan(model, search_plan(model.config, gpus=8))",
        example="examples/autoparallel_plan_and_train.py",
    ),
    Component(
        name="dataflex",
        title="DataFlex dynamic data selection / mixture / reweighting",
        status="built",
        demo="hf_ext.callbacks.dataflex.demo:run_demo",
        bench="hf_ext.callbacks.dataflex.bench:main",
        switch_on='DataFlexTrainer(model, args, train_dataset=ds, dataflex="dataflex.yaml")',
        example="examples/dataflex_sft.py",
    ),
    Component(
        name="sart",
        title="SART branch-level reasoning scheduling",
        status="planned",
        switch_on="model.generate(**inputs, custom_generate=sart_generate)",
    ),
    Component(
        name="tie",
        title="TIE tail-aware SJF scheduling",
        status="built",
        demo="hf_ext.generation.tie.demo:run_demo",
        bench="hf_ext.generation.tie.bench:main",
        switch_on='ContinuousBatchingConfig(scheduler_type="tie"), or hf-ext serve MODEL',
        example="examples/tie_serving.py",
        # what transformers.utils.is_serve_available checks (hf_ext.generation.tie.serve.require_serving)
        optional=(
            (("fastapi", "uvicorn", "openai", "pydantic"), "hf-ext serve needs pip install 'hf-ext[serve]'"),
        ),
    ),
    Component(
        name="pbkv",
        title="PBKV workflow-aware agent KV caching",
        status="planned",
        switch_on="PBKVCache(workflow_graph)",
    ),
    Component(
        name="latent_omni",
        title="LatentOmni interleaved latent reasoning model",
        status="built",
        demo="hf_ext.models.latent_omni.demo:run_demo",
        bench="hf_ext.models.latent_omni.bench:main",
        switch_on='AutoModelForMultimodalLM.from_pretrained("path/to/latent-omni")',
        example="examples/latent_omni_generate.py",
    ),
)

_BY_NAME = {c.name: c for c in COMPONENTS}


def names() -> list[str]:
    """Names of all registered components, in table order."""
    return [c.name for c in COMPONENTS]


def get(name: str) -> Component:
    """Look a component up by name; raises ``KeyError`` listing the known names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown component {name!r}; known components: {', '.join(names())}") from None
