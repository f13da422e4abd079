# The two commands of README.md's quick start are `make run` and `make test`.
PY := .venv/bin/python

.PHONY: setup run bench-cli test bench lint cuda-check clean

setup:            ## create .venv (reusing the interpreter's torch, else torch 2.13.0) and build koopfast
	bash scripts/setup.sh

run: setup        ## the main job: every criterion on real data (tables, plots, JSON in ./koopfast-demo)
	$(PY) -m koopfast demo

bench-cli: setup  ## all micro-benchmarks against PyTorch and the peers (./koopfast-bench); ARGS=--quick
	$(PY) -m koopfast bench $(ARGS)

test: setup       ## build, then run the test suite
	$(PY) -m pytest -q tests

bench: setup      ## the developer benchmark suite (pytest-benchmark); add ARGS=--quick for small sizes
	$(PY) -m pytest bench $(ARGS)

lint: setup
	$(PY) -m ruff check .

cuda-check: setup ## compile every CUDA source with nvcc (no GPU needed)
	bash scripts/check_cuda_compiles.sh

clean:
	rm -rf build .venv koopfast/_C*.so koopfast/_build_config.py
