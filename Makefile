# localsmall developer and user entry points. Everything lives in .venv.
#   make chat      set up what chat needs (no test tools), then chat with Mistral Small 3.2
#   make test      set that up plus the test and reference extras, then run the whole test suite
# GPU builds of llama.cpp: pass CMAKE_ARGS, e.g. `make install CMAKE_ARGS="-DGGML_CUDA=on"`.
# llama.cpp's RPC backend (`localsmall worker`, --rpc) is always built: -DGGML_RPC=on is
# added in front of CMAKE_ARGS (a later -DGGML_RPC=off in CMAKE_ARGS turns it off).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APP_STAMP := $(VENV)/.installed-app
DEV_STAMP := $(VENV)/.installed-dev
EXTRAS ?= dev,reference
override CMAKE_ARGS := -DGGML_RPC=on $(CMAKE_ARGS)
export CMAKE_ARGS
# pip keeps the wheel it built from llama-cpp-python's source archive, keyed by the archive
# alone: a wheel built with other CMAKE_ARGS (no RPC, another GPU backend) would be reused
# silently. So llama-cpp-python gets a wheel cache of its own per set of flags.
LLAMA_PIN   := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
LLAMA_CACHE := $(HOME)/.cache/localsmall/pip-llama-$(shell printf '%s' '$(CMAKE_ARGS)' | cksum | cut -d' ' -f1)
WANT_RPC    := $(if $(findstring GGML_RPC=off,$(CMAKE_ARGS)),,yes)

.PHONY: install install-dev chat test lint bench clean

# What `localsmall chat` needs, and nothing more (no test tools, no torch).
install: $(APP_STAMP)

# The test and reference extras on top (pytest, mistral-common, torch on the CPU, ...).
install-dev: $(DEV_STAMP)

$(APP_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# llama-cpp-python compiles llama.cpp (about 5 minutes on 2 cores; cached per CMAKE_ARGS).
	$(BIN)/python -m pip install --quiet --progress-bar off --cache-dir '$(LLAMA_CACHE)' '$(LLAMA_PIN)'
	# An older .venv may hold a build without RPC: rebuild it then.
	test -z '$(WANT_RPC)' \
		|| $(BIN)/python -c 'import sys; import llama_cpp; sys.exit(not llama_cpp.llama_supports_rpc())' \
		|| $(BIN)/python -m pip install --quiet --progress-bar off --force-reinstall --no-deps \
		   --cache-dir '$(LLAMA_CACHE)' '$(LLAMA_PIN)'
	$(BIN)/python -m pip install --quiet --progress-bar off -e .
	touch $@

$(DEV_STAMP): $(APP_STAMP)
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[$(EXTRAS)]'
	touch $@

chat: install
	$(BIN)/localsmall chat $(ARGS)

test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check localsmall tests benchmarks
	$(BIN)/mypy

bench: install-dev
	cd benchmarks && for b in run_overhead kv_followup weight_repack; do \
		echo "== $$b"; ../$(BIN)/python $$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
