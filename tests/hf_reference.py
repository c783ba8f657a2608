"""The transformers side of the end-to-end comparisons: the same model and prompt computed without
vLLM, with the image rows the torch reference selection chooses, at the positions the family's rule
gives them.

One :class:`Reference` subclass per model family (the family suite, ``tests/family/``, names it in
its table); the module-level functions are LLaVA-1.5 shortcuts for the tests that only know LLaVA.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from transformers import AutoProcessor

from lvlm_prune.kernels.reference import (
    coverage_select_ref,
    merge_dropped_ref,
    relevance_ref,
    topk_select_ref,
)
from lvlm_prune.kernels.selection import uniform_indices
from lvlm_prune.models.tiny_llava import IMAGE_TOKEN_ID  # noqa: F401  (LLaVA shortcut)

LOGPROB_ATOL = 2e-4  # float32, vLLM CPU kernels vs transformers eager

Grid = tuple[int, int]  # (rows, cols) of an image's tokens


class Reference:
    """One family's model in transformers, float32. A family supplies the model class, its image
    features, its token grid and its position rule; the rest is every family's."""

    model_class: type

    def __init__(self, model_dir: str) -> None:
        self.model = self.model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.image_token_id = int(self.model.config.image_token_id)

    # -- what a family supplies --

    def image_features(self, image) -> torch.Tensor:
        """[N, D] projector output for one image, rows in the order vLLM's placeholders take."""
        raise NotImplementedError

    def grid(self, image) -> Grid:
        """(rows, cols) of the image's tokens (rows x cols = N)."""
        raise NotImplementedError

    def position_grid(self, image) -> Grid:
        """The grid ``positions`` reads for the image (its ``grids``): the token grid, or (1, N)
        for a 1-D family whose N is not the grid's (LLaVA-NeXT's AnyRes)."""
        return self.grid(image)

    def positions(
        self, prompt_ids: Sequence[int], grids: Sequence[Grid], kept: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """The positions transformers gives the pruned prompt under the family's rule ([L] for
        1-D RoPE, [3, L] for M-RoPE); ``kept[i]``: image i's kept indices, in prompt order."""
        raise NotImplementedError

    def rule_positions(self, prompt_ids, grids, kept) -> torch.Tensor:
        """The same positions written from the rule itself, independently of transformers."""
        return self.positions(prompt_ids, grids, kept)

    def wrong_positions(self, prompt_ids, grids, kept) -> dict[str, torch.Tensor]:
        """Plausible wrong rules (negative controls): each must move the logprobs."""
        raise NotImplementedError

    # -- every family's --

    def placeholder_ids(self) -> set[int]:
        return {self.image_token_id}

    @torch.no_grad()
    def embed(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(list(ids), dtype=torch.int64)
        return self.model.get_input_embeddings()(ids)

    def query_ids(self, prompt_ids) -> list[int]:
        """The default query: the prompt's text tokens (no specials, no placeholders)."""
        skip = set(self.processor.tokenizer.all_special_ids) | self.placeholder_ids()
        return [t for t in prompt_ids if t not in skip]

    def encode(self, text: str) -> list[int]:
        return self.processor.tokenizer.encode(text, add_special_tokens=False)

    def scores(self, image, q_ids) -> torch.Tensor:
        feats = self.image_features(image)
        q = self.embed(q_ids)
        return relevance_ref(
            feats, torch.tensor([0, feats.shape[0]]), q, torch.tensor([0, q.shape[0]])
        )

    def kept(self, image, q_ids, k: int, method: str = "simignore") -> torch.Tensor:
        if method == "uniform":
            return uniform_indices(self.image_features(image).shape[0], k)
        if method == "cover":
            return coverage_select_ref(self.image_features(image), self.scores(image, q_ids), k)
        return topk_select_ref(self.scores(image, q_ids), k)

    def pruned_rows(self, image, kept: torch.Tensor, *, merge: bool = False) -> torch.Tensor:
        feats = self.image_features(image)
        return merge_dropped_ref(feats, kept) if merge else feats[kept]

    @torch.no_grad()
    def greedy(self, prompt_ids, image_rows: list[torch.Tensor], positions, max_tokens: int):
        """Greedy decode from ``prompt_ids`` whose placeholders take ``image_rows`` in order, at
        ``positions``; generated tokens follow at max + 1, max + 2, ... (as in transformers).

        Returns (token ids, per-step log-softmax [max_tokens, vocab]).
        """
        ids = torch.as_tensor(list(prompt_ids), dtype=torch.int64)
        embeds = self.embed(ids)
        mask = ids == self.image_token_id
        rows = torch.cat(image_rows) if image_rows else embeds[:0]
        assert int(mask.sum()) == rows.shape[0], (int(mask.sum()), rows.shape)
        embeds[mask] = rows.to(embeds.dtype)
        positions = torch.as_tensor(positions).clone()
        out, logprobs = [], []
        for _ in range(max_tokens):
            # NOTE(transformers 5.19): positions with gaps and no attention mask are read as
            # packed sequences (block-diagonal attention); the explicit mask keeps one sequence.
            logits = self.model(
                inputs_embeds=embeds[None],
                position_ids=positions.unsqueeze(-2),
                attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.int64),
            ).logits
            lp = torch.log_softmax(logits[0, -1].float(), dim=-1)
            nxt = int(lp.argmax())
            out.append(nxt)
            logprobs.append(lp)
            embeds = torch.cat([embeds, self.embed([nxt])])
            positions = torch.cat([positions, positions[..., -1:] * 0 + positions.max() + 1], -1)
        return out, torch.stack(logprobs)

    @torch.no_grad()
    def stock_generate(self, prompt: str, images, max_tokens: int):
        """transformers' own generate on the unpruned model: (expanded prompt ids, output ids)."""
        inputs = self.processor(text=prompt, images=images, return_tensors="pt")
        out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        n = inputs["input_ids"].shape[1]
        return inputs["input_ids"][0].tolist(), out[0, n:].tolist()


def _image_spans(prompt_ids, image_token_id: int, kept) -> list[int]:
    """Index of each image's first placeholder in the pruned prompt (images in prompt order)."""
    ids = list(prompt_ids)
    starts, i = [], 0
    for k in (len(x) for x in kept):
        i = ids.index(image_token_id, i)
        assert ids[i : i + k] == [image_token_id] * k, "K placeholders per image"
        starts.append(i)
        i += k
    return starts


class OneDReference(Reference):
    """The 1-D RoPE families' position rules (``vllm_plugin/positions.py``). By default
    (``positions: "original"``) kept token j of an image sits at its unpruned position, the text
    after the image where it is unpruned; ``compact_positions`` is the per-request alternative.
    An image spans grid rows x cols = N positions."""

    def positions(self, prompt_ids, grids, kept) -> torch.Tensor:
        return self.original_positions(prompt_ids, grids, kept)

    def original_positions(self, prompt_ids, grids, kept) -> torch.Tensor:
        """1-D positions as in the unpruned prompt: kept token j of an image at +(kept[j] - j),
        every later token at +(N - K)."""
        positions = torch.arange(len(prompt_ids))
        for start, grid, kept_i in zip(
            _image_spans(prompt_ids, self.image_token_id, kept), grids, kept
        ):
            k, n = len(kept_i), grid[0] * grid[1]
            positions[start : start + k] += torch.as_tensor(kept_i) - torch.arange(k)
            positions[start + k :] += n - k
        return positions

    def rule_positions(self, prompt_ids, grids, kept) -> torch.Tensor:
        """The original rule token by token: text one after another, an image at base b puts
        kept token j at b + kept[j] and takes N positions."""
        out, pos, i = [], 0, 0
        for start, grid, kept_i in zip(
            _image_spans(prompt_ids, self.image_token_id, kept), grids, kept
        ):
            out += range(pos, pos + start - i)
            pos += start - i
            out += [pos + int(j) for j in kept_i]
            pos += grid[0] * grid[1]
            i = start + len(kept_i)
        out += range(pos, pos + len(prompt_ids) - i)
        return torch.tensor(out)

    def compact_positions(self, prompt_ids, grids, kept) -> torch.Tensor:
        """``positions: "compact"``: vLLM's consecutive positions of the pruned prompt."""
        return torch.arange(len(prompt_ids))

    def wrong_positions(self, prompt_ids, grids, kept) -> dict[str, torch.Tensor]:
        """Compact positions, and the kept tokens in place with the text after the image not
        moved (at base + K, as compact)."""
        text_compact = self.compact_positions(prompt_ids, grids, kept)
        for start, kept_i in zip(_image_spans(prompt_ids, self.image_token_id, kept), kept):
            text_compact[start : start + len(kept_i)] = start + torch.as_tensor(kept_i)
        return {
            "compact": self.compact_positions(prompt_ids, grids, kept),
            "kept in place, text not moved": text_compact,
        }


class LlavaReference(OneDReference):
    """LLaVA-1.5: CLIP resizes every image to one square; 1-D RoPE."""

    @property
    def model_class(self):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @torch.no_grad()
    def image_features(self, image) -> torch.Tensor:
        pixels = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        feats = self.model.get_image_features(
            pixel_values=pixels.to(torch.float32),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = feats[0] if isinstance(feats, (list, tuple)) else feats
        return feats.reshape(-1, feats.shape[-1])

    def grid(self, image) -> Grid:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side


def mrope_rule_positions(prompt_ids, image_token_id: int, grids, kept) -> torch.Tensor:
    """[3, L] M-RoPE positions of a pruned prompt by Qwen2.5-VL's rule: text 1-D; an image at base
    b puts kept token j at (b, b + j // cols, b + j % cols); the text after it starts at
    b + max(rows, cols)."""
    out, pos, i = [], 0, 0
    ids = list(prompt_ids)
    for start, (rows, cols), kept_i in zip(_image_spans(ids, image_token_id, kept), grids, kept):
        for _ in range(i, start):
            out.append([pos] * 3)
            pos += 1
        out.extend([pos, pos + int(j) // cols, pos + int(j) % cols] for j in kept_i)
        pos += max(rows, cols)
        i = start + len(kept_i)
    out.extend([p] * 3 for p in range(pos, pos + len(ids) - i))
    return torch.tensor(out).T


class Qwen2_5_VLReference(Reference):
    """Qwen2.5-VL: dynamic resolution (rows x cols after the 2x2 merger) and M-RoPE. Kept tokens
    keep their original (t, h, w); text after an image sits where it does unpruned."""

    @property
    def model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def placeholder_ids(self) -> set[int]:
        return {self.image_token_id, int(self.model.config.video_token_id)}

    def _pixels(self, image):
        return self.processor.image_processor(images=image, return_tensors="pt")

    @torch.no_grad()
    def image_features(self, image) -> torch.Tensor:
        pixels = self._pixels(image)
        out = self.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"])
        return out.pooler_output[0]

    def grid(self, image) -> Grid:
        merge = self.model.config.vision_config.spatial_merge_size
        _, h, w = self._pixels(image)["image_grid_thw"][0].tolist()
        return h // merge, w // merge

    @torch.no_grad()
    def positions(self, prompt_ids, grids, kept) -> torch.Tensor:
        """``get_rope_index`` on the unpruned prompt (each image's K placeholders widened back to
        rows x cols), then the columns of the dropped image tokens removed."""
        full, keep_cols = [], []
        ids = list(prompt_ids)
        starts = _image_spans(ids, self.image_token_id, kept)
        i = 0
        for start, (rows, cols), kept_i in zip(starts, grids, kept):
            keep_cols.extend(range(len(full), len(full) + start - i))
            full.extend(ids[i:start])
            keep_cols.extend(len(full) + int(j) for j in kept_i)
            full.extend([self.image_token_id] * (rows * cols))
            i = start + len(kept_i)
        keep_cols.extend(range(len(full), len(full) + len(ids) - i))
        full.extend(ids[i:])
        input_ids = torch.tensor([full])
        merge = self.model.config.vision_config.spatial_merge_size
        positions, _ = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=(input_ids == self.image_token_id).int(),
            image_grid_thw=torch.tensor([[1, merge * r, merge * c] for r, c in grids]),
        )
        return positions[:, 0, keep_cols]

    def rule_positions(self, prompt_ids, grids, kept) -> torch.Tensor:
        return mrope_rule_positions(prompt_ids, self.image_token_id, grids, kept)

    def wrong_positions(self, prompt_ids, grids, kept) -> dict[str, torch.Tensor]:
        """The kept tokens on the first K cells of the grid; plain 1-D positions; the text after
        each image restarting at base + cols (vLLM EVS's rule) instead of base + max(rows, cols)."""
        right = self.positions(prompt_ids, grids, kept)
        evs = right.clone()
        for start, (rows, cols), kept_i in zip(
            _image_spans(prompt_ids, self.image_token_id, kept), grids, kept
        ):
            evs[:, start + len(kept_i) :] -= max(rows, cols) - cols
        return {
            "compacted": self.rule_positions(prompt_ids, grids, [range(len(k)) for k in kept]),
            "sequential": torch.arange(len(prompt_ids)).expand(3, -1),
            "evs": evs,
        }


class Qwen3VLReference(Qwen2_5_VLReference):
    """Qwen3-VL: Qwen2.5-VL's grid and position rule (interleaving the M-RoPE channels is the
    rotary embedding's business, not the positions'), plus DeepStack. An image's rows are full
    width, as vLLM's vision tower returns them: the main embedding (what the selection scores and
    the LM reads as the token), then the same rows of each DeepStack level, which ``greedy`` feeds
    to transformers' language model as ``deepstack_visual_embeds``."""

    @property
    def model_class(self):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    @torch.no_grad()
    def features(self, image) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """([N, D] main embedding, per DeepStack level [N, D]), rows in row-major grid order."""
        pixels = self._pixels(image)
        out = self.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"])
        return out.pooler_output[0], [level[0] for level in out.deepstack_features]

    def image_features(self, image) -> torch.Tensor:
        return self.features(image)[0]

    def pruned_rows(self, image, kept: torch.Tensor, *, merge: bool = False) -> torch.Tensor:
        assert not merge, "refused for Qwen3-VL"
        main, levels = self.features(image)
        return torch.cat([main[kept], *(level[kept] for level in levels)], dim=1)

    @torch.no_grad()
    def greedy(self, prompt_ids, image_rows, positions, max_tokens: int):
        width = self.model.config.text_config.hidden_size
        ids = torch.as_tensor(list(prompt_ids), dtype=torch.int64)
        embeds = self.embed(ids)
        mask = ids == self.image_token_id
        rows = torch.cat(image_rows)
        assert int(mask.sum()) == rows.shape[0], (int(mask.sum()), rows.shape)
        embeds[mask] = rows[:, :width]
        levels = list(rows[:, width:].split(width, dim=1))
        positions = torch.as_tensor(positions).clone()
        out, logprobs = [], []
        for _ in range(max_tokens):
            hidden = self.model.model.language_model(
                inputs_embeds=embeds[None],
                position_ids=positions[:, None],
                attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.int64),
                visual_pos_masks=mask[None],
                deepstack_visual_embeds=levels,
            ).last_hidden_state
            lp = torch.log_softmax(self.model.lm_head(hidden[0, -1]).float(), dim=-1)
            nxt = int(lp.argmax())
            out.append(nxt)
            logprobs.append(lp)
            embeds = torch.cat([embeds, self.embed([nxt])])
            mask = torch.cat([mask, torch.zeros(1, dtype=torch.bool)])
            positions = torch.cat([positions, positions[:, -1:] * 0 + positions.max() + 1], -1)
        return out, torch.stack(logprobs)


class Qwen3VLMoeReference(Qwen3VLReference):
    @property
    def model_class(self):
        from transformers import Qwen3VLMoeForConditionalGeneration

        return Qwen3VLMoeForConditionalGeneration


@functools.lru_cache(maxsize=8)
def reference(cls: type[Reference], model_dir: str) -> Reference:
    """One loaded reference per (family, model folder)."""
    return cls(model_dir)


# ---- comparing a vLLM output with the reference -------------------------------------------------


def vllm_logprobs(output) -> list[dict[int, float]]:
    return [{t: lp.logprob for t, lp in step.items()} for step in output.outputs[0].logprobs]


def max_logprob_diff(output, hf_logprobs: torch.Tensor) -> float:
    """Largest difference over every step's top logprobs that vLLM returned."""
    return max(
        abs(lp - float(hf_logprobs[step, token]))
        for step, tops in enumerate(vllm_logprobs(output))
        for token, lp in tops.items()
    )


def max_logprob_diff_between(a, b) -> float:
    """Largest difference between two vLLM outputs' top logprobs (same tokens each step)."""
    diffs = []
    for sa, sb in zip(vllm_logprobs(a), vllm_logprobs(b), strict=True):
        assert sa.keys() == sb.keys()
        diffs.extend(abs(sa[t] - sb[t]) for t in sa)
    return max(diffs)


def assert_matches(ref: Reference, output, image_rows, positions) -> None:
    """vLLM's greedy ids equal the reference's, and its logprobs are within LOGPROB_ATOL."""
    ids, hf_lp = ref.greedy(
        output.prompt_token_ids, image_rows, positions, len(output.outputs[0].token_ids)
    )
    assert list(output.outputs[0].token_ids) == ids
    diff = max_logprob_diff(output, hf_lp)
    assert diff < LOGPROB_ATOL, f"logprobs differ from the reference by {diff:.2e}"


# ---- LLaVA-1.5 shortcuts ------------------------------------------------------------------------


def _llava(model_dir: str) -> LlavaReference:
    return reference(LlavaReference, model_dir)


def load(model_dir: str):
    """(model, processor) of the LLaVA checkpoint."""
    ref = _llava(model_dir)
    return ref.model, ref.processor


def image_features(model_dir: str, image) -> torch.Tensor:
    return _llava(model_dir).image_features(image)


def embed(model_dir: str, ids) -> torch.Tensor:
    return _llava(model_dir).embed(ids)


def query_ids(model_dir: str, prompt_ids) -> list[int]:
    return _llava(model_dir).query_ids(prompt_ids)


def reference_kept(model_dir: str, image, q_ids, k: int, method: str = "simignore"):
    return _llava(model_dir).kept(image, q_ids, k, method)


def pruned_rows(model_dir: str, image, kept: torch.Tensor, *, merge: bool = False):
    return _llava(model_dir).pruned_rows(image, kept, merge=merge)


def greedy(model_dir: str, prompt_ids, image_rows: list[torch.Tensor], kept, max_tokens: int):
    """LLaVA's greedy decode at its original 1-D positions (each image's ``kept`` indices)."""
    ref = _llava(model_dir)
    kept = [list(map(int, k)) for k in kept]
    grids = [ref.grid(None)] * len(kept)
    positions = ref.positions(prompt_ids, grids, kept)
    return ref.greedy(prompt_ids, image_rows, positions, max_tokens)


def stock_generate(model_dir: str, prompt: str, images, max_tokens: int):
    return _llava(model_dir).stock_generate(prompt, images, max_tokens)


# ---- LLaVA-NeXT / LLaVA-OneVision (AnyRes) -----------------------------------------------------


class AnyResReference(OneDReference):
    """LLaVA-NeXT's AnyRes: an image is a base view (``grid`` is its square) and crops laid out
    as one grid, each crop row closed by the ``image_newline`` vector; 1-D RoPE, original
    positions over all N rows (``position_grid`` is (1, N)), so a kept row sits at its index
    among them, newlines included. ``image_features`` are all N rows in placeholder order; only
    the other rows compete in the selection (found here by value: the newline rows are that
    parameter itself), and kept indices are told in all N rows."""

    def _pixels(self, image):
        return self.processor.image_processor(images=image, return_tensors="pt")

    def _feature_kwargs(self) -> dict:
        config = self.model.config
        return {
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
        }

    @torch.no_grad()
    def image_features(self, image) -> torch.Tensor:
        pixels = self._pixels(image)
        out = self.model.model.get_image_features(
            pixel_values=pixels["pixel_values"].to(torch.float32),
            image_sizes=pixels["image_sizes"],
            **self._feature_kwargs(),
        )
        return out.pooler_output[0]

    def newline_rows(self, image) -> torch.Tensor:
        """[N] bool: the rows that are the ``image_newline`` parameter."""
        return (self.image_features(image) == self.model.model.image_newline).all(dim=-1)

    def prunable_rows(self, image) -> torch.Tensor:
        return (~self.newline_rows(image)).nonzero().flatten()

    def grid(self, image) -> Grid:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def position_grid(self, image) -> Grid:
        return 1, self.image_features(image).shape[0]

    def scores(self, image, q_ids) -> torch.Tensor:
        """Every row's score, NaN where the row does not compete (a newline)."""
        return super().scores(image, q_ids).masked_fill(self.newline_rows(image), float("nan"))

    def kept(self, image, q_ids, k: int, method: str = "simignore") -> torch.Tensor:
        rows = self.prunable_rows(image)
        if k >= len(self.newline_rows(image)):
            return torch.arange(len(self.newline_rows(image)))  # unpruned: every row, as stock
        if method == "uniform":
            return rows[uniform_indices(len(rows), k)]
        if method == "cover":
            feats, scores = self.image_features(image)[rows], self.scores(image, q_ids)[rows]
            return rows[coverage_select_ref(feats, scores, k)]
        return rows[topk_select_ref(self.scores(image, q_ids)[rows], k)]

    def pruned_rows(self, image, kept: torch.Tensor, *, merge: bool = False) -> torch.Tensor:
        feats = self.image_features(image)
        if not merge:
            return feats[kept]
        rows = self.prunable_rows(image)  # the merge folds the competing rows only
        return merge_dropped_ref(feats[rows], torch.searchsorted(rows, kept))

    def wrong_positions(self, prompt_ids, grids, kept) -> dict[str, torch.Tensor]:
        """LLaVA-1.5's wrong rules, and *gapped*: kept token j at its offset in the unpruned
        image (kept[j]), the text after it continuing from the last kept token's (the newline
        rows' positions not counted after it)."""
        gapped = torch.arange(len(prompt_ids))
        for start, kept_i in zip(_image_spans(prompt_ids, self.image_token_id, kept), kept):
            k = len(kept_i)
            gapped[start : start + k] += torch.as_tensor(kept_i) - torch.arange(k)
            gapped[start + k :] += int(kept_i[-1]) + 1 - k
        return {**super().wrong_positions(prompt_ids, grids, kept), "gapped": gapped}


class LlavaNextReference(AnyResReference):
    @property
    def model_class(self):
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration


class LlavaOnevisionReference(AnyResReference):
    """OneVision: AnyRes with the crops' grid shrunk to ``anyres_max_9``. One image per prompt
    is patched in transformers (several are base views only); vLLM patches every image, so the
    features here are each image's own, processed alone."""

    @property
    def model_class(self):
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def placeholder_ids(self) -> set[int]:
        return {self.image_token_id, int(self.model.config.video_token_id)}

    def _feature_kwargs(self) -> dict:
        aspect = {"vision_aspect_ratio": self.model.config.vision_aspect_ratio}
        return {**super()._feature_kwargs(), **aspect}
