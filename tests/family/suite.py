"""What the family tests share: requests in the family's format, the rows and positions the
reference expects, and the comparison with a vLLM output."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import hf_reference
import torch
from helpers import make_image
from vllm import SamplingParams

from family.families import Family, ImageCase

QUESTION = "What is the color of the car on the street?"
OTHER_QUESTION = "How many people are standing near the door?"
MAX_TOKENS = 6
SAMPLING = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True)

Images = Sequence[tuple[int, ImageCase]]  # (seed, size) per image, in prompt order


@dataclasses.dataclass
class Expected:
    """What the reference gives a pruned prompt: per image its kept indices and rows, and the
    positions of the whole prompt."""

    kept: list[torch.Tensor]
    rows: list[torch.Tensor]
    grids: list[tuple[int, int]]
    """Per image the grid the position rule reads (``Reference.position_grid``)."""
    positions: torch.Tensor


@dataclasses.dataclass
class FamilyEngine:
    """A family's engine (in-process ``LLM``), its reference, and requests in its format."""

    family: Family
    llm: object
    ref: hf_reference.Reference
    _ids: itertools.count = dataclasses.field(default_factory=lambda: itertools.count(1))

    def default_images(self) -> Images:
        return [(0, self.family.images[0])]

    def request(self, question: str = QUESTION, images: Images | None = None, **mm_kwargs):
        images = self.default_images() if images is None else images
        req = {
            "prompt": self.family.prompt(question, len(images)),
            "multi_modal_data": {"image": [make_image(s, case.size) for s, case in images]},
        }
        if mm_kwargs:
            req["mm_processor_kwargs"] = mm_kwargs
        return req

    def generate(self, req, sampling: SamplingParams = SAMPLING):
        return self.llm.generate(req, sampling, use_tqdm=False)[0]

    def diagnostics_id(self) -> int:
        """A fresh id for ``prune_diagnostics`` (the worker's store pops each once)."""
        return next(self._ids)

    def image_token_count(self, output) -> int:
        return list(output.prompt_token_ids).count(self.ref.image_token_id)

    def expected(self, output, images: Images | None = None, *, k=None, method="simignore"):
        """The reference's rows and positions for ``output``'s prompt; ``k`` per image or one
        for all (None: unpruned)."""
        images = self.default_images() if images is None else images
        q_ids = self.ref.query_ids(output.prompt_token_ids)
        ks = k if isinstance(k, (list, tuple)) else [k] * len(images)
        kept, rows, grids = [], [], []
        for (seed, case), k_i in zip(images, ks, strict=True):
            image = make_image(seed, case.size)
            grid = self.ref.grid(image)
            assert grid == case.grid, (grid, case.grid)
            kept_i = self.ref.kept(image, q_ids, case.tokens if k_i is None else k_i, method)
            kept.append(kept_i)
            rows.append(self.ref.pruned_rows(image, kept_i))
            grids.append(self.ref.position_grid(image))
        positions = self.ref.positions(output.prompt_token_ids, grids, kept)
        return Expected(kept, rows, grids, positions)

    def assert_matches(self, output, expected: Expected, positions=None) -> None:
        """Ids and logprobs equal transformers fed the expected rows at ``positions`` (the
        expected ones by default)."""
        positions = expected.positions if positions is None else positions
        hf_reference.assert_matches(self.ref, output, expected.rows, positions)
