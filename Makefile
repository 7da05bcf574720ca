# dsq: `make demo` installs everything and quantizes the bundled model; `make test` runs the tests.
# Both create the virtual environment on first use (.venv), so each works on a fresh clone.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch: on a CPU machine an unpinned `torch` resolves to a multi-GB CUDA wheel.
# GPU users: install the torch you want into $(VENV) first; any version pyproject.toml admits is kept.
TORCH_SPEC ?= torch==2.13.0
# llama-cpp-python ships no binary wheel: pip compiles llama.cpp. Portable x86-64 flags (AVX2/FMA/F16C,
# no -march=native) so the cached wheel runs on any recent CPU, not only the one that built it.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
DEMO_OUT ?= out/smollm2-135m-int4

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(BIN)/python || { echo "==> creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "==> pip, and $(TORCH_SPEC) (CPU build)"
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	@if ! $(BIN)/python -c "import llama_cpp" 2>/dev/null; then \
	  echo "==> llama-cpp-python"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -v "llama-cpp-python>=0.3.8,<0.4" 2>&1 \
	    | awk '/^ *\[[0-9]+\/[0-9]+\]/ { if (!c) { print "    compiling llama.cpp from source (6-11 min on 2 cores, once: pip caches the wheel)"; c = 1 } \
	                                   printf "\r    compiling %s", $$1; fflush() } \
	           /^(ERROR|error:)/ { print; fflush() } \
	           /Successfully installed/ { print "\n    " $$0; fflush() }'; \
	  $(BIN)/python -c "import llama_cpp" || { echo "llama-cpp-python failed to build: see pip's output above"; exit 1; }; \
	fi
	@echo "==> dsq and its dependencies (editable)"
	@$(BIN)/python -m pip install -q -e ".[all]"
	@touch $@
	@echo "==> installed: $$($(BIN)/dsq --help >/dev/null && echo ok) ($(BIN)/dsq)"

demo: install
	@echo "==> quantizing the bundled model (SmolLM2-135M-Instruct, Apache-2.0) to int4 -> $(DEMO_OUT)"
	$(BIN)/dsq plan default --recipe int4 --summary
	$(BIN)/dsq quantize default -o $(DEMO_OUT) --recipe int4 --overwrite
	@echo "==> its accuracy against the bf16 model, on shipped held-out text (in no calibration set)"
	$(BIN)/dsq eval $(DEMO_OUT) --ref default --runtime torch --text heldout --chunks 2 --ctx 256

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) out build *.egg-info
