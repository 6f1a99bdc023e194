"""Test and demo fixtures: tiny random models, a locally built tokenizer, a 2-process gloo runner.

Nothing here downloads anything: models are built from configs with random weights, the
tokenizer is trained on an embedded corpus.

Example:
    >>> tok = tiny_tokenizer()
    >>> model = tiny_llama()
    >>> ids = tok("hello world", return_tensors="pt").input_ids
    >>> model(ids).logits.shape[-1] == model.config.vocab_size
    True
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

VOCAB_SIZE = 512

_CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Attention is all you need. Sparse attention skips blocks whose scores are small.
Write a short poem about the sea. Explain the proof step by step. Summarize the following article.
Translate this sentence into French. List three reasons why the sky is blue. What is 12 times 7?
Solve for x: 3x + 5 = 20. Give a one-word answer. Write a detailed essay about the history of Rome.
def add(a, b): return a + b. for i in range(10): print(i). import torch; x = torch.zeros(3)
Video frames and audio segments are encoded into latent tokens. The model reasons in latent space.
Experts in a mixture of experts layer receive tokens from a router. Pipelines, tensors and data parallel.
""".strip()


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = VOCAB_SIZE, extra_special_tokens: tuple[str, ...] = ()) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on an embedded corpus.

    Has ``<s>`` (bos), ``</s>`` (eos), ``<pad>`` (pad), ``<unk>``; left padding is not set by default.
    Every byte is covered, so any text tokenizes. Cached: do not mutate the returned object in tests
    (``copy.deepcopy`` it first).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>", *extra_special_tokens]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    return fast


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


#: The dense tiny-LM shape shared by every fixture (2 layers, hidden 64, 4 query / 2 KV heads).
TINY_LM_KWARGS: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_llama_config(**overrides: Any) -> Any:
    """``LlamaConfig`` with 2 layers, hidden 64, 4 query heads and 2 KV heads (GQA)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LM_KWARGS, "tie_word_embeddings": False, **overrides})


def tiny_llama(seed: int = 0, **overrides: Any) -> Any:
    """A random tiny ``LlamaForCausalLM`` (fp32, eval mode)."""
    from transformers import LlamaForCausalLM

    _seeded(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def tiny_qwen2(seed: int = 0, **overrides: Any) -> Any:
    """A random tiny ``Qwen2ForCausalLM`` (GQA 4/2, qkv bias)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _seeded(seed)
    return Qwen2ForCausalLM(Qwen2Config(**{**TINY_LM_KWARGS, **overrides})).eval()


def tiny_qwen3(seed: int = 0, **overrides: Any) -> Any:
    """A random tiny ``Qwen3ForCausalLM`` (GQA 4/2, head_dim 16, q/k norm)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    _seeded(seed)
    return Qwen3ForCausalLM(Qwen3Config(**{**TINY_LM_KWARGS, "head_dim": 16, **overrides})).eval()


def tiny_llava(seed: int = 0, attn_implementation: str | dict[str, str] | None = None) -> Any:
    """A random tiny ``LlavaForConditionalGeneration`` (a one-layer CLIP vision tower and the tiny Llama as its
    text model; image token id 5), eval mode. ``attn_implementation``: passed to ``set_attn_implementation``
    (e.g. ``{"": "eager", "text_config": "eager", "vision_config": "sdpa"}`` for sub-models on different ones)."""
    import transformers as tf

    vision = tf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    cfg = tf.LlavaConfig(vision_config=vision, text_config=tiny_llama_config(), image_token_index=5)
    _seeded(seed)
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model


def tiny_moe(kind: str = "qwen2_moe", seed: int = 0, **overrides: Any) -> Any:
    """A random tiny MoE causal LM: ``kind`` in ``{"qwen2_moe", "mixtral", "olmoe", "qwen3_moe"}``.

    4 experts, top-2 routing, 2 layers, hidden 64. ``overrides`` are config arguments, given to the config's
    constructor (so fields derived from them, such as ``layer_types`` from ``num_hidden_layers``, follow).
    """
    import transformers as tf

    _seeded(seed)
    # the dense tiny shape without its FFN width (each MoE sets its own), 2048 positions
    common = {k: v for k, v in TINY_LM_KWARGS.items() if k != "intermediate_size"}
    common["max_position_embeddings"] = 2048
    if kind == "qwen2_moe":
        config_cls, cls = tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM
        own = dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
        )
    elif kind == "qwen3_moe":
        config_cls, cls = tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM
        own = dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            head_dim=16,
        )
    elif kind == "mixtral":
        config_cls, cls = tf.MixtralConfig, tf.MixtralForCausalLM
        own = dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    elif kind == "olmoe":
        config_cls, cls = tf.OlmoeConfig, tf.OlmoeForCausalLM
        own = dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    else:
        raise ValueError(
            f"kind={kind!r} is not supported; choose one of qwen2_moe, qwen3_moe, mixtral, olmoe"
        )
    cfg = config_cls(**{**common, **own, **overrides})
    return cls(cfg).eval()


def tiny_wan_transformer(seed: int = 0) -> Any:
    """A random tiny diffusers ``WanTransformer3DModel`` (2 heads x 16, 1 layer)."""
    from diffusers import WanTransformer3DModel

    _seeded(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def tiny_wan_pipeline(seed: int = 0) -> Any:
    """A full tiny ``WanPipeline``: tiny UMT5 text encoder, local tokenizer, tiny ``AutoencoderKLWan``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    _seeded(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=VOCAB_SIZE,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        )
    ).eval()
    tok = tiny_tokenizer()
    return WanPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        transformer=tiny_wan_transformer(seed),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


# --------------------------------------------------------------------------------------- triton
@contextlib.contextmanager
def triton_interpret() -> Iterator[None]:
    """Set ``TRITON_INTERPRET=1`` while the block runs (for Triton kernels on CPU).

    Triton 3.8 reads the variable when ``triton`` is first imported: this only helps in a process
    that has not imported triton yet (tests/conftest.py sets it at start-up on machines without CUDA;
    otherwise run the kernel in a fresh subprocess with the variable set).
    """
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def save_for_serving(model: Any, tokenizer: Any, path: str | os.PathLike, **generation: Any) -> None:
    """Save a (random-weight) ``model`` and ``tokenizer`` to ``path`` for ``transformers serve``, with a greedy
    generation config and no EOS token, so every request generates exactly its ``max_tokens`` (what tests and
    replays rely on); ``generation`` adds or overrides ``GenerationConfig`` fields (e.g. ``max_new_tokens``)."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        **{"do_sample": False, "pad_token_id": 0, "bos_token_id": 1, **generation}
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# -------------------------------------------------------------------------------------- gloo x 2
def free_port() -> int:
    """A free TCP port on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_entry(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, outdir: str
) -> None:
    import faulthandler
    import pickle

    # this rank's stderr (Python tracebacks, native messages such as gloo's, the faulthandler dump of a signal)
    # goes to a file the parent quotes when the rank fails: a retried crash no longer loses its cause
    log = open(os.path.join(outdir, f"rank{rank}.log"), "w")  # noqa: SIM115 - open until the process ends
    os.dup2(log.fileno(), 2)
    faulthandler.enable(all_threads=True)

    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    init = "file://" + os.path.join(outdir, "rendezvous")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        # No rank tears the group down while another still communicates.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _log_tail(outdir: str, rank: int, chars: int = 2000) -> str:
    """The end of a failed rank's stderr log (see :func:`_dist_entry`), as a block for an error message."""
    path = os.path.join(outdir, f"rank{rank}.log")
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip()
    except OSError:
        return ""
    if not text:
        return ""
    return f"\n--- rank {rank} stderr (last {chars} chars) ---\n{text[-chars:]}"


class _RankCrashed(RuntimeError):
    """A rank died from a signal (e.g. an abort inside gloo teardown), not from a Python exception."""


def run_distributed(
    fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 300.0, retries: int = 1
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes on CPU.

    ``fn`` must be importable (module level) and its return value picklable. Returns the per-rank
    results in rank order; raises ``RuntimeError`` if any rank failed, or if ranks are still running ``timeout``
    seconds after the start (one deadline for the whole group; those ranks are killed and named, their stderr
    quoted). A run in which a rank died from a signal (a native abort, e.g. inside gloo; its peers then fail
    too) is retried up to ``retries`` times with a warning; a run where every failing rank raised a Python
    exception, or a rank hung, is never retried.
    """
    import warnings

    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    for attempt in range(retries + 1):
        try:
            return _run_distributed_once(fn, world_size, args, timeout)
        except _RankCrashed as exc:
            if attempt == retries:
                raise RuntimeError(str(exc)) from None
            warnings.warn(f"run_distributed: {exc}; retrying ({attempt + 1}/{retries})", stacklevel=2)
    raise AssertionError("unreachable")


def _run_distributed_once(fn: Callable[..., Any], world_size: int, args: tuple, timeout: float) -> list[Any]:
    import pickle

    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_dist_entry, args=(r, world_size, port, fn, args, outdir))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout  # one deadline for the whole group, not one per rank
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        timed_out = [i for i, p in enumerate(procs) if p.is_alive()]
        for i in timed_out:
            procs[i].kill()
        for i in timed_out:
            procs[i].join(10)
        bad = [
            (i, procs[i].exitcode) for i in range(world_size) if i not in timed_out and procs[i].exitcode != 0
        ]
        if bad or timed_out:
            msg = ""
            if timed_out:
                done = [i for i in timed_out if os.path.exists(os.path.join(outdir, f"rank{i}.pkl"))]
                msg = (
                    f"distributed ranks {timed_out} hung: still running {timeout:g} s after the start (the "
                    "timeout covers the whole group), killed"
                    + (f"; ranks {done} had returned from fn and were waiting for the others" if done else "")
                )
            if bad:
                msg += ("; " if msg else "") + f"distributed ranks failed (rank, exitcode): {bad}"
            msg += "".join(_log_tail(outdir, i) for i in [*timed_out, *(i for i, _ in bad)])
            if not timed_out and any(code is not None and code < 0 for _, code in bad):
                raise _RankCrashed(msg)
            raise RuntimeError(msg)
        out = []
        for r in range(world_size):
            with open(os.path.join(outdir, f"rank{r}.pkl"), "rb") as f:
                out.append(pickle.load(f))
        return out
