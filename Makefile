# bnlab course: every target sets up what it needs on first use.
PYTHON ?= python3
# pyproject.toml's requires-python (a test checks that they agree)
PYTHON_MIN := 3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# torch and its matching torchvision, installed before the package so that pip does
# not resolve `torch>=2.4` to the newest release. These are served from local files
# on the course machines; the build runs on CPU-only machines too. Override for
# another pair, e.g. `make setup TORCH_PKGS="torch==2.5.1 torchvision==0.20.1"`.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
NOTEBOOKS  := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
PORT ?= 8888

# DATA_ARGS passes options to `python -m bnlab.data`, e.g. --no-apt or --timeout 60.
DATA_ARGS ?=
IS_ROOT := $(filter 0,$(shell id -u))

.PHONY: setup lab test test-unit test-deep test-notebooks test-browser chromium notebooks bench bench-gpu readme timings \
	lint \
	data clean

# setup: the environment, then trust the course's notebooks, so that JupyterLab renders
# their saved widgets (dashboards, progress bars) before anything is re-run.
setup: $(VENV)/.installed
	@$(PY) -m bnlab.teaching.notebooks trust

# .installed holds the TORCH_PKGS it installed: another value, or a venv whose python is
# gone (a system upgrade removes the Python it links to), installs again.
ifneq ($(shell cat $(VENV)/.installed 2>/dev/null),$(strip $(TORCH_PKGS)))
.PHONY: $(VENV)/.installed
endif
ifeq ($(wildcard $(PY)),)
.PHONY: $(VENV)/.installed
endif

# A venv whose python or pip does not run (an interrupted build) is made again, and only
# after $(PYTHON) passed the version check: nothing is created for a Python too old.
comma := ,
VENV_WORKS = $(PY) -c 'import sys; sys.exit(sys.version_info < ($(subst .,$(comma),$(PYTHON_MIN)),))' \
	>/dev/null 2>&1 && $(PY) -m pip --version >/dev/null 2>&1
CHECK_PYTHON = found=$$($(PYTHON) -c 'import sys; print("%d.%d.%d" % sys.version_info[:3]); \
	sys.exit(sys.version_info < ($(subst .,$(comma),$(PYTHON_MIN)),))' 2>/dev/null) || { \
	echo "error: the course needs Python $(PYTHON_MIN) or newer, and $(PYTHON)" \
		"$$(if [ -n "$$found" ]; then echo "is Python $$found"; else echo "was not found"; fi)." \
		"Choose another with PYTHON, e.g. make setup PYTHON=python3.12 (nothing was installed)." >&2; \
	exit 1; }

$(VENV)/.installed: pyproject.toml
	@$(VENV_WORKS) || { $(CHECK_PYTHON); echo "creating $(VENV) with $(PYTHON) ..."; \
		rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e ".[course,dev]"
	echo '$(strip $(TORCH_PKGS))' > $@

# Fashion-MNIST: the offline places, else Debian's package (as root), else a download with
# a timeout; exits non-zero with the remedies when all fail.
data: setup
	@$(PY) -m bnlab.data $(DATA_ARGS)

# LAB_ARGS passes extra options, e.g. `make lab LAB_ARGS=--no-browser` on a remote machine.
# Jupyter refuses to run as root unless told to: containers often run as root.
# Without the data JupyterLab opens anyway; the notebooks that need it say how to get it.
ROOT_ARGS := $(if $(IS_ROOT),--allow-root)
lab: setup
	@$(PY) -m bnlab.data $(DATA_ARGS) || echo "Opening JupyterLab anyway: 05, 06 and 08 need the data."
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --port=$(PORT) $(ROOT_ARGS) $(LAB_ARGS)

test: test-unit test-notebooks

test-unit: data
	$(PY) -m pytest -q tests --ignore=tests/browser

# The unit tests with the property-based tests at thousands of examples each (minutes).
test-deep: data
	HYPOTHESIS_PROFILE=deep $(PY) -m pytest -q tests --ignore=tests/browser

test-notebooks: data
	@test -n "$(NOTEBOOKS)" || { echo "no notebooks found under notebooks/"; exit 1; }
	BNLAB_FAST=1 $(PY) -m pytest -q --nbval-lax $(NOTEBOOKS)

# JupyterLab in headless Chromium (Debian's; Playwright cannot download its own here):
# notebook 03 opens clean, its saved dashboard renders, and its sliders redraw the plot.
# Screenshots go to build/browser/.
test-browser: setup chromium
	$(PY) -m pytest -q tests/browser

# apt-get, bounded: it waits at most 60 s for another apt's lock, and the target's apt-get
# calls together get APT_TIMEOUT seconds; `timeout` stops each with its whole process group
# (apt-get and the dpkg it started), TERM first and KILL 10 s later.
APT_TIMEOUT ?= 300
chromium:
	@command -v chromium >/dev/null || { \
		test -n "$(IS_ROOT)" && command -v apt-get >/dev/null || { \
			echo "error: Chromium is missing; install Debian's: sudo apt install chromium"; \
			exit 1; }; \
		echo "installing Debian's chromium with apt-get ..."; \
		end=$$(( $$(date +%s) + $(APT_TIMEOUT) )); \
		apt_get() { left=$$(( end - $$(date +%s) )); test $$left -gt 0 && \
			DEBIAN_FRONTEND=noninteractive timeout -k 10 $$left \
			apt-get -o DPkg::Lock::Timeout=60 "$$@" >/dev/null; }; \
		apt_get install -y -qq chromium || { apt_get update -qq && apt_get install -y -qq chromium; } || { \
			echo "error: apt-get did not install chromium: it failed (see above) or ran out of its" \
				"$(APT_TIMEOUT) s (APT_TIMEOUT). If it was stopped while installing, sudo dpkg" \
				"--configure -a finishes what dpkg began; or install it: sudo apt install chromium"; \
			exit 1; }; }

# The course as a website in build/site (website/build.py): the committed notebooks as they
# were last run (never executed here), the glossary, the bad-inputs catalogue, the course map
# as the home page; Sphinx with MyST-NB, warnings as errors. MathJax and the widget manager
# come from npm once, into build/site-vendor; after that the build and the site are offline.
# Rebuilt when its sources change. Open build/site/index.html, or serve the folder.
.PHONY: site test-site cjk-fonts
SITE_SOURCES := $(NOTEBOOKS) docs/glossary.md docs/bad-inputs.md README.md \
	bnlab/teaching/path.py $(wildcard website/*.py website/_static/*)
site: build/site/.built

build/site/.built: $(SITE_SOURCES) $(VENV)/.site-installed
	$(PY) website/build.py vendor
	$(PY) website/build.py stage
	$(PY) website/build.py html

$(VENV)/.site-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e ".[site]"
	touch $@

# The built site in Debian's headless Chromium, served on a local port, every request
# leaving it failed: tests/site/test_site.py. Screenshots go to build/site-shots/.
test-site: site chromium cjk-fonts
	$(PY) -m pytest -q tests/site

# Debian's Noto CJK fonts, so that Chromium draws the 中文 text as glyphs, not boxes; apt-get
# bounded as for chromium above.
cjk-fonts:
	@fc-list :lang=zh family 2>/dev/null | grep -q . || { \
		test -n "$(IS_ROOT)" && command -v apt-get >/dev/null || { \
			echo "error: no CJK font; install Debian's: sudo apt install fonts-noto-cjk"; \
			exit 1; }; \
		echo "installing Debian's fonts-noto-cjk with apt-get ..."; \
		end=$$(( $$(date +%s) + $(APT_TIMEOUT) )); \
		apt_get() { left=$$(( end - $$(date +%s) )); test $$left -gt 0 && \
			DEBIAN_FRONTEND=noninteractive timeout -k 10 $$left \
			apt-get -o DPkg::Lock::Timeout=60 "$$@" >/dev/null; }; \
		apt_get install -y -qq --no-install-recommends fonts-noto-cjk \
			|| { apt_get update -qq && apt_get install -y -qq --no-install-recommends fonts-noto-cjk; } || { \
			echo "error: apt-get did not install fonts-noto-cjk: it failed (see above) or ran out" \
				"of its $(APT_TIMEOUT) s (APT_TIMEOUT); or install it: sudo apt install fonts-noto-cjk"; \
			exit 1; }; }

# Re-execute every notebook in full mode, then store the metadata the installed ipykernel
# writes and finished progress bars, and sign the results as trusted. A notebook's figures
# wait in a pending file and reach the results store together once it ran without error;
# then its code hash and section times are recorded (a test compares the hash).
# NOTEBOOKS=notebooks/05_lenet.ipynb re-runs one.
notebooks: data
	@for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; start=$$(date +%s); pending=$$(mktemp); \
		BNLAB_FAST=0 BNLAB_RECORD=1 BNLAB_RECORD_PENDING=$$pending $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=1800 "$$nb" || { rm -f $$pending; exit 1; }; \
		$(PY) -m bnlab.teaching.results commit $$pending --source "$$(basename "$$nb" .ipynb)" || exit 1; \
		secs=$$(( $$(date +%s) - start )); echo "   $$secs s"; \
		$(PY) -m bnlab.teaching.results notebook-time "$$nb" $$secs; \
		$(PY) -m bnlab.teaching.results run "$$nb"; \
	done
	$(PY) -m bnlab.teaching.results prune $(NOTEBOOKS)
	$(PY) -m bnlab.teaching.notebooks normalize $(NOTEBOOKS)
	$(PY) -m bnlab.teaching.notebooks trust --all $(NOTEBOOKS)
	$(PY) -m bnlab.teaching.notebooks reading-time --readme
	$(PY) -m bnlab.teaching.results readme

# The full runs (make notebooks, make bench) write results/results.json; the README's
# results tables are generated from it. BENCH_JSON=path also writes every case as JSON.
# BENCH_ARGS="--only kernels" times the BatchNorm kernels alone (minutes), keeping the
# store's memory and folding figures.
BENCH_ARGS ?=
bench: setup
	BNLAB_RECORD=1 $(PY) -m bnlab.bench $(BENCH_ARGS) $(if $(BENCH_JSON),--json $(BENCH_JSON))
	$(PY) -m bnlab.teaching.results readme

# The Numba CUDA kernels against torch/cuDNN on a CUDA GPU: checked, then timed (under 5
# minutes on an H100); writes build/bench-gpu.json, or BENCH_JSON=path. Without a GPU it
# says so and measures nothing.
bench-gpu: setup
	$(PY) -m bnlab.bench.gpu $(if $(BENCH_JSON),--json $(BENCH_JSON))

readme: setup
	$(PY) -m bnlab.teaching.results readme

# How long the README's commands take, run one after the other in a fresh clone of the
# committed state (about 10 minutes); the README's timings block is generated from them.
timings: setup
	$(PY) -m bnlab.teaching.timings

lint: setup
	$(VENV)/bin/ruff check bnlab tests notebooks solutions
	$(VENV)/bin/ruff format --check bnlab tests solutions

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
