# Two commands on a fresh machine (Python 3 and a C++ compiler present; no venv, no torch needed):
#   make run    sets up .venv and finds a Conv-4 BinW-SLT on the bundled digits data (binwslt find)
#   make test   sets up .venv with the test tools and peers and runs the tests
# Options: RUN_ARGS="--threads 1 --epochs 3" (passed to binwslt find), PYTEST_ARGS="tests/test_lif.py -q", PYTHON=python3.12, VENV=.venv,
# TORCH_PIP_ARGS (see scripts/setup.sh). Version pins: constraints.txt.
PYTHON ?= python3
VENV ?= .venv
# one torch thread: on a shared 2-core machine it is several times faster than two, and the README's digits
# figures were measured with it (the thread count changes summation order, and so the last digits of a run)
RUN_ARGS ?= --threads 1
PYTEST_ARGS ?= tests -q -p no:cacheprovider
export PYTHON VENV

.PHONY: run test setup setup-test clean-venv

# the stamps re-run the setup when the package's or the pins' files change
$(VENV)/.setup-run: setup.py constraints.txt scripts/setup.sh
	bash scripts/setup.sh run
	touch $@

$(VENV)/.setup-test: setup.py constraints.txt scripts/setup.sh
	bash scripts/setup.sh test
	touch $@ $(VENV)/.setup-run

setup: $(VENV)/.setup-run
setup-test: $(VENV)/.setup-test

run: $(VENV)/.setup-run
	$(VENV)/bin/binwslt find $(RUN_ARGS)

test: $(VENV)/.setup-test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
