# offbeat: `make demo` runs the main job, `make test` the suite. Everything lives in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SERVICES := orchestrator inference scorer sandbox trainer
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck proto proto-check demo bench chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml $(foreach s,$(SERVICES),services/$(s)/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch (on these machines pip takes the wheel already on disk)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[envs,report,dev]" $(foreach s,$(SERVICES),-e services/$(s))
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy offbeat $(foreach s,$(SERVICES),services/$(s)/offbeat_$(s))

proto: install
	$(BIN)/python scripts/gen_proto.py

proto-check: install
	$(BIN)/python scripts/gen_proto.py --check

demo: install
	$(BIN)/offbeat run examples/arithmetic.toml --fresh

bench: install
	$(BIN)/python bench/run_all.py

# chaos, overload and fuzz suites on live runs; -rP prints each suite's counts
chaos: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -rP -m chaos tests

clean:
	rm -rf $(VENV) .offbeat

# The compose proof (podman as root, no registry): base image, builds, stack up, trainer steps, ledger.
.PHONY: compose-test
compose-test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m compose -s tests/test_deploy_compose.py
