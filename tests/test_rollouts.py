"""training.py's rollout generators: the choice (``resolve_rollout``), the static decoder's settings taken from
TRL's generation config, and a real GRPO generation step through ``trainer_class``: the static path hands TRL
exactly what its own ``generate`` path does (prompt and completion ids, padding, the EOS mask, the
``completion_ids`` given to the rewards, advantages and the no-grad log-probabilities), with completions that
stop at EOS and completions that run to the limit in one batch; its sampling is seeded per step.

Real parts only: TRL's GRPOTrainer, the real tokenizer, a tiny random Qwen2 with a LoRA adapter. The model's
weights are re-drawn larger (``test_decoding.lively``) so that every prompt gets its own greedy continuation.
"""

from __future__ import annotations

import pytest
import torch
from test_decoding import lively

import data
import rewards
import rollouts
import runtime
import training

LIMIT = 12  # completion tokens


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# --------------------------------------------------------------------------------------------------
# Choosing the generator
# --------------------------------------------------------------------------------------------------

def test_auto_takes_static_without_vllm_and_says_why():
    if runtime.has_cuda():
        pytest.skip("CPU-only behaviour")
    config = training.TrainConfig()
    assert config.rollout == "auto"
    assert training.resolve_rollout(config, "trl") == ("static", "vLLM not used: no CUDA GPU")
    assert training.resolve_rollout(training.TrainConfig(rollout="generate"), "trl") == ("generate", "requested")
    assert training.resolve_rollout(training.TrainConfig(rollout="static"), "trl") == ("static", "requested")
    with pytest.raises(RuntimeError, match=r"rollout='vllm' is not available: no CUDA GPU"):
        training.resolve_rollout(training.TrainConfig(rollout="vllm"), "trl")
    # Unsloth without vLLM (here: no GPU) generates with its own generate: it patches the attention the project's
    # decoder drives (seen on the GPU with unsloth 2026.10.9), so auto never pairs them.
    assert training.resolve_rollout(config, "unsloth") == ("generate",
                                                          "vLLM not used: no CUDA GPU; Unsloth generates itself")


def test_rollout_choices_are_checked_before_anything_loads():
    with pytest.raises(ValueError, match=r"rollout must be one of .*'static'.*got 'fast'"):
        training.check_config(training.TrainConfig(rollout="fast"))
    with pytest.raises(ValueError, match="backend 'trl' or 'auto'"):
        training.check_config(training.TrainConfig(backend="unsloth", rollout="static"))
    training.check_config(training.TrainConfig(backend="unsloth", rollout="generate"))  # Unsloth without vLLM
    with pytest.raises(ValueError, match="may not set use_vllm"):
        training.check_config(training.TrainConfig(grpo_overrides={"use_vllm": True}))
    training.check_config(training.TrainConfig(rollout="static"))
    # The smoke configuration keeps a rollout that runs on the CPU and lets auto choose otherwise.
    assert training.smoke_config(training.TrainConfig(rollout="generate")).rollout == "generate"
    assert training.smoke_config(training.TrainConfig(rollout="vllm")).rollout == "auto"
    # The option comes from the dataclass, like every other field.
    namespace = training.build_parser().parse_args(["--rollout", "generate", "--no-rollout-merge-adapter"])
    config = training.config_from_args(namespace)
    assert (config.rollout, config.rollout_merge_adapter) == ("generate", False)


def test_first_line_names_the_generator_and_the_reason():
    config = training.smoke_config(training.TrainConfig())
    smoke = training.startup_line(config, "trl", "requested", "static", "vLLM not used: no CUDA GPU", "no CUDA GPU")
    assert smoke.startswith("Smoke mode (no CUDA GPU): rollouts static (vLLM not used: no CUDA GPU), ")
    full = training.startup_line(training.TrainConfig(), "trl", "Unsloth not used: no CUDA GPU", "vllm",
                                 "vLLM installed (TRL colocate)")
    assert full == "Rollouts: vllm (vLLM installed (TRL colocate)) · backend trl (Unsloth not used: no CUDA GPU)"


def test_static_settings_are_what_grpo_config_asks():
    from transformers import GenerationConfig

    # What TRL 0.22.2 builds from GRPOConfig(temperature=0.9, top_p=0.95, top_k=None, min_p=0.05).
    generation = GenerationConfig(max_new_tokens=512, do_sample=True, pad_token_id=151643, bos_token_id=None,
                                  eos_token_id=151645, temperature=0.9, top_p=0.95, top_k=None, min_p=0.05,
                                  repetition_penalty=1.0, cache_implementation=None)
    settings = rollouts.static_rollout_settings(generation)
    assert (settings.method, settings.max_new_tokens, settings.temperature, settings.top_p, settings.top_k,
            settings.min_p) == ("static", 512, 0.9, 0.95, None, 0.05)
    assert (settings.eos_token_ids, settings.pad_token_id) == ((151645,), 151643)
    generation.do_sample = False
    assert rollouts.static_rollout_settings(generation).greedy
    generation.repetition_penalty = 1.05  # e.g. through generation_kwargs: the decoder cannot apply it
    with pytest.raises(ValueError, match=r"cannot honour generation setting.*repetition_penalty"):
        rollouts.static_rollout_settings(generation)


# --------------------------------------------------------------------------------------------------
# A real GRPO generation step: static against TRL's own generate
# --------------------------------------------------------------------------------------------------

def parity_reward(completions, completion_ids, **kwargs):
    """Varies from completion to completion even for a random model (the study's rewards are all 0 there)."""
    return [float(sum(ids) % 3) for ids in completion_ids]


class Spy:
    """A reward function that records the ``completion_ids`` TRL hands to the rewards, and rewards length."""

    __name__ = "length_spy"

    def __init__(self):
        self.seen: list[list[list[int]]] = []

    def __call__(self, completions, completion_ids, **kwargs):
        self.seen.append([list(ids) for ids in completion_ids])
        return [len(ids) / LIMIT for ids in completion_ids]


@pytest.fixture(scope="module")
def policy(tokenizer):
    """A lively tiny Qwen2 with a random (not identity) LoRA adapter, as a PEFT model in training mode."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(lively(runtime.build_tiny_qwen2(tokenizer, seed=0)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(training.LORA_TARGETS),
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    return model.train()


@pytest.fixture(scope="module")
def rows(tokenizer, gsm8k_dir):
    """8 different questions: completions differ within each group of 4, so the advantages are not all 0."""
    dataset = data.training_dataset(tokenizer, gsm8k_dir, size=8)
    return [dataset[i] for i in range(8)]


def make_trainer(policy, tokenizer, tmp_path, rollout: str, spy: Spy | None = None, **arguments):
    from trl import GRPOConfig, GRPOTrainer

    settings = dict(output_dir=str(tmp_path / rollout), per_device_train_batch_size=4,
                    gradient_accumulation_steps=2, num_generations=4, max_prompt_length=256,
                    max_completion_length=LIMIT, beta=0.1, num_iterations=2,  # old log-probs are computed too
                    use_cpu=True, report_to=[], seed=7, remove_unused_columns=False, logging_steps=1,
                    generation_kwargs={"do_sample": False})
    settings.update(arguments)
    functions = [*rewards.reward_functions("dapo_overlong", max_completion_length=LIMIT), parity_reward]
    return training.trainer_class(GRPOTrainer)(
        model=policy, reward_funcs=[*functions, *([spy] if spy else [])], args=GRPOConfig(**settings),
        processing_class=tokenizer, rollout=rollout)


def stop_token(completions: torch.Tensor) -> int:
    """A token that ends some greedy completions early (first seen before the last position) but not all."""
    for token in completions[:, : LIMIT - 2].flatten().tolist():
        rows_with = [token in row.tolist() for row in completions]
        if not all(rows_with):
            return token
    raise AssertionError("no token appears in some completions but not in others")


def test_static_step_hands_trl_what_generate_does(policy, tokenizer_dir, rows, tmp_path):
    """Greedy on both paths, so both see the same tokens; then every tensor TRL computes must agree."""
    tokenizer = runtime.load_tokenizer(tokenizer_dir)
    # The stop token: one that this policy's greedy completions reach in some rows and not in others.
    probe = make_trainer(policy, tokenizer, tmp_path, "static")
    full = probe._generate_and_score_completions(rows)["completion_ids"]
    assert full.shape == (8, LIMIT)  # Qwen's <|im_end|> never comes from a random model: all ran to the limit
    eos = stop_token(full)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    assert tokenizer.eos_token_id == eos

    spies = {"generate": Spy(), "static": Spy()}
    out = {}
    for name, spy in spies.items():
        trainer = make_trainer(policy, tokenizer, tmp_path, name, spy=spy)
        out[name] = trainer._generate_and_score_completions(rows)
        if name == "static":
            assert trainer.rollout_info["method"] == "static"  # the decoder ran, not a fallback
            assert trainer.rollout_decoder.calls == 1
    static, generate = out["static"], out["generate"]

    assert set(static) == set(generate) == {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                            "advantages", "num_items_in_batch", "old_per_token_logps",
                                            "ref_per_token_logps"}
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "num_items_in_batch"):
        assert torch.equal(static[key], generate[key]), key
    for key in ("advantages", "old_per_token_logps", "ref_per_token_logps"):
        torch.testing.assert_close(static[key], generate[key], rtol=0, atol=1e-6)
    assert static["advantages"].abs().max() > 0.1  # rewards differ within groups: a real comparison
    assert spies["static"].seen == spies["generate"].seen  # the rewards saw the same token lists

    # TRL's semantics, checked directly: prompts left-padded, completions right-padded with the pad token,
    # the mask covering everything up to and including the first EOS token, or the whole row at the limit.
    prompt_mask = static["prompt_mask"]
    assert (prompt_mask[:, -1] == 1).all() and (prompt_mask[:, 0] == 0).any()
    pad = tokenizer.pad_token_id
    ids, mask = static["completion_ids"], static["completion_mask"]
    assert ids.shape[1] == LIMIT
    stopped = 0
    for row, (token_row, mask_row) in enumerate(zip(ids.tolist(), mask.tolist())):
        if eos in token_row:
            end = token_row.index(eos) + 1
            stopped += 1
            assert all(t == pad for t in token_row[end:])
        else:
            end = LIMIT
        assert mask_row == [1] * end + [0] * (LIMIT - end), row
        assert spies["static"].seen[0][row] == token_row[:end]
    assert 0 < stopped < 8  # both kinds in one batch
    assert int(static["num_items_in_batch"]) == int(mask.sum())


def test_static_sampling_is_seeded_per_step(policy, tokenizer, rows, tmp_path):
    """Sampling (T = 1): a fresh trainer with the same seed draws the same rollouts at the same step; a second
    rollout in the same step draws new ones; another seed draws others. The merged-adapter path runs here."""
    def completions(trainer):
        return trainer._generate_and_score_completions(rows)["completion_ids"]

    sampled = dict(generation_kwargs=None, temperature=1.0)
    first = make_trainer(policy, tokenizer, tmp_path, "static", **sampled)
    first.rollout_decoder.merge_adapter = True
    a, b = completions(first), completions(first)
    again = completions(make_trainer(policy, tokenizer, tmp_path, "static", **sampled))
    other = completions(make_trainer(policy, tokenizer, tmp_path, "static", seed=8, **sampled))
    assert torch.equal(a, again)
    assert not torch.equal(a, b) and not torch.equal(a, other)
    assert len({tuple(row) for row in a[:4].tolist()}) > 1  # one question's 4 samples differ


def test_static_rollouts_need_vllm_off(policy, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="turn use_vllm and use_transformers_paged off"):
        make_trainer(policy, tokenizer, tmp_path, "static", use_transformers_paged=True)
