"""LatentOmni generation: latent feedback (hooks), cache equivalence, text-only parity with HF generate."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .test_model import _Capture


class _ForceToken(LogitsProcessor):
    """Forces ``token`` at text steps whose index is in ``steps`` (counted per call)."""

    def __init__(self, token: int, steps: set[int]):
        self.token, self.steps, self.i = token, steps, 0

    def __call__(self, input_ids, scores):
        if self.i in self.steps:
            scores = torch.full_like(scores, -1e9)
            scores[:, self.token] = 0.0
        self.i += 1
        return scores


def test_latent_steps_feed_hidden_state_back(model, cfg):
    k = cfg.num_latents
    prompt = torch.tensor([[1, 30, 31, 32, cfg.latent_start_token_id]])
    cap = _Capture(model._text_model())
    head_calls = []
    hh = model.lm_head.register_forward_hook(lambda m, a, o: head_calls.append(a[0].shape[0]))
    out = model.generate(prompt, max_new_tokens=k + 4, return_dict_in_generate=True, output_latents=True)
    cap.remove()
    hh.remove()
    calls = cap.calls  # 0 = prefill, then one per step
    assert len(calls) == 1 + k + 4
    emb = model.get_input_embeddings()
    for i in range(k):  # step i (call i + 1) consumes the last hidden state of call i
        fed = calls[i + 1]["embeds"][0, 0]
        prev = calls[i]["hidden"][0, -1]
        assert torch.equal(fed, prev), i
        assert not torch.allclose(fed, emb.weight[cfg.latent_pad_token_id])
        torch.testing.assert_close(out.latent_states[0][i], prev)
    # after K latent steps the end marker is forced (token embedding), then text resumes
    assert torch.equal(calls[k + 1]["embeds"][0, 0], emb.weight[cfg.latent_end_token_id])
    seq = out.sequences[0, prompt.shape[1] :].tolist()
    assert seq[:k] == [cfg.latent_pad_token_id] * k and seq[k] == cfg.latent_end_token_id
    assert all(t not in (cfg.latent_pad_token_id, cfg.latent_end_token_id) for t in seq[k + 1 :])
    # the LM head ran only for text steps: none during the K latent steps or the forced end marker
    assert len(head_calls) == 3


def test_generate_without_latents_matches_hf_generate(model):
    prompt = torch.tensor([[1, 30, 31, 32, 33], [0, 0, 1, 40, 41]])
    am = (prompt != 0).long()
    ours = model.generate(prompt, attention_mask=am, max_new_tokens=10, eos_token_id=[])
    hf = model.generate(
        prompt,
        attention_mask=am,
        max_new_tokens=10,
        latent_reasoning=False,
        do_sample=False,
        eos_token_id=None,
        min_new_tokens=10,
    )
    assert torch.equal(ours, hf)
    assert not torch.isin(ours, torch.tensor([model.config.latent_start_token_id])).any()


def test_generate_model_emitted_trigger_cache_equals_no_cache(model, cfg):
    k = cfg.num_latents
    prompt = torch.tensor([[0, 1, 30, 31], [1, 50, 51, 52]])
    am = (prompt != 0).long()
    outs = {}
    for use_cache in (True, False):
        lp = LogitsProcessorList(
            [_ForceToken(cfg.latent_start_token_id, {2, 9})]
        )  # trigger at text steps 2 and 9
        outs[use_cache] = model.generate(
            prompt,
            attention_mask=am,
            max_new_tokens=2 * k + 14,
            use_cache=use_cache,
            logits_processor=lp,
            max_latent_blocks=2,
            eos_token_id=[],
            return_dict_in_generate=True,
            output_latents=True,
        )
    a, b = outs[True], outs[False]
    assert torch.equal(a.sequences, b.sequences)
    for la, lb in zip(a.latent_states, b.latent_states):
        assert la.shape == (2 * k, 64)
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    for row in a.sequences.tolist():
        assert row.count(cfg.latent_start_token_id) == 2  # max_latent_blocks respected
        assert row.count(cfg.latent_pad_token_id) == 2 * k
        assert row.count(cfg.latent_end_token_id) == 2


def test_batched_generate_matches_single_rows(model, cfg):
    k = cfg.num_latents
    p1 = [1, 30, 31, cfg.latent_start_token_id]
    p2 = [1, 40]
    batch = torch.tensor([p1, [0, 0] + p2])
    am = (batch != 0).long()
    out = model.generate(batch, attention_mask=am, max_new_tokens=k + 4, eos_token_id=[])
    s1 = model.generate(torch.tensor([p1]), max_new_tokens=k + 4, eos_token_id=[])
    s2 = model.generate(torch.tensor([p2]), max_new_tokens=k + 4, eos_token_id=[])
    assert out[0, 4:].tolist() == s1[0, 4:].tolist()
    assert out[1, 4:].tolist() == s2[0, 2:].tolist()


def test_generate_stops_at_eos_and_samples(model, cfg):
    lp = LogitsProcessorList([_ForceToken(2, {3})])
    out = model.generate(torch.tensor([[1, 30]]), max_new_tokens=20, logits_processor=lp, eos_token_id=2)
    assert out.shape[1] == 2 + 4 and out[0, -1] == 2
    torch.manual_seed(0)
    a = model.generate(
        torch.tensor([[1, 30]]), max_new_tokens=6, do_sample=True, top_k=5, temperature=0.7, eos_token_id=[]
    )
    torch.manual_seed(0)
    b = model.generate(
        torch.tensor([[1, 30]]), max_new_tokens=6, do_sample=True, top_k=5, temperature=0.7, eos_token_id=[]
    )
    assert torch.equal(a, b) and a.shape == (1, 8)


def test_generate_forwards_every_media_argument():
    """generate passes the prompt's media by name lists; they must cover the helpers' keyword arguments."""
    import inspect

    from hf_ext.models.latent_omni import modeling_latent_omni as m

    cls = m.LatentOmniForConditionalGeneration
    embed = set(inspect.signature(cls._embed_prompt).parameters) - {"self", "input_ids"}
    rope = set(inspect.signature(cls._rope_positions).parameters) - {"self", "input_ids", "attention_mask"}
    assert set(m._EMBED_MEDIA) == embed and set(m._ROPE_MEDIA) == rope


def test_latent_generate_applies_the_generation_config_like_hf_generate(model):
    """repetition_penalty, no_repeat_ngram_size, min_new_tokens and max_length (from the model's generation config,
    generate() arguments or a generation_config=) change the latent path's text steps as they change transformers'
    generate; fields it cannot apply are an error naming them, never ignored."""
    import pytest
    from transformers import GenerationConfig

    prompt = torch.tensor([[1, 30, 31, 32, 33]])
    plain = model.generate(prompt, max_new_tokens=12, eos_token_id=[])
    for kw in (dict(repetition_penalty=50.0, no_repeat_ngram_size=1), dict(no_repeat_ngram_size=2)):
        ours = model.generate(prompt, max_new_tokens=12, eos_token_id=[], **kw)
        hf = model.generate(
            prompt, max_new_tokens=12, eos_token_id=None, latent_reasoning=False, min_new_tokens=12, **kw
        )
        assert torch.equal(ours, hf), kw
        assert not torch.equal(ours, plain)  # the penalties do change this prompt's greedy tokens
        via_config = model.generate(
            prompt, generation_config=GenerationConfig(max_new_tokens=12, **kw), eos_token_id=[]
        )
        assert torch.equal(via_config, ours)
    eos = int(plain[0, 6])  # a token greedy decoding emits as its 2nd new token: stops there unless held back
    assert model.generate(prompt, max_new_tokens=12, eos_token_id=eos).shape[1] == 7
    held = model.generate(prompt, max_new_tokens=12, eos_token_id=eos, min_new_tokens=5)
    assert held.shape[1] > 7 and eos not in held[0, 5:9].tolist()
    model.generation_config.max_length = 8  # transformers' meaning: prompt + new tokens
    try:
        assert model.generate(prompt, eos_token_id=[]).shape[1] == 8
        model.generation_config.num_beams = 3
        with pytest.raises(ValueError, match="num_beams"):
            model.generate(prompt, eos_token_id=[])
    finally:
        model.generation_config.max_length = None
        model.generation_config.num_beams = None
    for bad, match in (
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"max_latent_blocks": -1}, "max_latent_blocks"),
    ):
        with pytest.raises(ValueError, match=match):
            model.generate(prompt, **bad)
    with pytest.raises(ValueError, match="unknown arguments"):
        model.generate(prompt, max_new_tokens=2, bogus_argument=1)


def test_suppress_tokens_join_the_latent_tokens_on_both_paths(model, cfg):
    prompt = torch.tensor([[1, 30, 31, 32, 33]])
    plain = model.generate(prompt, max_new_tokens=6, eos_token_id=[])
    banned = sorted(set(plain[0, 5:].tolist()))
    hf = model.generate(
        prompt,
        max_new_tokens=6,
        latent_reasoning=False,
        suppress_tokens=banned,
        eos_token_id=None,
        min_new_tokens=6,
    )
    ours = model.generate(prompt, max_new_tokens=6, suppress_tokens=banned, eos_token_id=[])
    for out in (hf, ours):
        new = out[0, 5:].tolist()
        assert not set(new) & set(banned)
        assert cfg.latent_start_token_id not in new  # the latent tokens stay suppressed on the HF path
    assert torch.equal(hf, ours)


def test_max_latent_blocks_zero_refuses_a_prompt_that_opens_a_block(model, cfg):
    """The prompt's open block counts towards max_latent_blocks (docs): with a cap of 0 a prompt ending with
    <Unified_Latent> is a ValueError before the model runs (it used to run the block anyway), from the argument
    and from config.max_latent_blocks; a cap of 1 runs it and the model emits no further trigger."""
    k = cfg.num_latents
    prompt = torch.tensor([[1, 30, 31, 32, cfg.latent_start_token_id]])
    cap = _Capture(model._text_model())
    try:
        with pytest.raises(ValueError, match="max_latent_blocks=0"):
            model.generate(prompt, max_new_tokens=k + 4, max_latent_blocks=0)
        model.config.max_latent_blocks = 0
        try:
            with pytest.raises(ValueError, match="max_latent_blocks"):
                model.generate(prompt, max_new_tokens=k + 4)
        finally:
            model.config.max_latent_blocks = 3
        assert cap.calls == []  # refused before any forward pass
    finally:
        cap.remove()
    force = LogitsProcessorList([_ForceToken(cfg.latent_start_token_id, set(range(10)))])
    out = model.generate(prompt, max_new_tokens=k + 4, max_latent_blocks=1, logits_processor=force)
    new = out[0, prompt.shape[1] :].tolist()
    assert new[:k] == [cfg.latent_pad_token_id] * k and new[k] == cfg.latent_end_token_id
    assert cfg.latent_start_token_id not in new  # the prompt's block used the only one allowed
    # a prompt without a trigger and a cap of 0: text only, even when the trigger is pushed
    plain = model.generate(prompt[:, :-1], max_new_tokens=6, max_latent_blocks=0, logits_processor=force)
    assert cfg.latent_start_token_id not in plain[0, 4:].tolist()


def test_default_length_follows_transformers(model, cfg):
    """Without max_new_tokens or max_length, the latent path generates transformers' default of 20 new tokens (with
    its UserWarning), the same as latent_reasoning=False; it used to generate an undocumented 64."""
    from hf_ext.models.latent_omni.modeling_latent_omni import DEFAULT_MAX_NEW_TOKENS

    assert DEFAULT_MAX_NEW_TOKENS == 20
    prompt = torch.tensor([[1, 30, 31, 32, 33]])
    with pytest.warns(UserWarning, match="max_new_tokens"):
        ours = model.generate(prompt, eos_token_id=[])
    with pytest.warns(UserWarning):
        hf = model.generate(prompt, latent_reasoning=False, eos_token_id=None, min_new_tokens=20)
    assert ours.shape[1] - prompt.shape[1] == 20 == hf.shape[1] - prompt.shape[1]
    assert torch.equal(ours, hf)
    # near max_position_embeddings the default shrinks so that prompt + new tokens fit, as in transformers
    text_cfg = cfg.get_text_config()
    old = text_cfg.max_position_embeddings
    text_cfg.max_position_embeddings = prompt.shape[1] + 7
    try:
        with pytest.warns(UserWarning):
            assert model.generate(prompt, eos_token_id=[]).shape[1] == prompt.shape[1] + 7
    finally:
        text_cfg.max_position_embeddings = old


def test_generation_config_is_merged_as_transformers_merges_it(model):
    """A generation_config= takes its unset fields from model.generation_config (as transformers' generate does), its
    own suppress_tokens count on the latent_reasoning=False path, and return_dict_in_generate / use_cache come from
    the generation config unless passed; before, the latent path dropped the model's fields under a given config,
    the plain path replaced the given suppress_tokens by the model's, and both ignored return_dict_in_generate."""
    from transformers import GenerationConfig

    prompt = torch.tensor([[1, 30, 31, 32, 33]])
    first = int(model.generate(prompt, max_new_tokens=1, eos_token_id=[])[0, -1])
    model.generation_config.suppress_tokens = [first]
    try:
        for latent in (True, False):
            out = model.generate(
                prompt, generation_config=GenerationConfig(max_new_tokens=3), latent_reasoning=latent
            )
            assert int(out[0, 5]) != first, latent  # the model's suppress_tokens still apply
    finally:
        model.generation_config.suppress_tokens = None
    given = GenerationConfig(max_new_tokens=3, suppress_tokens=[first])
    for latent in (True, False):
        assert int(model.generate(prompt, generation_config=given, latent_reasoning=latent)[0, 5]) != first, (
            latent
        )
    as_dict = GenerationConfig(max_new_tokens=2, return_dict_in_generate=True)
    for latent in (True, False):
        out = model.generate(prompt, generation_config=as_dict, latent_reasoning=latent)
        assert isinstance(out.sequences, torch.Tensor) and out.sequences.shape == (1, 7), latent
        plain = model.generate(
            prompt, generation_config=as_dict, latent_reasoning=latent, return_dict_in_generate=False
        )
        assert isinstance(plain, torch.Tensor) and torch.equal(plain, out.sequences), latent
    model.generation_config.return_dict_in_generate = True
    model.generation_config.use_cache = False
    try:
        out = model.generate(prompt, max_new_tokens=2)
        assert torch.equal(
            out.sequences, model.generate(prompt, max_new_tokens=2, return_dict_in_generate=False)
        )
    finally:
        model.generation_config.return_dict_in_generate = None
        model.generation_config.use_cache = True


def test_output_latents_without_return_dict_in_generate_is_refused(model, cfg):
    """output_latents=True asks for the fed-back latent states, which only LatentOmniGenerateOutput can carry: without
    return_dict_in_generate=True (argument or generation config) it is a ValueError naming both before the model
    runs; before, generate returned the bare ids and silently dropped the latents."""
    prompt = torch.tensor([[1, 30, 31, 32, cfg.latent_start_token_id]])
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="output_latents=True needs return_dict_in_generate=True"):
            model.generate(prompt, max_new_tokens=cfg.num_latents + 2, output_latents=True)
    finally:
        hook.remove()
    assert not calls
    model.generation_config.return_dict_in_generate = True  # from the generation config counts too
    try:
        out = model.generate(prompt, max_new_tokens=cfg.num_latents + 2, output_latents=True)
    finally:
        model.generation_config.return_dict_in_generate = None
    assert out.latent_states[0].shape == (cfg.num_latents, cfg.get_text_config().hidden_size)


def test_latent_generate_takes_stopping_criteria_and_a_streamer_like_hf_generate(model, cfg):
    """stopping_criteria and streamer work on the latent path as in transformers' generate: a criterion stops each
    row where it says (later steps are pad ids, generation ends when every row is done, equal to
    latent_reasoning=False on a prompt without latents), a latent step is checked too, and the streamer gets the
    prompt, every step's ids (latent steps as pads) and one end(). Before, both were 'unknown arguments'."""
    from transformers import StoppingCriteria
    from transformers.generation.streamers import BaseStreamer

    class StopAt(StoppingCriteria):
        def __init__(self, prompt_len, per_row):
            self.prompt_len, self.per_row = prompt_len, per_row

        def __call__(self, input_ids, scores, **kwargs):
            n = input_ids.shape[1] - self.prompt_len
            return torch.tensor([n >= k for k in self.per_row], device=input_ids.device)

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts, self.ends = [], 0

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ends += 1

    prompt = torch.tensor([[1, 30, 31, 32, 33], [0, 0, 1, 40, 41]])
    am = (prompt != 0).long()
    stop = [StopAt(5, [6, 3])]
    ours = model.generate(
        prompt, attention_mask=am, max_new_tokens=12, eos_token_id=[], stopping_criteria=stop
    )
    hf = model.generate(
        prompt,
        attention_mask=am,
        max_new_tokens=12,
        latent_reasoning=False,
        eos_token_id=None,
        min_new_tokens=12,
        stopping_criteria=stop,
    )
    assert ours.shape == (2, 5 + 6) and torch.equal(ours, hf)
    assert ours[1, 8:].tolist() == [model.generation_config.pad_token_id] * 3
    k = cfg.num_latents
    latent_prompt = torch.tensor([[1, 30, 31, 32, cfg.latent_start_token_id]])
    streamer = Collect()
    out = model.generate(
        latent_prompt,
        max_new_tokens=k + 8,
        eos_token_id=[],
        stopping_criteria=[StopAt(5, [3])],
        streamer=streamer,
    )
    assert (
        out.shape == (1, 5 + 3) and out[0, 5:].tolist() == [cfg.latent_pad_token_id] * 3
    )  # stopped mid-block
    streamer = Collect()
    out = model.generate(latent_prompt, max_new_tokens=k + 3, eos_token_id=[], streamer=streamer)
    assert streamer.ends == 1 and torch.equal(streamer.puts[0], latent_prompt)
    assert torch.equal(torch.cat([p.reshape(1, -1) for p in streamer.puts], 1), out)
    assert out[0, 5 : 5 + k].tolist() == [cfg.latent_pad_token_id] * k


def test_sampling_without_top_k_uses_transformers_default_top_k(model):
    """transformers' generate samples with its global default top_k=50 when neither the call nor a generation config
    sets top_k; the latent path does the same, so one seed gives the same tokens on both paths (before, it sampled
    from the whole vocabulary and the paths drew different tokens). top_k=0 still turns the filter off."""
    prompt = torch.tensor([[1, 30, 31, 32, 33]])
    assert model.generation_config.top_k is None
    outs = {}
    for latent in (True, False):
        torch.manual_seed(3)
        kw = dict(eos_token_id=[]) if latent else dict(min_new_tokens=12)
        outs[latent] = model.generate(
            prompt, max_new_tokens=12, do_sample=True, latent_reasoning=latent, **kw
        )
    assert torch.equal(outs[True], outs[False])
    torch.manual_seed(3)
    off = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=0, eos_token_id=[])
    assert not torch.equal(off, outs[True])
