"""LLaVA-1.5-shaped models with random weights, built offline.

Tests and benchmarks use these (``tiny``: tests; ``bench``: speed, with LLaVA-1.5-7B's vision : LLM
prefill cost proportion): no model hub is reachable, and with random weights nothing here is meant
to say anything sensible — only token ids and counts are compared. The default served model is the
trained ``lvlm-prune-shapes`` (``shapes.py``), which reuses this module's processor and template. Every model is cached on disk under a content key (spec + builder version), so it is built
once per machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lvlm_prune import envs

# Bump when the files this module writes change in any way.
BUILDER_VERSION = 3

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_TOKEN_ID = range(5)

# LLaVA-1.5's conversation format; accepts plain string content and OpenAI-style list content
# (vLLM hands list content through as {"type": "image"} / {"type": "text"} items).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join(' ') }}\n"
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] in ['image', 'image_url'] %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{{ message['content'] | map(attribute='text') | join('') }}{% endif %}</s>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS = """\
USER: What is shown in this image? ASSISTANT: A red car parked beside a tree on a sunny street.
USER: How many people are in the picture? ASSISTANT: There are three people standing near the door.
USER: What color is the sky? ASSISTANT: The sky is blue with a few white clouds over the hills.
USER: Describe the animal in the photo. ASSISTANT: A small brown dog is sitting on the green grass.
Which option is correct? A. cat B. dog C. bird D. fish. Answer with the letter of the option.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Question: Where is the cup? Options: left, right, top, bottom. The cup is on the table, left side.
Is there a person riding a bicycle in the street? Yes, a woman rides a bike across the road.
What text is written on the sign? The sign says STOP in large white letters on red.
0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 , . ; : ! ? ' " ( ) [ ] - + = / * % & # @ _
"""


@dataclasses.dataclass(frozen=True)
class TinyLlavaSpec:
    """Shapes of a LLaVA-1.5-style model (CLIP tower + 2-layer MLP projector + Llama)."""

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    vocab_size: int = 320
    max_position_embeddings: int = 4096
    seed: int = 0

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def key(self) -> str:
        return spec_key(self, BUILDER_VERSION)


TINY = TinyLlavaSpec()
"""The test / default-serve model: vision-dominated, ~1 MB, builds in seconds."""

BENCH = TinyLlavaSpec(
    vision_hidden=512,
    vision_layers=5,  # vision_feature_layer=-2: vLLM runs 4 of them
    vision_heads=8,
    text_hidden=2048,
    text_layers=8,
    text_heads=16,
    text_intermediate=5632,
    vocab_size=320,
)
"""Bench-sized: the language model dominates prefill, as in LLaVA-1.5-7B (see benchmarks/)."""

SPECS = {"tiny": TINY, "bench": BENCH}


def cache_root() -> Path:
    return envs.cache_dir() / "models"


def build_tiny_llava(spec: TinyLlavaSpec = TINY, *, root: Path | None = None) -> Path:
    """Return the directory of the model for ``spec``, building it first if absent."""
    return build_cached(f"llava-{spec.key()}", lambda out: _write_model(spec, out), root=root)


def spec_key(spec, builder_version: int) -> str:
    """A model's cache key: its spec (a dataclass) and the version of the code that writes it."""
    payload = json.dumps(
        {"spec": dataclasses.asdict(spec), "builder": builder_version}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_cached(name: str, write: Callable[[Path], None], *, root: Path | None = None) -> Path:
    """``root / name`` (the cache by default), written by ``write(folder)`` first if absent.

    Written in a temporary sibling and renamed: concurrent builders (pytest-xdist, two servers)
    never see a half-written model.
    """
    out = (root or cache_root()) / name
    if (out / "model.safetensors").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        write(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            if not (out / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def llava_config(spec):
    """The LLaVA-1.5 config (CLIP tower, GELU projector, Llama LM) of a spec with this module's
    fields: the random-weight models here and the trained ``lvlm-prune-shapes``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=spec.num_image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def _build_tokenizer(spec: TinyLlavaSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No full 256-byte initial alphabet: lone byte tokens made random generations detokenize to "".
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - 8, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return wrap_llava_tokenizer(tok, spec.max_position_embeddings)


def wrap_llava_tokenizer(tok, max_length: int):
    """A ``tokenizers.Tokenizer`` over ``SPECIAL_TOKENS`` as LLaVA-1.5's tokenizer: BOS prepended,
    the special tokens named, ``<image>`` as the image token."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=max_length,
    )


def _write_model(spec: TinyLlavaSpec, out: Path) -> None:
    import torch
    from transformers import (
        LlavaForConditionalGeneration,
    )

    tokenizer = _build_tokenizer(spec)
    assert len(tokenizer) <= spec.vocab_size, (len(tokenizer), spec.vocab_size)
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID

    config = llava_config(spec)
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16).eval()
    processor = make_llava_processor(tokenizer, spec.image_size, spec.patch_size)
    save_llava(model, processor, out)
    (out / "lvlm_prune_spec.json").write_text(
        json.dumps({**dataclasses.asdict(spec), "builder": BUILDER_VERSION}, indent=2)
    )


def make_llava_processor(tokenizer, image_size: int, patch_size: int):
    """LLaVA-1.5's processor (CLIP image processor + tokenizer) with :data:`CHAT_TEMPLATE`."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def save_llava(model, processor, out: Path) -> None:
    """Save a ``LlavaForConditionalGeneration`` with its processor so that both transformers and
    vLLM 0.32 load the folder offline."""
    from safetensors.torch import load_file, save_file

    out = Path(out)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)

    # NOTE(transformers 5.19 / vLLM 0.32): transformers saves the CLIP tower as
    # `...vision_tower.embeddings.*`, vLLM's CLIPVisionModel loads `vision_tower.vision_model.*`.
    # transformers still loads the renamed file.
    weights_file = out / "model.safetensors"
    state = load_file(weights_file)
    renamed = {}
    for name, tensor in state.items():
        if ".vision_tower." in f".{name}" and ".vision_model." not in name:
            head, tail = name.split("vision_tower.", 1)
            name = f"{head}vision_tower.vision_model.{tail}"
        renamed[name] = tensor.contiguous()
    save_file(renamed, weights_file, metadata={"format": "pt"})
