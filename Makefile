# Two commands do all set-up on a fresh Debian machine (as root, libopus0 and for the tests
# opus-tools come through apt):
#   make test   - lint (ruff, deptry), type-check (strict mypy; pyright --verifytypes on the public
#                 API), the API docs (Sphinx, warnings are errors, every public object
#                 documented), the packaging check (every wheel
#                 built and installed from a wheelhouse alone), and the whole test suite on each
#                 Python in PYTHONS, in isolated environments
#   make demo   - the demo: a loopback Discord, four members speaking, the example bot recording them
PYTHON ?= python3
# The Pythons the suite runs on (found on PATH or under pyenv by scripts/bootstrap).
PYTHONS ?= 3.11 3.13
TOX := .tools/bin/tox
# scripts/bootstrap links the interpreters it found here; tox finds them on PATH.
export PATH := $(CURDIR)/.tools/pythons:$(PATH)
export PYTHONS

comma := ,
SUITES := $(subst $(eval) ,$(comma),$(foreach v,$(PYTHONS),py$(subst .,,$(v))))

.PHONY: test demo bootstrap bootstrap-test lint type docs packaging clean

bootstrap:
	@PYTHON=$(PYTHON) scripts/bootstrap

bootstrap-test:
	@PYTHON=$(PYTHON) scripts/bootstrap --test

test: bootstrap-test
	$(TOX) run -e lint,type,verifytypes,docs,packaging,$(SUITES)

lint: bootstrap
	$(TOX) run -e lint

type: bootstrap
	$(TOX) run -e type

docs: bootstrap
	$(TOX) run -e docs

packaging: bootstrap
	$(TOX) run -e packaging

demo: bootstrap
	$(TOX) run -e demo

clean:
	rm -rf .tox .tools build dist docs/_build *.egg-info
