# The two commands of the README: `make demo` and `make test` (each sets up .venv first if needed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: this machine serves the 2.13.0 CPU build from disk; an open range would pull CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[onnx,genai,gguf,llamacpp,eval,test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/flatllm-export run recipes/smollm2-135m-full.yaml --output out/smollm2-135m-full --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest tests

.PHONY: setup demo test
