# The two commands of the README: `make demo` and `make test`. CI calls `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test lint bench bench-quick soak clean gpu-wheels gpu-check

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m app.cli.demo $(if $(KEEP),--keep)

# TESTS narrows the run (CI's second pass: what depends on the database and Redis server).
TESTS ?=

test: install
	$(BIN)/pytest $(TESTS)

bench: install
	@for b in startup bulk_launch throughput per_job operations cancel latency depth_ops \
			throughput_depth \
			dispatch_depth; do \
		$(BIN)/python -m bench.$$b || exit 1; \
	done

# The queue-depth benchmarks at small depths (minutes, not hours), their figures and plot
# written to QUICK_DIR, so that the recorded bench/scale.png stays as `make bench` left it.
QUICK_DIR ?= build/bench-quick

bench-quick: install
	$(BIN)/python -m bench.throughput_depth --depths 0,20000 --jobs 500 --dir $(QUICK_DIR)
	$(BIN)/python -m bench.dispatch_depth --depths 1000,20000 --dir $(QUICK_DIR)

# Two simulated hosts under seeded random hard faults; exit 1 if a job was lost, ran twice,
# double-booked a GPU or was stuck (README, "Soak").
SOAK_MINUTES ?= 3
SOAK_SEED ?= 1

soak: install
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES) --seed $(SOAK_SEED)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy app scheduler tasks adapters
	$(BIN)/lint-imports

# gpu-check runs on a GPU host that has Python 3.12 with torch and no network: gpu-wheels
# (run here, with network) fetches what it needs into build/gpu-wheels, for CPython 3.12 on
# manylinux x86_64, pinned to this venv's versions; copy the tree over, then run gpu-check.
GPU_WHEELS = build/gpu-wheels
GPU_REQUIREMENTS = deploy/gpu-check/requirements.txt
GPU_PYTHON ?= python3
GPU_VENV = build/gpu-venv

gpu-wheels: install
	rm -rf $(GPU_WHEELS)
	mkdir -p $(GPU_WHEELS)
	$(BIN)/pip freeze --exclude-editable | grep -v '^#' > $(GPU_WHEELS)/constraints.txt
	$(BIN)/pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux_2_28_x86_64 --platform any \
		-d $(GPU_WHEELS) -r $(GPU_REQUIREMENTS) -c $(GPU_WHEELS)/constraints.txt
	@du -ch $(GPU_WHEELS)/*.whl | tail -1 | sed 's|total|in $(GPU_WHEELS)|'

# A venv that sees the host's torch and nvidia-ml-py; gpuq runs from the source tree on
# PYTHONPATH (no setuptools needed offline). Without a driver the check says so, exit 0.
gpu-check:
	@test -d $(GPU_WHEELS) || { echo "no $(GPU_WHEELS): run 'make gpu-wheels' where there is network"; exit 2; }
	$(GPU_PYTHON) -m venv --system-site-packages $(GPU_VENV) 2>/dev/null \
		|| $(GPU_PYTHON) -m venv --system-site-packages --without-pip $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --no-index --find-links $(GPU_WHEELS) \
		-r $(GPU_REQUIREMENTS) -c $(GPU_WHEELS)/constraints.txt
	PYTHONPATH=$(CURDIR) $(GPU_VENV)/bin/python -m app.cli.gpu_check

clean:
	rm -rf $(VENV) .gpuq
