# localsmall developer and user entry points. Everything lives in .venv.
#   make chat      set everything up, then chat with Mistral Small 3.2
#   make test      set everything up, then run the whole test suite
# GPU builds of llama.cpp: pass CMAKE_ARGS, e.g. `make install CMAKE_ARGS="-DGGML_CUDA=on"`.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS ?= dev,reference
export CMAKE_ARGS

.PHONY: install chat test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# llama-cpp-python compiles llama.cpp (about 5 minutes on 2 cores; pip caches the wheel).
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[$(EXTRAS)]'
	touch $(STAMP)

chat: install
	$(BIN)/localsmall chat $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check localsmall tests benchmarks
	$(BIN)/mypy

bench: install
	cd benchmarks && for b in run_overhead kv_followup weight_repack; do \
		echo "== $$b"; ../$(BIN)/python $$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
