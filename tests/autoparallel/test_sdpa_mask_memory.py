"""The dense attention masks of sdpa in the memory model (CPU, fast).

transformers gives sdpa a dense boolean mask where ``is_causal`` cannot do: on sliding-window layers when
``s >= w``, and on every layer when the batch has a padding ``attention_mask`` with pads. torch's sdpa turns it
into an additive ``[b, 1, s, s]`` mask in the query's dtype and saves that for the backward, one per layer. The
memory model used to count none of it, so a long-sequence plan of a small windowed model could be predicted to
fit by hundreds of MiB too much.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hf_ext.accelerate.autoparallel.cost_model import CostModel, LayerStrategy, ParallelConfig, TrainingSpec
from hf_ext.accelerate.autoparallel.plan import Plan
from hf_ext.accelerate.autoparallel.profiler import HardwareProfile
from hf_ext.accelerate.autoparallel.search import NoFeasiblePlanError, SearchConfig, predict, search
from hf_ext.accelerate.autoparallel.shapes import ModelShape, get_shape

MiB = 2**20
S = 4096
# A small model at a long sequence: the masks dwarf its activations. Every layer windowed (Mistral-style).
WIN = ModelShape("win", 2, 64, 128, 4, 2, 512, sliding_window=256, sliding_layers=(0, 1))
FULL = ModelShape("full", 2, 64, 128, 4, 2, 512)


def _mem(shape: ModelShape, **kw: Any) -> list[float]:
    opts = {k: kw.pop(k) for k in ("attn_implementation", "padding_mask") if k in kw}
    plan = Plan.uniform(shape, gpus=kw.pop("gpus", 1), seq_len=S, **kw, **opts)
    return predict(plan, memory_gb=80).stage_memory_bytes


def test_sliding_window_masks_are_in_the_predicted_memory():
    """b = 2, s = 4096, both layers windowed (w = 256 <= s): each layer saves a bf16 additive mask of
    2 * s^2 * 2 B = 64 MiB and k / v copied to all 4 query heads (2 more heads of 16 each: 2 * s * 2 * 32 * 2 B
    = 1 MiB); one more of each lives while a layer runs its backward (the transient layer); the boolean mask
    itself is [1, 1, s, s] expanded over the batch, s^2 = 16 MiB. Checkpointed layers save none."""
    kw = dict(dp_type="fsdp", global_batch=2, micro_batch=2)
    bias, kv, boolean = 2 * S * S * 2, 2 * S * 2 * (64 - 32) * 2, S * S
    assert bias == 64 * MiB and kv == MiB and boolean == 16 * MiB
    d = _mem(WIN, ckpt=False, **kw)[0] - _mem(FULL, ckpt=False, **kw)[0]
    assert d == 3 * (bias + kv) + boolean  # 211 MiB
    d_ckpt = _mem(WIN, ckpt=True, **kw)[0] - _mem(FULL, ckpt=True, **kw)[0]
    assert d_ckpt == bias + kv + boolean  # 81 MiB
    # a kernel that masks inside (flash-attention, flex) gets no dense mask
    flash = dict(kw, attn_implementation="flash_attention_2")
    assert _mem(WIN, ckpt=False, **flash) == _mem(FULL, ckpt=False, **flash)
    # sequences within the window: sdpa runs is_causal, no mask
    short = ModelShape.from_dict({**WIN.to_dict(), "sliding_window": S + 1})
    assert _mem(short, ckpt=False, **kw) == _mem(FULL, ckpt=False, **kw)


def test_padding_masks_are_in_the_predicted_memory_on_every_stage():
    """With padded batches every layer gets a real [b, 1, s, s] boolean mask (b * s^2 bytes) and keeps its
    additive copy (and the k / v copies, see above). The pipeline stage module builds its own per micro-batch:
    stage i keeps those of its min(m, pp - i) in-flight micro-batches."""
    kw = dict(dp_type="fsdp", global_batch=2, micro_batch=2, ckpt=False)
    bias, kv, boolean = 2 * S * S * 2, 2 * S * 2 * 32 * 2, 2 * S * S
    d = _mem(FULL, padding_mask=True, **kw)[0] - _mem(FULL, **kw)[0]
    assert d == 3 * (bias + kv) + boolean  # 227 MiB
    assert _mem(FULL, padding_mask=True, attn_implementation="flash_attention_2", **kw) == _mem(FULL, **kw)
    pipe = dict(dp_type="fsdp", gpus=2, pp=2, global_batch=4, micro_batch=1, ckpt=False)
    lay1, bool1 = S * S * 2 + S * 2 * 32 * 2, S * S  # b = 1
    d0, d1 = (a - b for a, b in zip(_mem(FULL, padding_mask=True, **pipe), _mem(FULL, **pipe)))
    assert d0 == 2 * lay1 + lay1 + 2 * bool1  # 2 micro-batches in flight on stage 0, one layer
    assert d1 == lay1 + lay1 + bool1


def test_the_search_needs_the_mask_bytes_to_fit():
    """The smallest memory any plan needs (b = 1, every layer checkpointed) grows by exactly one layer's
    additive mask and k / v copies (s^2 * 2 B + 0.5 MiB, while it runs its backward) and the boolean window
    mask (s^2 B); and a budget
    the full-attention model fits without checkpointing (65 MiB predicted) makes the windowed one checkpoint
    (without: 178 MiB)."""
    sc = dict(gpus=1, global_batch=2, seq_len=S, micro_batch_sizes=(1, 2))
    need = {}
    for shape in (WIN, FULL):
        with pytest.raises(NoFeasiblePlanError) as ei:
            search(shape, SearchConfig(memory_gb=1.0, **sc))
        need[shape.name] = ei.value.min_memory_gb
    expected = (S * S * 2 + S * 2 * 32 * 2 + S * S) / 0.92 / 2**30
    assert need["win"] - need["full"] == pytest.approx(expected, rel=1e-9)

    # usable = 0.92 * memory - 1 GiB = 120 MiB
    memory_gb = (120 / 1024 + 1) / 0.92
    full = search(FULL, SearchConfig(memory_gb=memory_gb, **sc)).best
    win = search(WIN, SearchConfig(memory_gb=memory_gb, **sc)).best
    as_win = Plan.from_dict({**full.to_dict(), "model": WIN.to_dict()})
    assert not predict(as_win).feasible  # the plan the full model gets does not fit the windowed one
    assert win.describe() != full.describe()
    assert sum(x["ckpt"] for x in win.layers) > sum(x["ckpt"] for x in full.layers)
    assert max(win.predicted["memory_gb"]) <= win.predicted["usable_memory_gb"]
    # padded batches: the full-attention model has to change its plan too
    padded = search(FULL, SearchConfig(memory_gb=memory_gb, padding_mask=True, **sc)).best
    assert padded.describe() != full.describe() and padded.padding_mask
    assert predict(padded).stage_memory_bytes == pytest.approx(
        [g * 2**30 for g in padded.predicted["memory_gb"]]
    )


def test_search_tells_masked_from_unmasked_layers_with_equal_spans():
    """s == w: a windowed layer attends to as many keys as a full one (same time), but sdpa still gets a
    dense mask for it (transformers builds one when s >= w). The search shares per-layer terms between layers
    of one kind; keyed by parameters and span alone, the windowed layers got the full layers' memory, the DP
    picked plans that did not fit and dropped them. The best plan must be the brute-force best."""
    import itertools

    shape = ModelShape("mixed", 4, 64, 128, 4, 2, 512, sliding_window=1024, sliding_layers=(2, 3))
    s, gb = 1024, 2
    memory_gb = (24 / 1024 + 1) / 0.92  # 24 MiB usable: some layers must be checkpointed
    best = search(shape, SearchConfig(gpus=1, memory_gb=memory_gb, global_batch=gb, seq_len=s)).best
    cm = CostModel(shape, HardwareProfile.h100(), TrainingSpec(global_batch=gb, seq_len=s))
    brute = []
    for dtype, b in itertools.product(("ddp", "fsdp"), (1, 2)):
        pc = ParallelConfig(
            gpus=1, pp=1, tp=1, sp=False, micro_batch=b, num_micro_batches=gb // b, dp_type=dtype
        )
        for ck in itertools.product((False, True), repeat=4):
            c = cm.evaluate(pc, [[LayerStrategy(0, x) for x in ck]], memory_gb)
            if c.feasible:
                brute.append(c.step_ms)
    assert brute and best.predicted["step_ms"] == pytest.approx(min(brute), rel=1e-9)
    assert predict(best).stage_memory_bytes == pytest.approx([g * 2**30 for g in best.predicted["memory_gb"]])


# ---------------------------------------------------------------------- the tensors transformers builds
def _config(kind: str) -> Any:
    import transformers as tf

    base = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    cfg = {
        "llama": lambda: tf.LlamaConfig(**base),
        "mistral": lambda: tf.MistralConfig(**base, sliding_window=8),  # every layer windowed
        "mistral_long_window": lambda: tf.MistralConfig(**base, sliding_window=64),  # s < w: no mask
        # layers 1 and 2 windowed, layer 0 full: two boolean masks per forward
        "qwen2": lambda: tf.Qwen2Config(
            **base, use_sliding_window=True, sliding_window=8, max_window_layers=1
        ),
    }[kind]()
    cfg._attn_implementation = "sdpa"
    return cfg


def _run(
    kind: str, padded: bool, b: int, s: int, device: str = "cpu"
) -> tuple[Any, list[torch.Tensor], dict[int, int]]:
    """Train step of a tiny random bf16 model on ``device``: the masks ``sdpa_mask`` returns and the storages
    autograd saves (parameters left out)."""
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    cfg = _config(kind)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=torch.bfloat16).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    built: list[torch.Tensor] = []
    inner = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        if out is not None:
            built.append(out)
        return out

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)
    ids = torch.randint(0, 100, (b, s)).to(device)
    mask = torch.ones(b, s, dtype=torch.long, device=device)
    if padded:
        mask[0, :5] = 0  # one left-padded row
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, attention_mask=mask if padded else None, labels=ids, use_cache=False)
        out.loss.backward()
    return cfg, built, saved


@pytest.mark.parametrize("kind", ["llama", "mistral", "mistral_long_window", "qwen2"])
@pytest.mark.parametrize("padded", [False, True])
def test_predicted_mask_bytes_match_what_transformers_and_torch_allocate(kind, padded):
    """A tiny random bf16 GQA model on CPU (no download), b = 3, s = 32, against the same-size Llama without a
    mask: the boolean masks transformers' ``sdpa_mask`` returns (their storage: an expanded window mask holds
    s^2 bytes, a padded one b * s^2) are the predicted boolean bytes, and everything autograd saves beyond the
    unmasked Llama is, per masked layer, the additive [b, 1, s, s] bf16 mask plus the k / v copies for every
    query head (transformers' repeat_kv instead of sdpa's enable_gqa when a mask is given)."""
    _check_mask_bytes(kind, padded, b=3, s=32, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("padded", [False, True])
def test_predicted_mask_bytes_match_what_cuda_sdpa_saves(kind, padded):
    """The CPU check on a GPU, where sdpa picks its CUDA kernels (flash without a mask, memory-efficient or cuDNN
    with one), with a sequence length the memory-efficient kernel needs no mask padding for."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _check_mask_bytes(kind, padded, b=3, s=64, device="cuda")


def _check_mask_bytes(kind: str, padded: bool, *, b: int, s: int, device: str) -> None:
    """The mask check of a tiny random bf16 GQA model of ``kind`` (see the CPU test) at ``b`` x ``s`` on
    ``device``."""
    cfg, built, saved = _run(kind, padded, b, s, device)
    _, _, plain = _run("llama", False, b, s, device)
    shape = get_shape(cfg)
    cm = CostModel(shape, HardwareProfile.cpu(), TrainingSpec(global_batch=b, seq_len=s, padding_mask=padded))
    pc = ParallelConfig(gpus=1, pp=1, tp=1, sp=False, micro_batch=b, num_micro_batches=1, dp_type="fsdp")
    layers = list(range(shape.num_layers))
    bool_bytes = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in built}.values())
    assert all(t.dtype == torch.bool and tuple(t.shape) == (b, 1, s, s) for t in built)
    assert cm.mask_bool_bytes(pc, layers) == bool_bytes
    masked = sum(cm.layer_has_mask(i) for i in layers)
    assert cm.mask_repeat_kv_bytes(pc) == b * s * 2 * (32 - 16) * 2 > 0
    per_layer = cm.mask_bias_bytes(pc) + cm.mask_repeat_kv_bytes(pc)
    assert sum(saved.values()) - sum(plain.values()) == masked * per_layer
    expect_any = padded or kind in ("mistral", "qwen2")
    assert (bool_bytes > 0) == expect_any and (masked > 0) == expect_any


# ------------------------------------------------------------------------------------ the option itself
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"attn_implementation": "eager"}, r"SearchConfig\.attn_implementation must be one of sdpa, flash"),
        ({"padding_mask": "yes"}, r"SearchConfig\.padding_mask must be True .* or False"),
        ({"padding_mask": 1}, r"SearchConfig\.padding_mask"),
    ],
)
def test_bad_mask_options_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(gpus=1, **kw)
    name = match.replace("SearchConfig", "Plan.uniform")
    with pytest.raises(ValueError, match=name):
        Plan.uniform("tiny", gpus=1, global_batch=2, seq_len=16, **kw)
    good = Plan.uniform("tiny", gpus=1, global_batch=2, seq_len=16).to_dict()
    with pytest.raises(ValueError, match=match.replace("SearchConfig", "Plan")):
        Plan.from_dict({**good, **kw})
    with pytest.raises(ValueError, match=match.replace("SearchConfig", "TrainingSpec")):
        TrainingSpec(global_batch=2, seq_len=16, **kw)


def test_plans_record_the_mask_options_and_older_plans_still_load():
    res = search("tiny", SearchConfig(gpus=1, global_batch=2, seq_len=64, padding_mask=True))
    p = Plan.from_json(res.best.to_json())
    assert p.padding_mask is True and p.attn_implementation == "sdpa" and p == res.best
    assert predict(p).stage_memory_bytes == pytest.approx([g * 2**30 for g in p.predicted["memory_gb"]])
    old = {k: v for k, v in p.to_dict().items() if k not in ("padding_mask", "attn_implementation")}
    before = Plan.from_dict(old)  # a plan written before the options existed
    assert before.padding_mask is False and before.attn_implementation == "sdpa"


def test_a_plan_with_the_default_mask_options_writes_the_format_older_versions_read():
    """An hf_ext older than the two options refuses unknown keys: a plan that keeps their defaults must not
    write them, and one that changes them writes them (an older version then refuses it, as it should)."""
    p = Plan.uniform("tiny", gpus=1, global_batch=2, seq_len=16)
    d = p.to_dict()
    assert "padding_mask" not in d and "attn_implementation" not in d
    assert Plan.from_json(p.to_json()) == p
    for kw in ({"padding_mask": True}, {"attn_implementation": "flash_attention_2"}):
        q = Plan.uniform("tiny", gpus=1, global_batch=2, seq_len=16, **kw)
        ((name, value),) = kw.items()
        assert q.to_dict()[name] == value
        assert Plan.from_json(q.to_json()) == q


def test_cli_passes_the_mask_options_and_refuses_unknown_kernels(monkeypatch, capsys, tmp_path):
    from hf_ext.accelerate.autoparallel import cli

    with pytest.raises(SystemExit):
        cli.main(["--model", "tiny", "--gpus", "1", "--attn-implementation", "eager"])
    assert "--attn-implementation: must be one of sdpa" in capsys.readouterr().err
    seen = {}
    import hf_ext.accelerate.autoparallel.search as search_mod

    real = search_mod.search

    def spy(model: Any, config: SearchConfig, **kw: Any) -> Any:
        seen["config"] = config
        return real(model, config, **kw)

    monkeypatch.setattr(search_mod, "search", spy)
    out = tmp_path / "plan.json"
    args = ["--model", "tiny", "--gpus", "1", "--global-batch", "2", "--seq-len", "64", "--out", str(out)]
    assert cli.main([*args, "--padding-mask", "--attn-implementation", "flash_attention_2"]) == 0
    assert seen["config"].padding_mask is True
    assert seen["config"].attn_implementation == "flash_attention_2"
    assert Plan.load(str(out)).attn_implementation == "flash_attention_2"
    assert cli.main(args) == 0
    assert seen["config"].padding_mask is False and seen["config"].attn_implementation == "sdpa"


def test_profiling_a_windowed_model_leaves_the_masks_out_of_the_calibration():
    """The profiler runs a decoder layer with the mask the model passes it: for a windowed model at s >= w the
    layer saved the additive mask and the repeated k / v too, and the activation calibration took them in, on
    top of the cost model's own mask terms. Mistral and Llama layers of one size now calibrate alike."""
    import transformers as tf

    from hf_ext.accelerate.autoparallel.profiler import profile_model

    base = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    calib = {}
    for name, cfg in (
        ("llama", tf.LlamaConfig(**base)),
        ("mistral", tf.MistralConfig(**base, sliding_window=8)),
    ):
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg)
        prof = profile_model(
            model,
            seq_len=64,
            micro_batches=(1, 2),
            dtype=torch.bfloat16,
            runtime_probe=False,
            warmup=0,
            repeats=1,
        )
        calib[name] = prof.act_calibration
    assert calib["mistral"] == pytest.approx(calib["llama"], rel=1e-12)


def test_the_profiler_tells_masks_from_rotary_tables_of_the_same_shape():
    """head_dim == s makes the rotary tables [b, 1, s, s] too; they stay in the saved bytes."""
    from hf_ext.accelerate.autoparallel.profiler import _is_attention_mask

    s = 8
    causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    additive = torch.where(causal, 0.0, float("-inf")).to(torch.bfloat16).expand(3, 1, s, s)
    assert _is_attention_mask(causal) and _is_attention_mask(additive)
    cos = torch.cos(torch.arange(s * s, dtype=torch.float32).view(1, 1, s, s))
    assert not _is_attention_mask(cos) and not _is_attention_mask(torch.zeros(2, 1, s, s + 1))


# --------------------------------------------------------------------------------- the runtime tells the user
def test_train_step_warns_once_about_pads_the_plan_did_not_count(tiny_llama):
    """A plan searched with padding_mask=False trained on batches with pads (sdpa): one warning naming the
    option; none for an all-ones mask, none for a plan searched with padding_mask=True."""
    import warnings

    from hf_ext.accelerate.autoparallel.apply import AppliedPlan

    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    ones, padded = torch.ones_like(ids), torch.ones_like(ids)
    padded[0, :3] = 0
    assert tiny_llama.config._attn_implementation == "sdpa"

    def runner(pad: bool) -> AppliedPlan:
        plan = Plan.uniform(
            tiny_llama.config, gpus=1, dp_type="ddp", global_batch=2, seq_len=8, padding_mask=pad
        )
        return AppliedPlan(tiny_llama, plan, None, torch.device("cpu"), None)

    r = runner(False)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        r.train_step(ids, attention_mask=ones)
        r.train_step(ids)
        assert got == []
        r.train_step(ids, attention_mask=padded)
        r.train_step(ids, attention_mask=padded)
        runner(True).train_step(ids, attention_mask=padded)
    msgs = [str(w.message) for w in got]
    assert len(msgs) == 1 and "padding_mask=False" in msgs[0] and "--padding-mask" in msgs[0], msgs


def test_apply_plan_warns_when_the_plan_was_searched_for_another_attention_kernel(tiny_llama):
    import torch.distributed as dist

    from hf_ext.accelerate.autoparallel.apply import apply_plan

    if dist.is_initialized():
        pytest.skip("needs a process group of its own")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for attn, warns in (("flash_attention_2", True), ("sdpa", False)):
            plan = Plan.uniform(
                tiny_llama.config, gpus=1, dp_type="ddp", global_batch=2, seq_len=8, attn_implementation=attn
            )
            with pytest.warns(UserWarning) if warns else _no_warning() as got:
                runner = apply_plan(tiny_llama, plan, device="cpu")
            runner.close()
            if warns:
                assert any("attn_implementation='flash_attention_2'" in str(w.message) for w in got)
                assert any("runs 'sdpa'" in str(w.message) for w in got)
        # a kernel the search does not know: no advice to search with it (hf-ext plan refuses 'eager')
        tiny_llama.set_attn_implementation("eager")
        plan = Plan.uniform(tiny_llama.config, gpus=1, dp_type="ddp", global_batch=2, seq_len=8)
        with pytest.warns(UserWarning, match=r"knows sdpa, .* only, not 'eager'") as got:
            apply_plan(tiny_llama, plan, device="cpu").close()
        assert not any("--attn-implementation" in str(w.message) for w in got)
    finally:
        tiny_llama.set_attn_implementation("sdpa")
        dist.destroy_process_group()


class _no_warning:
    def __enter__(self) -> list:
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.got = self._cm.__enter__()
        warnings.simplefilter("always")
        return self.got

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)
        assert not [w for w in self.got if "attn_implementation" in str(w.message)]
