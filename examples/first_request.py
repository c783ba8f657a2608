"""The README's first request, run against ``make serve`` (127.0.0.1:8000), and the numbers the
README quotes: the answer, the votes, the prompt tokens pruned and unpruned, and how many of the
asked object's patches were kept. Its output is committed as benchmarks/results/first-request.md.

    python examples/first_request.py [--base-url http://127.0.0.1:8000/v1]
"""

import argparse

# --- the README's code, as it is there ---
import base64
import io

from openai import OpenAI

from lvlm_prune.shapes import scenes

scene, question = scenes.example()  # the scene above; "What color is the striped object?"
png = io.BytesIO()
scene.image().save(png, format="PNG")
image_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
# --- end of the README's code ---


def ask(client: OpenAI, pruning: dict):
    return client.chat.completions.create(
        model="lvlm-prune-shapes",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": question.text},
                ],
            }
        ],
        max_tokens=4,
        extra_body={"pruning": pruning},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="none")
    reply = ask(client, {"keep_ratio": 0.25, "diagnostics": True})
    unpruned = ask(client, {"keep_ratio": 1.0})
    pruning = reply.model_extra["pruning"]
    (image,) = pruning["per_image"]
    kept = image["kept_indices"]
    votes = ", ".join(f"{v['token']!r}: {v['votes']}" for v in image["top_query_tokens"])
    hit = scenes.object_hit_rate(scene, question, kept)
    print(f"question: {question.text!r} (answer {question.answer!r})")
    print(f"reply at keep 0.25: {reply.choices[0].message.content!r}")
    print(f"image tokens: {pruning['image_tokens_before']} -> {pruning['image_tokens_after']}")
    print(f"top query tokens (votes): {votes}")
    print(f"prompt tokens: {reply.usage.prompt_tokens} ({unpruned.usage.prompt_tokens} unpruned)")
    print(f"asked object's patches kept: {100 * hit:.0f} %")
    print(f"reply unpruned: {unpruned.choices[0].message.content!r}")


if __name__ == "__main__":
    main()
