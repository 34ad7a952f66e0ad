r"""Evaluation on the 1319 GSM8K test questions, for every notebook, for training's final cells and the CLI.

One call runs a model (optionally with a LoRA adapter) on the test split, scores each completion with the
scoring contract of ``rewards.py`` (so evaluation and reward never disagree), writes a per-question JSONL
file and a summary JSON beside the adapter, and returns the summary; ``evaluate_run`` does the same for a
training run's adapter (its settings read from the run's ``run_config.json``) and pairs it with the baseline::

    summary = evaluation.evaluate(evaluation.EvalConfig(adapter="outputs/group/adapter"))
    evaluation.print_summary(summary)           # "Accuracy: 9.55% (126 of 1319)" ...
    summary = evaluation.evaluate_run("outputs/Group_method")  # + "baseline_comparison" when the baseline is there

    python evaluation.py --adapter outputs/Group_method [--limit 100] [--backend hf] [--budget steps]

The metrics, their intervals and the paired comparison are ``metrics.py``'s (``metrics.compute_metrics``,
``metrics.compare_runs``); this module generates, records and prints.

Generation uses the training prompt (``data.prompt_messages`` + ``data.render_prompt``), greedy decoding by
default, at most 512 new tokens. Backends:

- ``"vllm"``: ``vllm.LLM`` with a ``LoRARequest`` (where vLLM is installed);
- ``"unsloth"``: an Unsloth model's ``fast_generate`` (vLLM inside) with its LoRA request (Colab);
- ``"hf"``: this module's own Hugging Face decoder (``generate_token_ids``): a fixed-shape KV cache, one
  slot per sequence, finished slots refilled at once with the next prompts (continuous batching), the
  decode step replayed as a CUDA graph on GPUs; models it cannot drive fall back to ``"hf-generate"``;
- ``"hf-generate"``: batched ``model.generate`` (prompts sorted by length, left padding, stop at EOS);
- ``"auto"``: an Unsloth model passed in → ``"unsloth"``; any other model passed in → ``"hf"``; otherwise
  ``"vllm"`` when installed with a GPU, else ``"hf"``. The choice and its reason are printed and saved.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import random
import re
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

import data
import metrics
import rewards
import runtime

BACKENDS = ("auto", "vllm", "unsloth", "hf", "hf-generate")
BUDGET_MODES = ("limit", "prompt", "both")
_SMOKE_BATCH = 32
_MAX_AUTO_BATCH = 512


class AdapterError(runtime.ConfigError):
    """A LoRA adapter that is missing, is not an adapter, or does not fit the base model."""


# ==================================================================================================
# Configuration
# ==================================================================================================

@dataclasses.dataclass
class EvalConfig:
    """What to evaluate and how; every field has a default that reproduces the study's evaluation. The fields'
    help texts are also the command line's (``python evaluation.py --help``)."""

    model: str = field(default=runtime.MODEL_ID, metadata={
        "help": f"Hub id, local folder or .gguf file of the base model; {runtime.TINY_MODEL!r} = tiny random Qwen2"})
    adapter: str | None = field(default=None, metadata={
        "help": "LoRA adapter: a local or Google Drive folder (/content/drive/..., MyDrive/...) or a Hub repo id"})
    backend: str = field(default="auto", metadata={"help": f"one of {BACKENDS}"})
    max_new_tokens: int = field(default=512, metadata={"help": "token limit of each answer"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; else sampling temperature"})
    batch_size: int | None = field(default=None, metadata={"help": "sequences at a time (default: what fits)"})
    limit: int | None = field(default=None, metadata={"help": "evaluate the first N test questions only"})
    shuffle: bool = field(default=False, metadata={"help": "with limit: a seeded random N questions instead"})
    seed: int = field(default=0, metadata={"help": "seed for sampling, the shuffled subset and the bootstrap"})
    output_dir: str | None = field(default=None, metadata={
        "help": "results folder (default: the adapter's folder, else outputs/eval-<model>)"})
    redo: bool = field(default=False, metadata={"help": "run again even when results with these settings exist"})
    gsm8k_dir: str | None = field(default=None, metadata={"help": "local GSM8K folder (default: found or Hub)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer folder (default: the adapter's, else found by runtime.py)"})
    budget: str | None = field(default=None, metadata={
        "help": "per-question length budget, one of budgets.KINDS ('steps', 'reference', 'question')"})
    budget_mode: str = field(default="limit", metadata={
        "help": f"one of {BUDGET_MODES}: the budget as token limit, stated in the prompt, or both"})
    dtype: str | None = field(default=None, metadata={
        "help": "bfloat16, float16 or float32 (default: bf16 where supported, fp16 on other GPUs, fp32 on CPU)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "4-bit weights (Unsloth backend)"})
    gpu_memory_utilization: float = field(default=0.6, metadata={"help": "GPU share for vLLM"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    smoke: bool | None = field(default=None, metadata={
        "help": "CPU smoke preset (8 questions, 32 new tokens); default: when runtime.smoke_mode() (no GPU)"})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise runtime.ConfigError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.budget is not None:
            import budgets  # one spelling per kind: aliases must not make separate result files

            self.budget = budgets.budget_kind(self.budget)
        if self.budget_mode not in BUDGET_MODES:
            raise runtime.ConfigError(f"budget_mode must be one of {list(BUDGET_MODES)}, got {self.budget_mode!r}")
        for name in ("max_new_tokens", "batch_size", "limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise runtime.ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_new_tokens is None:
            raise runtime.ConfigError("max_new_tokens must be a positive integer, got None")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise runtime.ConfigError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise runtime.ConfigError(f"dtype must be None, 'bfloat16', 'float16' or 'float32', got {self.dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise runtime.ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not self.model:
            raise runtime.ConfigError("model must name a Hub id, a local folder or runtime.TINY_MODEL")


# ==================================================================================================
# Generation: this module's Hugging Face decoder (fixed-shape KV cache, continuous refill, CUDA graphs)
# ==================================================================================================

_ATTENTION_NAME = "lengthrl_static_kv"


class _Unsupported(RuntimeError):
    """The model cannot be driven by the static decoder (falls back to ``model.generate``)."""


class _KVState:
    """The KV buffers of every layer and what the attention function must do with them right now."""

    def __init__(self, keys: list, values: list) -> None:
        self.keys = keys
        self.values = values
        self.mode = "prefill"
        self.rows = None  # prefill: the slots being filled
        self.index = None  # decode: write positions expanded to [b, kv_heads, 1, head_dim]
        self.mask = None  # decode: [b, 1, 1, S], True where a row may attend
        self.calls = 0


_ACTIVE_STATE: _KVState | None = None


def _static_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """Attention over the slot KV buffers (a transformers ``AttentionInterface`` function).

    Prefill: writes the prompt's keys/values into rows ``state.rows`` at positions ``0..P-1`` and attends
    causally among them (right-padded prompts: padding sits after every real token, so causality alone keeps
    it out). Decode (one token per row): writes each row's key/value at its own position, then attends over
    the whole buffer under ``state.mask`` (``[b, 1, 1, S]``, True = visible). The ``attention_mask`` argument
    is ignored: models build (or drop) masks differently, so the decoder hands its own mask over directly.
    Query heads are grouped by their key/value head instead of repeating the keys, so grouped-query attention
    reads each key once.
    """
    import torch.nn.functional as F

    state = _ACTIVE_STATE
    if state is None:
        raise RuntimeError("the static-KV attention was called outside evaluation.generate_token_ids")
    layer = module.layer_idx
    state.calls += 1
    if state.mode == "prefill":
        length = key.shape[2]
        state.keys[layer][state.rows, :, :length] = key
        state.values[layer][state.rows, :, :length] = value
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2), None
    b, heads, _, dim = query.shape
    keys = state.keys[layer][:b]
    values = state.values[layer][:b]
    keys.scatter_(2, state.index, key)
    values.scatter_(2, state.index, value)
    kv_heads = keys.shape[1]
    grouped = query.reshape(b, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=state.mask, scale=scaling)
    return out.reshape(b, heads, 1, dim).transpose(1, 2), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION_NAME, _static_attention)


def _causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a PEFT wrapper (LoRA layers stay injected and active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _eos_ids(model: Any = None, tokenizer: Any = None) -> list[int]:
    ids: list[int] = []
    sources = [getattr(getattr(model, "generation_config", None), "eos_token_id", None),
               getattr(tokenizer, "eos_token_id", None)]
    for source in sources:
        for value in (source if isinstance(source, (list, tuple)) else [source]):
            if value is not None and int(value) not in ids:
                ids.append(int(value))
    return ids


def _trim(ids: Sequence[int], eos: Iterable[int], limit: int) -> list[int]:
    """Tokens up to and including the first stop token, at most ``limit`` of them."""
    stop = set(eos)
    out: list[int] = []
    for token in ids[:limit]:
        out.append(int(token))
        if token in stop:
            break
    return out


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def default_batch_size(model: Any, n_prompts: int, max_total_tokens: int) -> int:
    """Slots for the decoder: on a GPU as many as fit a quarter of free memory (at most 512), else 32."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return max(1, min(n_prompts, _SMOKE_BATCH))
    config = _causal_lm(model).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.finfo(next(model.parameters()).dtype).bits // 8
    per_slot = 2 * config.num_hidden_layers * kv_heads * head_dim * max_total_tokens * element
    per_slot += 3 * 4 * config.vocab_size  # float32 logits and sampling temporaries
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(n_prompts, _MAX_AUTO_BATCH, int(0.25 * free // per_slot)))


class _StaticDecoder:
    """Continuous-batching greedy/sampled decoding with a fixed-shape KV cache (see ``generate_token_ids``)."""

    def __init__(self, model: Any, prompts: Sequence[Sequence[int]], limits: Sequence[int], eos: Sequence[int],
                 pad_id: int, temperature: float, batch_size: int, use_cuda_graphs: bool,
                 check_every: int | None, prefill_tokens: int, profile: bool = False) -> None:
        import torch

        self.torch = torch
        self.lm = _causal_lm(model)
        config = self.lm.config
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            raise _Unsupported("logit soft-capping / scaling is not implemented by the static decoder")
        if getattr(config, "use_sliding_window", False):
            raise _Unsupported("sliding-window attention is not implemented by the static decoder")
        if not getattr(type(self.lm), "_supports_attention_backend", False):
            raise _Unsupported(f"{type(self.lm).__name__} does not use transformers' attention interface")
        self.decoder = self.lm.get_decoder()
        self.head = self.lm.get_output_embeddings()
        if self.decoder is None or self.head is None:
            raise _Unsupported("the model exposes no decoder / output embeddings")
        parameter = next(self.lm.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.prompts, self.limits = [list(p) for p in prompts], [int(m) for m in limits]
        self.eos_list, self.pad_id, self.temperature = list(eos), int(pad_id), float(temperature)
        self.batch = max(1, min(batch_size, len(prompts)))
        self.cuda = self.device.type == "cuda"
        self.use_graphs = use_cuda_graphs and self.cuda
        self.check_every = check_every or (8 if self.cuda else 1)
        self.prefill_tokens = prefill_tokens
        self.profile = profile
        self.layers = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        # One fixed cache length for the whole run (a multiple of 64 keeps attention kernels aligned).
        self.length = _round_up(max(len(p) + m for p, m in zip(self.prompts, self.limits)), 64)
        self.max_new = max(self.limits)
        B, S, dev = self.batch, self.length, self.device
        shape = (B, kv_heads, S, head_dim)
        self.state = _KVState([torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(self.layers)],
                              [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(self.layers)])
        self.kv_heads, self.head_dim = kv_heads, head_dim
        long = dict(dtype=torch.long, device=dev)
        self.tok = torch.zeros(B, **long)
        self.pos = torch.zeros(B, **long)
        self.n_gen = torch.zeros(B, **long)
        self.limit = torch.ones(B, **long)
        self.done = torch.ones(B, dtype=torch.bool, device=dev)
        self.out = torch.zeros(B, self.max_new, **long)
        self.eos = torch.tensor(self.eos_list, **long)
        self.positions = torch.arange(S, **long)
        self.graphs: dict[int, Any] = {}
        self.info: dict[str, Any] = {"method": "static", "batch_size": B, "cache_length": S,
                                     "cuda_graphs": self.use_graphs, "graph_sizes": [], "prefill_calls": 0,
                                     "decode_steps": 0, "slot_steps": 0, "capture_s": 0.0}

    # -- profiling (``info={"profile": True}``: synchronises, so only for benchmarks) -------------------
    def _clock(self) -> float:
        if self.profile and self.cuda:
            self.torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _account(self, key: str, mark: float) -> float:
        now = self._clock()
        if self.profile:
            self.info[key] = self.info.get(key, 0.0) + now - mark
        return now

    # -- sampling -----------------------------------------------------------------------------------
    def _pick(self, logits: Any) -> Any:
        if self.temperature <= 0:
            return logits.argmax(-1)
        # Gumbel-max: argmax(logits/T + G) with G = -log(-log U) is an exact sample of softmax(logits/T),
        # and unlike torch.multinomial it needs no host synchronisation (so it can live in a CUDA graph).
        uniform = self.torch.rand_like(logits).clamp_(min=1e-20)
        return (logits / self.temperature - self.torch.log(-self.torch.log(uniform))).argmax(-1)

    def _stops(self, tokens: Any) -> Any:
        return (tokens[:, None] == self.eos[None, :]).any(-1)

    # -- prefill ------------------------------------------------------------------------------------
    def _prefill(self, slots: list[int], questions: list[int]) -> None:
        # Chunks of at most ``prefill_tokens`` padded tokens bound the activation memory.
        start = 0
        while start < len(slots):
            longest = len(self.prompts[questions[start]])
            count = max(1, min(len(slots) - start, self.prefill_tokens // max(1, longest)))
            self._prefill_chunk(slots[start:start + count], questions[start:start + count])
            start += count

    def _prefill_chunk(self, slots: list[int], questions: list[int]) -> None:
        torch = self.torch
        lengths = [len(self.prompts[q]) for q in questions]
        # A multiple of 32 (within the cache): fewer distinct shapes for the kernels and the allocator.
        width = min(self.length, _round_up(max(lengths), 32))
        ids = torch.full((len(slots), width), self.pad_id, dtype=torch.long)
        for row, q in enumerate(questions):
            ids[row, :lengths[row]] = torch.tensor(self.prompts[q], dtype=torch.long)
        ids = ids.to(self.device)
        rows = torch.tensor(slots, dtype=torch.long, device=self.device)
        state = self.state
        state.mode, state.rows, state.calls = "prefill", rows, 0
        position_ids = torch.arange(width, device=self.device)[None, :].expand(len(slots), width)
        if self.info["prefill_calls"] == 0:
            # The first call probes the model: a forward patched to bypass the attention interface (Unsloth)
            # may fail on these inputs, or silently ignore the KV buffers; either way, fall back.
            try:
                hidden = self.decoder(input_ids=ids, position_ids=position_ids, use_cache=False)[0]
            except Exception as error:
                raise _Unsupported(f"{type(self.lm).__name__}'s forward failed in the static decoder "
                                   f"({type(error).__name__}: {error})") from error
        else:
            hidden = self.decoder(input_ids=ids, position_ids=position_ids, use_cache=False)[0]
        if state.calls != self.layers:
            raise _Unsupported(f"{type(self.lm).__name__}'s attention did not go through the attention "
                               f"interface ({state.calls} of {self.layers} layers); is it patched (Unsloth)?")
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.head(hidden[torch.arange(len(slots), device=self.device), last]).float()
        first = self._pick(logits)
        limits = torch.tensor([self.limits[q] for q in questions], dtype=torch.long, device=self.device)
        self.tok[rows] = first
        self.pos[rows] = last + 1
        self.n_gen[rows] = 1
        self.limit[rows] = limits
        self.out[rows, 0] = first
        self.done[rows] = self._stops(first) | (limits <= 1)
        self.info["prefill_calls"] += 1

    # -- decode -------------------------------------------------------------------------------------
    def _step(self, b: int) -> None:
        """One token for rows ``0..b-1``; all bookkeeping stays on the device (no host synchronisation)."""
        torch = self.torch
        pos, tok, done, n_gen = self.pos[:b], self.tok[:b], self.done[:b], self.n_gen[:b]
        state = self.state
        state.mode = "decode"
        state.index = pos.view(b, 1, 1, 1).expand(b, self.kv_heads, 1, self.head_dim)
        state.mask = (self.positions[None, :] <= pos[:, None]).view(b, 1, 1, self.length)
        hidden = self.decoder(input_ids=tok.view(b, 1), position_ids=pos.view(b, 1), use_cache=False)[0]
        nxt = self._pick(self.head(hidden[:, -1]).float())
        active = ~done
        column = n_gen.clamp(max=self.max_new - 1).view(b, 1)
        out = self.out[:b]
        out.scatter_(1, column, torch.where(active, nxt, out.gather(1, column).view(b)).view(b, 1))
        counted = n_gen + active.long()
        n_gen.copy_(counted)
        done.logical_or_(active & (self._stops(nxt) | (counted >= self.limit[:b])))
        tok.copy_(nxt)
        pos.copy_((pos + 1).clamp(max=self.length - 1))

    def _graph(self, b: int) -> Any:
        """The decode step for ``b`` rows as a CUDA graph (captured once per size); None when unavailable."""
        if not self.use_graphs:
            return None
        if b in self.graphs:
            return self.graphs[b]
        torch = self.torch
        started = time.perf_counter()
        saved = [t.clone() for t in (self.tok, self.pos, self.n_gen, self.done)]
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy initialisations must not happen during capture
                    self._step(b)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(b)
        except Exception as error:  # any capture failure: decode eagerly instead
            warnings.warn(f"CUDA graph capture failed ({type(error).__name__}: {error}); decoding eagerly",
                          stacklevel=2)
            self.use_graphs = False
            self.info["cuda_graphs"] = False
            graph = None
        finally:
            # Warm-up steps wrote at the rows' current positions; restoring the counters makes the next real
            # step overwrite exactly those cells.
            for tensor, copy in zip((self.tok, self.pos, self.n_gen, self.done), saved):
                tensor.copy_(copy)
        self.info["capture_s"] += time.perf_counter() - started
        if graph is not None:
            self.graphs[b] = graph
            self.info["graph_sizes"].append(b)
        return graph

    def _compact(self, active_rows: list[int], size: int) -> None:
        """Move the active rows to ``0..len-1`` so a smaller (faster) decode step serves the tail."""
        torch = self.torch
        index = torch.tensor(active_rows, dtype=torch.long, device=self.device)
        count = len(active_rows)
        for tensor in [*self.state.keys, *self.state.values, self.tok, self.pos, self.n_gen, self.limit,
                       self.done, self.out]:
            tensor[:count] = tensor[index]
        self.done[count:size] = True

    def run(self, progress: Any = None) -> list[list[int]]:
        global _ACTIVE_STATE
        torch = self.torch
        n = len(self.prompts)
        # Longest prompts first: similar lengths are prefilled together, and memory peaks early.
        queue = sorted(range(n), key=lambda q: -len(self.prompts[q]))
        queue.reverse()  # pop() from the end
        slot_question = [-1] * self.batch
        # Upper bound on the steps each slot still needs (its limit; a stop token may end it sooner).
        slot_left = [0] * self.batch
        results: list[list[int] | None] = [None] * n
        size = self.batch
        min_size = min(self.batch, 8) if self.cuda else 1
        refill_min = max(1, self.batch // 16) if self.cuda else 1
        previous = _ACTIVE_STATE
        _ACTIVE_STATE = self.state
        try:
            while True:
                free = [s for s in range(size) if slot_question[s] < 0]
                # Refill in groups (a prefill call has a fixed cost), but never leave the decoder idle.
                if queue and free and (len(free) >= refill_min or len(free) == size):
                    questions = [queue.pop() for _ in range(min(len(free), len(queue)))]
                    slots = free[:len(questions)]
                    for s, q in zip(slots, questions):
                        slot_question[s], slot_left[s] = q, self.limits[q] - 1
                    mark = self._clock()
                    self._prefill(slots, questions)
                    self._account("prefill_s", mark)
                active = [s for s in range(size) if slot_question[s] >= 0]
                if not active:
                    break
                # Once nothing is queued, shrink to the active rows whenever they fill half the slots or less:
                # sizes at least halve each time, so only a few CUDA graphs are ever captured.
                if not queue and len(active) <= size // 2 and size > min_size:
                    new_size = max(min_size, _round_up(len(active), 8) if self.cuda else len(active))
                    if new_size < size:
                        self._compact(active, size)
                        moved = [slot_question[s] for s in active]
                        slot_question = moved + [-1] * (self.batch - len(moved))
                        left = [slot_left[s] for s in active]
                        slot_left = left + [0] * (self.batch - len(left))
                        size = new_size
                graph = self._graph(size)
                # Check again after ``check_every`` steps, or as soon as some slot must have reached its limit.
                steps = max(1, min(self.check_every, min(slot_left[s] for s in active)))
                mark = self._clock()
                for _ in range(steps):
                    if graph is not None:
                        graph.replay()
                    else:
                        self._step(size)
                for s in active:
                    slot_left[s] -= steps
                self.info["decode_steps"] += steps
                self.info["slot_steps"] += steps * size
                done = self.done[:size].cpu().tolist()
                mark = self._account("decode_s", mark)
                finished = [s for s in range(size) if done[s] and slot_question[s] >= 0]
                if finished:
                    index = torch.tensor(finished, dtype=torch.long, device=self.device)
                    counts = self.n_gen[index].cpu().tolist()
                    tokens = self.out[index].cpu().tolist()
                    for s, count, row in zip(finished, counts, tokens):
                        q = slot_question[s]
                        results[q] = _trim(row[:count], self.eos_list, self.limits[q])
                        slot_question[s] = -1
                    if progress is not None:
                        progress.update(len(finished))
                self._account("host_s", mark)
        finally:
            _ACTIVE_STATE = previous
        return [r if r is not None else [] for r in results]


@contextlib.contextmanager
def _attention_implementation(model: Any, name: str):
    config = _causal_lm(model).config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def _eval_mode(model: Any):
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


@contextlib.contextmanager
def _cpu_threads(model: Any):
    """One CPU thread for small models (under 200M parameters: smoke runs, SmolLM2-135M): their operations are
    so small that synchronising threads costs more than the work; on a busy 2-core machine, 2 threads made
    SmolLM2's decoding 12 times slower than 1 (115 s against 9.6 s)."""
    import torch

    parameter = next(model.parameters())
    tiny = parameter.device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 200_000_000
    previous = torch.get_num_threads()
    if tiny:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if tiny:
            torch.set_num_threads(previous)


@contextlib.contextmanager
def _seeded(seed: int, device: Any):
    import torch

    devices = [device] if getattr(device, "type", None) == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _generate_static(model: Any, prompts: list[list[int]], limits: list[int], eos: list[int], pad_id: int,
                     temperature: float, seed: int, batch_size: int, progress: Any, use_cuda_graphs: bool,
                     check_every: int | None, prefill_tokens: int, info: dict[str, Any]) -> list[list[int]]:
    import torch

    _register_attention()
    decoder = _StaticDecoder(model, prompts, limits, eos, pad_id, temperature, batch_size, use_cuda_graphs,
                             check_every, prefill_tokens, profile=bool(info.get("profile")))
    try:
        with _attention_implementation(model, _ATTENTION_NAME), _eval_mode(model), torch.inference_mode(), \
                _seeded(seed, decoder.device):
            return decoder.run(progress)
    finally:
        info.update(decoder.info)


def _generate_with_generate(model: Any, prompts: list[list[int]], limits: list[int], eos: list[int],
                            pad_id: int, temperature: float, seed: int, batch_size: int, progress: Any,
                            info: dict[str, Any]) -> list[list[int]]:
    """Batched ``model.generate``: prompts sorted by length, left padding, stop at EOS."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda q: -len(prompts[q]))
    results: list[list[int]] = [[] for _ in prompts]
    info.update({"method": "generate", "batch_size": batch_size, "cuda_graphs": False})
    with _eval_mode(model), torch.inference_mode(), _seeded(seed, device):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(prompts[q]) for q in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, q in enumerate(batch):
                ids[row, width - len(prompts[q]):] = torch.tensor(prompts[q], dtype=torch.long)
                mask[row, width - len(prompts[q]):] = 1
            max_new = max(limits[q] for q in batch)
            # Every knob explicit and use_model_defaults=False: Qwen's generation_config.json would otherwise
            # bring in repetition_penalty=1.05, top_k=20, top_p=0.8 and change what "greedy" means.
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
                if temperature > 0 else {"do_sample": False}
            config = GenerationConfig(
                max_new_tokens=max_new, repetition_penalty=1.0, num_beams=1, pad_token_id=pad_id,
                eos_token_id=list(eos) if eos else None, min_new_tokens=0 if eos else max_new, **sampling,
            )
            output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    generation_config=config, use_model_defaults=False)
            for row, q in enumerate(batch):
                results[q] = _trim(output[row, width:].tolist(), eos, limits[q])
            if progress is not None:
                progress.update(len(batch))
    return results


def generate_token_ids(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 512,
                       *, eos_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None,
                       temperature: float = 0.0, seed: int = 0, batch_size: int | None = None,
                       method: str = "auto", use_cuda_graphs: bool = True, check_every: int | None = None,
                       prefill_tokens: int = 32_768, progress: bool = False, desc: str = "Generating",
                       info: dict[str, Any] | None = None) -> list[list[int]]:
    """Generate completions for tokenized prompts with a transformers model; returns the new token ids.

    Each result holds the tokens up to and including the first stop token (``eos_token_ids``; default: the
    model's generation-config and tokenizer EOS ids; ``[]``: never stop early), at most that prompt's
    ``max_new_tokens`` (an int, or one per prompt). Greedy when ``temperature == 0``, else sampled from
    ``softmax(logits / temperature)`` with nothing else (no top-k/top-p/repetition penalty).

    ``method``: ``"static"`` (this module's decoder: ``batch_size`` slots of a fixed-shape KV cache, each
    finished slot refilled with the next prompt, longest prompts first; the decode step is a CUDA graph on
    GPUs; the tail of the run is compacted into fewer slots), ``"generate"`` (batched ``model.generate``),
    or ``"auto"`` (static, falling back to generate when the model's attention is not transformers'
    standard interface, e.g. patched by Unsloth). ``info`` (a dict) receives what ran.
    """
    if method not in ("auto", "static", "generate"):
        raise ValueError(f"method must be 'auto', 'static' or 'generate', got {method!r}")
    prompts = [list(p) for p in prompts]
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    limits = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else [int(m) for m in
                                                                                            max_new_tokens]
    if len(limits) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(limits)} entries but there are {len(prompts)} prompts")
    if any(m < 1 for m in limits):
        raise ValueError("max_new_tokens must be at least 1 for every prompt")
    eos = _eos_ids(model) if eos_token_ids is None else [int(e) for e in eos_token_ids]
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    total = max(len(p) + m for p, m in zip(prompts, limits))
    if batch_size is None:
        batch_size = default_batch_size(model, len(prompts), total)
    info = {} if info is None else info
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="question")
    with _cpu_threads(model):
        return _generate(model, prompts, limits, eos, pad_token_id, temperature, seed, batch_size, method, bar,
                         use_cuda_graphs, check_every, prefill_tokens, info)


def _generate(model: Any, prompts: list[list[int]], limits: list[int], eos: list[int], pad_token_id: int,
              temperature: float, seed: int, batch_size: int, method: str, bar: Any, use_cuda_graphs: bool,
              check_every: int | None, prefill_tokens: int, info: dict[str, Any]) -> list[list[int]]:
    try:
        if method in ("auto", "static"):
            try:
                return _generate_static(model, prompts, limits, eos, pad_token_id, temperature, seed,
                                        batch_size, bar, use_cuda_graphs, check_every, prefill_tokens, info)
            except _Unsupported as reason:
                if method == "static":
                    raise ValueError(f"the static decoder cannot run this model: {reason}") from None
                info["fallback_reason"] = str(reason)
                print(f"Static decoder unavailable ({reason}); using model.generate", flush=True)
                if bar is not None:
                    bar.reset()
        return _generate_with_generate(model, prompts, limits, eos, pad_token_id, temperature, seed,
                                       batch_size, bar, info)
    finally:
        if bar is not None:
            bar.close()


# ==================================================================================================
# Generation: vLLM and Unsloth
# ==================================================================================================

def _sampling_params(limits: list[int], eos: list[int], temperature: float, seed: int) -> list[Any]:
    from vllm import SamplingParams

    return [SamplingParams(n=1, temperature=temperature, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                           max_tokens=m, stop_token_ids=list(eos), seed=seed + i if temperature > 0 else None,
                           detokenize=False)
            for i, m in enumerate(limits)]


def _vllm_outputs(outputs: Sequence[Any], eos: list[int], limits: list[int]) -> list[list[int]]:
    return [_trim(list(o.outputs[0].token_ids), eos, m) for o, m in zip(outputs, limits)]


def _lora_rank(adapter_dir: Path | None) -> int:
    if adapter_dir is None:
        return 16
    rank = int(json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 16))
    return next(size for size in (8, 16, 32, 64, 128, 256, 512) if size >= rank)


def _generate_vllm(config: EvalConfig, prompts: list[list[int]], limits: list[int], eos: list[int],
                   adapter_dir: Path | None, info: dict[str, Any]) -> list[list[int]]:
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    total = max(len(p) + m for p, m in zip(prompts, limits))
    llm = LLM(model=config.model, dtype=config.dtype or "auto", seed=config.seed,
              enable_lora=adapter_dir is not None, max_lora_rank=_lora_rank(adapter_dir),
              max_model_len=_round_up(total, 64), gpu_memory_utilization=config.gpu_memory_utilization)
    request = LoRARequest("adapter", 1, str(adapter_dir)) if adapter_dir is not None else None
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           _sampling_params(limits, eos, config.temperature, config.seed),
                           lora_request=request, use_tqdm=config.progress)
    info.update({"method": "vllm.LLM"})
    return _vllm_outputs(outputs, eos, limits)


def _generate_unsloth(config: EvalConfig, model: Any, prompts: list[list[int]], limits: list[int],
                      eos: list[int], adapter_dir: Path | None, info: dict[str, Any]) -> list[list[int]]:
    """Unsloth's ``fast_generate`` (its vLLM engine). Its LoRA weights reach vLLM only through a LoRA request:
    the adapter folder, or (a trained PEFT model without one) the model's adapter saved to a temporary folder."""
    import tempfile

    temporary = None
    if adapter_dir is None and hasattr(model, "peft_config"):
        temporary = tempfile.TemporaryDirectory(prefix="eval-lora-")
        saver = getattr(model, "save_lora", None) or model.save_pretrained
        saver(temporary.name)
        adapter_dir = Path(temporary.name)
    try:
        request = None
        if adapter_dir is not None:
            loader = getattr(model, "load_lora", None)
            if loader is not None:
                request = loader(str(adapter_dir))
            else:
                from vllm.lora.request import LoRARequest

                request = LoRARequest("adapter", 1, str(adapter_dir))
        outputs = model.fast_generate([{"prompt_token_ids": p} for p in prompts],
                                      sampling_params=_sampling_params(limits, eos, config.temperature, config.seed),
                                      lora_request=request, use_tqdm=config.progress)
    finally:
        if temporary is not None:
            temporary.cleanup()
    info.update({"method": "unsloth.fast_generate"})
    return _vllm_outputs(outputs, eos, limits)


# ==================================================================================================
# Models, tokenizers and adapters
# ==================================================================================================

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _local_path(text: str) -> Path:
    """Where ``text`` is on this machine: its mounted Google Drive path (``runtime.drive_path``), else itself."""
    try:
        drive = runtime.drive_path(text)
    except runtime.ConfigError as error:
        raise AdapterError(f"adapter {error}") from None
    return drive or Path(text).expanduser()


def resolve_adapter(adapter: str | os.PathLike, base_model: str = runtime.MODEL_ID) -> tuple[Path, bool]:
    """(local folder of the adapter, whether it is the user's own folder rather than a Hub download).

    Accepts a local folder, a Google Drive folder (mounted on demand in Colab) or a Hub repo id. Raises
    ``AdapterError`` / ``FileNotFoundError`` naming the adapter and the base model it was expected to fit.
    """
    text = str(adapter)
    path = _local_path(text)
    local = True
    if not path.exists():
        if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
            try:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(repo_id=text))
                local = False
            except Exception as error:  # offline, unknown repo, no access: all say the same
                raise AdapterError(
                    f"LoRA adapter {text!r} (for base model {base_model!r}) is neither a local folder nor a "
                    f"Hub repo that could be downloaded: {type(error).__name__}: {error}") from None
        else:
            raise FileNotFoundError(f"LoRA adapter folder {text!r} does not exist "
                                    f"(expected an adapter for base model {base_model!r})")
    if not path.is_dir() or not (path / "adapter_config.json").exists():
        checkpoints = sorted(p.name for p in path.glob("checkpoint-*")) if path.is_dir() else []
        hint = f"; it holds {', '.join(checkpoints[-3:])} (pass one of those)" if checkpoints else ""
        raise AdapterError(f"{str(path)!r} has no adapter_config.json: not a LoRA adapter folder "
                           f"(expected an adapter for base model {base_model!r}){hint}")
    return path, local


def _normalise_model_name(name: str | None) -> str:
    name = (name or "").rstrip("/").split("/")[-1].lower()
    for suffix in ("-unsloth-bnb-4bit", "-bnb-4bit", "-unsloth"):
        name = name.removesuffix(suffix)
    return name


def attach_adapter(model: Any, adapter_dir: str | os.PathLike, base_model: str = runtime.MODEL_ID,
                   merge: bool = True) -> Any:
    """``model`` with the LoRA adapter of ``adapter_dir`` loaded (merged into the weights when ``merge``).

    An adapter that does not fit (other architecture or size, missing weights) raises ``AdapterError``
    naming the folder and ``base_model``; an adapter saved for a differently named base model is a warning.
    """
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    expected = f"LoRA adapter {str(adapter_dir)!r} does not fit base model {base_model!r}"
    try:
        peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as error:
        raise AdapterError(f"{expected}: its adapter_config.json cannot be read ({error})") from None
    trained_on = getattr(peft_config, "base_model_name_or_path", None)
    if trained_on and base_model != runtime.TINY_MODEL and \
            _normalise_model_name(trained_on) != _normalise_model_name(base_model):
        warnings.warn(f"adapter {str(adapter_dir)!r} was saved for base model {trained_on!r}, evaluating it on "
                      f"{base_model!r}", stacklevel=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        except Exception as error:  # size mismatch, missing target modules, ...
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            detail = " ".join(lines[:2])[:400] if lines else type(error).__name__
            trained = f"the adapter says it was trained on {trained_on!r}" if trained_on else \
                "the adapter does not name its base model"
            raise AdapterError(f"{expected} ({trained}): {detail}") from None
    for warning in caught:
        if "missing adapter keys" in str(warning.message):
            raise AdapterError(f"{expected}: {warning.message}")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return peft_model.merge_and_unload() if merge else peft_model


def load_tokenizer(config: EvalConfig, adapter_dir: Path | None = None) -> Any:
    """The tokenizer for ``config``: ``config.tokenizer``, else the adapter's own (saved by training, so
    its chat template is the one trained with), else the GGUF file's, else ``runtime.load_tokenizer``."""
    if config.tokenizer is not None:
        return runtime.load_tokenizer(config.tokenizer, model_name=config.model)
    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").exists():
        return runtime.load_tokenizer(adapter_dir, model_name=config.model)
    if str(config.model).endswith(".gguf"):
        from transformers import AutoTokenizer

        path = Path(config.model).expanduser()
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    local = Path(str(config.model)).expanduser()
    if local.is_dir() and (local / "tokenizer_config.json").exists():
        return runtime.load_tokenizer(local, model_name=config.model)
    return runtime.load_tokenizer(model_name=config.model)


def load_model(config: EvalConfig, tokenizer: Any, adapter_dir: Path | None = None) -> Any:
    """The transformers model of ``config`` on the GPU when there is one, adapter merged, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = runtime.torch_dtype(config.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.model == runtime.TINY_MODEL:
        model = runtime.build_tiny_qwen2(tokenizer, seed=0)
    elif str(config.model).endswith(".gguf"):
        path = Path(config.model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device=device, dtype=dtype)
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir, config.model)
    return model.eval()


# ==================================================================================================
# Evaluate
# ==================================================================================================

def _model_dtype(model: Any) -> str | None:
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except (AttributeError, StopIteration, TypeError):
        return None


def _model_eos_ids(config: EvalConfig, tokenizer: Any) -> list[int]:
    """Stop tokens for a model not loaded here (vLLM): its generation_config.json's and the tokenizer's."""
    from transformers import GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(config.model)
    except Exception:  # no generation_config.json: the tokenizer's EOS alone
        generation_config = None
    holder = type("Holder", (), {"generation_config": generation_config})()
    return _eos_ids(holder, tokenizer)


def _pick_backend(config: EvalConfig, model: Any) -> tuple[str, str]:
    """(backend, reason) for ``config.backend == "auto"``; explicit choices are checked here too."""
    import importlib.util

    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    if config.backend == "auto":
        if model is not None and hasattr(model, "fast_generate"):
            return "unsloth", "the model passed in is an Unsloth model with fast_generate"
        if model is not None:
            return "hf", "a transformers model was passed in"
        if config.model == runtime.TINY_MODEL or str(config.model).endswith(".gguf"):
            return "hf", "vLLM cannot load this model"
        if has_vllm and torch.cuda.is_available():
            return "vllm", "vLLM is installed and a GPU is present"
        return "hf", "vLLM is not installed" if not has_vllm else "no GPU for vLLM"
    if config.backend == "vllm":
        if model is not None:
            raise runtime.ConfigError("backend='vllm' loads its own model; pass no model (or use backend='hf')")
        if not has_vllm:
            raise runtime.ConfigError("backend='vllm' needs the vllm package (pip install vllm)")
        if config.model == runtime.TINY_MODEL:
            raise runtime.ConfigError("backend='vllm' cannot run runtime.TINY_MODEL; use backend='hf'")
    if config.backend == "unsloth" and model is not None and not hasattr(model, "fast_generate"):
        raise runtime.ConfigError("backend='unsloth' needs an Unsloth model loaded with fast_inference=True "
                         "(it has no fast_generate); use backend='hf'")
    return config.backend, "requested"


def _load_unsloth(config: EvalConfig, adapter_dir: Path | None, total: int) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel  # type: ignore[import-not-found]

    return FastLanguageModel.from_pretrained(
        model_name=config.model, max_seq_length=_round_up(total, 64), load_in_4bit=config.load_in_4bit,
        fast_inference=True, max_lora_rank=_lora_rank(adapter_dir),
        gpu_memory_utilization=config.gpu_memory_utilization)


def _default_output_dir(config: EvalConfig, adapter_dir: Path | None, adapter_is_local: bool) -> Path:
    if config.output_dir is not None:
        return Path(config.output_dir).expanduser()
    if adapter_dir is not None and adapter_is_local:
        return adapter_dir
    name = config.adapter if config.adapter is not None else config.model
    return Path("outputs") / f"eval-{metrics.slug(Path(str(name)).name)}"


def _settings(config: EvalConfig, adapter_dir: Path | None, adapter_is_local: bool, n_test: int) -> dict[str, Any]:
    """What determines the results (not how fast they were made): results are reused only when equal.

    A model passed to ``evaluate`` is identified by ``config.model`` and ``config.adapter`` like one loaded
    from them, so the evaluation made at the end of training is reused by a later one of the saved adapter.
    """
    if config.adapter is None or adapter_dir is None:
        adapter = None
    else:
        # The weights' fingerprint, not the path: results travel with their adapter (e.g. Drive → local), and
        # two runs' folders both called "adapter" are still told apart.
        adapter = _adapter_fingerprint(adapter_dir) or (adapter_dir.name if adapter_is_local else str(config.adapter))
    return {
        "model": str(config.model), "adapter": adapter,
        "max_new_tokens": config.max_new_tokens, "temperature": float(config.temperature),
        "limit": config.limit, "shuffle": config.shuffle,
        "seed": config.seed if (config.shuffle or config.temperature > 0) else None,
        "budget": config.budget, "budget_mode": config.budget_mode if config.budget else None,
        "system_prompt": data.SYSTEM_PROMPT, "test_questions": n_test,
    }


def _adapter_fingerprint(adapter_dir: Path) -> str | None:
    """``sha256:<16 hex>`` of the adapter's weights file; None when there is none."""
    import hashlib

    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = adapter_dir / name
        if path.exists():
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return f"sha256:{digest.hexdigest()[:16]}"
    return None


def _select(n_test: int, config: EvalConfig) -> list[int]:
    indices = list(range(n_test))
    if config.shuffle:
        random.Random(config.seed).shuffle(indices)
    if config.limit is not None:
        indices = sorted(indices[:config.limit])
    return indices


def _budgets(config: EvalConfig, dataset: Any, tokenizer: Any) -> list[int]:
    import budgets  # a colleague's module; imported only when a budget is asked for

    values = budgets.compute_budgets(config.budget, dataset, tokenizer, gsm8k_dir=config.gsm8k_dir)
    if len(values) != len(dataset):
        raise ValueError(f"budgets.compute_budgets returned {len(values)} budgets for {len(dataset)} questions")
    return [max(1, int(v)) for v in values]


def smoke_config(config: EvalConfig) -> EvalConfig:
    """``config`` for the CPU smoke mode: the tiny random Qwen2 (unless an adapter names its own base model, as a
    smoke training run's does), at most ``runtime.SMOKE_QUESTIONS`` questions and ``runtime.SMOKE_NEW_TOKENS``
    new tokens. Idempotent."""
    return dataclasses.replace(
        config,
        model=runtime.TINY_MODEL if config.adapter is None else config.model,
        limit=min(config.limit or runtime.SMOKE_QUESTIONS, runtime.SMOKE_QUESTIONS),
        max_new_tokens=min(config.max_new_tokens, runtime.SMOKE_NEW_TOKENS),
        smoke=True,
    )


def resolve_config(config: EvalConfig | None) -> EvalConfig:
    """The configuration ``evaluate`` runs: the smoke configuration when asked or when ``runtime.smoke_mode()``."""
    config = config or EvalConfig()
    smoke = runtime.wants_smoke(config.smoke)
    if smoke and config.smoke is not True:
        print(f"Smoke mode: {runtime.SMOKE_QUESTIONS} questions, {runtime.SMOKE_NEW_TOKENS} new tokens"
              + (", tiny random Qwen2" if config.adapter is None else ""), flush=True)
    return smoke_config(config) if smoke else config


def evaluate(config: EvalConfig | None = None, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Evaluate on the GSM8K test split; write ``eval_results.jsonl`` and ``eval_summary.json``; return the
    summary (see ``print_summary``).

    With ``model`` (e.g. right after training: a transformers/PEFT model, or an Unsloth model with
    ``fast_generate``), that model is evaluated as it is; ``config.adapter`` then only names where its adapter
    lives (output folder; Unsloth's LoRA request). Without a model and without a GPU (or with
    ``LENGTHRL_SMOKE=1``) the smoke preset runs (``resolve_config``). Results already on disk with the same settings are
    returned without generating again, unless ``config.redo``.
    """
    started = time.perf_counter()
    # A model passed in is evaluated as configured by its caller; otherwise no GPU means the smoke preset.
    config = resolve_config(config) if model is None else (config or EvalConfig())
    adapter_dir, adapter_is_local = (None, False)
    if config.adapter is not None:
        adapter_dir, adapter_is_local = resolve_adapter(config.adapter, config.model)
    full = data.load_gsm8k("test", config.gsm8k_dir)
    settings = _settings(config, adapter_dir, adapter_is_local, len(full))
    model_passed_in = model is not None
    output_dir = _default_output_dir(config, adapter_dir, adapter_is_local)
    results_path, summary_path = metrics.result_paths(output_dir, config.budget, config.budget_mode)
    if not config.redo and results_path.exists() and summary_path.exists():
        existing = json.loads(summary_path.read_text(encoding="utf-8"))
        if existing.get("settings") == settings:
            print(f"Found results with the same settings in {summary_path} (EvalConfig(redo=True) runs again)",
                  flush=True)
            return existing
        changed = sorted(k for k in set(settings) | set(existing.get("settings", {}))
                         if settings.get(k) != existing.get("settings", {}).get(k))
        print(f"Results in {summary_path} were made with other settings ({', '.join(changed)}); running again",
              flush=True)

    if tokenizer is None:
        tokenizer = load_tokenizer(config, adapter_dir)
    indices = _select(len(full), config)
    # Length columns for the evaluated questions only (a smoke run tokenizes 8, not 1319); budgets.py computes
    # what it needs for the whole split itself.
    subset = data.add_length_columns(full.select(indices), tokenizer)
    budgets_all = _budgets(config, full, tokenizer) if config.budget else None
    question_budgets = [budgets_all[i] for i in indices] if budgets_all else [None] * len(indices)
    limit_mode = config.budget is not None and config.budget_mode in ("limit", "both")
    prompt_mode = config.budget is not None and config.budget_mode in ("prompt", "both")
    limits = [min(b, config.max_new_tokens) if limit_mode else config.max_new_tokens for b in question_budgets]
    texts = [data.render_prompt(tokenizer, data.prompt_messages(q, budget=b if prompt_mode else None))
             for q, b in zip(subset["question"], question_budgets)]
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]

    backend, reason = _pick_backend(config, model)
    print(f"Backend: {backend} ({reason}); {len(indices)} questions, "
          f"{'greedy' if config.temperature == 0 else f'temperature {config.temperature}'}, "
          f"at most {config.max_new_tokens} new tokens", flush=True)
    info: dict[str, Any] = {}
    total = max(len(p) + m for p, m in zip(prompts, limits))
    generation_started = time.perf_counter()
    if backend == "vllm":
        eos = _model_eos_ids(config, tokenizer)
        completions = _generate_vllm(config, prompts, limits, eos, adapter_dir, info)
    elif backend == "unsloth":
        if model is None:
            model, _ = _load_unsloth(config, adapter_dir, total)
        eos = _eos_ids(model, tokenizer)
        completions = _generate_unsloth(config, model, prompts, limits, eos, adapter_dir, info)
    else:
        if model is None:
            model = load_model(config, tokenizer, adapter_dir)
        eos = _eos_ids(model, tokenizer)
        completions = generate_token_ids(
            model, prompts, limits, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id,
            temperature=config.temperature, seed=config.seed, batch_size=config.batch_size,
            method="generate" if backend == "hf-generate" else "auto", progress=config.progress,
            desc="GSM8K test", info=info)
    generation_s = time.perf_counter() - generation_started

    decoded = tokenizer.batch_decode(completions, skip_special_tokens=True)
    eos_set = set(eos)
    records = []
    for row, index, ids, text, limit, budget in zip(subset, indices, completions, decoded, limits,
                                                    question_budgets):
        record = {"index": index, "question": row["question"], "gold": row["gold"], "completion": text,
                  **metrics.score_completion(text, row["gold"]), "length": len(ids), "limit": limit,
                  "finish": "stop" if ids and ids[-1] in eos_set else "length",
                  "out_of_limit": rewards.is_out_of_limit(len(ids), limit), "steps": row["steps"],
                  "reference_length": row["reference_length"]}
        if config.budget is not None:
            record["budget"] = budget
        records.append(record)
    scores = metrics.compute_metrics(records)
    generated = scores["generated_tokens"]
    summary = {
        "model": str(config.model), "adapter": config.adapter,
        "adapter_path": str(adapter_dir) if adapter_dir is not None else None,
        "model_passed_in": model_passed_in, "backend": backend, "backend_reason": reason,
        "generation_info": info,
        "metrics": scores,
        "generation": {"decoding": "greedy" if config.temperature == 0 else "sampling",
                       "temperature": config.temperature, "max_new_tokens": config.max_new_tokens,
                       "batch_size": info.get("batch_size", config.batch_size),
                       "dtype": _model_dtype(model) or config.dtype,
                       "budget": config.budget, "budget_mode": config.budget_mode if config.budget else None,
                       "stop_token_ids": eos, "system_prompt": data.SYSTEM_PROMPT,
                       "chat_template": "tokenizer's (data.render_prompt)"},
        "settings": settings, "limit": config.limit, "shuffle": config.shuffle, "seed": config.seed,
        "versions": runtime.library_versions(), "git_commit": runtime.git_commit(), "device": runtime.device_name(),
        "timing": {"wall_s": None, "generation_s": generation_s, "generated_tokens": generated,
                   "tokens_per_s": generated / generation_s if generation_s > 0 else None},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {"results": str(results_path), "summary": str(summary_path)},
    }
    metrics.save_records(records, results_path)
    summary["timing"]["wall_s"] = time.perf_counter() - started
    metrics.save_summary(summary, summary_path)
    print(f"Wrote {results_path} and {summary_path.name}", flush=True)
    return summary


def _saved_run_config(adapter_dir: Path) -> dict[str, Any]:
    """The training configuration saved beside an adapter (``run_config.json``'s ``config``); {} without one."""
    path = adapter_dir / "run_config.json"
    return json.loads(path.read_text(encoding="utf-8")).get("config", {}) if path.is_file() else {}


def evaluate_run(run: str | os.PathLike | None = None, method: str | None = None, save_to_drive: bool = False,
                 model: Any = None, tokenizer: Any = None, compare: bool = True, **settings: Any) -> dict[str, Any]:
    """Evaluate the adapter a training run saved (the Eval notebooks, the end of training, the CLI), print the
    summary, then compare it with the baseline run.

    ``run``: a run folder (one holding ``adapter/``; results go to its ``eval/``), an adapter folder (local or
    Google Drive; results beside it) or a Hub repo id. None: the run folder of ``method``
    (``runtime.run_dir(method, save_to_drive, smoke)``, the smoke folder in smoke mode). The base model, tokenizer,
    GSM8K folder and token limit come from the adapter's ``run_config.json`` when there is one; ``settings`` are
    further ``EvalConfig`` fields (``limit``, ``backend``, ``redo``, ``budget``, ...; None leaves a field as the run
    has it). ``model``/``tokenizer``: the trained model still in memory, evaluated as it is (``evaluate``).

    With ``compare``, for a run folder of a method other than the baseline, when the baseline run beside it
    (``runtime.run_folder("baseline")``) has results under the same budget, the paired comparison is printed and
    returned under ``"baseline_comparison"``.
    """
    smoke = runtime.smoke_mode()
    if run is None:
        if method is None:
            raise runtime.ConfigError("evaluate_run needs a run folder, an adapter or a method")
        run_dir: Path | None = runtime.run_dir(method, save_to_drive, smoke)
        if not (run_dir / "adapter" / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no trained adapter in {run_dir / 'adapter'}: run the {run_dir.name} training "
                                    "notebook first, or give the adapter's folder or Hub repo id")
    else:
        path = _local_path(str(run))
        run_dir = path if (path / "adapter" / "adapter_config.json").is_file() else None
    adapter_dir = run_dir / "adapter" if run_dir is not None else _local_path(str(run))
    saved = _saved_run_config(adapter_dir)
    method = method or saved.get("method")
    values: dict[str, Any] = {
        "model": saved.get("model", runtime.TINY_MODEL if smoke else runtime.MODEL_ID),
        "adapter": str(adapter_dir) if run_dir is not None else str(run),
        "output_dir": str(run_dir / "eval") if run_dir is not None else None,
        # A smoke run is evaluated on the smoke number of questions, also when its model is passed in.
        "limit": runtime.SMOKE_QUESTIONS if saved.get("smoke") else None,
    }
    for name, key in (("max_new_tokens", "max_completion_length"), ("gsm8k_dir", "gsm8k_dir"),
                      ("tokenizer", "tokenizer")):
        if saved.get(key) is not None:
            values[name] = saved[key]
    values.update({name: value for name, value in settings.items() if value is not None})
    config = EvalConfig(**values)
    summary = evaluate(config, model=model, tokenizer=tokenizer if model is not None else None)
    print_summary(summary)
    if compare and run_dir is not None and method not in (None, "baseline"):
        baseline_dir = run_dir.parent / runtime.run_folder("baseline", smoke=bool(saved.get("smoke", smoke)))
        baseline_results = metrics.result_paths(baseline_dir / "eval", config.budget, config.budget_mode)[0]
        if baseline_results.is_file():
            comparison = metrics.compare_runs(baseline_results, summary["files"]["results"],
                                              labels=("baseline", method))
            print_comparison(comparison)
            summary = {**summary, "baseline_comparison": comparison}
    return summary


# ==================================================================================================
# Reporting
# ==================================================================================================

def print_summary(summary: Mapping[str, Any], file: Any = None) -> None:
    """Print a summary the way the study reports results ("Accuracy: 9.55% (126 of 1319)" ...)."""
    out = file or sys.stdout
    m = summary["metrics"]
    generation = summary.get("generation", {})
    what = str(summary.get("model"))
    if summary.get("adapter"):
        what += f" + adapter {summary['adapter']}"
    decoding = generation.get("decoding", "greedy")
    if decoding != "greedy":
        decoding = f"temperature {generation.get('temperature')}"
    budget = f", budget {generation['budget']} ({generation['budget_mode']})" if generation.get("budget") else ""
    lines = [f"GSM8K test: {what} (backend {summary.get('backend')}, {decoding}, "
             f"at most {generation.get('max_new_tokens')} new tokens{budget})"]

    def with_ci(name: str, metric: Mapping[str, Any]) -> str:
        return (f"{metrics.format_count(name, metric)}, 95% CI {metrics.format_percent(metric['ci_low'])} to "
                f"{metrics.format_percent(metric['ci_high'])}")

    lines.append(with_ci("Accuracy", m["accuracy"]))
    lines.append(with_ci("Format accuracy", m["format_accuracy"]))
    lines.append(with_ci("Lenient accuracy (diagnostic: last number anywhere)", m["lenient_accuracy"]))
    length = m["mean_length"]
    lines.append(f"Mean response length: {length['value']:.1f} tokens, 95% CI {length['ci_low']:.1f} to "
                 f"{length['ci_high']:.1f}")
    percentiles = " · ".join(f"{k} {v:g}" for k, v in m["length_percentiles"].items())
    lines.append(f"Length percentiles: {percentiles}")
    lines.append(with_ci(f"Out-of-limit rate (within {metrics.OUT_OF_LIMIT_MARGIN} tokens of the limit)",
                         m["out_of_limit_rate"]))
    efficiency = m.get("model_efficiency")
    lines.append("Model efficiency: " + (f"{efficiency:.3f} (reference tokens / response tokens over the "
                                         f"{m['accuracy']['count']} correct answers)"
                                         if efficiency is not None else "n/a (no correct answer)"))
    lines.append(f"{'steps':>7} {'n':>6} {'accuracy':>18} {'mean length':>12}")
    for row in m["by_steps"]:
        accuracy = f"{metrics.format_percent(row['accuracy'])} ({row['correct']})"
        lines.append(f"{row['steps']:>7} {row['n']:>6} {accuracy:>18} {row['mean_length']:>12.1f}")
    timing = summary.get("timing") or {}
    if timing.get("generation_s"):
        rate = timing.get("tokens_per_s") or 0
        lines.append(f"Generated {timing['generated_tokens']:,} tokens in {timing['generation_s']:.1f} s "
                     f"({rate:,.0f} tokens/s); total {timing.get('wall_s') or 0:.1f} s")
    files = summary.get("files") or {}
    if files.get("results"):
        lines.append(f"Per-question results: {files['results']}")
    print("\n".join(lines), file=out, flush=True)


def print_comparison(result: Mapping[str, Any], file: Any = None) -> None:
    """Print ``compare_runs``'s result."""
    out = file or sys.stdout
    name_a, name_b = result["labels"]
    accuracy, length, test = result["accuracy_diff"], result["length_diff"], result["mcnemar"]
    level = f"{100 * result.get('confidence', metrics.CONFIDENCE):g}%"
    percent = metrics.format_percent
    lines = [f"{name_b} vs {name_a} on {result['n']} paired questions"]
    if result["only_in_a"] or result["only_in_b"]:
        lines[0] += f" ({result['only_in_a']} only in {name_a}, {result['only_in_b']} only in {name_b}, left out)"
    lines.append(f"Accuracy: {name_a} {percent(result['accuracy_a'])} ({result['correct_a']} of {result['n']}), "
                 f"{name_b} {percent(result['accuracy_b'])} ({result['correct_b']} of {result['n']}); "
                 f"difference {100 * accuracy['estimate']:+.2f} points, {level} CI "
                 f"{100 * accuracy['ci_low']:+.2f} to {100 * accuracy['ci_high']:+.2f} (paired bootstrap)")
    lines.append(f"McNemar exact test: {test['a_only']} right only in {name_a}, {test['b_only']} right only in "
                 f"{name_b}; p = {test['p_value']:.4g}")
    lines.append(f"Mean length: {name_a} {result['mean_length_a']:.1f}, {name_b} {result['mean_length_b']:.1f} "
                 f"tokens; difference {length['estimate']:+.1f}, {level} CI {length['ci_low']:+.1f} to "
                 f"{length['ci_high']:+.1f}")
    print("\n".join(lines), file=out, flush=True)


def plot_length_histogram(records: Any, path: str | os.PathLike | None = None, title: str | None = None,
                          bins: int = 40) -> Any:
    """Histogram of response lengths, correct and incorrect stacked, with the token limit marked.

    ``records``: a run's records or results path, an ``evaluate`` summary (the PNG is then saved beside its
    results as ``length_histogram.png`` unless ``path`` says otherwise), or a mapping ``{label: records or path}``
    to overlay several runs. Returns the matplotlib ``Figure`` (displayed by notebooks); saves a PNG when ``path``.
    """
    from matplotlib.figure import Figure

    if isinstance(records, Mapping) and "files" in records:  # an evaluate() summary
        results = Path(records["files"]["results"])
        path = path if path is not None else results.with_name(
            results.name.replace(metrics.RESULTS_FILE.split(".")[0], "length_histogram").replace(".jsonl", ".png"))
        records = results

    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    if isinstance(records, Mapping):
        runs = {label: metrics.run_records(value) for label, value in records.items()}
        largest = max((max(int(r["length"]) for r in run) for run in runs.values() if run), default=1)
        edges = [largest * i / bins for i in range(bins + 1)]
        for label, run in runs.items():
            mean = sum(int(r["length"]) for r in run) / max(1, len(run))
            axes.hist([int(r["length"]) for r in run], bins=edges, histtype="step", linewidth=1.5,
                      label=f"{label} (mean {mean:.0f})")
        limits = [int(r.get("limit", 0)) for run in runs.values() for r in run]
    else:
        run = metrics.run_records(records)
        if not run:
            raise ValueError("no records to plot")
        right = [int(r["length"]) for r in run if r["correct"]]
        wrong = [int(r["length"]) for r in run if not r["correct"]]
        axes.hist([right, wrong], bins=bins, stacked=True, color=["tab:green", "tab:gray"],
                  label=[f"correct ({len(right)})", f"incorrect ({len(wrong)})"])
        limits = [int(r.get("limit", 0)) for r in run]
    if limits and max(limits) > 0 and len(set(limits)) == 1:
        axes.axvline(limits[0], color="tab:red", linestyle="--", linewidth=1, label=f"limit ({limits[0]})")
    axes.set_xlabel("response length (tokens)")
    axes.set_ylabel("questions")
    axes.set_title(title or "Response lengths on GSM8K test")
    axes.legend()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    return figure


# ==================================================================================================
# Command line
# ==================================================================================================

def build_parser() -> argparse.ArgumentParser:
    """The CLI: one option per ``EvalConfig`` field (same names, dashes), as training.py's."""
    parser = argparse.ArgumentParser(
        prog="evaluation.py",
        description="Evaluate a model, or a training run's LoRA adapter, on the GSM8K test split.",
        epilog="--adapter also takes a training run's folder (RUN_DIR, holding adapter/): the model, tokenizer and "
               "token limit then come from its run_config.json, results go to RUN_DIR/eval, and the run is compared "
               "with the baseline run beside it. Without a GPU the CPU smoke preset runs.")
    runtime.add_dataclass_options(parser, EvalConfig, defaults=False)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python evaluation.py [--adapter PATH|RUN_DIR] [options]``: evaluate, print the summary (and the comparison)."""
    namespace = build_parser().parse_args(argv)
    settings = runtime.dataclass_values(EvalConfig, namespace)
    with runtime.one_line_errors(namespace.debug, prog="evaluation.py"):
        if settings.get("adapter") is not None:
            return evaluate_run(settings.pop("adapter"), **settings)
        summary = evaluate(EvalConfig(**settings))
        print_summary(summary)
        return summary


if __name__ == "__main__":
    main()
