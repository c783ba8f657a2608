"""Train ``lvlm-prune-shapes`` on ShapesVQA from scratch, on CPU: ``lvlm-prune train shapes --out DIR``.

The model is a stock ``LlavaForConditionalGeneration``; training only adds losses. Three stages:

1. **vision** — the CLIP tower + projector regress each patch's row onto a fixed target: the sum of
   the LM's input embeddings of the patch's colour and pattern words (weighted by how much of the
   patch the object covers) plus the direction of the quadrant the patch lies in, or one
   background vector. Background and quadrant directions are orthogonal to every word embedding
   (no question word has a cosine cue to a place). The LM's ``embed_tokens`` is fixed (an
   orthonormal set of rows), so the targets never move.
2. **lm** — the language model learns to answer from *pseudo images*: those target rows plus noise
   in place of the projector output, 4 question/answer turns per scene. Answer loss alone sits on a
   plateau (two hops: question word → object rows, answer position → question word); a
   training-only attention-supervision loss on two heads breaks it: layer 0 head 0 from each
   colour/pattern word of the question, and from a location question's quadrant word, to the rows
   of the object it names (to the word itself when no object has the attribute), layer 1 head 0
   from the answer position to the turn's cue words. Questions follow ShapesVQA v3 (binding
   negatives and location included; ``VERSION``).
3. **join** — the LM reads real images: the projector and the LM are fine-tuned on the tower's
   rows with answer + attention loss + the stage-1 alignment loss, so the rows stay word-like
   (which is also what makes simignore's cosine selection find the asked object). The tower stays
   as stage 1 left it.

Stages 1 and 2 are independent and run side by side, one core each, when two are free.
Everything is seeded; ``--smoke`` runs a few steps of each stage in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lvlm_prune.models import shapes as shapes_model

from . import scenes

N = scenes.NUM_PATCHES
TURNS = 8
LOG_NAME = "train_log.jsonl"
VERSION = scenes.LATEST
PATCH_QUADRANT = torch.tensor(
    [
        2 * (r >= scenes.GRID // 2) + (c >= scenes.GRID // 2)
        for r in range(scenes.GRID)
        for c in range(scenes.GRID)
    ]
)
"""[N] the quadrant (``scenes.QUADRANTS`` index) each patch lies in."""


@dataclasses.dataclass
class StageConfig:
    steps: int
    batch: int
    lr: float
    warmup: int = 50
    eval_every: int = 100


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    vision: StageConfig = dataclasses.field(
        default_factory=lambda: StageConfig(steps=1000, batch=16, lr=1e-3)
    )
    lm: StageConfig = dataclasses.field(
        default_factory=lambda: StageConfig(steps=1200, batch=16, lr=2e-3, eval_every=50)
    )
    join: StageConfig = dataclasses.field(
        default_factory=lambda: StageConfig(steps=150, batch=8, lr=3e-4, warmup=20, eval_every=25)
    )
    row_noise: float = 0.25  # norm of the noise added to pseudo rows (word embeddings have norm 1)
    attn_weight: float = 1.0
    align_weight: float = 1.0
    eval_items: int = 300


SMOKE = TrainConfig(
    vision=StageConfig(steps=3, batch=2, lr=1e-3, warmup=1, eval_every=3),
    lm=StageConfig(steps=3, batch=2, lr=2e-3, warmup=1, eval_every=3),
    join=StageConfig(steps=2, batch=2, lr=3e-4, warmup=1, eval_every=2),
    eval_items=3,
)


# ---------------------------------------------------------------------------------------------
# Word geometry: fixed input embeddings and the row targets built from them


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Row directions that are no word: the background, and one per quadrant. Orthogonal to
    every word embedding, so a question's words have no cosine cue to where an object is; the
    LM learns (in its attention) which quadrant direction a quadrant word asks for."""

    background: torch.Tensor  # [D]
    quadrants: torch.Tensor  # [4, D]


def design_embeddings(model, seed: int) -> Geometry:
    """Set ``embed_tokens`` to orthonormal rows (frozen); the background and quadrant vectors
    are unit vectors orthogonal to all of them and to each other."""
    emb = model.get_input_embeddings()
    vocab, dim = emb.weight.shape
    gen = torch.Generator().manual_seed(seed)
    extra = 1 + len(scenes.QUADRANTS)
    q, _ = torch.linalg.qr(torch.randn(dim, vocab + extra, generator=gen))
    with torch.no_grad():
        emb.weight.copy_(q[:, :vocab].T)
    emb.weight.requires_grad_(False)
    return Geometry(q[:, vocab].clone(), q[:, vocab + 1 : vocab + extra].T.clone())


def _word_ids() -> tuple[torch.Tensor, torch.Tensor]:
    colour = torch.tensor(shapes_model.token_ids(" ".join(scenes.COLOR_NAMES)))
    pattern = torch.tensor(shapes_model.token_ids(" ".join(scenes.PATTERNS)))
    return colour, pattern


# ---------------------------------------------------------------------------------------------
# Batches


@dataclasses.dataclass
class Batch:
    ids: torch.Tensor  # [B, L] token ids; image slots hold the image token
    image_start: int  # first image row's position
    coverage: torch.Tensor  # [B, 4, N] share of each patch inside each object (0 for padding)
    obj_colour: torch.Tensor  # [B, 4] colour index (0 for padding, masked by coverage)
    obj_pattern: torch.Tensor  # [B, 4]
    answer_pos: torch.Tensor  # [B, T] positions whose logits predict the answers
    answers: torch.Tensor  # [B, T] answer token ids
    word_pos: torch.Tensor  # [B, T, 2] cue-word positions of each turn (-1: none)
    word_obj: torch.Tensor  # [B, T, 2] object with that word's attribute (-1: none in scene)
    qtypes: list[list[str]]  # each turn's Question.subtype
    clean: np.ndarray | None  # [B, 336, 336, 3] uint8 before noise, when pixels were asked


def _turns(rng: np.random.Generator, turns: int):
    """A scene and ``turns`` questions about it: the first as the task draws it (type first, so
    a location question gets a scene that can ask it), the rest of any type the scene allows."""
    scene, first = scenes.sample_item(rng, version=VERSION)
    types = [
        t for t in scenes.VERSION_TYPES[VERSION] if t != "location" or scene.eligible_quadrants()
    ]
    rest = [
        scenes.sample_question(
            scene, rng, qtype=types[int(rng.integers(len(types)))], version=VERSION
        )
        for _ in range(turns - 1)
    ]
    return scene, [first, *rest][:turns]


def make_batch(
    rng: np.random.Generator, size: int, *, turns: int = TURNS, bos: bool, pixels: bool
) -> Batch:
    """``size`` fresh scenes, each with ``turns`` questions, laid out as the chat template does:
    ``[<s>] USER : <image>*576 Q1 ASSISTANT : A1 </s> USER : Q2 ASSISTANT : A2 </s> ...``,
    padded at the end (questions differ in length; causal attention never reads the padding)."""
    ids_of = {w: i for i, w in enumerate((*shapes_model.SPECIAL_TOKENS, *shapes_model.WORDS))}
    head = ([shapes_model.BOS_ID] if bos else []) + [ids_of["USER"], ids_of[":"]]
    image_start = len(head)
    coverage = torch.zeros(size, 4, N)
    obj_colour = torch.zeros(size, 4, dtype=torch.long)
    obj_pattern = torch.zeros(size, 4, dtype=torch.long)
    rows, answers, word_pos, word_obj, qtypes, clean = [], [], [], [], [], []
    answer_pos = []
    for b in range(size):
        scene, questions = _turns(rng, max(turns, 1))
        n = len(scene.objects)
        coverage[b, :n] = torch.from_numpy(scene.patch_coverage())
        for o, obj in enumerate(scene.objects):
            obj_colour[b, o] = scenes.COLOR_NAMES.index(obj.color)
            obj_pattern[b, o] = scenes.PATTERNS.index(obj.pattern)
        if pixels:
            clean.append(scene.clean_pixels())
        seq = head + [shapes_model.IMAGE_TOKEN_ID] * N
        ans, apos, wpos, wobj, types = [], [], [], [], []
        for t, q in enumerate(questions[:turns]):
            if t:
                seq += [ids_of["USER"], ids_of[":"]]
            q_start = len(seq)
            words = shapes_model.split_words(q.text)
            seq += [ids_of[w] for w in words]
            seq += [ids_of["ASSISTANT"], ids_of[":"]]
            apos.append(len(seq) - 1)
            seq += [ids_of[q.answer], shapes_model.EOS_ID]
            ans.append(ids_of[q.answer])
            pos, objs = [-1, -1], [-1, -1]
            if q.quadrant is not None:  # the quadrant word finds the object in it
                pos[0], objs[0] = q_start + words.index(q.quadrant), q.target
            for slot, (attr, key) in enumerate(((q.color, "color"), (q.pattern, "pattern"))):
                if attr is None:
                    continue
                pos[slot] = q_start + words.index(attr)
                found = scene.find(**{key: attr})
                objs[slot] = -1 if found is None else found
            wpos.append(pos)
            wobj.append(objs)
            types.append(q.subtype)
        rows.append(seq)
        answers.append(ans)
        answer_pos.append(apos)
        word_pos.append(wpos)
        word_obj.append(wobj)
        qtypes.append(types)
    length = max(len(r) for r in rows)
    rows = [r + [shapes_model.PAD_ID] * (length - len(r)) for r in rows]
    return Batch(
        ids=torch.tensor(rows),
        image_start=image_start,
        coverage=coverage,
        obj_colour=obj_colour,
        obj_pattern=obj_pattern,
        answer_pos=torch.tensor(answer_pos, dtype=torch.long).reshape(size, turns),
        answers=torch.tensor(answers),
        word_pos=torch.tensor(word_pos),
        word_obj=torch.tensor(word_obj),
        qtypes=qtypes,
        clean=np.stack(clean) if pixels else None,
    )


class PixelNoise:
    """The spec's Gaussian pixel noise (sigma 6, rounded, clipped), then CLIP's normalisation.

    Drawing 340 k normals per image costs more than the rest of a batch; a bank of noise fields,
    each used at a random cyclic shift and sign, gives the same per-pixel distribution.
    """

    def __init__(self, gen: torch.Generator, bank: int = 32):
        shape = (bank, scenes.CANVAS, scenes.CANVAS, 3)
        self.bank = scenes.NOISE_SIGMA * torch.randn(shape, generator=gen)
        self.gen = gen

    def __call__(self, clean: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(clean).float()
        pick = torch.randint(len(self.bank), (len(x),), generator=self.gen)
        shift = torch.randint(scenes.CANVAS, (len(x), 2), generator=self.gen)
        sign = torch.randint(2, (len(x),), generator=self.gen) * 2 - 1
        for b in range(len(x)):
            noise = self.bank[pick[b]].roll(tuple(shift[b].tolist()), dims=(0, 1))
            x[b] += sign[b] * noise
        return shapes_model.pixel_values(x.round_().clamp_(0, 255))


def row_targets(batch: Batch, emb_weight: torch.Tensor, geometry: Geometry):
    """[B, N, D] target rows: coverage-weighted colour + pattern word vectors plus the patch's
    quadrant vector, the rest background."""
    colour_ids, pattern_ids = _word_ids()
    obj_vec = emb_weight[colour_ids[batch.obj_colour]] + emb_weight[pattern_ids[batch.obj_pattern]]
    cov = batch.coverage  # [B, 4, N]
    rows = torch.einsum("bon,bod->bnd", cov, obj_vec)
    on_object = cov.sum(1).clamp(max=1)[..., None]  # [B, N, 1]
    rows += on_object * geometry.quadrants[PATCH_QUADRANT]
    rows += (1 - on_object) * geometry.background
    return rows


# ---------------------------------------------------------------------------------------------
# Forward passes (the stock modules, called layer by layer for the training-only quantities)


def vision_rows(model, pixel_values: torch.Tensor, *, tower_grad: bool = True) -> torch.Tensor:
    """[B, N, D_text] projector output, exactly as ``get_image_features`` computes it for
    ``vision_feature_layer=-2`` (the last tower layer is not used, so it is not run)."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel holds its layers directly
    with torch.set_grad_enabled(tower_grad and torch.is_grad_enabled()):
        h = tower.pre_layrnorm(tower.embeddings(pixel_values))
        layer_index = model.config.vision_feature_layer % (len(tower.encoder.layers) + 1)
        for layer in tower.encoder.layers[:layer_index]:
            h = layer(h, None)
    return model.model.multi_modal_projector(h[:, 1:])


def lm_forward(model, embeds: torch.Tensor, probe: dict[int, torch.Tensor], out_pos: torch.Tensor):
    """Final hidden states at ``out_pos`` [B, P] (per row) as [B, P, D] and, per layer in
    ``probe``, head 0's attention probabilities [B, M, L] from the query positions
    ``probe[layer]`` [B, M].

    The stock decoder layers' modules, called step by step. The last layer only runs its queries,
    MLP and the final norm at ``out_pos``: nothing else of it reaches the output.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    bsz, length, _ = embeds.shape
    positions = torch.arange(length).expand(bsz, length)
    cos, sin = lm.rotary_emb(embeds, positions)
    h = embeds
    probs = {}
    last = len(lm.layers) - 1
    for i, layer in enumerate(lm.layers):
        att = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (bsz, length, -1, att.head_dim)
        q = att.q_proj(x).view(shape).transpose(1, 2)
        k = att.k_proj(x).view(shape).transpose(1, 2)
        v = att.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if i in probe:
            qpos = probe[i]
            q0 = q[:, 0].gather(1, qpos[..., None].expand(-1, -1, att.head_dim))
            scores = q0 @ k[:, 0].transpose(1, 2) * att.scaling
            future = torch.arange(length)[None, None] > qpos[..., None]
            probs[i] = scores.masked_fill(future, float("-inf")).softmax(-1)
        if i == last:
            visible = torch.arange(length)[None, None] <= out_pos[..., None]  # [B, P, L]
            heads, p = q.shape[1], out_pos.shape[1]
            q_out = q.gather(2, out_pos[:, None, :, None].expand(-1, heads, -1, att.head_dim))
            out = F.scaled_dot_product_attention(
                q_out, k, v, attn_mask=visible[:, None], scale=att.scaling
            )
            h_out = h.gather(1, out_pos[..., None].expand(-1, -1, h.shape[-1]))
            h = h_out + att.o_proj(out.transpose(1, 2).reshape(bsz, p, -1))
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=att.scaling)
            h = h + att.o_proj(out.transpose(1, 2).reshape(bsz, length, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return lm.norm(h), probs


def input_embeds(model, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
    embeds = model.get_input_embeddings()(batch.ids)
    s = batch.image_start
    return torch.cat([embeds[:, :s], rows, embeds[:, s + rows.shape[1] :]], dim=1)


def attention_targets(batch: Batch):
    """Layer-0 queries (attribute words) with their key masks, layer-1 queries (answer
    positions) with theirs."""
    bsz, length = batch.ids.shape
    turns = batch.answer_pos.shape[1]
    wpos = batch.word_pos.reshape(bsz, turns * 2)
    wobj = batch.word_obj.reshape(bsz, turns * 2)
    valid0 = wpos >= 0
    q0 = wpos.clamp(min=0)
    mask0 = torch.zeros(bsz, turns * 2, length, dtype=torch.bool)
    img = slice(batch.image_start, batch.image_start + N)
    # The object's patches by the spec's rule; the word itself when no object has the attribute.
    obj_patches = batch.coverage >= scenes.PATCH_COVER  # [B, 4, N]
    has_obj = wobj >= 0
    mask0[:, :, img] = (
        obj_patches.gather(1, wobj.clamp(min=0)[..., None].expand(-1, -1, N)) & (has_obj[..., None])
    )
    self_mask = torch.zeros_like(mask0).scatter_(2, q0[..., None], True)
    mask0 = torch.where(has_obj[..., None], mask0, self_mask)
    q1 = batch.answer_pos
    mask1 = torch.zeros(bsz, turns, length, dtype=torch.bool)
    pos = batch.word_pos  # [B, T, 2]
    for slot in range(2):
        p = pos[:, :, slot]
        mask1.scatter_(2, p.clamp(min=0)[..., None], (p >= 0)[..., None])
    return (q0, mask0, valid0), (q1, mask1)


def attention_loss(probs, targets) -> torch.Tensor:
    (_, mask0, valid0), (_, mask1) = targets
    mass0 = (probs[0] * mask0).sum(-1).clamp(min=1e-6)
    mass1 = (probs[1] * mask1).sum(-1).clamp(min=1e-6)
    loss0 = -(mass0.log() * valid0).sum() / valid0.sum().clamp(min=1)
    return loss0 + -(mass1.log()).mean()


def output_positions(batch: Batch) -> torch.Tensor:
    """Where the loss reads the LM, per row: each answer's position, then each ``</s>``'s."""
    return torch.cat([batch.answer_pos, batch.answer_pos + 1], dim=1)


def answer_loss(model, hidden, batch: Batch):
    """Cross-entropy of each turn's answer and of the ``</s>`` after it (``hidden`` at
    :func:`output_positions`); also the answers' correctness."""
    turns = batch.answer_pos.shape[1]
    logits = model.lm_head(hidden[:, :turns])  # [B, T, V]
    eos_logits = model.lm_head(hidden[:, turns:])
    ce = F.cross_entropy(logits.flatten(0, 1), batch.answers.flatten())
    eos = torch.full_like(batch.answers, shapes_model.EOS_ID)
    ce = ce + 0.1 * F.cross_entropy(eos_logits.flatten(0, 1), eos.flatten())
    correct = logits.argmax(-1) == batch.answers
    return ce, correct


# ---------------------------------------------------------------------------------------------
# Stages


class Logger:
    """One JSON object a line (the loss/accuracy log) plus a tqdm bar for the console."""

    def __init__(self, path: Path | None, stage: str, total: int, *, quiet: bool = False):
        from tqdm import tqdm

        self.path, self.stage = path, stage
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=stage, file=sys.stderr, disable=quiet, mininterval=2)

    def step(self, **postfix):
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()}, refresh=False)

    def write(self, **values):
        record = {"stage": self.stage, "elapsed_s": round(time.perf_counter() - self.start, 1)}
        record.update({k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()})
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.bar.write(json.dumps(record), file=sys.stderr)

    def close(self):
        self.bar.close()


def _schedule(opt, cfg: StageConfig):
    def factor(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        # Constant, then a cosine to 10 % over the last third.
        tail_start = int(cfg.steps * 2 / 3)
        if step < tail_start:
            return 1.0
        t = (step - tail_start) / max(1, cfg.steps - tail_start)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def alignment_loss(rows: torch.Tensor, targets: torch.Tensor, coverage: torch.Tensor):
    """Squared error relative to the target's norm, averaged over background patches and over
    object patches separately and summed (576 background patches must not drown the objects)."""
    err = ((rows - targets) ** 2).sum(-1) / (targets**2).sum(-1)
    on_object = coverage.sum(1) > 0
    return err[~on_object].mean() + err[on_object].mean()


@torch.no_grad()
def patch_accuracy(
    rows: torch.Tensor, batch: Batch, emb_weight: torch.Tensor, geometry: Geometry
) -> dict:
    """Per patch mostly inside one object (>= 50 %): is the nearest colour / pattern word (by dot
    product) the object's? And the share of background patches whose best cosine to any
    attribute word stays below 0.3."""
    colour_ids, pattern_ids = _word_ids()
    cov, owner = batch.coverage.max(1)  # [B, N]
    inside = cov >= 0.5
    pred_c = (rows @ emb_weight[colour_ids].T).argmax(-1)
    pred_p = (rows @ emb_weight[pattern_ids].T).argmax(-1)
    true_c = batch.obj_colour.gather(1, owner)
    true_p = batch.obj_pattern.gather(1, owner)
    words = F.normalize(emb_weight[torch.cat([colour_ids, pattern_ids])], dim=-1)
    best = (F.normalize(rows, dim=-1) @ words.T).max(-1).values
    background = batch.coverage.sum(1) == 0
    pred_q = (rows @ geometry.quadrants.T).argmax(-1)
    true_q = PATCH_QUADRANT.expand_as(pred_q)
    return {
        "patch_colour_acc": (pred_c == true_c)[inside].float().mean().item(),
        "patch_pattern_acc": (pred_p == true_p)[inside].float().mean().item(),
        "patch_quadrant_acc": (pred_q == true_q)[inside].float().mean().item(),
        "background_clean": (best[background] < 0.3).float().mean().item(),
    }


def _stage_params(model, stage: str):
    vision = list(model.model.vision_tower.parameters()) + list(
        model.model.multi_modal_projector.parameters()
    )
    lm = [p for p in model.model.language_model.parameters() if p.requires_grad] + list(
        model.lm_head.parameters()
    )
    projector = list(model.model.multi_modal_projector.parameters())
    # Stage 3 leaves the tower as stage 1 made it: backpropagating through it would double the
    # step's cost, and the projector alone can adapt the rows.
    return {"vision": vision, "lm": lm, "join": projector + lm}[stage]


def _rng(seed: int, stage: str) -> tuple[np.random.Generator, torch.Generator]:
    index = ("vision", "lm", "join", "eval").index(stage)
    return scenes.stream(seed, f"train/{stage}"), torch.Generator().manual_seed(seed * 1000 + index)


def pseudo_rows(batch, emb_weight, geometry: Geometry, noise: float, gen: torch.Generator):
    """Target rows with noise: what the LM sees before the vision tower is ready."""
    rows = row_targets(batch, emb_weight, geometry)
    scale = 1 + 0.1 * torch.randn(rows.shape[:2] + (1,), generator=gen)
    jitter = torch.randn(rows.shape, generator=gen) * (noise / math.sqrt(rows.shape[-1]))
    return rows * scale + jitter


def run_stage(model, geometry: Geometry, stage: str, cfg: TrainConfig, logger: Logger) -> None:
    """Train one stage in place."""
    scfg = getattr(cfg, stage)
    emb_weight = model.get_input_embeddings().weight.detach()
    params = _stage_params(model, stage)
    opt = torch.optim.AdamW(params, lr=scfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = _schedule(opt, scfg)
    rng, gen = _rng(cfg.seed, stage)
    noise = PixelNoise(gen) if stage != "lm" else None
    model.train()
    recent: list[dict] = []
    for step in range(scfg.steps):
        batch = make_batch(
            rng,
            scfg.batch,
            turns=0 if stage == "vision" else TURNS,
            bos=bool(rng.random() < 0.5),
            pixels=stage != "lm",
        )
        parts = {}
        if stage == "lm":
            rows = pseudo_rows(batch, emb_weight, geometry, cfg.row_noise, gen)
        else:
            rows = vision_rows(model, noise(batch.clean), tower_grad=stage == "vision")
            targets = row_targets(batch, emb_weight, geometry)
            parts["align"] = alignment_loss(rows, targets, batch.coverage)
        if stage != "vision":
            targets = attention_targets(batch)
            hidden, probs = lm_forward(
                model,
                input_embeds(model, batch, rows),
                {0: targets[0][0], 1: targets[1][0]},
                output_positions(batch),
            )
            parts["answer"], correct = answer_loss(model, hidden, batch)
            parts["attn"] = attention_loss(probs, targets)
        weights = {"align": cfg.align_weight, "answer": 1.0, "attn": cfg.attn_weight}
        loss = sum(weights[k] * v for k, v in parts.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        record = {k: v.item() for k, v in parts.items()}
        if stage != "vision":
            record["train_acc"] = correct.float().mean().item()
            for t in (*scenes.VERSION_TYPES[VERSION], "exists/binding"):
                flags = [
                    bool(correct[b, i])
                    for b, types in enumerate(batch.qtypes)
                    for i, ty in enumerate(types)
                    if t in (ty, ty.split("/")[0])
                ]
                record[f"train_acc_{t}"] = float(np.mean(flags)) if flags else float("nan")
        recent.append(record)
        logger.step(loss=loss.item(), **{k: v for k, v in record.items() if k == "train_acc"})
        if (step + 1) % scfg.eval_every == 0 or step + 1 == scfg.steps:
            summary = {k: float(np.nanmean([r[k] for r in recent])) for k in recent[0]}
            if stage != "lm":
                summary.update(patch_accuracy(rows.detach(), batch, emb_weight, geometry))
            logger.write(step=step + 1, lr=sched.get_last_lr()[0], **summary)
            recent = []
    model.eval()


# ---------------------------------------------------------------------------------------------
# Evaluation (the same forward as training; the tests and the benchmark use vLLM)


@torch.no_grad()
def evaluate(
    model, geometry: Geometry, *, items: int, seed: int, real: bool, bos: bool = True
) -> dict:
    """Answer accuracy per question type on fresh single-question scenes; ``real``: from the
    image through the vision tower, else from pseudo rows (no noise)."""
    emb_weight = model.get_input_embeddings().weight
    rng = scenes.stream(seed, "train/heldout")
    noise = PixelNoise(torch.Generator().manual_seed(seed)) if real else None
    hits: dict[str, list[bool]] = {t: [] for t in scenes.VERSION_TYPES[VERSION]}
    binding: list[bool] = []
    was_training = model.training
    model.eval()
    for start in range(0, items, 32):
        batch = make_batch(rng, min(32, items - start), turns=1, bos=bos, pixels=real)
        if real:
            rows = vision_rows(model, noise(batch.clean))
        else:
            rows = row_targets(batch, emb_weight, geometry)
        hidden, _ = lm_forward(model, input_embeds(model, batch, rows), {}, output_positions(batch))
        _, correct = answer_loss(model, hidden, batch)
        for b, types in enumerate(batch.qtypes):
            hits[types[0].split("/")[0]].append(bool(correct[b, 0]))
            if types[0] == "exists/binding":
                binding.append(bool(correct[b, 0]))
    model.train(was_training)
    out = {f"acc_{t}": float(np.mean(h)) for t, h in hits.items() if h}
    if binding:
        out["acc_exists_binding"] = float(np.mean(binding))
    out["acc"] = float(np.mean([x for h in hits.values() for x in h]))
    return out


@torch.no_grad()
def alignment_report(model, *, items: int, seed: int) -> dict:
    """How word-like the real image rows are (the projector output for fresh images): mean cosine
    of object patches (>= 50 % inside one object) to their colour word and to their pattern
    word, and the best cosine of background patches (no object pixel) to any vocabulary word."""
    emb = F.normalize(model.get_input_embeddings().weight, dim=-1)
    colour_ids, pattern_ids = _word_ids()
    word_ids = torch.tensor(shapes_model.token_ids(" ".join(shapes_model.WORDS)))
    rng = scenes.stream(seed, "train/alignment-check")
    noise = PixelNoise(torch.Generator().manual_seed(seed))
    colour_cos, pattern_cos, other_attr, background = [], [], [], []
    for start in range(0, items, 32):
        batch = make_batch(rng, min(32, items - start), turns=0, bos=True, pixels=True)
        rows = F.normalize(vision_rows(model, noise(batch.clean)), dim=-1)
        cov, owner = batch.coverage.max(1)
        inside = cov >= 0.5
        cos_c = rows @ emb[colour_ids].T  # [B, N, 6]
        cos_p = rows @ emb[pattern_ids].T  # [B, N, 4]
        true_c = batch.obj_colour.gather(1, owner)
        true_p = batch.obj_pattern.gather(1, owner)
        own_c = cos_c.gather(-1, true_c[..., None])[..., 0]
        own_p = cos_p.gather(-1, true_p[..., None])[..., 0]
        colour_cos.append(own_c[inside])
        pattern_cos.append(own_p[inside])
        others = torch.cat([cos_c, cos_p], -1).scatter(-1, true_c[..., None], -1.0)
        others = others.scatter(-1, (true_p + len(colour_ids))[..., None], -1.0)
        other_attr.append(others.max(-1).values[inside])
        on_object = batch.coverage.sum(1) > 0
        background.append((rows @ emb[word_ids].T).max(-1).values[~on_object])
    bg = torch.cat(background)
    return {
        "object_cos_own_colour_word": torch.cat(colour_cos).mean().item(),
        "object_cos_own_pattern_word": torch.cat(pattern_cos).mean().item(),
        "object_best_cos_other_attribute_word": torch.cat(other_attr).mean().item(),
        "background_best_cos_any_word": bg.mean().item(),
        "background_best_cos_any_word_p99": bg.quantile(0.99).item(),
    }


# ---------------------------------------------------------------------------------------------
# The pipeline


def _fresh_model(seed: int):
    model = shapes_model.new_model(seed=seed)
    return model, design_embeddings(model, seed)


def _stage_worker(stage: str, cfg: TrainConfig, out: str, threads: int, quiet: bool) -> None:
    torch.set_num_threads(threads)
    model, geometry = _fresh_model(cfg.seed)
    logger = Logger(
        Path(out) / f"{LOG_NAME}.{stage}", stage, getattr(cfg, stage).steps, quiet=quiet
    )
    run_stage(model, geometry, stage, cfg, logger)
    logger.close()
    names = {id(p) for p in _stage_params(model, stage)}
    state = {n: p.detach() for n, p in model.named_parameters() if id(p) in names}
    torch.save(state, Path(out) / f"stage-{stage}.pt")


def train(out: Path, cfg: TrainConfig, *, jobs: int = 2, quiet: bool = False) -> dict:
    """All stages; the checkpoint, its log and a summary end up in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / LOG_NAME
    log.unlink(missing_ok=True)
    started = time.perf_counter()
    if jobs >= 2:
        # Stages 1 and 2 share nothing but the seed: one process (one core) each.
        ctx = torch.multiprocessing.get_context("spawn")
        procs = [
            ctx.Process(target=_stage_worker, args=(s, cfg, str(out), 1, quiet))
            for s in ("vision", "lm")
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            if p.exitcode:
                raise RuntimeError(f"a training stage failed (exit code {p.exitcode})")
    else:
        for stage in ("vision", "lm"):
            _stage_worker(stage, cfg, str(out), max(1, jobs), quiet)
    with log.open("a") as f:
        for stage in ("vision", "lm"):
            part = out / f"{LOG_NAME}.{stage}"
            f.write(part.read_text())
            part.unlink()
    torch.set_num_threads(max(1, jobs))
    model, geometry = _fresh_model(cfg.seed)
    for stage in ("vision", "lm"):
        path = out / f"stage-{stage}.pt"
        model.load_state_dict(torch.load(path), strict=False)
        path.unlink()
    parallel_s = time.perf_counter() - started
    before = evaluate(model, geometry, items=cfg.eval_items, seed=cfg.seed + 1, real=True)
    logger = Logger(log, "join", cfg.join.steps, quiet=quiet)
    logger.write(step=0, **{f"before_{k}": v for k, v in before.items()})
    run_stage(model, geometry, "join", cfg, logger)
    after = evaluate(model, geometry, items=cfg.eval_items, seed=cfg.seed + 2, real=True)
    logger.write(step=cfg.join.steps, **{f"heldout_{k}": v for k, v in after.items()})
    alignment = alignment_report(model, items=min(cfg.eval_items, 64), seed=cfg.seed + 3)
    logger.write(step=cfg.join.steps, **alignment)
    logger.close()
    wall = time.perf_counter() - started
    summary = {
        "seed": cfg.seed,
        "jobs": jobs,
        "wall_s": round(wall, 1),
        "stages_1_2_wall_s": round(parallel_s, 1),
        "heldout": after,
        "alignment": alignment,
        "config": dataclasses.asdict(cfg),
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    shapes_model.save_model(model, out, version=VERSION, extra={"training": summary})
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvlm-prune train shapes",
        description=f"Train lvlm-prune-shapes (a small LLaVA-1.5) on {scenes.VERSIONS[VERSION]} from "
        "scratch, "
        "on CPU. Writes a checkpoint folder that vLLM and transformers load.",
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1),
        help="processes for stages 1 and 2 (run side by side when 2); threads for stage 3",
    )
    parser.add_argument("--smoke", action="store_true", help="a few steps of each stage")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = dataclasses.replace(SMOKE if args.smoke else TrainConfig(), seed=args.seed)
    with contextlib.suppress(AttributeError):
        sys.stderr.reconfigure(line_buffering=True)
    summary = train(args.out, cfg, jobs=args.jobs, quiet=args.quiet)
    print(json.dumps({k: summary[k] for k in ("wall_s", "heldout")}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
