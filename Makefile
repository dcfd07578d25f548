# Two commands do all set-up on a fresh Debian machine (as root, libopus0 comes through apt):
#   make test   - lint, type-check and run the whole test suite in isolated environments
#   make demo   - the end-to-end demo (not written yet: see the newcomer issue)
PYTHON ?= python3
TOX := .tools/bin/tox

.PHONY: test demo bootstrap lint type clean

bootstrap:
	@PYTHON=$(PYTHON) scripts/bootstrap

test: bootstrap
	$(TOX) run -e lint,type,tests

lint: bootstrap
	$(TOX) run -e lint

type: bootstrap
	$(TOX) run -e type

demo:
	@echo "make demo: the demo has not been written yet; it arrives with the newcomer issue." >&2
	@exit 1

clean:
	rm -rf .tox .tools build dist *.egg-info
