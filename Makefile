# The commands a new user needs:
#   make quickstart   build the embedded corpus, train a tokenizer, preprocess, train tiny ALCoT + vanilla on CPU
#   make test         install everything into .venv and run the whole test suite on CPU (what CI runs)
#   make test-fast    the development subset: no process worlds, no long training, no Slurm/MPI
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned in the same pip command as everything that depends on it (an unpinned torch pulls a CUDA build).
TORCH_PIN := torch==2.13.0
EXTRAS    ?= test,hf,eval,deepspeed

.PHONY: install quickstart test test-fast bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(PY) -m megatron_alcot.quickstart --output-dir quickstart_out

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow and not system" tests

clean:
	rm -rf $(VENV) quickstart_out bench_out
