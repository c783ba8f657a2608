"""Information flow through the served language model, from the served weights.

Two uses of one piece of math, the decoder layers run eagerly with their own submodules (norms,
``qkv_proj``, the q/k norms where the attention has them (Qwen3), rotary embedding, ``o_proj``,
MLP or MoE block) and only vLLM's paged attention (``self.attn``, which needs the KV cache) replaced
by explicit causal softmax attention whose probabilities are read in float32:

- **Flow diagnostics** (``flow_pass``): one pass over a request's actual LLM input (its prompt with
  the kept image rows in place) after the request is done. Per decoder layer l, with A_l the
  attention probabilities averaged over all heads and p the last prompt position,
  ``share_l(X) = sum_{j in X} A_l[p, j]`` for X = system (before the first image token), image
  (the image tokens the LLM saw) and question (every other token after the first image token).
  For a few shallow layers it also gives each kept image token's attention from the question
  tokens after the last image (mean over heads and those tokens): the map a person compares with
  the relevance heatmap.
- **The flow selection's scout** (``scout_scores``): the first ``prune_layer`` decoder layers over
  ``[BOS] + image rows + question tokens``; each image token's score is the attention the question
  tokens pay it in the last of those layers, mean over heads and question tokens (all of them, not
  only the last: a shallow layer's last row leans toward the image's last rows through RoPE).

Both run on every tensor-parallel rank (``o_proj`` and the MLP all-reduce inside). Heads are
sharded, so each rank sums its own heads; ``combine_flow`` (diagnostics) or an all-reduce (scout)
adds the ranks up and divides by the total number of heads.

What differs between families comes from the model:

- positions: the served ones, fed to the layer's own ``rotary_emb``: 1-D (LLaVA-1.5, LLaVA-NeXT,
  OneVision: original or compact, as the request had them) or M-RoPE's [3, L] (Qwen2.5-VL,
  Qwen3-VL: each kept image token at its original (t, h, w), the text after an image where it
  is unpruned). The flow pass asks the model (``flow_inputs``), the scout's caller passes them;
- DeepStack (Qwen3-VL): level i's rows of the kept image tokens added to the hidden states after
  decoder layer i, at the image's positions, as vLLM's ``Qwen3LLMModel.forward`` adds them;
- a forward context (``flow_vllm_config``): vLLM's MoE layers find themselves through it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen2_5_vl_text",
    "qwen3_vl_text",
    "qwen3_vl_moe_text",
)
"""Language models whose vLLM decoder layers have ``LlamaDecoderLayer``'s steps (Llama, Mistral;
Qwen2, plain as LLaVA-OneVision serves it and as Qwen2.5-VL's text model, the same
``Qwen2DecoderLayer``; Qwen3, dense and MoE, as the Qwen-VL families serve them): the pass reruns
those steps (pinned in tests/test_vllm_internals.py)."""

MAP_LAYERS = (0, 1, 2)
"""Decoder layers whose image map flow diagnostics return (those the model has)."""

ROW_CHUNK_ELEMENTS = 1 << 24
"""Attention probabilities held at once, per chunk of query rows (64 MiB of float32)."""

LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
ATTENTION_PARTS = (
    "qkv_proj",
    "rotary_emb",
    "o_proj",
    "q_size",
    "kv_size",
    "num_heads",
    "num_kv_heads",
    "total_num_heads",
    "head_dim",
    "scaling",
)
"""What the pass uses of vLLM's ``LlamaDecoderLayer`` / ``LlamaAttention`` (pinned in
tests/test_vllm_internals.py)."""


class FlowUnavailable(RuntimeError):
    """The served model or its input does not allow a flow pass; the message says why."""


def check_supported(opts, text_config) -> None:
    """Refuse, in the processor (before the engine sees the request), what the worker could not
    run: the flow method or flow diagnostics on another language model, a scout deeper than the
    model.

    Raises:
        PruneOptionError: naming ``prune_method`` / ``prune_flow`` / ``prune_layer``.
    """
    from ..options import FLOW, METHOD, PruneOptionError

    opts.check_layers(text_config.num_hidden_layers)
    why = unsupported_model(text_config)
    if (opts.method == "flow" or opts.flow) and why:
        kwarg = METHOD if opts.method == "flow" else FLOW
        raise PruneOptionError(kwarg, f"{kwarg}: {why}")


def unsupported_model(text_config) -> str | None:
    """Why a flow pass or scout cannot run this language model, or None when it can: they rerun
    Llama-style decoder layers (``MODEL_TYPES``)."""
    if text_config.model_type in MODEL_TYPES:
        return None
    return (
        f"information flow supports {', '.join(MODEL_TYPES)} language models; this model's is "
        f"{text_config.model_type!r}"
    )


# ---- attention ------------------------------------------------------------------------------


def head_summed_attention(
    q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Causal softmax attention of the query positions ``rows``, summed over heads and averaged
    over the rows: ``sum_h mean_{r in rows} A_h[r, :]``, [L] float32.

    Args:
        q: [H, L, d] queries (rotary applied).
        k: [H, L, d] keys (rotary applied; GQA groups already expanded to H).
        rows: [R] int64 query positions, R >= 1.
        scale: the softmax scale (head_dim ** -0.5 for Llama).

    Only R rows of probabilities exist at a time, in chunks of at most ``ROW_CHUNK_ELEMENTS``,
    so the cost is O(H R L) and the memory bounded for any prompt.
    """
    heads, length, _ = q.shape
    kf = k.float().transpose(1, 2)  # [H, d, L]
    cols = torch.arange(length, device=q.device)
    total = torch.zeros(length, dtype=torch.float32, device=q.device)
    step = max(1, ROW_CHUNK_ELEMENTS // max(heads * length, 1))
    for start in range(0, rows.numel(), step):
        chunk = rows[start : start + step]
        logits = torch.matmul(q[:, chunk].float(), kf) * scale  # [H, c, L]
        logits.masked_fill_(cols[None, None, :] > chunk[None, :, None], float("-inf"))
        total += torch.softmax(logits, dim=-1).sum(dim=(0, 1))
    return total / rows.numel()


def head_summed_attention_ref(
    q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Reference for ``head_summed_attention``: the whole [H, L, L] causal attention matrix,
    written out, then the rows averaged and the heads summed. It stays beside the op it checks,
    as every kernel's torch reference does (``kernels/``), so the two are read and changed
    together; tests/test_flow.py compares them."""
    length = q.shape[1]
    logits = torch.einsum("hid,hjd->hij", q.double(), k.double()) * scale
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    return probs[:, rows].mean(dim=1).sum(dim=0).float()


# ---- the decoder layers, eagerly ------------------------------------------------------------


def decoder_layers(model) -> list[torch.nn.Module]:
    """The language model's decoder layers, checked to have what the pass uses."""
    inner = model.get_language_model().model
    layers = list(inner.layers)
    if getattr(inner, "start_layer", 0) != 0 or getattr(inner, "end_layer", len(layers)) != len(
        layers
    ):
        raise FlowUnavailable(
            "information flow needs every decoder layer on each worker: it is "
            "not available with pipeline parallelism"
        )
    for layer in layers:
        missing = [p for p in LAYER_PARTS if not hasattr(layer, p)]
        missing += [p for p in ATTENTION_PARTS if not hasattr(getattr(layer, "self_attn", None), p)]
        if missing:
            raise FlowUnavailable(
                f"information flow supports Llama-style decoder layers; {type(layer).__name__} "
                f"has no {', '.join(missing)}"
            )
    return layers


def _project(attn, positions: torch.Tensor, normed: torch.Tensor):
    """``LlamaAttention.forward`` (``Qwen3Attention.forward`` where the attention has q/k norms)
    up to ``self.attn``: q, k, v as [H, L, d] (local heads). ``positions``: [L], or [3, L] for
    M-RoPE (the layer's ``rotary_emb`` takes either)."""
    qkv, _ = attn.qkv_proj(normed)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    length, d = normed.shape[0], attn.head_dim
    if hasattr(attn, "q_norm"):  # per head, before the rotary embedding
        q = attn.q_norm(q.reshape(length, -1, d)).reshape(q.shape)
        k = attn.k_norm(k.reshape(length, -1, d)).reshape(k.shape)
    q, k = attn.rotary_emb(positions, q, k)
    q = q.reshape(length, attn.num_heads, d).transpose(0, 1)
    k = k.reshape(length, attn.num_kv_heads, d).transpose(0, 1)
    v = v.reshape(length, attn.num_kv_heads, d).transpose(0, 1)
    group = attn.num_heads // attn.num_kv_heads
    if group > 1:  # grouped-query attention: each kv head serves `group` query heads
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    return q, k, v


def _finish_layer(layer, q, k, v, residual):
    """The rest of ``LlamaDecoderLayer.forward`` after the attention probabilities."""
    attn = layer.self_attn
    out = torch.nn.functional.scaled_dot_product_attention(
        q[None], k[None], v[None], is_causal=True, scale=attn.scaling
    )[0]
    out = out.transpose(0, 1).reshape(q.shape[1], attn.num_heads * attn.head_dim)
    hidden, _ = attn.o_proj(out)
    hidden, residual = layer.post_attention_layernorm(hidden, residual)
    return layer.mlp(hidden), residual


AfterLayer = Callable[[int, torch.Tensor], torch.Tensor]


def run_layers(
    layers,
    embeds: torch.Tensor,
    visit,
    *,
    positions: torch.Tensor | None = None,
    after_layer: AfterLayer | None = None,
) -> None:
    """Run ``layers`` over one sequence ``embeds`` [L, D], calling ``visit(i, q, k)`` with each
    layer's queries and keys; stop after the last layer's visit (its attention output and MLP
    are not needed).

    Args:
        positions: [L] or [3, L] (M-RoPE); None: 0 .. L - 1.
        after_layer: ``after_layer(i, hidden)`` -> the hidden states layer i + 1 reads (DeepStack
            adds its rows there); None: as they are.
    """
    if positions is None:
        positions = torch.arange(embeds.shape[0], device=embeds.device)
    hidden, residual = embeds, None
    for i, layer in enumerate(layers):
        # vLLM's fused norm may write into its inputs: the first layer gets a copy.
        if residual is None:
            residual = hidden.clone()
            normed = layer.input_layernorm(hidden)
        else:
            normed, residual = layer.input_layernorm(hidden, residual)
        q, k, v = _project(layer.self_attn, positions, normed)
        visit(i, q, k)
        if i + 1 < len(layers):
            hidden, residual = _finish_layer(layer, q, k, v, residual)
            if after_layer is not None:
                hidden = after_layer(i, hidden)


def deepstack_adder(at: torch.Tensor, levels: Sequence[torch.Tensor]) -> AfterLayer:
    """DeepStack as ``Qwen3LLMModel.forward`` applies it: after decoder layer i < len(levels),
    ``levels[i]`` ([len(at), D], the image tokens' rows of level i) added to the hidden states
    at the sequence positions ``at``."""

    def add(i: int, hidden: torch.Tensor) -> torch.Tensor:
        if i >= len(levels):
            return hidden
        return hidden.index_add(0, at, levels[i].to(hidden.dtype))

    return add


def forward_context(model):
    """vLLM's forward context for an eager pass outside the runner's, where the model needs one
    (``model.flow_vllm_config``; vLLM's MoE layers look themselves up in it), else nothing."""
    vllm_config = getattr(model, "flow_vllm_config", None)
    if vllm_config is None:
        return contextlib.nullcontext()
    from vllm.forward_context import create_forward_context, override_forward_context

    return override_forward_context(create_forward_context(None, vllm_config))


# ---- flow diagnostics -----------------------------------------------------------------------


@torch.inference_mode()
def flow_pass(
    model,
    prompt_ids: Sequence[int],
    entry: dict,
    *,
    map_layers: Sequence[int] = MAP_LAYERS,
) -> dict:
    """This rank's share of a request's flow diagnostics (heads summed over this rank's heads).

    Args:
        model: the served model (vLLM's, on this worker). A family whose language model needs
            more than 1-D positions from 0 supplies ``flow_inputs(prompt_ids, entry)`` ->
            (positions, ``after_layer`` or None) (``qwen2_5_vl.MRopePruneModelMixin``).
        prompt_ids: the request's prompt token ids as the engine ran them (K placeholders/image).
        entry: what ``embed_multimodal`` kept for the request (``DiagnosticsStore.put_flow``):
            ``rows`` (per image, the [K, D] rows the LLM saw, in prompt order), ``kept``,
            ``num_tokens``, ``grids``, and DeepStack's ``levels`` where the model has them.
        map_layers: layers whose image map is returned (those the model has).

    Returns:
        ``{"heads", "total_heads", "layers": [[system, image, question] per layer],
        "image_map_layers": [{"layer", "per_image": [[K_i floats]]}], "kept", "num_tokens",
        "grids", "seconds"}``; every attention number is a sum over this rank's heads.
    """
    start = time.perf_counter()
    layers = decoder_layers(model)
    image_token = model.config.image_token_id
    rows = entry["rows"]
    device = next(model.parameters()).device
    ids = torch.as_tensor(list(prompt_ids), dtype=torch.int64, device=device)
    is_image = ids == image_token
    positions = is_image.nonzero().flatten()
    if positions.numel() != sum(r.shape[0] for r in rows) or positions.numel() == 0:
        raise FlowUnavailable(
            f"the prompt has {positions.numel()} image tokens, the kept rows "
            f"{sum(r.shape[0] for r in rows)}: not the input this request ran"
        )
    # The text's embeddings with the kept rows in place (not the model's embed_input_ids: on
    # Qwen3-VL that would also fill the DeepStack buffer the next forward reads).
    embed = model.get_language_model().embed_input_ids
    embeds = embed(ids.masked_fill(is_image, 0))
    embeds[is_image] = torch.cat(rows).to(device=device, dtype=embeds.dtype)
    inputs = getattr(model, "flow_inputs", None)
    rope, after_layer = inputs(list(prompt_ids), entry) if inputs else (None, None)
    if rope is not None:
        rope = rope.to(device)

    length = ids.numel()
    first, last = int(positions[0]), int(positions[-1])
    segment = torch.full((length,), 2, dtype=torch.int64, device=device)  # question
    segment[:first] = 0  # system
    segment[is_image] = 1  # image
    last_row = torch.tensor([length - 1], device=device)
    map_rows = torch.arange(last + 1, length, device=device)
    wanted = {i for i in map_layers if i < len(layers)} if map_rows.numel() else set()
    split = [r.shape[0] for r in rows]
    shares: list[list[float]] = []
    maps: list[dict] = []

    def visit(i: int, q: torch.Tensor, k: torch.Tensor) -> None:
        scale = layers[i].self_attn.scaling
        row = head_summed_attention(q, k, last_row, scale=scale)
        shares.append(torch.zeros(3, device=device).index_add_(0, segment, row).tolist())
        if i in wanted:
            paid = head_summed_attention(q, k, map_rows, scale=scale)[positions]
            maps.append({"layer": i, "per_image": [t.tolist() for t in torch.split(paid, split)]})

    with forward_context(model):
        run_layers(layers, embeds, visit, positions=rope, after_layer=after_layer)
    attn = layers[0].self_attn
    return {
        "heads": attn.num_heads,
        "total_heads": attn.total_num_heads,
        "layers": shares,
        "image_map_layers": maps,
        "kept": entry["kept"],
        "num_tokens": entry["num_tokens"],
        "grids": entry.get("grids"),
        "seconds": time.perf_counter() - start,
    }


def combine_flow(answers: Sequence[dict]) -> dict:
    """The ``flow`` object of the response from every tensor-parallel rank's ``flow_pass``:
    per-rank head sums added up and divided by the total number of heads.

    Returns:
        ``{"layers": [{"system", "image", "question"}], "cliff_layer",
        "image_map_layers": [{"layer", "per_image": [grid]}]}``, a grid per image shaped as its
        token grid (the rank's ``grids``; without one, a square; a flat list when N is not one),
        ``None`` at dropped tokens.

    Raises:
        FlowUnavailable: a rank reported an error, or the ranks do not add up to every head.
    """
    errors = [a["error"] for a in answers if "error" in a]
    if errors:
        raise FlowUnavailable(errors[0])
    total = answers[0]["total_heads"]
    if sum(a["heads"] for a in answers) != total:
        raise FlowUnavailable(
            f"{len(answers)} rank(s) answered for {sum(a['heads'] for a in answers)} of "
            f"{total} heads"
        )
    first = answers[0]
    layers = []
    for parts in zip(*(a["layers"] for a in answers)):
        system, image, question = (sum(v) / total for v in zip(*parts))
        layers.append({"system": system, "image": image, "question": question})
    maps = []
    for per_rank in zip(*(a["image_map_layers"] for a in answers)):
        grids = []
        shapes = first.get("grids") or [None] * len(first["kept"])
        for i, per_image in enumerate(zip(*(m["per_image"] for m in per_rank))):
            values = [sum(v) / total for v in zip(*per_image)]
            grids.append(patch_grid(values, first["kept"][i], first["num_tokens"][i], shapes[i]))
        maps.append({"layer": per_rank[0]["layer"], "per_image": grids})
    return {
        "layers": layers,
        "cliff_layer": cliff_layer([layer["image"] for layer in layers]),
        "image_map_layers": maps,
    }


def patch_grid(
    values: Sequence[float],
    kept: Sequence[int],
    num_tokens: int,
    grid: Sequence[int] | None = None,
) -> list:
    """Kept tokens' values on the image's patch grid (``grid`` = rows, cols; without it, a square
    one), ``None`` where dropped; a flat list of N when the grid is unknown."""
    flat: list[float | None] = [None] * num_tokens
    for index, value in zip(kept, values, strict=True):
        flat[index] = value
    if grid is None:
        side = math.isqrt(num_tokens)
        grid = (side, side)
    rows, cols = grid
    if rows * cols != num_tokens:
        return flat
    return [flat[r * cols : (r + 1) * cols] for r in range(rows)]


def cliff_layer(image_shares: Sequence[float]) -> int:
    """The layer l >= 1 where the image's share falls most from layer l - 1 (the first such layer
    on a tie); -1 when it never falls (or the model has one layer)."""
    best, at = 0.0, -1
    for layer in range(1, len(image_shares)):
        drop = image_shares[layer - 1] - image_shares[layer]
        if drop > best:
            best, at = drop, layer
    return at


def fetch_flow(llm, diag_id: int, prompt_token_ids: Sequence[int]) -> dict:
    """Flow diagnostics of a finished offline request that ran with ``prune_flow`` and
    ``prune_diagnostics=diag_id`` (``LLM`` engine; one data-parallel engine).

    Runs the flow pass on every worker (``PruneWorkerExtension``) and combines the ranks. Take
    the selection's diagnostics after it (``lvlm_prune_pop_diagnostics``), not before: that pop
    also drops what the pass needs.

    Raises:
        FlowUnavailable: no worker holds the request's rows (never asked, already taken, or
            evicted), or the pass could not run.
    """
    answers = [
        a
        for a in llm.collective_rpc("lvlm_prune_flow", args=(diag_id, list(prompt_token_ids)))
        if a is not None
    ]
    if not answers:
        raise FlowUnavailable(
            f"no flow data for diagnostics id {diag_id}: ask with prune_flow and "
            "prune_diagnostics, once per id"
        )
    return combine_flow(answers)


# ---- the flow selection's scout -------------------------------------------------------------


@torch.inference_mode()
def scout_scores(
    model,
    images: Sequence[torch.Tensor],
    queries: Sequence[torch.Tensor],
    prune_layers: Sequence[int],
    *,
    head: torch.Tensor | None,
    positions: Sequence[torch.Tensor | None] | None = None,
    deepstack: Sequence[Sequence[torch.Tensor] | None] | None = None,
) -> list[torch.Tensor]:
    """Each image's flow scores, [N_b] float32: the attention its tokens receive from the question
    tokens in decoder layer ``prune_layers[b] - 1`` of a pass over ``[head] + image + question``,
    mean over all heads and question tokens.

    Every tensor-parallel rank must call this with the same inputs (the layers all-reduce inside,
    and the per-rank head sums are all-reduced here), so every rank ranks identically.

    Args:
        model: the served model.
        images: per image [N_b, D] projector output (the rows the LLM reads as tokens).
        queries: per image [T_b, D] question token embeddings, T_b >= 1.
        prune_layers: per image, how many decoder layers the scout runs (>= 1).
        head: [D] the embedding of the token the sequence starts with (LLaVA: BOS; the Qwen-VL
            families: ``<|vision_start|>``), or None for none.
        positions: per image the sequence's positions ([3, L_b] for M-RoPE), None: 1-D from 0.
        deepstack: per image its DeepStack levels' rows ([N_b, D] each), None: none.
    """
    layers = decoder_layers(model)
    out: list[torch.Tensor] = []
    for b, (image, query, depth) in enumerate(zip(images, queries, prune_layers, strict=True)):
        if not 1 <= depth <= len(layers):
            raise ValueError(f"prune_layer must be in [1, {len(layers)}], got {depth}")
        start = [] if head is None else [head.reshape(1, -1).to(image.dtype)]
        seq = torch.cat([*start, image, query.to(image.dtype)])
        offset = len(start)
        n = image.shape[0]
        rows = torch.arange(offset + n, seq.shape[0], device=seq.device)
        levels = deepstack[b] if deepstack is not None else None
        at = torch.arange(offset, offset + n, device=seq.device)
        found: list[torch.Tensor] = []

        def visit(i, q, k, depth=depth, rows=rows, offset=offset, n=n, found=found):
            if i == depth - 1:
                scale = layers[i].self_attn.scaling
                found.append(head_summed_attention(q, k, rows, scale=scale)[offset : offset + n])

        with forward_context(model):
            run_layers(
                layers[:depth],
                seq,
                visit,
                positions=None if positions is None else positions[b],
                after_layer=None if levels is None else deepstack_adder(at, levels),
            )
        out.append(found[0])
    if not out:
        return out
    summed = torch.cat(out)
    if _tp_world_size() > 1:
        from vllm.distributed import tensor_model_parallel_all_reduce

        summed = tensor_model_parallel_all_reduce(summed)
    summed = summed / layers[0].self_attn.total_num_heads
    return list(torch.split(summed, [image.shape[0] for image in images]))


ScoutInputs = Callable[[int, int], tuple[torch.Tensor | None, Sequence[torch.Tensor] | None]]


def family_scout_scores(
    model,
    images: Sequence[torch.Tensor],
    queries: Sequence[torch.Tensor],
    methods: Sequence[str],
    keep: Sequence[int],
    diag_ids: Sequence[int],
    prune_layers: Sequence[int],
    *,
    head_id: int | None,
    inputs: ScoutInputs | None = None,
) -> list[torch.Tensor | None]:
    """``PruneModelMixin._scout_scores`` (``worker/model.py``): the scout's scores for
    the flow images that prune or report scores and have a question, None for the others.

    Args:
        head_id: the token the scout's sequence starts with (``scout_scores``' ``head``).
        inputs: ``inputs(b, length)`` -> (positions, DeepStack levels) of image b's sequence of
            ``length`` tokens (``scout_scores``' per-image arguments); None: 1-D, no DeepStack.
    """
    scores: list[torch.Tensor | None] = [None] * len(images)
    scouted = [
        b
        for b, (m, q) in enumerate(zip(methods, queries))
        if m == "flow" and q.shape[0] and (keep[b] < images[b].shape[0] or diag_ids[b])
    ]
    if not scouted:
        return scores
    head = None
    if head_id is not None:
        embed_tokens = model.get_language_model().model.embed_tokens
        embed_tokens = getattr(embed_tokens, "base_layer", embed_tokens)
        head = embed_tokens(torch.tensor([head_id], device=images[0].device))[0]
    extras = [(None, None)] * len(scouted)
    if inputs is not None:
        start = 0 if head is None else 1
        extras = [inputs(b, start + images[b].shape[0] + queries[b].shape[0]) for b in scouted]
    try:
        found = scout_scores(
            model,
            [images[b] for b in scouted],
            [queries[b] for b in scouted],
            [prune_layers[b] for b in scouted],
            head=head,
            positions=[p for p, _ in extras],
            deepstack=[d for _, d in extras],
        )
    except FlowUnavailable as err:
        # The processor refuses what it can see; what only the worker sees (pipeline
        # parallelism) must not stop the engine: the selection falls back to uniform and says
        # so in its method. Every rank raises here, before any collective.
        logger.warning("lvlm-prune: flow method unavailable, uniform instead: %s", err)
        found = [None] * len(scouted)
    for b, s in zip(scouted, found):
        scores[b] = s
    return scores


def _tp_world_size() -> int:
    from vllm.distributed import get_tensor_model_parallel_world_size

    try:
        return get_tensor_model_parallel_world_size()
    except AssertionError:  # no distributed state (a model built outside an engine)
        return 1
