# The two commands of the README:
#   make demo   installs fastlora into .venv and runs the main job (fastlora finetune) on its embedded default
#   make test   installs fastlora with its test extras into .venv and runs lint + every test (what CI runs:
#               tests/test_install.py also installs fastlora into a fresh venv with a plain `pip install .`
#               and runs the install-dependent tests there)
# and for the edit-test loop:
#   make test-fast   the suite without the slow, install and aot-compile tests
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast test-gpu lint env clean bench bench-gpu gpu-stack

env: $(VENV)/.installed $(VENV)/gpu-triton/.installed

# A CUDA torch already installed for $(PY) is kept (the venv sees it); otherwise the
# CPU build of torch goes in first, so nothing pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "fastlora: keeping the CUDA torch of $(PY)"; \
		$(PY) -m venv --system-site-packages $(VENV); \
		$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77" wheel; \
	else \
		$(PY) -m venv $(VENV); \
		$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77" wheel; \
		$(BIN)/python -m pip install -q torch==2.13.0; \
	fi
	$(BIN)/python -m pip install -q ninja
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

# The GPU machine's triton beside the venv's, in a directory on no path: tests/test_aot.py compiles
# every kernel with both, since their compilers differ (register allocation, literal typing).
GPU_TRITON ?= 3.6.0
$(VENV)/gpu-triton/.installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q --no-deps --target $(VENV)/gpu-triton triton==$(GPU_TRITON)
	touch $@

demo: env
	HF_HUB_OFFLINE=1 $(BIN)/fastlora finetune --output-dir fastlora-run

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest workers (pytest-xdist), each test file on one worker in its order: the interpreter tests are
# single-threaded Python, so two cores run them in about half the time.
PYTEST_ARGS ?= -n 2 --dist loadfile

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: env
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) -m "not slow and not install and not aot"

# On a CUDA machine: the compiled Triton kernels on the GPU (the `gpu`-marked tests).
test-gpu: env
	FASTLORA_GPU=1 $(BIN)/python -m pytest -q -m gpu

# Without a GPU: the CUDA extension built and linked, every Triton kernel compiled and the whole suite
# run against the GPU machine's torch 2.11 + CUDA 13 and triton 3.6 (.ci/gpu-stack; a ~4.6 GB venv).
gpu-stack:
	bash .ci/gpu-stack

# Benchmarks (benchmarks/README.md). Anywhere: the reduced CPU set.
bench: env
	$(BIN)/fastlora bench --quick

# On a CUDA machine: every suite, full case lists, into benchmarks/results/<date>_gpu/ (commit it).
bench-gpu: env
	$(BIN)/fastlora bench --suite all --out benchmarks/results/$$(date -u +%Y-%m-%d)_gpu

clean:
	rm -rf $(VENV) .venv-gpustack build *.egg-info .pytest_cache .ruff_cache fastlora/_C*.so
