# Quick start: `make demo` (the main job on embedded data) and `make test`.
# Both install what is missing into the current Python environment first.
PY ?= python3
STAMP := .make/install.stamp
KERNEL := nag-toolkit

.PHONY: install demo test sync nbtest pytest docs clean

install: $(STAMP)

$(STAMP): setup.py settings.ini
	@mkdir -p .make
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m ipykernel install --user --name $(KERNEL) --display-name "Python (nag_toolkit)"
	@touch $(STAMP)

demo: install
	$(PY) -m nag_toolkit.cli study --out runs/demo

# The sync check: notebooks are clean and nbdev_export leaves the library unchanged.
sync: install
	$(PY) tools/check_sync.py

nbtest: install
	OMP_NUM_THREADS=1 nbdev_test --n_workers 2

pytest: install
	$(PY) -m pytest -q tests

test: sync nbtest pytest

docs: install
	nbdev_docs

clean:
	rm -rf .make runs _docs _proc
