# make demo: set up and run the main job.  make test: set up and run every test.
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast bench clean

$(VENV)/.ready: pyproject.toml scripts/setup_venv.sh
	VENV=$(VENV) bash scripts/setup_venv.sh
	touch $@

setup: $(VENV)/.ready

demo: setup
	$(PY) -m autoresearch_lib loop --workspace $${WORKSPACE:-demo} --preset $${PRESET:-auto} \
	  --budget $${BUDGET:-$$([ "$$AUTORESEARCH_QUICK" = 1 ] && echo 4 || echo 30)} \
	  --max-experiments $${EXPERIMENTS:-6}

test: setup
	AUTORESEARCH_QUICK=1 $(PY) -m pytest -q tests notebooks \
	  --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

bench: setup
	$(PY) bench/bench_cpu.py

clean:
	rm -rf runs demo .pytest_cache
