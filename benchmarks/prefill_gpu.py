"""Prefill of a LLaVA-1.5-7B-shaped language model on a GPU: 576 image tokens vs 288 / 144 / 64.

torch + transformers only (no vLLM): a Llama built from a ``LlamaConfig`` with random weights
(bf16, nothing downloaded), fed ``inputs_embeds`` of K image rows + ~60 text rows, timed with CUDA
events; token counts interleaved per repeat; medians. This is the upper bound of what pruning can
save in the LLM prefill of a real 7B model, without vLLM's scheduling or the vision tower.
Without CUDA it says so and exits cleanly; ``--smoke`` runs a tiny shape on CPU so the code stays
alive on machines without a GPU.
"""

from __future__ import annotations

import argparse
import time

from . import common

NAME = "prefill-gpu"
LLAVA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
)
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=320,
    max_position_embeddings=4096,
)
IMAGE_TOKENS = (576, 288, 144, 64)
NO_CUDA = (
    "prefill-gpu needs a CUDA GPU and torch.cuda.is_available() is False here: nothing measured. "
    "(--smoke runs a tiny shape on CPU to check the code.)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repeats", type=int, default=None, help="measured rounds (default 20; smoke 2)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="unmeasured rounds (default 3; smoke 1)"
    )
    parser.add_argument("--text-tokens", type=int, default=60)
    parser.add_argument("--image-tokens", type=int, nargs="+", default=list(IMAGE_TOKENS))


def run(args: argparse.Namespace, llm=None, model_label: str | None = None) -> dict | None:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(NO_CUDA)
        return None
    device = torch.device("cuda" if cuda else "cpu")
    shape = TINY_SHAPE if args.smoke else LLAVA_7B
    dtype = torch.bfloat16
    repeats = args.repeats or (2 if args.smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    counts = sorted(set(args.image_tokens), reverse=True)

    model = _random_llama(shape, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    embeds = {
        k: torch.randn(
            1, k + args.text_tokens, shape["hidden_size"], generator=gen, device=device, dtype=dtype
        )
        * 0.02
        for k in counts
    }
    samples = _time_prefills(model, embeds, counts, warmup, repeats, cuda)
    return {
        "benchmark": NAME,
        "model": "tiny-llama (smoke, CPU)"
        if args.smoke
        else "LLaVA-1.5-7B-shaped Llama (random, bf16)",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "timing": "CUDA events around one forward"
        if cuda
        else "perf_counter around one forward (CPU)",
        "settings": {
            "shape": shape,
            "dtype": str(dtype),
            "text_tokens": args.text_tokens,
            "repeats": repeats,
            "warmup": warmup,
            "order": "round-robin, rotated each round",
            "attention": "sdpa",
            "logits_to_keep": 1,
        },
        "rows": _rows(samples, counts, args.text_tokens),
    }


def _random_llama(shape: dict, device, dtype):
    """A random-weight Llama of ``shape``, built straight on ``device`` in ``dtype`` (a 7B model
    in fp32 first would need 27 GB)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)


def _time_prefills(model, embeds, counts, warmup: int, repeats: int, cuda: bool) -> dict:
    """Seconds of one prefill per image-token count, round-robin, rotated each round."""
    import torch

    def forward(k: int) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(inputs_embeds=embeds[k], use_cache=True, logits_to_keep=1)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        model(inputs_embeds=embeds[k], use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0

    samples = {k: [] for k in counts}
    bar = common.progress((warmup + repeats) * len(counts), NAME)
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for k in common.rotated(counts, round_):
                seconds = forward(k)
                bar.update()
                if round_ >= warmup:
                    samples[k].append(seconds)
    bar.close()
    return samples


def _rows(samples: dict, counts: list[int], text_tokens: int) -> list[dict]:
    full = max(counts)
    rows = [
        {
            "image_tokens": k,
            "prompt_tokens": k + text_tokens,
            "token_bound": (k + text_tokens) / (full + text_tokens),
            "prefill": common.summary(samples[k]),
        }
        for k in counts
    ]
    for row in rows:
        row["ratio"] = row["prefill"]["median"] / rows[0]["prefill"]["median"]
    return rows


def markdown(result: dict) -> str:
    headers = [
        "image tokens",
        "prompt tokens",
        "token bound",
        "prefill ms median (min–max)",
        "ratio",
    ]
    rows = [
        [
            r["image_tokens"],
            r["prompt_tokens"],
            f"{r['token_bound']:.3f}",
            f"{r['prefill']['median'] * 1e3:.2f} ({r['prefill']['min'] * 1e3:.2f}–"
            f"{r['prefill']['max'] * 1e3:.2f})",
            f"**{r['ratio']:.3f}**",
        ]
        for r in result["rows"]
    ]
    return "\n".join(
        [
            f"### LLM prefill — {result['model']} on {result['device']}",
            "",
            f"{result['timing']}; {result['settings']['repeats']} rounds after "
            f"{result['settings']['warmup']} warm-up, {result['settings']['order']}.",
            "",
            common.markdown_table(headers, rows),
        ]
    )
