"""No evaluation or fidelity scene is a training scene: the task's random streams are disjoint by
construction (``scenes.STREAMS``), and a replay of the released training configuration's first
batches shares no scene with a v3 evaluation draw."""

import json
import math

import numpy as np

from lvlm_prune.models.shapes import SPEC_FILE, released_model_dir
from lvlm_prune.shapes import scenes, train

HELD_OUT = ("evaluation", "fidelity")


def test_every_named_stream_is_its_own_for_every_seed():
    """The state numpy derives from each (seed, name) differs from every other's, and no
    held-out stream is ``default_rng(seed)`` for any seed (numpy pads entropy with zeros, so
    ``[seed, 0]`` is ``seed``: training's vision stream is, and a held-out one must not be)."""
    seeds = range(64)
    states = {}
    for name, word in scenes.STREAMS.items():
        for seed in seeds:
            state = tuple(np.random.SeedSequence([seed, word]).generate_state(4))
            assert state not in states, (name, seed, states.get(state))
            states[state] = (name, seed)
    bare = {tuple(np.random.SeedSequence(seed).generate_state(4)): seed for seed in seeds}
    for state, (name, seed) in states.items():
        if name in HELD_OUT:
            assert state not in bare, (name, seed)
    assert len(set(scenes.STREAMS.values())) == len(scenes.STREAMS)
    assert all(scenes.STREAMS[name] != 0 for name in HELD_OUT)


def test_no_evaluation_scene_of_the_released_configuration_was_trained_on():
    """Scenes are told apart by their 63-bit noise seed. The first batches of every training
    stage of the released run (its seed and batch sizes), replayed, against the first 1,000
    scenes of each held-out stream for that seed and the next."""
    released = json.loads((released_model_dir() / SPEC_FILE).read_text())["training"]["config"]
    seed = released["seed"]
    trained = set()
    for stage in ("vision", "lm", "join"):
        rng, _ = train._rng(seed, stage)
        batch = released[stage]["batch"]
        for _ in range(math.ceil(400 / batch)):
            turns = 0 if stage == "vision" else train.TURNS
            bos = bool(rng.random() < 0.5)
            before = rng.bit_generator.state
            train.make_batch(rng, batch, turns=turns, bos=bos, pixels=False)
            # Replay the same draws to read the scenes' noise seeds (make_batch keeps no scene).
            replay = np.random.default_rng()
            replay.bit_generator.state = before
            for _ in range(batch):
                scene, questions = train._turns(replay, max(turns, 1))
                trained.add(scene.noise_seed)
            assert replay.bit_generator.state == rng.bit_generator.state
    assert len(trained) > 1000
    for name in HELD_OUT:
        for s in (seed, seed + 1):
            held_out = {sc.noise_seed for sc, _ in scenes.sample(s, 1000, stream_name=name)}
            assert not held_out & trained, (name, s)
