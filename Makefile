# The two commands a new user needs: `make demo` (set up, then train and score the demo adapter on
# the CPU) and `make test` (set up a fresh environment and run the test suite, as CI does).
# Both install the versions CI tests, pinned in requirements-lock.txt; `make lock` refreshes that
# file, and `make test-latest` / `make test-oldest` run the suite on the newest / oldest versions
# pyproject.toml allows.

VENV := .venv
# The CPU build of torch: on this project's machines it lies in /opt/wheels; elsewhere PyTorch's index.
TORCH := torch==2.13.0
TORCH_CPU_WHEELS ?= $(if $(wildcard /opt/wheels/torch-*),/opt/wheels,https://download.pytorch.org/whl/cpu/torch/)
UV := .venv-tools/bin/uv

.PHONY: demo studio screenshots test test-latest test-oldest lock

$(VENV)/.installed: pyproject.toml requirements-lock.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -c requirements-lock.txt -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/sdlora toy demo --out out/demo

# The studio on the toy world: queue datasets/*/train.toml from its New-run page (TOML tab), or train
# into out/studio from the command line and watch it appear.
studio: $(VENV)/.installed
	$(VENV)/bin/sdlora studio --runs out/studio --data datasets

# The studio's screenshots in docs/studio/, made by its browser test (needs chromium and chromium-driver).
screenshots: $(VENV)/.installed
	SDLORA_SCREENSHOTS=docs/studio $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_studio_browser.py

test:
	bash .ci/run

# Not in CI: find a drift on purpose. A fresh venv with the newest releases pyproject.toml allows.
test-latest:
	rm -rf .venv-latest
	python3 -m venv .venv-latest
	.venv-latest/bin/pip install -q $(TORCH)
	.venv-latest/bin/pip install -q -e ".[dev]"
	.venv-latest/bin/python .ci/versions.py requirements-lock.txt
	.venv-latest/bin/python -m pytest -q

# Not in CI: the oldest releases pyproject.toml allows (its lower bounds), to check they still hold.
test-oldest: $(UV)
	echo "$(TORCH)+cpu" > .venv-tools/torch-cpu.txt
	$(UV) pip compile pyproject.toml --extra dev --resolution lowest-direct --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --find-links $(TORCH_CPU_WHEELS) \
		-c .venv-tools/torch-cpu.txt --no-emit-package torch -q -o .venv-tools/oldest.txt
	rm -rf .venv-oldest
	python3 -m venv .venv-oldest
	.venv-oldest/bin/pip install -q $(TORCH)
	.venv-oldest/bin/pip install -q -c .venv-tools/oldest.txt -e ".[dev]"
	.venv-oldest/bin/python .ci/versions.py requirements-lock.txt
	.venv-oldest/bin/python -m pytest -q

$(UV):
	python3 -m venv .venv-tools
	.venv-tools/bin/pip install -q uv==0.13.9

# Resolve the newest versions pyproject.toml allows, for CI's platform (Python 3.11, Linux x86-64,
# CPU torch). torch itself is left out of the file so that users keep the build that fits their GPU.
lock: $(UV)
	echo "$(TORCH)+cpu" > .venv-tools/torch-cpu.txt
	$(UV) pip compile pyproject.toml --extra dev --upgrade --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --find-links $(TORCH_CPU_WHEELS) \
		-c .venv-tools/torch-cpu.txt --no-emit-package torch --custom-compile-command "make lock" \
		-o requirements-lock.txt
	@echo "requirements-lock.txt refreshed: run make test before committing it"
