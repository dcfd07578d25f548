# Two commands do all set-up on a fresh Debian machine (as root, libopus0 and for the tests
# opus-tools come through apt):
#   make test   - lint, type-check and run the whole test suite in isolated environments
#   make demo   - the demo: a loopback Discord, four members speaking, the example bot recording them
PYTHON ?= python3
TOX := .tools/bin/tox

.PHONY: test demo bootstrap bootstrap-test lint type clean

bootstrap:
	@PYTHON=$(PYTHON) scripts/bootstrap

bootstrap-test:
	@PYTHON=$(PYTHON) scripts/bootstrap --test

test: bootstrap-test
	$(TOX) run -e lint,type,tests

lint: bootstrap
	$(TOX) run -e lint

type: bootstrap
	$(TOX) run -e type

demo: bootstrap
	$(TOX) run -e demo

clean:
	rm -rf .tox .tools build dist *.egg-info
