"""A compiled engine (vLLM's default: torch.compile, no ``--enforce-eager``) per language-model
class: every other engine test runs eager for speed, and a compiled one traces the language model
with symbolic shapes, where positions of the wrong rank fail at start-up (vLLM 0.32 compiles
``LlamaModel`` with positions' dim 0 as the token dimension; ``vllm_plugin/positions.py``).

One engine per family here; narrowed to one family per language-model class (Llama: LLaVA-1.5,
shared by NeXT; Qwen2: Qwen2.5-VL, shared by OneVision; Qwen3-VL with DeepStack).
"""

import pytest
from helpers import close_llm, make_llm
from hf_reference import reference

from family.families import LLAVA, QWEN2_5_VL, QWEN3_VL
from family.suite import FamilyEngine

pytestmark = pytest.mark.parametrize(
    "family", [LLAVA, QWEN2_5_VL, QWEN3_VL], indirect=True, ids=str
)


@pytest.fixture(scope="module")
def engine(family, model_dir):
    llm = make_llm(model_dir, enforce_eager=False, **family.engine_kwargs)
    yield FamilyEngine(family, llm, reference(family.reference, model_dir))
    close_llm(llm)


def test_the_engine_is_compiled_and_takes_the_position_hook(engine):
    from vllm.config.compilation import CompilationMode

    config = engine.llm.llm_engine.vllm_config
    assert config.compilation_config.mode != CompilationMode.NONE
    assert config.model_config.uses_mrope, "original positions need vLLM's M-RoPE hook"


@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_compiled_pruned_prompt_matches_the_reference_at_original_positions(engine, ratio):
    k = engine.family.images[0].keep(ratio)
    out = engine.generate(engine.request(keep_ratio=ratio))
    assert engine.image_token_count(out) == k
    engine.assert_matches(out, engine.expected(out, k=None if ratio >= 1.0 else k))
