"""Benchmark the evaluation backends: generated tokens/s and the wall time of the full GSM8K test split.

Not a test: run it on a GPU and copy the table into BENCHMARKS.md ("## Evaluation")::

    python benchmarks/bench_eval.py --tokenizer PATH --gsm8k DIR [--out results.json] [--budget-s 400]

The model is Qwen2.5-0.5B-shaped (24 layers, hidden 896, 14 heads, 2 KV heads, vocab 151936, tied
embeddings) with random bf16 weights, so no download is needed. Random weights rarely emit EOS, so most rows
force every completion to its full length (no stop token): the worst case for an evaluation. The
"early stop" row gives each question its own length instead (drawn once, seeded, averaging about 180 tokens,
as real completions do), to measure how well finished slots are refilled. Prompts are the real 1319 test
prompts rendered with the chat template (58 to 223 tokens).

Rows:
- a correctness check first: on a tiny float32 model, the static decoder (CUDA graphs, refill, compaction,
  stop tokens, per-question limits) must give exactly the tokens of a plain recompute-everything greedy loop;
- ``static``: ``decoding.generate_token_ids(method="static")``, cold (CUDA-graph capture included) and warm;
- ``generate``: plain batched ``model.generate`` (dynamic cache), the reference path;
- batch 1 for both;
- vLLM when it is installed (it needs the model on disk: the random model is saved first).

``--sampling`` times the rollout shape instead (``sampling_benchmark``): greedy against sampled decoding, and
sampling after the CUDA graph against sampling inside it, then the same through ``decoding.RolloutDecoder`` on
a LoRA-wrapped model, adapter unmerged and merged.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import data  # noqa: E402
import decoding  # noqa: E402
import evaluation  # noqa: E402


def qwen05b_config(vocab_size: int = 151936):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1_000_000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       use_sliding_window=False)


def random_model(config, dtype, device: str = "cuda"):
    """A randomly initialised model built directly on ``device`` in ``dtype`` (seconds, not minutes)."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def test_prompts(tokenizer, gsm8k: Path) -> list[list[int]]:
    questions = [json.loads(line)["question"] for line in (gsm8k / "test.jsonl").read_text().splitlines()
                 if line.strip()]
    texts = [data.render_prompt(tokenizer, data.prompt_messages(q)) for q in questions]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(name: str, function, prompts, limits, batch: int | str, **details) -> dict:
    sync()
    started = time.perf_counter()
    outputs = function()
    sync()
    seconds = time.perf_counter() - started
    tokens = sum(len(o) for o in outputs)
    row = {"name": name, "batch": batch, "prompts": len(prompts), "new_tokens_max": max(limits),
           "generated_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
           **details}
    print(json.dumps(row), flush=True)
    return row


def correctness_check(tokenizer, prompts: list[list[int]], device: str) -> dict:
    """Static decoder (graphs on CUDA) vs a recompute-everything greedy loop, float32 tiny chaotic model."""
    import torch

    import runtime

    model = runtime.build_tiny_qwen2(tokenizer, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # large random weights: varied tokens instead of repeating the last one
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                scale = 1.0 if "embed" in name else 0.3
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    model = model.to(device).eval()
    chosen = prompts[:24]
    limits = [8 + (i * 7) % 17 for i in range(len(chosen))]

    def reference(prompt: list[int], n: int) -> list[int]:
        ids, out = list(prompt), []
        with torch.no_grad():
            for _ in range(n):
                logits = model(torch.tensor([ids], device=device), logits_to_keep=1).logits[0, -1]
                out.append(int(logits.argmax()))
                ids.append(out[-1])
        return out

    full = [reference(p, m) for p, m in zip(chosen, limits)]
    eos = sorted({full[0][3], full[5][6], full[11][2]})
    expected = [decoding.trim(seq, eos, m) for seq, m in zip(full, limits)]
    info: dict = {}
    got = decoding.generate_token_ids(model, chosen, limits, eos_token_ids=eos, batch_size=8, method="static",
                                      info=info)
    generated = decoding.generate_token_ids(model, chosen, limits, eos_token_ids=eos, batch_size=8,
                                            method="generate")
    result = {"static_equals_reference": got == expected, "generate_equals_reference": generated == expected,
              "stopped_early": sum(len(e) < m for e, m in zip(expected, limits)), "prompts": len(chosen),
              "info": info}
    print(json.dumps({"check": result}), flush=True)
    return result


SAMPLING_ROWS = (  # (name, DecodeSettings changes)
    ("greedy", {}),
    ("T=1 (GRPOConfig default), sampled after the graph", {"temperature": 1.0}),
    ("T=1, sampled inside the graph", {"temperature": 1.0, "sample_in_graph": True}),
    ("T=0.9 top_k=50 top_p=0.95 min_p=0.05, after the graph",
     {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "min_p": 0.05}),
    ("T=0.9 top_k=50 top_p=0.95 min_p=0.05, inside the graph",
     {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "min_p": 0.05, "sample_in_graph": True}),
    ("T=1 top_p=0.95 (whole-vocabulary sort), after the graph", {"temperature": 1.0, "top_p": 0.95}),
    ("T=1 top_p=0.95 (whole-vocabulary sort), inside the graph",
     {"temperature": 1.0, "top_p": 0.95, "sample_in_graph": True}),
)


def sampling_benchmark(model, prompts: list[list[int]], n_prompts: int, max_new_tokens: int,
                       lora_rank: int) -> list[dict]:
    """The rollout shape: ``n_prompts`` prompts, every completion forced to ``max_new_tokens`` tokens, one
    ``decoding.RolloutDecoder`` per row, called twice: cold (CUDA-graph capture included), then warm (graphs
    kept, as from the second training step on). Rows: greedy against sampled, sampling after the graph against
    inside it; then, with a LoRA adapter of rank ``lora_rank`` on every linear layer (``lora_rank`` 0: none),
    greedy and T=1 with the adapter unmerged and merged for each call."""
    chosen = prompts[:n_prompts]
    limits = [max_new_tokens] * len(chosen)
    base = decoding.DecodeSettings(method="static", eos_token_ids=(), batch_size=len(chosen))
    plan = [(name, base.replace(**changes), False) for name, changes in SAMPLING_ROWS]
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        for merge in (False, True):
            label = f"LoRA r{lora_rank}, {'merged' if merge else 'unmerged'}"
            plan += [(f"{label}, greedy", base, merge), (f"{label}, T=1", base.replace(temperature=1.0), merge)]
    rows = []
    for name, settings, merge in plan:
        rollouts = decoding.RolloutDecoder(settings, merge_adapter=merge)
        for phase in ("cold", "warm"):
            info: dict = {}
            call = functools.partial(rollouts.generate, model, chosen, limits, info=info)
            try:
                row = measure(f"rollouts, {name}, {phase}", call, chosen, limits, len(chosen), info=info)
            except Exception as error:  # report and go on: one failing row must not lose the others
                row = {"name": f"rollouts, {name}, {phase}", "error": f"{type(error).__name__}: {error}"}
                print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def full_evaluate(model, tokenizer, gsm8k: Path, limit: int | None, max_new_tokens: int) -> dict:
    """One ``evaluation.evaluate`` call on the whole test split, as after a training job (random weights:
    completions run to the 512-token limit, the worst case)."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="bench-eval-")
    config = evaluation.EvalConfig(model="random-qwen2.5-0.5b-shape", gsm8k_dir=str(gsm8k), output_dir=folder,
                                   progress=False, redo=True, limit=limit, max_new_tokens=max_new_tokens)
    sync()
    started = time.perf_counter()
    summary = evaluation.evaluate(config, model=model, tokenizer=tokenizer)
    seconds = time.perf_counter() - started
    timing = summary["timing"]
    row = {"name": "evaluation.evaluate(), full test, default settings (random weights: full length)",
           "batch": summary["generation"]["batch_size"], "prompts": summary["metrics"]["n"],
           "generated_tokens": timing["generated_tokens"], "seconds": round(seconds, 3),
           "generation_s": round(timing["generation_s"], 3), "tokens_per_s": round(timing["tokens_per_s"], 1),
           "method": summary["generation_info"].get("method"), "info": summary["generation_info"]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="Qwen tokenizer folder")
    parser.add_argument("--gsm8k", required=True, type=Path, help="folder with test.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="slots for the full-test rows (default: decoding.default_batch_size)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--budget-s", type=float, default=400, help="skip remaining rows after this many seconds")
    parser.add_argument("--limit", type=int, default=None, help="first N test prompts only (dry runs)")
    parser.add_argument("--tiny", action="store_true", help="tiny 2-layer model instead of the 0.5B shape (dry runs)")
    parser.add_argument("--profile", action="store_true", help="time prefill/decode/host separately (syncs)")
    parser.add_argument("--evaluate", action="store_true",
                        help="also time one full evaluation.evaluate() call (scoring and files included)")
    parser.add_argument("--rows", default="check,cold,early,b1,gen_b1,gen_b256,synthetic,warm,b256",
                        help="comma-separated rows to run, in order")
    parser.add_argument("--sampling", action="store_true",
                        help="time greedy vs sampled rollouts, sampling after vs inside the CUDA graph, LoRA "
                             "unmerged vs merged (sampling_benchmark) instead of the rows")
    parser.add_argument("--rollout-prompts", type=int, default=16, help="prompts of a rollout (--sampling)")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank for --sampling's adapter rows (0: none)")
    args = parser.parse_args()

    import torch

    import runtime

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = runtime.load_tokenizer(args.tokenizer)
    prompts = test_prompts(tokenizer, args.gsm8k)[:args.limit]
    meta = {"date": _dt.date.today().isoformat(), "device": runtime.device_name(),
            "versions": runtime.library_versions(), "python": platform.python_version(),
            "cuda": torch.version.cuda, "max_new_tokens": args.max_new_tokens}
    print(json.dumps({"meta": meta}), flush=True)
    rows: list[dict] = []
    results = {"meta": meta, "rows": rows}
    wanted = args.rows.split(",")

    if "check" in wanted:
        results["check"] = correctness_check(tokenizer, prompts, device)

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = runtime.tiny_qwen2_config(151936) if args.tiny else qwen05b_config()
    model = random_model(shape, dtype, device)
    with torch.inference_mode():  # CUDA context, cuBLAS handles: not part of any row
        model(torch.tensor([prompts[0]], device=device))
    full = [args.max_new_tokens] * len(prompts)
    rng = random.Random(0)
    # Lengths like real completions: log-normal around 150 tokens, within [16, max].
    early = [min(args.max_new_tokens, max(16, int(rng.lognormvariate(5.0, 0.5)))) for _ in prompts]
    B = args.batch_size or decoding.default_batch_size(model, len(prompts), max(map(len, prompts)) +
                                                       args.max_new_tokens)
    meta["batch_size"] = B
    R = min(256, len(prompts))  # the reference measurements' batch

    def static(ps, limits, batch, info, check_every=None):
        settings = decoding.DecodeSettings(method="static", eos_token_ids=(), batch_size=batch,
                                           check_every=check_every, profile=args.profile)
        return lambda: decoding.generate_token_ids(model, ps, limits, settings, info=info)

    def generate(ps, limits, batch):
        settings = decoding.DecodeSettings(method="generate", eos_token_ids=(), batch_size=batch)
        return lambda: decoding.generate_token_ids(model, ps, limits, settings)

    synthetic = [[(i * 7919 + j * 104729) % 150000 + 10 for j in range(256)] for i in range(R)]
    plan = {
        "cold": lambda: ("static, full test, forced full length, cold (graph capture included)", prompts, full, B,
                         "static"),
        "warm": lambda: ("static, full test, forced full length, warm", prompts, full, B, "static"),
        "early": lambda: ("static, full test, early stop (per-question lengths, mean "
                          f"{sum(early) / len(early):.0f})", prompts, early, B, "static"),
        "b1": lambda: ("static, batch 1, one prompt, 256 new tokens", prompts[:1], [256], 1, "static"),
        "gen_b1": lambda: ("generate, batch 1, one prompt, 64 new tokens", prompts[:1], [64], 1, "generate"),
        "gen_b256": lambda: (f"generate, batch {R}, {R} test prompts, 128 new tokens", prompts[:R], [128] * R, R,
                             "generate"),
        "synthetic": lambda: (f"static, batch {R}, prompts of 256 tokens, {args.max_new_tokens} new tokens "
                              "(reference shape)", synthetic, [args.max_new_tokens] * R, R, "static"),
        "b512": lambda: ("static, full test, forced full length, batch 512", prompts, full, 512, "static"),
        "b256": lambda: (f"static, full test, forced full length, batch {R}", prompts, full, R, "static"),
        "early_c16": lambda: ("static, full test, early stop, check every 16 steps", prompts, early, B,
                              "static", 16),
        "early512": lambda: ("static, full test, early stop, batch 512", prompts, early, 512, "static"),
        "early512_c16": lambda: ("static, full test, early stop, batch 512, check every 16 steps", prompts, early,
                                 512, "static", 16),
    }
    if args.sampling:
        rows.extend(sampling_benchmark(model, prompts, args.rollout_prompts, args.max_new_tokens, args.lora_rank))
        wanted = []
    for key in wanted:
        if key == "check" or key not in plan:
            continue
        if time.perf_counter() - started > args.budget_s:
            print(json.dumps({"skipped": key, "reason": "time budget"}), flush=True)
            continue
        name, ps, limits, batch, method, *rest = plan[key]()
        info: dict = {}
        function = static(ps, limits, batch, info, *rest) if method == "static" else generate(ps, limits, batch)
        try:
            row = measure(name, function, ps, limits, batch, method=method)
        except Exception as error:  # report and go on: one failing row must not lose the others
            row = {"name": name, "error": f"{type(error).__name__}: {error}"}
            print(json.dumps(row), flush=True)
        row["info"] = {k: v for k, v in info.items() if k != "method"}
        rows.append(row)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
    if args.evaluate and time.perf_counter() - started <= args.budget_s:
        rows.append(full_evaluate(model, tokenizer, args.gsm8k, args.limit, args.max_new_tokens))
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
    try:
        import vllm  # noqa: F401
        results["vllm"] = "installed but not benchmarked by this script version"
    except ImportError:
        results["vllm"] = "not installed"
    results["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps({"vllm": results["vllm"], "total_s": results["total_s"]}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
