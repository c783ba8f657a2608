"""The ``cover`` selection against its rule spelled out in plain Python, and what it promises:
a token of every distinct thing in the image, where relevance alone keeps one thing only."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import DEVICE, assert_equal

from lvlm_prune.kernels import select_tokens
from lvlm_prune.kernels.coverage import coverage_select_ref, relevance_count


def rule(image: torch.Tensor, scores: torch.Tensor | None, k: int) -> list[int]:
    """The docstring's rule, one row at a time: ceil(K/2) by score (ties to the lower index),
    then the row with the largest cosine distance to everything kept (the image's mean direction
    counts as kept when there are no scores), first index on ties."""
    rows = torch.nn.functional.normalize(image.double(), dim=-1).tolist()
    n = len(rows)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b))

    kept: list[int] = []
    anchors: list[list[float]] = []
    if scores is not None:
        order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
        kept = order[: math.ceil(k / 2)]
        anchors = [rows[i] for i in kept]
    else:
        mean = image.double().div(image.double().norm(dim=-1, keepdim=True)).mean(0)
        anchors = [(mean / mean.norm()).tolist()]
    while len(kept) < k:
        best, best_d = None, -math.inf
        for i in range(n):
            if i in kept:
                continue
            d = min(1 - cos(rows[i], a) for a in anchors)
            if d > best_d + 1e-9:  # strictly larger (beyond float noise): first index on ties
                best, best_d = i, d
        kept.append(best)
        anchors.append(rows[best])
    return sorted(kept)


@pytest.mark.parametrize("with_scores", [True, False], ids=["query", "no-query"])
@pytest.mark.parametrize("n,k,d", [(40, 9, 16), (100, 30, 32), (7, 7, 8), (5, 1, 8)])
def test_matches_the_rule(n, k, d, with_scores, seed):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=gen)
    scores = torch.randn(n, generator=gen) if with_scores else None
    got = coverage_select_ref(image, scores, k)
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert got.tolist() == rule(image, scores, k), f"seed={seed}"


def test_relevance_half_is_simignores_top_and_ties_go_low(seed):
    """Equal scores and duplicated rows: the relevance half is the top ceil(K/2) by score with
    ties to the lower index; duplicates of a kept row are never picked while anything else is
    left (their distance is 0)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 16, generator=gen)
    image = base.repeat_interleave(4, dim=0)  # 6 distinct rows, each 4 times
    scores = torch.zeros(24)
    kept = coverage_select_ref(image, scores, 12).tolist()
    assert kept[: relevance_count(12)] == [0, 1, 2, 3, 4, 5]  # ties: the lowest indices
    # Then one of every distinct row not yet kept (rows 2..5 of base: index 8, 12, 16, 20).
    assert set(kept) >= {8, 12, 16, 20}


def test_a_question_with_no_cue_still_keeps_every_object():
    """Background plus four objects of 9 rows each; the question's scores point at background
    (no cue to the objects). simignore keeps background only; cover keeps a row of each object
    within its 20 tokens."""
    gen = torch.Generator().manual_seed(0)
    d = 32
    background = torch.randn(d, generator=gen)
    objects = [torch.randn(d, generator=gen) for _ in range(4)]
    rows = [background + 0.05 * torch.randn(d, generator=gen) for _ in range(200)]
    owner = [-1] * 200
    for o, vec in enumerate(objects):
        rows += [vec + 0.05 * torch.randn(d, generator=gen) for _ in range(9)]
        owner += [o] * 9
    image = torch.stack(rows)
    scores = torch.nn.functional.cosine_similarity(image, background[None], dim=-1)
    query = background[None]
    (simignore, cover) = select_tokens(
        [image, image],
        [query, query],
        [20, 20],
        methods=["simignore", "cover"],
        merge=[False, False],
        seeds=[0, 0],
    )
    assert {owner[i] for i in simignore.kept.tolist()} == {-1}
    assert {owner[i] for i in cover.kept.tolist()} >= {0, 1, 2, 3}
    torch.testing.assert_close(cover.scores, scores, atol=1e-5, rtol=0)
    assert cover.method == "cover"


def test_select_tokens_runs_the_reference_per_image(seed):
    """Two images, one with a query and one without, in one call, and merge on top."""
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randn(50, 16, generator=gen).to(DEVICE), torch.randn(30, 16, generator=gen)]
    images[1] = images[1].to(DEVICE)
    queries = [torch.randn(3, 16, generator=gen).to(DEVICE), torch.empty(0, 16, device=DEVICE)]
    got = select_tokens(
        images, queries, [10, 8], methods=["cover", "cover"], merge=[False, True], seeds=[0, 0]
    )
    want0 = coverage_select_ref(images[0], got[0].scores, 10)
    assert_equal(got[0].kept, want0, "image 0 kept", seed)
    assert_equal(got[1].kept, coverage_select_ref(images[1], None, 8), "image 1 kept", seed)
    assert got[1].scores is None and got[1].rows.shape == (8, 16)
