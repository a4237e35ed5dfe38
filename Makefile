# lmforge: two commands matter.
#   make demo  -> set up .venv and run `lmforge quickstart` (offline, tiny model, CPU)
#   make test  -> set up .venv, lint, and run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lmforge-installed

.PHONY: setup tools demo test lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the pinned CPU wheel on CPU machines, the CUDA wheel on GPU ones.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Programs some tests run beside Python: Go (the Ollama Modelfile's template through Go's own
# text/template). Installed with apt where this user can; otherwise those tests skip and say why.
APT_PACKAGES := golang-go
tools:
	@command -v go >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q $(APT_PACKAGES) >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(APT_PACKAGES) >/dev/null 2>&1; }; }; } || \
	  echo "note: could not install $(APT_PACKAGES); the tests that need them will skip"

demo: setup
	$(BIN)/lmforge quickstart

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# llama.cpp's Python binding, built from source (about 5 minutes on 2 cores; PyPI has no CPU
# wheel), so tests/export/test_llama_cpp.py runs lmforge's GGUF files in llama.cpp itself.
LLAMA_CPP   := llama-cpp-python==0.3.36
LLAMA_STAMP := $(VENV)/.llama-cpp-installed
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
               -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
$(LLAMA_STAMP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE)" \
	  $(BIN)/python -m pip install -q "$(LLAMA_CPP)" || \
	  echo "note: $(LLAMA_CPP) did not build; tests/export/test_llama_cpp.py will skip"
	touch $@

# DeepSpeed (pure Python; its CPU communication op is compiled on first use, about 45 s) for
# the ZeRO tests in tests/training/test_distributed.py.
DEEPSPEED_STAMP := $(VENV)/.deepspeed-installed
$(DEEPSPEED_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[deepspeed]" || \
	  echo "note: deepspeed did not install; the ZeRO tests will skip"
	touch $@

test: lint tools $(LLAMA_STAMP) $(DEEPSPEED_STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15

format: setup
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

bench: setup
	$(BIN)/python bench/sft_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
