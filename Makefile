# Quick start: `make demo` (the main job on embedded data) and `make test`.
# Both install what is missing into the current Python environment first.
PY ?= python3
STAMP := .make/install.stamp
KERNEL := nag-toolkit

.PHONY: install demo digits-checkpoint test sync nbtest pytest docs docs-offline test-browser bench clean

# The stamp alone is not trusted: a fresh Python environment under an old checkout reinstalls.
install:
	@$(PY) -c "import importlib.metadata as m; m.version('nag_toolkit')" 2>/dev/null || rm -f $(STAMP)
	@$(MAKE) --no-print-directory $(STAMP)

$(STAMP): setup.py settings.ini
	@mkdir -p .make
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m ipykernel install --user --name $(KERNEL) --display-name "Python (nag_toolkit)"
	@touch $(STAMP)

# The mixture study, then the reduced digits study; their findings (generated from results.csv) go into README.md.
# runs/demo is the demo's own folder: it starts afresh (a folder of an older version's settings would be refused).
demo: install
	rm -rf runs/demo
	$(PY) -m nag_toolkit.cli study --preset demo --out runs/demo
	$(PY) -m nag_toolkit.cli study --preset digits-demo --out runs/demo/digits
	$(PY) -m nag_toolkit.cli findings runs/demo runs/demo/digits --out findings/demo.md
	cp runs/demo/hero.png findings/demo_hero.png
	$(PY) tools/make_readme.py

# The digits denoiser that ships in the package (nag_toolkit/assets/digits-denoiser), where `make demo`'s digits study
# starts: the exact command that trained it (about 25 min on 2 CPU cores), then its EMA weights and JSON state copied
# there with their digests (`ship_checkpoint`). The weights depend only on the options, not on the run's timing.
DIGITS_RUN := runs/digits-checkpoint
digits-checkpoint: install
	OMP_NUM_THREADS=1 $(PY) -m nag_toolkit.cli train --dataset digits --model digits --path linear --steps 8000 \
		--batch-size 128 --p-drop 0.1 --seed 0 --log-every 100 --ckpt-every 1000 --keep-checkpoints 0 --out $(DIGITS_RUN)
	$(PY) -c "from nag_toolkit.checkpoint import ship_checkpoint; \
		ship_checkpoint('$(DIGITS_RUN)', 'nag_toolkit/assets/digits-denoiser')"

# The sync check: notebooks are clean and nbdev_export leaves the library unchanged.
sync: install
	$(PY) tools/check_sync.py

nbtest: install
	OMP_NUM_THREADS=1 nbdev_test --n_workers 2

pytest: install
	$(PY) -m pytest -q tests --ignore=tests/browser

test: sync nbtest pytest

docs: install
	nbdev_docs

# The docs without Quarto: executed notebooks rendered to an offline HTML site in _site_offline/, with nbdev's
# show_doc API block (signature, docments, docstring) after each exported function and class.
docs-offline: install
	$(PY) tools/render_docs.py --out _site_offline

# Real-browser tests (JupyterLab + the NAG explorer, and every page of the offline docs) in headless Chromium.
# Installs Debian's chromium and Playwright for Python where missing; never runs `playwright install`.
test-browser: install
	command -v chromium || (apt-get update && apt-get install -y chromium)
	$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -e ".[browser]"
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/browser

# Benchmarks: ratios measured in one run (not timed tests).
# Writes bench/results.csv and bench/results.md (shown in README.md, regenerated here); about 20 min on 2 CPU cores (and 8 GiB of disk for bench_data.py).
bench: install
	$(PY) -c "import diffusers" 2>/dev/null || $(PY) -m pip install -e ".[bench]"
	OMP_NUM_THREADS=1 $(PY) bench/run_all.py
	$(PY) tools/make_readme.py

clean:
	rm -rf .make runs _docs _proc _site_offline
