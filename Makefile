# Two commands for a newcomer: `make demo` (set up, then answer a question about a sample video) and
# `make test` (set up, then run the test suite). Everything else here is what those two need.
VENV ?= .venv
PY := $(VENV)/bin/python
# The pinned torch is a local build on our machines; installing it first keeps pip from pulling a
# multi-gigabyte CUDA build when the package's own looser `torch>=` requirement is resolved. torchvision is
# pinned with it (the two must match): the Qwen-VL and LLaVA-OneVision video/image processors need it.
# Both wheels lie on our machines' disk, so pip installs them locally (about a minute, no download).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/dymu-video demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
