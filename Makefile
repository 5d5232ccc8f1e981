# The two commands a new user needs: `make demo` (set up, then train and score the demo adapter on
# the CPU) and `make test` (set up a fresh environment and run the test suite, as CI does).

VENV := .venv

.PHONY: demo test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/sdlora toy demo --out out/demo

test:
	bash .ci/run
