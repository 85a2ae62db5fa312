# Two commands for a newcomer: `make demo` (set up, then answer a question about a sample video) and
# `make test` (set up, then run the test suite). Everything else here is what those two need, plus the
# maintainers' check against the newest releases (`make test-latest`) and the oldest ones we claim
# (`make test-oldest`).
VENV ?= .venv
PY := $(VENV)/bin/python
# The pinned torch is a local build on our machines; installing it first keeps pip from pulling a
# multi-gigabyte CUDA build when the package's own looser `torch>=` requirement is resolved. torchvision is
# pinned with it (the two must match): the Qwen-VL and LLaVA-OneVision video/image processors need it.
# Both wheels lie on our machines' disk, so pip installs them locally (about a minute, no download).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Exact versions the suite passed with: setup installs through them, so a fresh clone tests what was tested.
CONSTRAINTS := constraints.txt
# The tests that hold us to transformers' own behaviour (prompts, processors, M-RoPE, stock forward passes):
# the ones a new transformers release can break.
PARITY_TESTS := tests/test_qwen_ask.py tests/test_ask.py tests/test_mrope.py tests/test_stock_parity.py \
	tests/test_vtu.py tests/test_vision.py tests/test_qwen_vision.py tests/test_qwen_inputs.py \
	tests/test_generate.py tests/test_layout.py tests/test_tiny.py
# The oldest transformers the package's requirements admit (keep in step with pyproject.toml).
OLDEST_TRANSFORMERS ?= 5.24.0

.PHONY: setup demo test test-latest test-oldest lock bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) $(TORCH_SPEC)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/dymu-video demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# Not in CI's path: a fresh venv with the newest releases the requirements admit, then the parity tests.
# A failure here is a bug to fix (then `make lock` and `make test`), not a pin to keep for good.
test-latest:
	rm -rf .venv-latest
	python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q $(TORCH_SPEC)
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[test]'
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -i -E '^(transformers|tokenizers|huggingface.hub|torch|torchvision) '
	HF_HUB_OFFLINE=1 .venv-latest/bin/python -m pytest -q -p no:cacheprovider $(PARITY_TESTS)

# The same parity tests on the oldest transformers the requirements admit.
test-oldest:
	rm -rf .venv-oldest
	python3 -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q --upgrade pip
	.venv-oldest/bin/python -m pip install -q $(TORCH_SPEC)
	.venv-oldest/bin/python -m pip install -q 'transformers==$(OLDEST_TRANSFORMERS)' -e '.[test]'
	.venv-oldest/bin/python -m pip list 2>/dev/null | grep -i -E '^(transformers|tokenizers|huggingface.hub|torch|torchvision) '
	HF_HUB_OFFLINE=1 .venv-oldest/bin/python -m pytest -q -p no:cacheprovider $(PARITY_TESTS)

# Rewrite the constraints from what the setup venv holds now (after `make test` passed on it).
lock: setup
	{ sed -n '/^#/p' $(CONSTRAINTS); $(PY) -m pip freeze --exclude-editable 2>/dev/null | grep -v '^dymu-video'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest build *.egg-info .pytest_cache
