"""Conversations: each image keeps the selection its own question made, so follow-up turns hit
vLLM's prefix and encoder caches.

A real ``lvlm-prune serve`` of its own (this module only), started with
``--enable-prompt-tokens-details`` (``usage.prompt_tokens_details.cached_tokens``) and
``--enable-logging-iteration-details`` (vLLM logs every engine step with the encoder inputs it
scheduled: how often the vision tower ran), and the real ``openai`` client resending the history,
as every chat UI does.
"""

from __future__ import annotations

import dataclasses
import re

import hf_reference as ref
import pytest
import requests
from helpers import data_url, make_image

from lvlm_prune.server.middleware import image_queries
from server_api.serving import API_KEY, MODEL, Server, serve

RATIO, K = 0.25, 144  # keep_count(576, 0.25)
QUESTIONS = (
    "What color is the car parked beside the tree?",
    "How many windows does the house have?",
    "Is there a dog on the grass?",
)


@pytest.fixture(scope="module")
def chat_server(tiny_model_dir, tmp_path_factory):
    args = [
        *("tiny", "--api-key", API_KEY, "--dtype", "float32", "--enforce-eager"),
        *("--max-model-len", "2048", "--limit-mm-per-prompt", '{"image": 2}'),
        "--enable-prompt-tokens-details",
        "--enable-logging-iteration-details",
    ]
    with serve(args, tmp_path_factory.mktemp("chat-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def chat_client(chat_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{chat_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def block_size(chat_server) -> int:
    metrics = requests.get(f"{chat_server.url}/metrics", timeout=30).text
    return int(re.search(r'vllm:cache_config_info\{[^}]*block_size="(\d+)"', metrics).group(1))


def encoder_inputs(server: Server) -> int:
    """Encoder inputs (images through the vision tower) vLLM has scheduled so far."""
    return sum(int(n) for n in re.findall(r"encoder inputs: (\d+)", server.log.read_text()))


def image_part(seed: int) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(make_image(seed))}}


def user(text: str, *images: int) -> dict:
    return {"role": "user", "content": [*map(image_part, images), {"type": "text", "text": text}]}


@dataclasses.dataclass
class Turn:
    prompt_tokens: int
    cached_tokens: int
    encoder_inputs: int
    tokens_after: list[int]


def send(server, client, messages, **pruning) -> Turn:
    """One turn; the reply joins ``messages`` as the assistant's message."""
    before = encoder_inputs(server)
    response = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=4,
        temperature=0.0,
        extra_body={"pruning": {"keep_ratio": RATIO, **pruning}},
    )
    messages.append({"role": "assistant", "content": response.choices[0].message.content or ""})
    details = response.usage.prompt_tokens_details
    return Turn(
        prompt_tokens=response.usage.prompt_tokens,
        cached_tokens=details.cached_tokens if details else 0,
        encoder_inputs=encoder_inputs(server) - before,
        tokens_after=[i["tokens_after"] for i in response.model_extra["pruning"]["per_image"]],
    )


def kept_indices(client, messages, **pruning) -> list[list[int]]:
    """Each image's kept indices for this conversation, from a diagnostics request (its own
    multimodal hash: it neither uses nor disturbs the conversation's cache entries)."""
    response = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=1,
        extra_body={"pruning": {"keep_ratio": RATIO, "diagnostics": True, **pruning}},
    )
    return [image["kept_indices"] for image in response.model_extra["pruning"]["per_image"]]


@pytest.fixture(scope="module")
def reference_kept(tiny_model_dir):
    def compute(image_seed: int, question: str) -> list[int]:
        q_ids = ref.load(tiny_model_dir)[1].tokenizer.encode(question, add_special_tokens=False)
        return ref.reference_kept(tiny_model_dir, make_image(image_seed), q_ids, K).tolist()

    return compute


def test_follow_up_turns_hit_the_prefix_cache_and_keep_the_selection(
    chat_server, chat_client, block_size, reference_kept
):
    messages, turns, probes = [], [], []
    for i, question in enumerate(QUESTIONS):
        messages.append(user(question, 10) if i == 0 else user(question))
        probes.append(list(messages))
        turns.append(send(chat_server, chat_client, messages))
    assert [t.tokens_after for t in turns] == [[K]] * 3
    assert turns[0].encoder_inputs == 1 and turns[0].cached_tokens == 0
    for previous, turn in zip(turns, turns[1:]):
        assert turn.prompt_tokens > previous.prompt_tokens
        assert turn.cached_tokens >= previous.prompt_tokens // block_size * block_size > 0, turns
        assert turn.encoder_inputs == 0, "the vision tower ran again for a follow-up turn"
    # Every turn selects the image's tokens by the question it came with.
    first = reference_kept(10, QUESTIONS[0])
    assert first != reference_kept(10, QUESTIONS[2])
    assert [kept_indices(chat_client, p) for p in probes] == [[first]] * 3


def test_requery_selects_for_the_latest_question_and_pays_the_prefill(
    chat_server, chat_client, reference_kept
):
    messages = [user(QUESTIONS[0], 11)]
    send(chat_server, chat_client, messages)
    messages.append(user(QUESTIONS[1]))
    assert kept_indices(chat_client, messages, requery=True) == [reference_kept(11, QUESTIONS[1])]
    turn = send(chat_server, chat_client, messages, requery=True)
    assert turn.tokens_after == [K]
    assert turn.cached_tokens == 0 and turn.encoder_inputs == 1  # the cost, as documented


def test_images_sent_in_different_turns_each_keep_their_own_question(
    chat_server, chat_client, block_size, reference_kept
):
    messages = [user(QUESTIONS[0], 12)]
    first = send(chat_server, chat_client, messages)
    messages.append(user(QUESTIONS[1], 13))
    second = send(chat_server, chat_client, messages)
    assert second.tokens_after == [K, K]
    assert second.encoder_inputs == 1, "only the new image goes through the vision tower"
    assert second.cached_tokens >= first.prompt_tokens // block_size * block_size > 0
    expected = [reference_kept(12, QUESTIONS[0]), reference_kept(13, QUESTIONS[1])]
    assert kept_indices(chat_client, messages[:-1]) == expected
    # An explicit list is one query per image, in prompt order.
    swapped = list(reversed(QUESTIONS[:2]))
    assert kept_indices(chat_client, messages[:-1], query=swapped) == [
        reference_kept(12, QUESTIONS[1]),
        reference_kept(13, QUESTIONS[0]),
    ]


def test_an_image_without_text_takes_the_next_user_question(chat_client, reference_kept):
    messages = [{"role": "user", "content": [image_part(14)]}, user(QUESTIONS[2])]
    assert kept_indices(chat_client, messages) == [reference_kept(14, QUESTIONS[2])]


def _body(**over) -> dict:
    return {"model": MODEL, "messages": [user(QUESTIONS[0], 15)], "max_tokens": 2, **over}


BAD = {
    "query list too long": (_body(pruning={"query": ["a", "b"]}), "pruning.query"),
    "query list empty": (_body(pruning={"query": []}), "pruning.query"),
    "query list of non-strings": (_body(pruning={"query": [5]}), "pruning.query"),
    "requery not a bool": (_body(pruning={"requery": "yes"}), "pruning.requery"),
    "requery with a query": (
        _body(pruning={"requery": True, "query": "a car"}),
        "pruning.requery",
    ),
    "requery with a raw query": (
        _body(pruning={"requery": True}, mm_processor_kwargs={"prune_query": "a car"}),
        "pruning.requery",
    ),
    "raw query list too long": (
        _body(mm_processor_kwargs={"prune_query": ["a", "b"]}),
        "mm_processor_kwargs.prune_query",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_query_lists_are_a_400_naming_the_field(chat_server, chat_client, case):
    body, param = BAD[case]
    response = requests.post(
        f"{chat_server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json=body,
        timeout=120,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param.split(".")[-1] in error["message"], error


def test_the_processor_refuses_a_query_list_of_the_wrong_length_outside_the_middleware(
    chat_server,
):
    """/tokenize is vLLM's route, not ours: the processor's own check answers with a 400."""
    response = requests.post(
        f"{chat_server.url}/tokenize",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={
            "model": MODEL,
            "messages": [user(QUESTIONS[0], 15)],
            "mm_processor_kwargs": {"keep_ratio": RATIO, "prune_query": ["a", "b"]},
        },
        timeout=120,
    )
    assert response.status_code == 400, response.text
    assert "prune_query has 2 queries for 1 image" in response.json()["error"]["message"]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [IMAGE, _text("What is on the table?")]},
    {"role": "assistant", "content": "A cup."},
    {"role": "user", "content": [IMAGE]},
    {"role": "user", "content": [_text("And here?"), _text("Which color?")]},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Thanks, and the first one?"},
]


@pytest.mark.parametrize(
    "messages,requery,expected",
    [
        (CONVERSATION[:2], False, ["What is on the table?"]),
        (CONVERSATION, False, ["What is on the table?", "And here?\nWhich color?"]),
        (CONVERSATION[:4], False, ["What is on the table?", ""]),
        (CONVERSATION, True, ["Thanks, and the first one?"] * 2),
        ([{"role": "user", "content": [IMAGE, IMAGE, _text("Compare.")]}], False, ["Compare."] * 2),
        ([{"role": "user", "content": "no image"}], False, []),
    ],
    ids=["own", "next-user-text", "no-text-yet", "requery", "two-in-one", "none"],
)
def test_image_queries(messages, requery, expected):
    assert image_queries(messages, requery=requery) == expected
