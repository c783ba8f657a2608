"""Training in seconds: each stage's loss falls over a few steps, the forward used for training is
the stock model's, and the pipeline writes a checkpoint transformers loads."""

import numpy as np
import torch

from lvlm_prune.models import shapes as shapes_model
from lvlm_prune.shapes import scenes, train


def fresh(seed):
    torch.manual_seed(seed)
    return train._fresh_model(seed)


def batch_losses(model, batch, rows_fn):
    rows = rows_fn()
    targets = train.attention_targets(batch)
    hidden, probs = train.lm_forward(
        model,
        train.input_embeds(model, batch, rows),
        {0: targets[0][0], 1: targets[1][0]},
        train.output_positions(batch),
    )
    answer, _ = train.answer_loss(model, hidden, batch)
    return answer + train.attention_loss(probs, targets)


def test_training_forward_is_the_stock_forward(seed):
    model, _ = fresh(seed)
    model.eval()
    batch = train.make_batch(np.random.default_rng(seed), 2, turns=2, bos=True, pixels=True)
    pixels = train.PixelNoise(torch.Generator().manual_seed(seed))(batch.clean)
    with torch.no_grad():
        rows = train.vision_rows(model, pixels)
        out = train.output_positions(batch)
        hidden, _ = train.lm_forward(model, train.input_embeds(model, batch, rows), {}, out)
        ours = model.lm_head(hidden)
        logits = model(input_ids=batch.ids, pixel_values=pixels).logits
        stock = logits.gather(1, out[..., None].expand(-1, -1, logits.shape[-1]))
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


def test_a_few_steps_lower_each_stage_loss(seed):
    model, geometry = fresh(seed)
    emb = model.get_input_embeddings().weight.detach()
    rng = np.random.default_rng(seed)
    batch = train.make_batch(rng, 1, turns=2, bos=False, pixels=True)
    pixels = train.PixelNoise(torch.Generator().manual_seed(seed))(batch.clean)
    targets = train.row_targets(batch, emb, geometry)

    def vision_loss():
        return train.alignment_loss(train.vision_rows(model, pixels), targets, batch.coverage)

    def lm_loss():
        return batch_losses(model, batch, lambda: targets)

    for stage, loss_fn in (("vision", vision_loss), ("lm", lm_loss)):
        params = train._stage_params(model, stage)
        opt = torch.optim.AdamW(params, lr=2e-3)
        first = loss_fn().item()
        for _ in range(6):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
        last = loss_fn().item()
        print(f"{stage}: loss {first:.3f} -> {last:.3f}")
        assert last < 0.8 * first, (stage, first, last)


def test_embeddings_are_orthonormal_and_background_and_quadrants_are_no_word(seed):
    """The background and quadrant directions are orthogonal to every word: a question's words
    have no cosine cue to where an object is (what v3's location questions test)."""
    model, geometry = fresh(seed)
    emb = model.get_input_embeddings().weight
    assert not emb.requires_grad
    every = torch.cat([emb, geometry.background[None], geometry.quadrants])
    torch.testing.assert_close(every @ every.T, torch.eye(len(every)), atol=1e-5, rtol=0)


def test_the_tokenizer_reads_a_quadrant_as_one_word(seed):
    """Training lays questions out by ``split_words``; the released tokenizer must agree."""
    tokenizer = shapes_model.build_tokenizer()
    for _, q in scenes.sample(seed, 40, per_type=True, version="v3"):
        ids = tokenizer.encode(q.text, add_special_tokens=False)
        assert ids == shapes_model.token_ids(q.text), q.text
        assert shapes_model.UNK_ID not in ids
        if q.quadrant is not None:
            assert tokenizer.convert_tokens_to_ids(q.quadrant) in ids


def test_attention_targets_point_at_the_asked_objects_patches(seed):
    rng = np.random.default_rng(seed)
    batch = train.make_batch(rng, 3, turns=3, bos=True, pixels=False)
    (q0, mask0, valid0), (q1, mask1) = train.attention_targets(batch)
    ids = batch.ids
    cue_ids = set(shapes_model.token_ids([*shapes_model.ATTRIBUTE_WORDS, *scenes.QUADRANTS]))
    for b in range(3):
        for m in range(q0.shape[1]):
            if not valid0[b, m]:
                continue
            pos = int(q0[b, m])
            assert int(ids[b, pos]) in cue_ids
            keys = mask0[b, m].nonzero().flatten().tolist()
            if keys == [pos]:  # no object has this attribute
                continue
            patches = [k - batch.image_start for k in keys]
            assert all(0 <= p < scenes.NUM_PATCHES for p in patches)
            assert (ids[b, keys] == shapes_model.IMAGE_TOKEN_ID).all()
        for t in range(q1.shape[1]):
            keys = mask1[b, t].nonzero().flatten().tolist()
            assert 1 <= len(keys) <= 2 and all(int(ids[b, k]) in cue_ids for k in keys)
            assert int(ids[b, q1[b, t] + 1]) == int(batch.answers[b, t])


def test_smoke_pipeline_writes_a_loadable_checkpoint(tmp_path):
    assert train.main(["--out", str(tmp_path), "--smoke", "--jobs", "1", "--quiet"]) == 0
    model, processor = shapes_model.load_model(tmp_path)
    assert shapes_model.is_shapes_model(tmp_path)
    assert model.config.lvlm_prune == {"prune_layer": shapes_model.SCOUT_LAYER}  # as released
    assert (tmp_path / train.LOG_NAME).read_text().count("\n") >= 3
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
        add_generation_prompt=True,
    )
    image = scenes.sample(0, 1)[0][0].image()
    inputs = processor(images=[image], text=text, return_tensors="pt")
    assert (inputs["input_ids"] == shapes_model.IMAGE_TOKEN_ID).sum() == scenes.NUM_PATCHES
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == shapes_model.SPEC.vocab_size
