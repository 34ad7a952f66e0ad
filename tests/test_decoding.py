"""decoding.py on a tiny random Qwen2 with the real tokenizer: greedy decoding equals a recompute-everything
loop (batching, refill, padding, stop tokens, per-prompt limits, a second architecture, the generate fallback),
sampling follows softmax(logits / T) after top-k/top-p/min-p (chi-square tests against transformers' own
warpers), seeds, and the rollout entry point on a PEFT model being trained: modes restored, nothing recorded
for autograd, and an optimizer step reaches the next rollout, merged or not.

The tiny model of ``runtime.build_tiny_qwen2`` repeats its last input token under greedy decoding (tied
embeddings, small weights), which cannot tell a correct decoder from a broken one; the ``lively`` model below
re-draws its weights larger so that every prompt gets its own varied continuation.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import lively
from scipy import stats

import decoding
import runtime

# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


def greedy_reference(model, prompt, steps):
    """The plainest possible greedy decoder: recompute the whole sequence for every token, no cache, no batch."""
    ids, out = list(prompt), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny operations: threads only add waiting, badly so on a busy CI machine
    try:
        with torch.no_grad():
            for _ in range(steps):
                logits = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
                out.append(int(logits.argmax()))
                ids.append(out[-1])
    finally:
        torch.set_num_threads(threads)
    return out


LIMITS = [9, 14, 5, 12, 14, 7, 11]


@pytest.fixture(scope="module")
def references(lively_model, prompts):
    return [greedy_reference(lively_model, p, m) for p, m in zip(prompts, LIMITS)]


# ---------------------------------------------------------------------------------------------------------
# Greedy: batching, padding, stop tokens, limits
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_static_decoder_equals_greedy_reference(lively_model, prompts, references, batch_size):
    info = {}
    got = decoding.generate_token_ids(lively_model, prompts, LIMITS, eos_token_ids=[], batch_size=batch_size,
                                      method="static", info=info)
    assert got == references
    assert info["method"] == "static" and info["batch_size"] == batch_size
    if batch_size < len(prompts):
        assert info["prefill_calls"] > 1  # finished slots were refilled


def test_static_decoder_on_a_llama_model(tokenizer, prompts):
    """A second architecture (Llama: no attention biases, 3 query heads per key/value head) and another way
    of building masks: the decoder must not depend on how a model prepares its attention mask."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = lively(LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)))
    limits = [6, 9, 4]
    expected = [greedy_reference(model, p, m) for p, m in zip(prompts[:3], limits)]
    assert decoding.generate_token_ids(model, prompts[:3], limits, eos_token_ids=[], batch_size=2,
                                       method="static") == expected


def test_generate_fallback_equals_greedy_reference(lively_model, prompts, references):
    info = {}
    got = decoding.generate_token_ids(lively_model, prompts, LIMITS, eos_token_ids=[], batch_size=4,
                                      method="generate", info=info)
    assert got == references  # left padding, length-sorted batches
    assert info["method"] == "generate"


@pytest.mark.parametrize("method", ["static", "generate"])
def test_generation_stops_at_the_first_stop_token(lively_model, prompts, references, method):
    # Stop tokens taken from the reference continuations themselves: some prompts reach one early, others not.
    eos = sorted({references[0][3], references[3][6], references[6][2]})
    expected = [decoding.trim(seq, eos, m) for seq, m in zip(references, LIMITS)]
    stopped = [len(e) < m for e, m in zip(expected, LIMITS)]
    assert any(stopped) and not all(stopped)
    got = decoding.generate_token_ids(lively_model, prompts, LIMITS, eos_token_ids=eos, batch_size=3,
                                      method=method)
    assert got == expected
    for tokens, was_stopped in zip(got, stopped):
        assert (tokens[-1] in eos) == was_stopped
        assert not set(tokens[:-1]) & set(eos)


def test_settings_object_and_keyword_overrides_agree(lively_model, prompts, references):
    settings = decoding.DecodeSettings(max_new_tokens=5, method="static", eos_token_ids=(), batch_size=2)
    expected = [r[:5] for r in references[:4]]
    assert decoding.generate_token_ids(lively_model, prompts[:4], settings=settings) == expected
    assert decoding.generate_token_ids(lively_model, prompts[:4], 5, eos_token_ids=[], batch_size=2,
                                       method="static") == expected


def test_sampling_is_seeded(lively_model, prompts):
    def sample(seed):
        return decoding.generate_token_ids(lively_model, prompts[:3], 8, eos_token_ids=[], batch_size=2,
                                           temperature=1.0, seed=seed)

    first = sample(0)
    assert first == sample(0)
    assert first != sample(1)
    assert all(len(tokens) == 8 for tokens in first)


def test_models_outside_the_attention_interface_fall_back_to_generate(tokenizer, prompts, references):
    from transformers import Qwen2ForCausalLM

    class Opaque(Qwen2ForCausalLM):
        _supports_attention_backend = False

    model = Opaque(runtime.build_tiny_qwen2(tokenizer).config)
    model.load_state_dict(lively(runtime.build_tiny_qwen2(tokenizer)).state_dict())
    model.eval()
    info = {}
    got = decoding.generate_token_ids(model, prompts, LIMITS, eos_token_ids=[], batch_size=4, info=info)
    assert got == references
    assert info["method"] == "generate" and "attention interface" in info["fallback_reason"]
    with pytest.raises(ValueError, match="static decoder cannot run"):
        decoding.generate_token_ids(model, prompts, LIMITS, eos_token_ids=[], method="static")


def test_the_cache_reaches_attention_explicitly_and_nothing_leaks(lively_model, prompts, references):
    """No module-level state: after a run the model's attention is its own again, and the decoder's attention
    function refuses to run without the cache handed to it."""
    before = lively_model.config._attn_implementation
    decoding.generate_token_ids(lively_model, prompts[:2], 3, eos_token_ids=[], method="static")
    assert lively_model.config._attn_implementation == before
    assert greedy_reference(lively_model, prompts[0], 3) == references[0][:3]
    q = torch.zeros(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="needs a KVCache"):
        decoding.static_attention(lively_model.model.layers[0].self_attn, q, q[:, :2], q[:, :2], None)


def test_generate_token_ids_validates_input(lively_model, prompts):
    with pytest.raises(ValueError, match="entries"):
        decoding.generate_token_ids(lively_model, prompts, [4, 5])
    with pytest.raises(ValueError, match="at least one token"):
        decoding.generate_token_ids(lively_model, [[]], 4)
    with pytest.raises(ValueError, match="method"):
        decoding.generate_token_ids(lively_model, prompts, 4, method="beam")
    with pytest.raises(ValueError, match=r"unknown decoding setting.*beams"):
        decoding.generate_token_ids(lively_model, prompts, 4, beams=2)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", -0.5, "temperature"), ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"),
    ("top_k", -3, "top_k"), ("min_p", 1.5, "min_p"), ("batch_size", 0, "batch_size"),
    ("max_new_tokens", 0, "max_new_tokens"), ("method", "beam", "method")])
def test_settings_reject_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        decoding.DecodeSettings(**{field: value})


def test_settings_are_frozen():
    settings = decoding.DecodeSettings(eos_token_ids=[1, 2])
    assert settings.eos_token_ids == (1, 2)  # a tuple: hashable, and the caller's list cannot change it
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.temperature = 1.0  # type: ignore[misc]
    # GRPOConfig's "off" values and vLLM's top_k=-1 all mean no filtering.
    assert [decoding.DecodeSettings(top_k=k).top_k_active for k in (None, 0, -1, 5)] == [None, None, None, 5]


# ---------------------------------------------------------------------------------------------------------
# Sampling: transformers' semantics, the right distribution, seeds
# ---------------------------------------------------------------------------------------------------------

FILTERS = [  # (temperature, top_k, top_p, min_p)
    (1.0, None, 1.0, None), (2.5, 12, 1.0, None), (2.5, None, 0.9, None), (2.5, None, 1.0, 0.05),
    (2.5, 12, 0.9, 0.02), (0.7, 0, 0.95, 0.0),
]


def reference_filter(logits, temperature, top_k, top_p, min_p):
    """transformers' own warpers, in the order GenerationMixin applies them for GRPOConfig's settings."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p is not None:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores


@pytest.fixture(scope="module")
def peaked_logits(lively_model, tokenizer):
    """Next-token logits of a real prompt: a few likely tokens and a long tail, as a language model gives."""
    ids = tokenizer("What is 12 plus 30?", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return lively_model(torch.tensor([ids])).logits[:, -1].float()


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "min_p"), FILTERS)
def test_filter_logits_equals_transformers_warpers(peaked_logits, temperature, top_k, top_p, min_p):
    settings = decoding.DecodeSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    got = decoding.filter_logits(peaked_logits, settings)
    expected = reference_filter(peaked_logits, temperature, top_k, top_p, min_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    kept = torch.isfinite(expected)
    assert torch.allclose(got[kept], expected[kept], rtol=1e-6, atol=1e-6)
    if top_k or top_p < 1.0 or min_p:
        assert int(kept.sum()) < peaked_logits.shape[-1]  # the filter really removed tokens


def chi_square_p(observed_tokens, probabilities):
    """Chi-square goodness of fit of sampled tokens against ``probabilities`` (a dict token -> p); cells with an
    expected count below 5 are pooled so the test's approximation holds."""
    n = len(observed_tokens)
    counts = {}
    for token in observed_tokens:
        counts[token] = counts.get(token, 0) + 1
    observed, expected, pooled_o, pooled_e = [], [], 0, 0.0
    for token, p in probabilities.items():
        if n * p >= 5:
            observed.append(counts.get(token, 0))
            expected.append(n * p)
        else:
            pooled_o += counts.get(token, 0)
            pooled_e += n * p
    if pooled_e > 0:
        observed.append(pooled_o)
        expected.append(pooled_e)
    assert len(observed) >= 3  # enough cells for the test to mean something
    scale = sum(observed) / sum(expected)  # exact float normalisation
    return stats.chisquare(observed, [e * scale for e in expected]).pvalue


def support(scores):
    """token -> probability of softmax over the finite scores of one row."""
    probs = torch.softmax(scores.double(), -1)
    return {int(t): float(probs[t]) for t in torch.nonzero(torch.isfinite(scores)).flatten()}


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "min_p"), FILTERS[1:5])
def test_sample_next_follows_the_filtered_softmax(peaked_logits, temperature, top_k, top_p, min_p):
    settings = decoding.DecodeSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    # The 500 likeliest tokens as a whole vocabulary: a long tail still, and sorting 20,000 rows stays cheap.
    logits = peaked_logits[:, peaked_logits[0].topk(500).indices]
    expected = support(reference_filter(logits, temperature, top_k, top_p, min_p)[0])
    generator = torch.Generator().manual_seed(0)
    tokens = decoding.sample_next(logits.expand(20_000, -1), settings, generator).tolist()
    assert set(tokens) <= set(expected)  # filtered tokens are never sampled
    assert chi_square_p(tokens, expected) > 1e-3


@pytest.mark.parametrize("sample_in_graph", [False, True])
def test_decoder_samples_follow_the_filtered_softmax(lively_model, tokenizer, sample_in_graph):
    """End to end through prefill and one decode step: 2000 copies of one prompt, two sampled tokens each. The
    pairs must follow p(t1) p(t2 | t1), each factor the filtered softmax of a fresh full forward."""
    settings = decoding.DecodeSettings(max_new_tokens=2, method="static", temperature=2.5, top_k=12, top_p=0.9,
                                       min_p=0.02, seed=11, batch_size=250, eos_token_ids=(),
                                       sample_in_graph=sample_in_graph)
    prompt = tokenizer("What is 12 plus 30?", add_special_tokens=False)["input_ids"]
    n = 2000
    pairs = [tuple(t) for t in decoding.generate_token_ids(lively_model, [prompt] * n, settings=settings)]

    def filtered(ids):
        with torch.no_grad():
            logits = lively_model(torch.tensor([ids])).logits[:, -1].float()
        return support(reference_filter(logits, 2.5, 12, 0.9, 0.02)[0])

    first = filtered(prompt)
    joint = {(a, b): pa * pb for a, pa in first.items() for b, pb in filtered([*prompt, a]).items()}
    assert len(first) > 2 and len(joint) > 6
    assert set(pairs) <= set(joint)  # filtered tokens are never sampled, at either position
    assert chi_square_p(pairs, joint) > 1e-3


@pytest.mark.parametrize("sample_in_graph", [False, True])
def test_filtered_sampling_is_seeded(lively_model, prompts, sample_in_graph):
    def sample(seed):
        return decoding.generate_token_ids(lively_model, prompts[:3], 8, eos_token_ids=[], batch_size=2,
                                           temperature=1.5, top_k=20, top_p=0.95, min_p=0.01, seed=seed,
                                           sample_in_graph=sample_in_graph)

    first = sample(5)
    assert first == sample(5)
    assert first != sample(6)


# ---------------------------------------------------------------------------------------------------------
# Rollouts: a PEFT model in training, optimizer steps, merged adapters
# ---------------------------------------------------------------------------------------------------------


def training_peft_model(tokenizer):
    """A LoRA-wrapped lively model as GRPO holds it: r=8 on every linear layer, non-zero adapter, training
    mode, gradient checkpointing with input gradients (what TRL's PEFT preparation turns on)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = get_peft_model(lively(runtime.build_tiny_qwen2(tokenizer, seed=0)),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                                      lora_dropout=0.1, task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    return model


def eval_reference(model, prompts, limits):
    was_training = model.training
    model.eval()
    try:
        return [greedy_reference(model, p, m) for p, m in zip(prompts, limits)]
    finally:
        model.train(was_training)


def adamw_step(model, prompt, completion, lr):
    """One real optimizer step on the adapter: the causal LM loss of ``completion`` after ``prompt``."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.tensor([[*prompt, *completion]])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.parametrize("merge", [False, True])
def test_rollouts_follow_every_optimizer_step(tokenizer, prompts, merge):
    model = training_peft_model(tokenizer)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    kept_in_eval = model.base_model.model.model.norm
    kept_in_eval.eval()  # a module the trainer keeps in eval mode must stay so
    chosen, limits = prompts[:4], [6, 3, 8, 5]
    rollouts = decoding.RolloutDecoder(decoding.DecodeSettings(method="static", eos_token_ids=(), batch_size=3),
                                       merge_adapter=merge)

    before = rollouts.generate(model, chosen, limits)
    assert model.training and not kept_in_eval.training  # every module back in its own mode
    assert model.base_model.model.model.layers[0].training and model.is_gradient_checkpointing
    assert all(p.grad is None for p in model.parameters())  # nothing was recorded for autograd
    assert before == eval_reference(model, chosen, limits)
    decoder = rollouts.decoder

    loss = adamw_step(model, chosen[0], [7, 8, 9, 10], lr=0.05)
    assert loss > 0
    after = rollouts.generate(model, chosen, limits)
    assert rollouts.decoder is decoder  # the same cache (and, on a GPU, the same graphs) served both calls
    assert after == eval_reference(model, chosen, limits)  # the step reached the decoder ...
    assert after != before  # ... and it mattered
    for name, parameter in model.named_parameters():
        if "lora_" not in name:  # merging and unmerging left the frozen weights bit for bit as they were
            assert torch.equal(parameter, base_weights[name]), name


def test_rollouts_sample_afresh_each_call_and_reproducibly(tokenizer, prompts):
    settings = decoding.DecodeSettings(temperature=1.0, seed=4, eos_token_ids=(), max_new_tokens=6)
    model = training_peft_model(tokenizer)
    first, second = decoding.RolloutDecoder(settings), decoding.RolloutDecoder(settings)
    calls = [first.generate(model, prompts[:3]) for _ in range(2)]
    assert calls[0] != calls[1]  # one seed per call: a new step gets new completions
    assert [second.generate(model, prompts[:3]) for _ in range(2)] == calls
    assert first.generate(model, prompts[:3], seed=4) == calls[0]


def test_merging_needs_a_peft_model(lively_model, prompts):
    with pytest.raises(ValueError, match="needs a PEFT model"):
        decoding.RolloutDecoder(decoding.DecodeSettings(), merge_adapter=True).generate(lively_model, prompts[:1], 2)
