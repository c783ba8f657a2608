"""The ShapesVQA model: a stock LLaVA-1.5 (CLIP tower, 2-layer GELU projector, Llama LM), small.

Everything a checkpoint needs is built here offline — a word-level tokenizer over the task's
words, LLaVA-1.5's processor and chat template (shared with the random-weight models in
``lvlm_prune/models/tiny_llava.py``), the config — and saved in the form both transformers and vLLM
0.32 load. :func:`released_model_dir` is the trained model that ships in the package.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from lvlm_prune.shapes import scenes

from . import tiny_llava

MODEL_NAME = "lvlm-prune-shapes"
SPEC_FILE = "lvlm_prune_shapes.json"
"""Written beside the weights: the model spec and the task version (marks a ShapesVQA model)."""

SPECIAL_TOKENS = tiny_llava.SPECIAL_TOKENS
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_TOKEN_ID = range(len(SPECIAL_TOKENS))

WORDS = (
    "USER",
    "ASSISTANT",
    ":",
    "?",
    ".",
    ",",
    "What",
    "color",
    "pattern",
    "is",
    "the",
    "object",
    "Is",
    "there",
    "a",
    *scenes.COLOR_NAMES,
    *scenes.PATTERNS,
    "yes",
    "no",
    "in",
    *scenes.QUADRANTS,
)
"""The vocabulary after the special tokens; any other word reads as ``<unk>``. A quadrant
("top left") is one word: a 2-layer LM reads it with one attention hop, as an attribute word."""
ATTRIBUTE_WORDS = (*scenes.COLOR_NAMES, *scenes.PATTERNS)


@dataclasses.dataclass(frozen=True)
class ShapesModelSpec:
    """Shapes of the model (LLaVA-1.5's layout at a size two CPU cores can train)."""

    image_size: int = scenes.CANVAS
    patch_size: int = scenes.PATCH
    vision_hidden: int = 128
    vision_layers: int = 3  # vision_feature_layer -2 (as LLaVA-1.5): the last one is not used
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4  # head size 32, one vLLM's CPU attention supports
    text_intermediate: int = 512
    vocab_size: int = 64
    max_position_embeddings: int = 2048

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SPEC = ShapesModelSpec()


def released_model_dir() -> Path:
    """The trained ``lvlm-prune-shapes`` checkpoint inside the installed package: it ships with
    the task and its training (``lvlm_prune/shapes/model/``), not with the builders here."""
    path = Path(scenes.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the released ShapesVQA weights are missing from {path}; "
            "train them with `lvlm-prune train shapes --out DIR`"
        )
    return path


def is_shapes_model(model_dir: str | Path) -> bool:
    return (Path(model_dir) / SPEC_FILE).exists()


def task_version(model_dir: str | Path) -> str:
    """The ShapesVQA version a checkpoint was trained on (``"v2"``, ``"v3"``), from its spec
    file: what its evaluation and fidelity runs ask."""
    task = json.loads((Path(model_dir) / SPEC_FILE).read_text())["task"]
    (version,) = [v for v, name in scenes.VERSIONS.items() if name == task]
    return version


def build_tokenizer(spec: ShapesModelSpec = SPEC):
    """Word-level tokenizer: one token per word or punctuation mark, BOS prepended."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *WORDS))}
    assert len(vocab) <= spec.vocab_size, (len(vocab), spec.vocab_size)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Splits "object?" into "object", "?" and "ASSISTANT:" into "ASSISTANT", ":"; whitespace and
    # newlines only separate words, so the chat template's "\n" and a plain " " tokenise alike.
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # vLLM detokenises a reply as decode(prompt tail + new) minus decode(prompt tail): with
    # words joined by spaces a reply would come out as " red". Fused, it is "red" (a whole text
    # decodes without spaces: "USER:Whatcolor...", which nothing shows).
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    # Matched in the text before the whitespace split, so "top left" stays one word.
    tok.add_tokens([AddedToken(q, single_word=True, normalized=False) for q in scenes.QUADRANTS])
    return tiny_llava.wrap_llava_tokenizer(tok, spec.max_position_embeddings)


def build_processor(tokenizer=None, spec: ShapesModelSpec = SPEC):
    return tiny_llava.make_llava_processor(
        tokenizer if tokenizer is not None else build_tokenizer(spec),
        spec.image_size,
        spec.patch_size,
    )


SCOUT_LAYER = 1
"""The flow method's scout depth this model declares: its information-flow cliff is layer 1, and a
deeper scout ranks by attention that no longer reads the image. The measurement behind the choice
is the fidelity table (``benchmarks/results/fidelity-shapes.md``, flow vs flow/1), not a number
copied here."""


def build_config(spec: ShapesModelSpec = SPEC):
    from lvlm_prune.models.tiny_llava import llava_config
    from lvlm_prune.vllm_plugin import options

    config = llava_config(spec)
    setattr(config, options.CHECKPOINT_DEFAULTS, {options.PRUNE_LAYER: SCOUT_LAYER})
    return config


def new_model(spec: ShapesModelSpec = SPEC, *, seed: int = 0):
    """A freshly initialised float32 ``LlavaForConditionalGeneration`` for ``spec``."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(build_config(spec)).float()


def save_model(
    model,
    out: Path,
    *,
    spec: ShapesModelSpec = SPEC,
    version: str = scenes.LATEST,
    extra: dict | None = None,
):
    """Write a loadable checkpoint folder (weights, config, tokenizer, processor, template)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tiny_llava.save_llava(model, build_processor(spec=spec), out)
    task = scenes.VERSIONS[version]
    info = {"model": MODEL_NAME, "task": task, "spec": dataclasses.asdict(spec)}
    (out / SPEC_FILE).write_text(json.dumps({**info, **(extra or {})}, indent=2) + "\n")
    return out


def load_model(model_dir: str | Path):
    """(model, processor) from a checkpoint folder, float32, eval mode, offline."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(model_dir)


# ---------------------------------------------------------------------------------------------
# What training needs beyond the stock classes


def pixel_values(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 336, 336, 3] uint8 or float pixels → [B, 3, 336, 336] as the CLIP image processor
    makes them for a 336 px image (rescale 1/255, normalise with CLIP's mean and std)."""
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    x = pixels.permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


def split_words(text: str) -> list[str]:
    """The tokenizer's words of a task text: split at whitespace, "?" a word of its own, a
    quadrant ("top left") one word."""
    for quadrant in scenes.QUADRANTS:
        text = text.replace(quadrant, quadrant.replace(" ", "_"))
    return [w.replace("_", " ") for w in text.replace("?", " ?").split()]


def token_ids(words: str | Sequence[str]) -> list[int]:
    """Ids of a task text or of a list of words, without BOS (training builds its sequences)."""
    index = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *WORDS))}
    return [index.get(w, UNK_ID) for w in (split_words(words) if isinstance(words, str) else words)]
