# The commands a new user needs:
#   make quickstart   build the embedded corpus, train a tokenizer, preprocess, train tiny ALCoT + vanilla on CPU
#   make test         install everything into .venv and run the whole test suite on CPU (what CI runs)
#   make test-fast    the development subset: no process worlds, no long training, no Slurm/MPI
#   make test-machines  the fast subset again as an AVX2 CPU without fast bf16 (CI runs it after make test)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned in the same pip command as everything that depends on it (an unpinned torch pulls a CUDA build).
TORCH_PIN := torch==2.13.0
EXTRAS    ?= test,hf,eval,deepspeed

.PHONY: install quickstart test test-fast test-machines bench clean

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

# The fast tests once more as another kind of CPU: ATen and oneDNN restricted to AVX2 (no AVX-512,
# so bf16 is emulated and slow, and vector widths and FMA use differ), with the machine probe forced
# to "bf16 slow" and "oneDNN slow". Its own compile cache, so AVX2 kernels never reach normal runs.
MACHINE_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MEGATRON_ALCOT_PROBE=bf16=slow,gemm=torch \
	TORCHINDUCTOR_CACHE_DIR=$${TMPDIR:-/tmp}/megatron_alcot_inductor_avx2
test-machines: install
	$(MACHINE_ENV) $(PY) -m pytest -q -m "not slow and not system" tests

clean:
	rm -rf $(VENV) quickstart_out bench_out
