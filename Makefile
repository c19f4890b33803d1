# zeoraid development tasks.  `make test` and `make demo` bootstrap .venv on
# first use (only python3 >= 3.11 is needed), and reinstall the package
# whenever setup.py changes.
#
#   make test                 run the whole suite (tests/)
#   make test ARGS="-t foo"   pass extra zope-testrunner arguments
#   make demo                 start the local demo (zeoraid-demo)
#   make bench [ARGS=--quick] run the benchmark suite (benchmarks/bench.py)
#   make clean                remove var/ and build output
#   make distclean            also remove .venv and buildout artefacts

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.zeoraid-installed
BENCH_STAMP := $(VENV)/.zeoraid-bench-installed
ARGS   ?=

# The stamp is redone when the packaging metadata changes.
PACKAGING := setup.py $(wildcard setup.cfg pyproject.toml)

.PHONY: all test demo bench venv clean distclean

all: test

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "zeoraid needs python >= 3.11 ($(PYTHON) is too old; try make PYTHON=python3.11)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PACKAGING) | $(BIN)/python
	$(BIN)/python -m pip install --progress-bar off -e '.[test]'
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/zope-testrunner --path=. --test-path=. -s tests -vv $(ARGS)

demo: $(STAMP)
	$(BIN)/zeoraid-demo $(ARGS)

# The chart needs matplotlib; without it the benchmark still runs and says
# so (the install is tried again on the next make bench).
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --progress-bar off -e '.[test,bench]' && touch $@ || \
	  echo "matplotlib could not be installed: the benchmark runs without its chart" >&2

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench.py $(ARGS)

clean:
	rm -rf var build dist htmlcov .coverage
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) src/*.egg-info bin parts eggs develop-eggs lib include \
	  pyvenv.cfg .installed.cfg .mr.developer.cfg
