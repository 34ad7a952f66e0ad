r"""The project's decoder: completions for tokenized prompts from a transformers causal LM, fast on one GPU.

Evaluation generates the GSM8K test split with it, training generates its GRPO rollouts with it, and the
benchmarks time it. Two methods:

- ``"static"``: a fixed-shape KV cache (``KVCache``) with one slot per sequence. ``StaticDecoder.prefill``
  writes prompts into free slots, ``StaticDecoder.decode_step`` adds one token to every slot; a finished slot
  is refilled with the next prompt at once (continuous batching), the tail of a run is compacted into fewer
  slots, and on CUDA the decode step is replayed as a CUDA graph. The cache reaches the attention function
  explicitly, as a keyword argument that the model's forward hands through to transformers' attention
  interface (``static_attention``);
- ``"generate"``: batched ``model.generate`` (prompts sorted by length, left padding), the fallback for models
  whose attention is not transformers' standard interface (e.g. patched by Unsloth); ``"auto"`` tries static
  first.

Every choice lives in one frozen ``DecodeSettings``, passed whole::

    settings = decoding.DecodeSettings(temperature=1.0, top_p=0.95, seed=3)
    completions = decoding.generate_token_ids(model, prompt_ids, 512, settings)     # one call: evaluation
    rollouts = decoding.RolloutDecoder(settings, merge_adapter=True)                 # kept across steps: training
    completion_ids = rollouts.generate(peft_model, prompt_ids)

Greedy when ``temperature == 0``. Otherwise tokens are sampled from :math:`\mathrm{softmax}(z / T)` after
top-k, top-p and min-p filtering (``filter_logits``; transformers' order and semantics, which is what TRL's
``GRPOConfig`` asks of ``generate``), seeded. Under CUDA graphs sampling runs either after the graph (the
graph outputs logits; filtering and sampling run eagerly with a generator of their own: the default) or
inside it with the default CUDA generator, which PyTorch keeps graph-safe (``sample_in_graph=True``).

Public API: ``DecodeSettings``, ``generate_token_ids``, ``RolloutDecoder``, ``eos_ids``, ``trim``,
``default_batch_size``, ``filter_logits``, ``sample_next``, ``merged_adapter``, ``decoding_context``, ``KVCache``,
``StaticDecoder``, ``static_attention``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import runtime

METHODS = ("auto", "static", "generate")
ATTENTION_NAME = "lengthrl_static_kv"
CACHE_ARGUMENT = "static_kv_cache"  # the forward keyword that carries the KVCache to static_attention
_CPU_BATCH = 32
_MAX_AUTO_BATCH = 512


class _Unsupported(RuntimeError):
    """The model cannot be driven by the static decoder (falls back to ``model.generate``)."""


# ==================================================================================================
# Settings
# ==================================================================================================

@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How completions are decoded. Frozen: one object is passed whole and may key captured graphs.

    - ``max_new_tokens``: each prompt's token limit, unless the call gives limits of its own (one per prompt);
    - ``method``: ``"static"``, ``"generate"`` or ``"auto"`` (static, else generate);
    - ``temperature``: 0 is greedy (the filters below are then ignored); otherwise sample from
      ``softmax(logits / temperature)`` after ``top_k`` (keep the k most likely tokens; None, 0 or -1: off),
      ``top_p`` (keep the most likely tokens until their probability reaches top_p; 1.0: off) and ``min_p``
      (drop tokens less likely than min_p times the most likely one; None or 0: off), in that order;
    - ``seed``: same seed, prompts and settings, same tokens;
    - ``batch_size``: slots of the static cache / rows of a generate batch (None: ``default_batch_size``);
    - ``use_cuda_graphs``: replay the decode step as a CUDA graph on CUDA devices;
    - ``sample_in_graph``: sample with the default generator inside the decode step (inside the CUDA graph)
      instead of with a generator of the decoder's own after the graph; greedy always picks inside the graph;
    - ``eos_token_ids``: stop tokens (None: the model's generation-config EOS ids; ``()``: never stop early);
    - ``pad_token_id``: None: the model's, else the first stop token, else 0;
    - ``check_every``: decode steps between host checks for finished slots (None: 8 on CUDA, 1 on CPU);
    - ``prefill_tokens``: most padded prompt tokens per prefill call (bounds activation memory);
    - ``progress``/``desc``: a progress bar; ``profile``: time prefill/decode/host separately (synchronises).
    """

    max_new_tokens: int = 512
    method: str = "auto"
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float | None = None
    seed: int = 0
    batch_size: int | None = None
    use_cuda_graphs: bool = True
    sample_in_graph: bool = False
    eos_token_ids: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    check_every: int | None = None
    prefill_tokens: int = 32_768
    progress: bool = False
    desc: str = "Generating"
    profile: bool = False

    def __post_init__(self) -> None:
        if self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
        if self.method not in METHODS:
            raise ValueError(f"method must be 'auto', 'static' or 'generate', got {self.method!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < -1:
            raise ValueError(f"top_k must be positive, or None, 0 or -1 for off, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1.0: off), got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (None or 0: off), got {self.min_p}")
        for name in ("batch_size", "check_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for automatic), got {value}")
        if self.prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be at least 1, got {self.prefill_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def top_k_active(self) -> int | None:
        """top_k when it filters, else None (GRPOConfig's None, transformers' 0 and vLLM's -1 all mean off)."""
        return self.top_k if self.top_k is not None and self.top_k > 0 else None

    def replace(self, **changes: Any) -> DecodeSettings:
        """A copy with ``changes``; an unknown name is a one-line error."""
        known = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown decoding setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)


# ==================================================================================================
# Small public helpers
# ==================================================================================================

def eos_ids(model: Any = None, tokenizer: Any = None) -> list[int]:
    """Stop tokens: the model's generation-config EOS ids, then the tokenizer's, without repeats."""
    ids: list[int] = []
    sources = [getattr(getattr(model, "generation_config", None), "eos_token_id", None),
               getattr(tokenizer, "eos_token_id", None)]
    for source in sources:
        for value in (source if isinstance(source, (list, tuple)) else [source]):
            if value is not None and int(value) not in ids:
                ids.append(int(value))
    return ids


def trim(ids: Sequence[int], eos: Iterable[int], limit: int) -> list[int]:
    """Tokens up to and including the first stop token, at most ``limit`` of them."""
    stop = set(eos)
    out: list[int] = []
    for token in ids[:limit]:
        out.append(int(token))
        if token in stop:
            break
    return out


def _causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a PEFT wrapper (LoRA layers stay injected and active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def default_batch_size(model: Any, n_prompts: int, max_total_tokens: int) -> int:
    """Slots for the decoder: on a GPU as many as fit a quarter of free memory (at most 512), else 32."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return max(1, min(n_prompts, _CPU_BATCH))
    config = _causal_lm(model).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.finfo(next(model.parameters()).dtype).bits // 8
    per_slot = 2 * config.num_hidden_layers * kv_heads * head_dim * max_total_tokens * element
    per_slot += 3 * 4 * config.vocab_size  # float32 logits and sampling temporaries
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(n_prompts, _MAX_AUTO_BATCH, int(0.25 * free // per_slot)))


# ==================================================================================================
# Sampling: greedy, or temperature with top-k / top-p / min-p (graph-safe: no host synchronisation)
# ==================================================================================================

def filter_logits(logits: Any, settings: DecodeSettings) -> Any:
    """``logits / temperature`` with the tokens that top-k, then top-p, then min-p remove set to -inf.

    The semantics of transformers' warpers (what ``GRPOConfig`` passes to ``generate``): top-k keeps the k
    best tokens; top-p sorts ascending and drops tokens whose cumulative probability stays at or below
    ``1 - top_p`` (the most likely token always stays); min-p drops tokens with probability below ``min_p``
    times the largest. ``logits``: ``[rows, vocab]``. With top-k on, top-p and min-p only look at the k
    candidates (the others have probability 0 anyway): sorting k values instead of the vocabulary is what
    keeps filtering cheap. (A tie for the k-th place keeps exactly k tokens, where transformers keeps all tied.)
    """
    import torch

    scores, indices = _candidates(logits, settings)
    if indices is None:
        return scores
    return torch.full(logits.shape, float("-inf"), device=logits.device).scatter(-1, indices, scores)


def _candidates(logits: Any, settings: DecodeSettings) -> tuple[Any, Any]:
    """The filtered, temperature-scaled scores of the tokens still in play: ``(scores, None)`` over the whole
    vocabulary, or ``(scores, indices)`` of the top-k (chosen before scaling: dividing by T keeps the order,
    and scaling k values is cheaper than scaling the vocabulary)."""
    import torch

    top_k = settings.top_k_active
    if top_k is None or top_k >= logits.shape[-1]:
        return _top_p_min_p(logits.float() / settings.temperature, settings), None
    values, indices = torch.topk(logits, top_k, dim=-1)
    return _top_p_min_p(values.float() / settings.temperature, settings), indices


def _top_p_min_p(scores: Any, settings: DecodeSettings) -> Any:
    import torch

    if settings.top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - settings.top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if settings.min_p:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < settings.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return scores


def _gumbel_argmax(scores: Any, generator: Any) -> Any:
    """Gumbel-max: ``argmax(scores + G)`` with ``G = -log(-log U)`` is an exact sample of ``softmax(scores)``;
    -inf scores never win, and unlike ``torch.multinomial`` it needs no host synchronisation."""
    import torch

    uniform = torch.rand(scores.shape, generator=generator, device=scores.device).clamp_(min=1e-20)
    return (scores - torch.log(-torch.log(uniform))).argmax(-1)


def sample_next(logits: Any, settings: DecodeSettings, generator: Any = None) -> Any:
    """One token per row: argmax when greedy, else a sample of ``softmax(filter_logits(logits))``.

    Graph-safe (no host synchronisation): with ``generator=None`` it draws from the default generator, which
    PyTorch keeps consistent across CUDA graph replays. With top-k on, only the k candidates are sampled.
    """

    if settings.greedy:
        return logits.argmax(-1)
    scores, indices = _candidates(logits, settings)
    pick = _gumbel_argmax(scores, generator)
    return pick if indices is None else indices.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


# ==================================================================================================
# The static decoder: KV cache, attention, prefill and decode step
# ==================================================================================================

class KVCache:
    """The key/value buffers of every layer, ``[slots, kv_heads, length, head_dim]`` each, and what the
    attention function must do with them in the current forward (``prefill`` or ``decode``)."""

    def __init__(self, layers: int, slots: int, kv_heads: int, length: int, head_dim: int, like: Any) -> None:
        import torch

        shape = (slots, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self.length = length
        self.positions = torch.arange(length, device=like.device)
        self.mode = "prefill"
        self.rows = None  # prefill: the slots being filled
        self.index = None  # decode: write positions expanded to [b, kv_heads, 1, head_dim]
        self.mask = None  # decode: [b, 1, 1, length], True where a row may attend
        self.calls = 0  # attention calls in this forward (a model that bypasses the interface makes none)

    def start_prefill(self, rows: Any) -> None:
        self.mode, self.rows, self.calls = "prefill", rows, 0

    def start_decode(self, positions: Any) -> None:
        """Rows ``0..b-1`` write their new token's key/value at ``positions`` and see everything up to it."""
        b = positions.shape[0]
        kv_heads, head_dim = self.keys[0].shape[1], self.keys[0].shape[3]
        self.mode, self.calls = "decode", 0
        self.index = positions.view(b, 1, 1, 1).expand(b, kv_heads, 1, head_dim)
        self.mask = (self.positions[None, :] <= positions[:, None]).view(b, 1, 1, self.length)

    def compact(self, index: Any) -> None:
        """Move rows ``index`` to ``0..len(index)-1``."""
        count = index.shape[0]
        for tensor in [*self.keys, *self.values]:
            tensor[:count] = tensor[index]


def static_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """Attention over a ``KVCache`` (a transformers ``AttentionInterface`` function).

    The cache arrives as the ``static_kv_cache`` keyword, which the model's forward passes through to its
    attention function. Prefill: writes the prompt's keys/values into rows ``cache.rows`` at positions
    ``0..P-1`` and attends causally among them (right-padded prompts: padding sits after every real token, so
    causality alone keeps it out). Decode (one token per row): writes each row's key/value at its own
    position, then attends over the whole buffer under ``cache.mask``. The ``attention_mask`` argument is
    ignored: models build (or drop) masks differently, so the decoder hands its own mask over directly.
    Query heads are grouped by their key/value head instead of repeating the keys, so grouped-query attention
    reads each key once.
    """
    import torch.nn.functional as F

    cache: KVCache | None = kwargs.get(CACHE_ARGUMENT)
    if cache is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention needs a KVCache ({CACHE_ARGUMENT}=...); "
                           "it runs inside decoding.StaticDecoder only")
    layer = module.layer_idx
    cache.calls += 1
    if cache.mode == "prefill":
        length = key.shape[2]
        cache.keys[layer][cache.rows, :, :length] = key
        cache.values[layer][cache.rows, :, :length] = value
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2), None
    b, heads, _, dim = query.shape
    keys = cache.keys[layer][:b]
    values = cache.values[layer][:b]
    keys.scatter_(2, cache.index, key)
    values.scatter_(2, cache.index, value)
    kv_heads = keys.shape[1]
    grouped = query.reshape(b, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=cache.mask, scale=scaling)
    return out.reshape(b, heads, 1, dim).transpose(1, 2), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, static_attention)


def _weights_key(lm: Any) -> tuple:
    """What a captured graph depends on: every parameter's storage, and each adapter layer's merge/enable
    state (a graph captured with the adapter merged runs no LoRA kernels). In-place updates (optimizer steps,
    merging) keep the key, so graphs read the new values; replaced tensors change it, so graphs are dropped."""
    storage = tuple((p.data_ptr(), p.dtype, tuple(p.shape)) for p in lm.parameters())
    adapters = tuple((bool(getattr(m, "merged", False)), bool(getattr(m, "disable_adapters", False)),
                      tuple(getattr(m, "active_adapters", ()) or ()))
                     for m in lm.modules() if hasattr(m, "base_layer") and hasattr(m, "merge"))
    return storage, adapters


class StaticDecoder:
    """Continuous-batching decoding over a ``KVCache`` of ``slots`` rows and ``length`` positions.

    Built once, it can serve many ``generate`` calls (training's rollouts), as long as every prompt plus its
    limit fits ``length``; its CUDA graphs are kept while the model's weights stay where they are (see
    ``_weights_key``), so an optimizer step, which updates them in place, reaches the next replay.
    """

    def __init__(self, model: Any, settings: DecodeSettings, slots: int, length: int) -> None:
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
        if settings.eos_token_ids is None or settings.pad_token_id is None:
            raise ValueError("StaticDecoder needs resolved eos_token_ids and pad_token_id (see generate_token_ids)")
        parameter = next(self.lm.parameters())
        self.device = parameter.device
        self.settings = settings
        self.eos_list, self.pad_id = list(settings.eos_token_ids), settings.pad_token_id
        self.batch = max(1, int(slots))
        # One fixed cache length (a multiple of 64 keeps attention kernels aligned).
        self.length = runtime.round_up(int(length), 64)
        self.cuda = self.device.type == "cuda"
        self.use_graphs = settings.use_cuda_graphs and self.cuda
        # Eager sampling: the graph stops at the logits, and a generator of our own draws the noise after it.
        self.eager_sampling = not settings.greedy and not settings.sample_in_graph
        self.check_every = settings.check_every or (8 if self.cuda else 1)
        self.layers = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        B, S, dev = self.batch, self.length, self.device
        self.cache = KVCache(self.layers, B, kv_heads, S, head_dim, parameter)
        long = dict(dtype=torch.long, device=dev)
        self.tok = torch.zeros(B, **long)
        self.pos = torch.zeros(B, **long)
        self.n_gen = torch.zeros(B, **long)
        self.limit = torch.ones(B, **long)
        self.done = torch.ones(B, dtype=torch.bool, device=dev)
        self.out = torch.zeros(B, S, **long)
        self.eos = torch.tensor(self.eos_list, **long)
        # Sampling after the graph: the graph writes the logits here.
        vocab = self.head.weight.shape[0]
        self.logits = torch.zeros(B, vocab, device=dev) if self.eager_sampling and self.use_graphs else None
        self.generator = torch.Generator(device=dev) if self.eager_sampling else None
        self.graphs: dict[int, Any] = {}
        self.graph_key: tuple | None = None
        self.prompts: list[list[int]] = []
        self.limits: list[int] = []
        self.info: dict[str, Any] = {}

    # -- profiling (``settings.profile``: synchronises, so only for benchmarks) ------------------------
    def _clock(self) -> float:
        if self.settings.profile and self.cuda:
            self.torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _account(self, key: str, mark: float) -> float:
        now = self._clock()
        if self.settings.profile:
            self.info[key] = self.info.get(key, 0.0) + now - mark
        return now

    def _forward(self, ids: Any, positions: Any) -> Any:
        return self.decoder(input_ids=ids, position_ids=positions, use_cache=False,
                            **{CACHE_ARGUMENT: self.cache})[0]

    def _stops(self, tokens: Any) -> Any:
        return (tokens[:, None] == self.eos[None, :]).any(-1)

    # -- prefill ------------------------------------------------------------------------------------
    def prefill(self, slots: list[int], questions: list[int]) -> None:
        """Write prompts ``questions`` into ``slots`` and pick their first tokens, in chunks of at most
        ``prefill_tokens`` padded tokens (bounds the activation memory)."""
        start = 0
        while start < len(slots):
            longest = len(self.prompts[questions[start]])
            count = max(1, min(len(slots) - start, self.settings.prefill_tokens // max(1, longest)))
            self._prefill_chunk(slots[start:start + count], questions[start:start + count])
            start += count

    def _prefill_chunk(self, slots: list[int], questions: list[int]) -> None:
        torch = self.torch
        lengths = [len(self.prompts[q]) for q in questions]
        # A multiple of 32 (within the cache): fewer distinct shapes for the kernels and the allocator.
        width = min(self.length, runtime.round_up(max(lengths), 32))
        ids = torch.full((len(slots), width), self.pad_id, dtype=torch.long)
        for row, q in enumerate(questions):
            ids[row, :lengths[row]] = torch.tensor(self.prompts[q], dtype=torch.long)
        ids = ids.to(self.device)
        rows = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.cache.start_prefill(rows)
        position_ids = torch.arange(width, device=self.device)[None, :].expand(len(slots), width)
        if self.info["prefill_calls"] == 0:
            # The first call probes the model: a forward patched to bypass the attention interface (Unsloth)
            # may fail on these inputs, or silently ignore the KV buffers; either way, fall back.
            try:
                hidden = self._forward(ids, position_ids)
            except Exception as error:
                raise _Unsupported(f"{type(self.lm).__name__}'s forward failed in the static decoder "
                                   f"({type(error).__name__}: {error})") from error
        else:
            hidden = self._forward(ids, position_ids)
        if self.cache.calls != self.layers:
            raise _Unsupported(f"{type(self.lm).__name__}'s attention did not go through the attention "
                               f"interface ({self.cache.calls} of {self.layers} layers); is it patched (Unsloth)?")
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.head(hidden[torch.arange(len(slots), device=self.device), last]).float()
        first = sample_next(logits, self.settings, self.generator)
        limits = torch.tensor([self.limits[q] for q in questions], dtype=torch.long, device=self.device)
        self.tok[rows] = first
        self.pos[rows] = last + 1
        self.n_gen[rows] = 1
        self.limit[rows] = limits
        self.out[rows, 0] = first
        self.done[rows] = self._stops(first) | (limits <= 1)
        self.info["prefill_calls"] += 1

    # -- decode -------------------------------------------------------------------------------------
    def decode_step(self, b: int) -> None:
        """One token for rows ``0..b-1``; all bookkeeping stays on the device (no host synchronisation)."""
        self._advance(b, sample_next(self._logits(b), self.settings, self.generator))

    def _logits(self, b: int) -> Any:
        """The forward of one decode step: next-token logits ``[b, vocab]`` (float32)."""
        self.cache.start_decode(self.pos[:b])
        hidden = self._forward(self.tok[:b].view(b, 1), self.pos[:b].view(b, 1))
        return self.head(hidden[:, -1]).float()

    def _logits_into_buffer(self, b: int) -> None:
        """The graph's body when sampling runs after it: the logits land in a buffer the graph owns."""
        self.logits[:b].copy_(self._logits(b))

    def _advance(self, b: int, nxt: Any) -> None:
        torch = self.torch
        pos, tok, done, n_gen = self.pos[:b], self.tok[:b], self.done[:b], self.n_gen[:b]
        active = ~done
        column = n_gen.clamp(max=self.length - 1).view(b, 1)
        out = self.out[:b]
        out.scatter_(1, column, torch.where(active, nxt, out.gather(1, column).view(b)).view(b, 1))
        counted = n_gen + active.long()
        n_gen.copy_(counted)
        done.logical_or_(active & (self._stops(nxt) | (counted >= self.limit[:b])))
        tok.copy_(nxt)
        pos.copy_((pos + 1).clamp(max=self.length - 1))

    def _graph(self, b: int) -> Any:
        """The decode step for ``b`` rows as a CUDA graph (captured once per size); None when unavailable.
        With eager sampling the graph holds the forward only; ``_replay`` samples and advances after it."""
        if not self.use_graphs:
            return None
        if b in self.graphs:
            return self.graphs[b]
        torch = self.torch
        started = time.perf_counter()
        saved = [t.clone() for t in (self.tok, self.pos, self.n_gen, self.done)]
        step = self._logits_into_buffer if self.eager_sampling else self.decode_step
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy initialisations must not happen during capture
                    step(b)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(b)
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

    def _replay(self, graph: Any, b: int) -> None:
        if graph is None:
            self.decode_step(b)
            return
        graph.replay()
        if self.eager_sampling:
            self._advance(b, sample_next(self.logits[:b], self.settings, self.generator))

    def _compact(self, active_rows: list[int], size: int) -> None:
        """Move the active rows to ``0..len-1`` so a smaller (faster) decode step serves the tail."""
        index = self.torch.tensor(active_rows, dtype=self.torch.long, device=self.device)
        count = len(active_rows)
        self.cache.compact(index)
        for tensor in (self.tok, self.pos, self.n_gen, self.limit, self.done, self.out):
            tensor[:count] = tensor[index]
        self.done[count:size] = True

    # -- the loop -----------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], limits: list[int], seed: int, progress: Any = None,
                 info: dict[str, Any] | None = None) -> list[list[int]]:
        """Completions of ``prompts`` (each at most its limit, ending at the first stop token). Run it under
        ``decoding_context`` (attention implementation, eval mode, inference mode)."""
        too_long = [i for i, (p, m) in enumerate(zip(prompts, limits)) if len(p) + m > self.length]
        if too_long:
            raise ValueError(f"prompt {too_long[0]} plus its limit exceeds the decoder's cache ({self.length})")
        key = _weights_key(self.lm)
        if key != self.graph_key:  # weights moved (or the adapter was merged/unmerged): capture again
            self.graphs.clear()
            self.graph_key = key
        self.prompts, self.limits = prompts, limits
        self.info = {"method": "static", "batch_size": self.batch, "cache_length": self.length,
                     "cuda_graphs": self.use_graphs, "sampling": self._sampling_mode(), "graph_sizes": [],
                     "prefill_calls": 0, "decode_steps": 0, "slot_steps": 0, "capture_s": 0.0}
        if self.generator is not None:
            self.generator.manual_seed(seed)
        self.done.fill_(True)
        try:
            return self._loop(progress)
        finally:
            if info is not None:
                info.update(self.info)

    def _sampling_mode(self) -> str:
        if self.settings.greedy:
            return "greedy"
        if self.eager_sampling:
            return "own generator" + (", after the graph" if self.use_graphs else "")
        return "default generator" + (", inside the graph" if self.use_graphs else "")

    def _loop(self, progress: Any) -> list[list[int]]:
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
        while True:
            free = [s for s in range(size) if slot_question[s] < 0]
            # Refill in groups (a prefill call has a fixed cost), but never leave the decoder idle.
            if queue and free and (len(free) >= refill_min or len(free) == size):
                questions = [queue.pop() for _ in range(min(len(free), len(queue)))]
                slots = free[:len(questions)]
                for s, q in zip(slots, questions):
                    slot_question[s], slot_left[s] = q, self.limits[q] - 1
                mark = self._clock()
                self.prefill(slots, questions)
                self._account("prefill_s", mark)
            active = [s for s in range(size) if slot_question[s] >= 0]
            if not active:
                break
            # Once nothing is queued, shrink to the active rows whenever they fill half the slots or less:
            # sizes at least halve each time, so only a few CUDA graphs are ever captured.
            if not queue and len(active) <= size // 2 and size > min_size:
                new_size = max(min_size, runtime.round_up(len(active), 8) if self.cuda else len(active))
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
                self._replay(graph, size)
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
                    results[q] = trim(row[:count], self.eos_list, self.limits[q])
                    slot_question[s] = -1
                if progress is not None:
                    progress.update(len(finished))
            self._account("host_s", mark)
        return [r if r is not None else [] for r in results]


# ==================================================================================================
# Contexts: attention implementation, eval/inference mode, threads, seeds, merged adapters
# ==================================================================================================

@contextlib.contextmanager
def _attention_implementation(model: Any, name: str) -> Iterator[None]:
    config = _causal_lm(model).config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Eval mode (no dropout, no gradient checkpointing) for the duration; afterwards every module gets back
    its own training flag (a training model may hold modules deliberately kept in eval mode)."""
    modes = [(module, module.training) for module in model.modules()] if hasattr(model, "modules") else []
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _cpu_threads(model: Any) -> Iterator[None]:
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
def _seeded(seed: int, device: Any) -> Iterator[None]:
    import torch

    devices = [device] if getattr(device, "type", None) == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def merged_adapter(model: Any) -> Iterator[None]:
    """A PEFT model's LoRA adapter merged into its base weights for the duration (``merge_adapter``), so
    decoding runs one matrix product a layer instead of three; afterwards ``unmerge_adapter``, then the base
    weights are restored bit for bit from a copy: merging and unmerging in fp16/bf16 rounds, and repeated every
    training step that error would accumulate in the frozen weights. The merge is computed from the adapter's
    current weights on every entry, so it never lags an optimizer step. Costs one copy of the adapted base
    weights while merged."""
    import torch

    if not hasattr(model, "merge_adapter") or not hasattr(model, "unmerge_adapter"):
        raise ValueError("merge_adapter=True needs a PEFT model (one with merge_adapter/unmerge_adapter)")
    layers = [m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "merge")]
    with torch.no_grad():
        saved = [(p, p.detach().clone()) for m in layers for p in m.get_base_layer().parameters(recurse=False)]
        model.merge_adapter()
        try:
            yield
        finally:
            model.unmerge_adapter()
            for parameter, copy in saved:
                parameter.copy_(copy)


@contextlib.contextmanager
def decoding_context(model: Any, settings: DecodeSettings, device: Any) -> Iterator[None]:
    """What every decoding call runs under: the static attention (for ``"static"``), eval mode, inference mode
    and the seeded default generator (restored afterwards)."""
    import torch

    with contextlib.ExitStack() as stack:
        if settings.method == "static":
            _register_attention()
            stack.enter_context(_attention_implementation(model, ATTENTION_NAME))
        stack.enter_context(_eval_mode(model))
        stack.enter_context(torch.inference_mode())
        stack.enter_context(_seeded(settings.seed, device))
        yield


# ==================================================================================================
# Entry points
# ==================================================================================================

def _limits(prompts: list[list[int]], max_new_tokens: int | Sequence[int] | None,
            settings: DecodeSettings) -> list[int]:
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens is None:
        max_new_tokens = settings.max_new_tokens
    limits = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else [int(m) for m in
                                                                                            max_new_tokens]
    if len(limits) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(limits)} entries but there are {len(prompts)} prompts")
    if any(m < 1 for m in limits):
        raise ValueError("max_new_tokens must be at least 1 for every prompt")
    return limits


def _resolved(model: Any, settings: DecodeSettings, n_prompts: int, total: int) -> DecodeSettings:
    """Settings with the stop tokens, padding token and batch size filled in from the model."""
    eos = eos_ids(model) if settings.eos_token_ids is None else list(settings.eos_token_ids)
    pad = settings.pad_token_id
    if pad is None:
        pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        pad = pad if pad is not None else (eos[0] if eos else 0)
    batch = settings.batch_size or default_batch_size(model, n_prompts, total)
    return settings.replace(eos_token_ids=tuple(eos), pad_token_id=int(pad), batch_size=int(batch))


def _progress_bar(settings: DecodeSettings, total: int) -> Any:
    if not settings.progress:
        return None
    return runtime.progress_bar(total=total, desc=settings.desc, unit="question")


def _generate_with_generate(model: Any, prompts: list[list[int]], limits: list[int], settings: DecodeSettings,
                            progress: Any, info: dict[str, Any]) -> list[list[int]]:
    """Batched ``model.generate``: prompts sorted by length, left padding, stop at EOS."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos, pad_id, batch_size = list(settings.eos_token_ids), settings.pad_token_id, settings.batch_size
    order = sorted(range(len(prompts)), key=lambda q: -len(prompts[q]))
    results: list[list[int]] = [[] for _ in prompts]
    info.update({"method": "generate", "batch_size": batch_size, "cuda_graphs": False})
    # Every knob explicit and use_model_defaults=False: Qwen's generation_config.json would otherwise bring in
    # repetition_penalty=1.05, top_k=20, top_p=0.8 and change what "greedy" means.
    sampling = {"do_sample": False} if settings.greedy else {
        "do_sample": True, "temperature": settings.temperature, "top_k": settings.top_k_active or 0,
        "top_p": settings.top_p, "min_p": settings.min_p or None}
    with decoding_context(model, settings.replace(method="generate"), device):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(prompts[q]) for q in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, q in enumerate(batch):
                ids[row, width - len(prompts[q]):] = torch.tensor(prompts[q], dtype=torch.long)
                mask[row, width - len(prompts[q]):] = 1
            max_new = max(limits[q] for q in batch)
            config = GenerationConfig(
                max_new_tokens=max_new, repetition_penalty=1.0, num_beams=1, pad_token_id=pad_id,
                eos_token_id=eos or None, min_new_tokens=0 if eos else max_new, **sampling,
            )
            output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    generation_config=config, use_model_defaults=False)
            for row, q in enumerate(batch):
                results[q] = trim(output[row, width:].tolist(), eos, limits[q])
            if progress is not None:
                progress.update(len(batch))
    return results


def _new_static_decoder(model: Any, settings: DecodeSettings, n_prompts: int, total: int) -> StaticDecoder:
    return StaticDecoder(model, settings, min(settings.batch_size, n_prompts), total)


def _generate(model: Any, prompts: list[list[int]], limits: list[int], settings: DecodeSettings,
              decoder: Any, info: dict[str, Any]) -> tuple[list[list[int]], Any]:
    """Static (``decoder``: a StaticDecoder to reuse, or None to build one) or generate, with "auto"'s
    fallback; returns the completions and the static decoder (None when generate ran)."""
    bar = _progress_bar(settings, len(prompts))
    device = next(model.parameters()).device
    try:
        if settings.method in ("auto", "static"):
            try:
                total = max(len(p) + m for p, m in zip(prompts, limits))
                if decoder is None:
                    decoder = _new_static_decoder(model, settings, len(prompts), total)
                with decoding_context(model, settings.replace(method="static"), device):
                    return decoder.generate(prompts, limits, settings.seed, bar, info), decoder
            except _Unsupported as reason:
                if settings.method == "static":
                    raise ValueError(f"the static decoder cannot run this model: {reason}") from None
                info["fallback_reason"] = str(reason)
                print(f"Static decoder unavailable ({reason}); using model.generate", flush=True)
                if bar is not None:
                    bar.reset()
        return _generate_with_generate(model, prompts, limits, settings, bar, info), None
    finally:
        if bar is not None:
            bar.close()


def generate_token_ids(model: Any, prompts: Sequence[Sequence[int]],
                       max_new_tokens: int | Sequence[int] | None = None, settings: DecodeSettings | None = None,
                       *, info: dict[str, Any] | None = None, **overrides: Any) -> list[list[int]]:
    """Completions for tokenized prompts with a transformers model (PEFT-wrapped or not): the new token ids.

    Each result holds the tokens up to and including the first stop token, at most that prompt's limit
    (``max_new_tokens``: an int, one per prompt, or None for ``settings.max_new_tokens``). ``settings``
    (default ``DecodeSettings()``: greedy, ``"auto"``) may be adjusted by keyword, e.g.
    ``generate_token_ids(model, prompts, 64, eos_token_ids=[], batch_size=4)``. ``info`` (a dict) receives
    what ran: method, slots, graph sizes, fallback reason. The model's train/eval mode is restored afterwards.
    """
    settings = (settings or DecodeSettings()).replace(**overrides) if overrides else settings or DecodeSettings()
    prompts = [list(p) for p in prompts]
    if not prompts:
        return []
    limits = _limits(prompts, max_new_tokens, settings)
    total = max(len(p) + m for p, m in zip(prompts, limits))
    settings = _resolved(model, settings, len(prompts), total)
    info = {} if info is None else info
    with _cpu_threads(model):
        return _generate(model, prompts, limits, settings, None, info)[0]


class RolloutDecoder:
    """GRPO rollouts from the policy being trained, one ``generate`` call per generation step.

    ``generate(model, prompt_ids)`` takes the PEFT-wrapped model as training holds it (training mode, gradient
    checkpointing on) and returns the completion ids per prompt; the model leaves in the mode it came in, and
    nothing is recorded for autograd. The static decoder (cache and CUDA graphs) is kept between calls and
    rebuilt only when a call needs more cache; its graphs read the weights where they live, so in-place
    optimizer steps reach the next rollout, and they are captured again if a weight tensor is replaced.
    ``merge_adapter=True`` merges the LoRA adapter into the base weights for each call (``merged_adapter``):
    unmerged LoRA adds about 14 small kernels a layer to a launch-bound decode step. Each call draws from its
    own seed: ``settings.seed`` plus the number of earlier calls, unless ``seed`` is given.
    """

    def __init__(self, settings: DecodeSettings, merge_adapter: bool = False) -> None:
        self.settings = settings
        self.merge_adapter = merge_adapter
        self.decoder: StaticDecoder | None = None
        self.decoder_model_id: int | None = None
        self.calls = 0
        self.fallback_reason: str | None = None

    def generate(self, model: Any, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int | Sequence[int] | None = None, seed: int | None = None,
                 info: dict[str, Any] | None = None) -> list[list[int]]:
        prompts = [list(p) for p in prompts]
        if not prompts:
            return []
        limits = _limits(prompts, max_new_tokens, self.settings)
        total = max(len(p) + m for p, m in zip(prompts, limits))
        seed = self.settings.seed + self.calls if seed is None else seed
        self.calls += 1
        settings = _resolved(model, self.settings, len(prompts), total).replace(seed=seed)
        if self.fallback_reason is not None:  # "auto" found the model unsupported once: generate from now on
            settings = settings.replace(method="generate")
        info = {} if info is None else info
        with contextlib.ExitStack() as stack:
            stack.enter_context(_cpu_threads(model))
            if self.merge_adapter:
                stack.enter_context(merged_adapter(model))
            decoder = self._decoder(model, settings, len(prompts), total)
            completions, self.decoder = _generate(model, prompts, limits, settings, decoder, info)
        if "fallback_reason" in info:
            self.fallback_reason = info["fallback_reason"]
        self.decoder_model_id = id(model) if self.decoder is not None else None
        return completions

    def _decoder(self, model: Any, settings: DecodeSettings, n_prompts: int, total: int) -> StaticDecoder | None:
        """The kept decoder when it still fits this call, else None (``_generate`` builds a new one)."""
        kept = self.decoder
        if kept is None or settings.method == "generate" or self.decoder_model_id != id(model):
            return None
        fits = kept.length >= total and kept.batch >= min(settings.batch_size, n_prompts)
        same = kept.settings.replace(seed=settings.seed, batch_size=settings.batch_size) == settings
        return kept if fits and same else None
