# celery-fleet: `make lab` deploys the whole stack into local systemd containers; `make test` runs
# lint, the application tests and every Molecule scenario. Both install what they need.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps
WHEELHOUSE := build/wheelhouse
# What the hosts run (Debian 12: CPython 3.11.2 on glibc 2.36), resolved for exactly that, so its
# dependency markers hold for the hosts whatever Python the controller has (redis-py needs
# async-timeout below 3.11.3). The controller's lock adds the tools at the same versions.
LOCK := worker/requirements.lock
DEV_LOCK := requirements-dev.lock
HOST_PYTHON := 3.11.2
HOST_PLATFORM := x86_64-manylinux_2_36
# Extra `uv pip compile` options for `make lock`, e.g. LOCK_ARGS=--upgrade or
# LOCK_ARGS='--upgrade-package kombu'; without them the pinned versions are kept where allowed.
LOCK_ARGS ?=
LOGS := build/logs
# Molecule scenarios run side by side (all three at once): most of their time is spent waiting on
# services, restarts and timeouts, little on the two cores.
MOLECULE_JOBS ?= 3
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMPS):
	@mkdir -p $@

$(STAMPS)/host-lab: scripts/host-packages.sh | $(STAMPS)
	scripts/host-packages.sh lab
	@touch $@

$(STAMPS)/host-test: scripts/host-packages.sh | $(STAMPS)
	scripts/host-packages.sh test
	@touch $@

# Everything from the lock, hashes checked; then the worker itself, editable, built by the locked
# hatchling (its dependencies are already in the lock, so pip fetches nothing more).
$(STAMPS)/venv: $(DEV_LOCK) $(LOCK) worker/pyproject.toml $(STAMPS)/host-lab | $(STAMPS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r $(DEV_LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e worker
	@touch $@

.PHONY: venv
venv: $(STAMPS)/venv ## Python virtualenv with Ansible, Molecule, the test tools and the worker, from the lock

# $(call compile-locks,APP_LOCK,DEV_LOCK): resolve both locks, keeping the versions already in
# them where the inputs allow (uv reads an existing output file as its preferences).
define compile-locks
	$(BIN)/uv pip compile --quiet --generate-hashes --custom-compile-command 'make lock' \
	  --python-version $(HOST_PYTHON) --python-platform $(HOST_PLATFORM) $(LOCK_ARGS) \
	  --output-file $(1) worker/pyproject.toml
	$(BIN)/uv pip compile --quiet --generate-hashes --custom-compile-command 'make lock' \
	  --universal --python-version 3.11 --constraint $(1) $(LOCK_ARGS) \
	  --output-file $(2) requirements-dev.txt worker/pyproject.toml
endef

.PHONY: lock
lock: $(STAMPS)/venv ## Re-pin worker/requirements.lock and requirements-dev.lock (with hashes) from their inputs
	$(call compile-locks,$(LOCK),$(DEV_LOCK))

# Compares packages, versions and markers only: a wheel added upstream to a pinned release changes
# the hashes, not what is installed.
.PHONY: lock-check
lock-check: $(STAMPS)/venv ## Fail when a lock no longer matches worker/pyproject.toml or requirements-dev.txt
	rm -rf build/lock-check && mkdir -p build/lock-check
	cp $(LOCK) build/lock-check/app.lock && cp $(DEV_LOCK) build/lock-check/dev.lock
	$(call compile-locks,build/lock-check/app.lock,build/lock-check/dev.lock)
	pins() { grep -v -e '^ *#' -e '--hash=' "$$1"; }; \
	for pair in $(LOCK):app.lock $(DEV_LOCK):dev.lock; do \
	  diff -u --label "$${pair%%:*}" --label "resolved now" <(pins $${pair%%:*}) <(pins build/lock-check/$${pair##*:}) \
	    || { echo "$${pair%%:*} does not match its inputs: run \`make lock\` and commit it" >&2; exit 1; }; \
	done

.PHONY: docker
docker: $(STAMPS)/host-lab ## Start the Docker engine if it is not running
	scripts/start-docker.sh

.PHONY: image
image: docker ## Build the local Debian 12 systemd base image (debootstrap + docker import)
	scripts/build-base-image.sh

# The locked wheels (hashes checked; no sdist builds, whose wheels the lock's hashes could not
# match), the worker's own wheel, and requirements.lock: the lock plus that wheel's hash, which the
# hosts install with --require-hashes. The dry run installs it as a host would, from the wheels alone.
.PHONY: wheelhouse
wheelhouse: $(STAMPS)/venv ## Build the worker and its locked dependencies as wheels for the hosts
	rm -rf $(WHEELHOUSE)
	$(BIN)/pip wheel -q --no-deps --only-binary=:all: --require-hashes --wheel-dir $(WHEELHOUSE) -r $(LOCK)
	$(BIN)/pip wheel -q --no-deps --no-build-isolation --wheel-dir $(WHEELHOUSE) ./worker
	cd $(WHEELHOUSE) && wheel=$$(echo mailworker-*.whl) && { \
	  echo "# What the hosts install: $(LOCK) and the worker's wheel built with it."; \
	  cat $(CURDIR)/$(LOCK); \
	  echo "mailworker==$$(echo $$wheel | cut -d- -f2) --hash=sha256:$$(sha256sum $$wheel | cut -d' ' -f1)"; \
	} > requirements.lock
	$(BIN)/pip install -q --dry-run --ignore-installed --no-index --find-links $(WHEELHOUSE) \
	  --only-binary=:all: --require-hashes -r $(WHEELHOUSE)/requirements.lock

.PHONY: lint
lint: $(STAMPS)/venv lock-check ## ruff, yamllint, ansible-lint (production profile) and the locks against their inputs
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint

.PHONY: test-python
test-python: $(STAMPS)/venv $(STAMPS)/host-test ## Application tests against real Redis, PostgreSQL, Dovecot and SMTP
	# Four processes on two cores: the tests mostly wait on their servers and timeouts (load
	# about 1 with two); four took 5 min instead of 9.
	$(BIN)/pytest -n 4 tests

.PHONY: test-molecule
# host-test: the default scenario's browser test drives the controller's Chromium.
test-molecule: $(STAMPS)/venv $(STAMPS)/host-test image wheelhouse ## Every Molecule scenario on local systemd containers
	mkdir -p $(LOGS)
	rm -rf $(LOGS)/verify-*.xml $(LOGS)/browser
	MOLECULE=$(BIN)/molecule scripts/molecule-all.sh $(MOLECULE_JOBS) $(LOGS)

.PHONY: test
test: lint test-python test-molecule ## Everything CI runs

.PHONY: lab
lab: $(STAMPS)/venv image wheelhouse ## Deploy the whole stack and a lab mail server into local containers and print Flower's URL
	$(BIN)/ansible-playbook playbooks/lab.yml
	$(BIN)/ansible-playbook -i inventories/lab playbooks/site.yml
	$(BIN)/ansible-playbook -i inventories/lab playbooks/lab-mail.yml
	$(BIN)/ansible-playbook -i inventories/lab playbooks/lab-info.yml

.PHONY: lab-destroy
lab-destroy: $(STAMPS)/venv ## Remove the lab containers
	$(BIN)/ansible-playbook playbooks/lab.yml -e lab_state=absent

.PHONY: bench
bench: $(STAMPS)/venv $(STAMPS)/host-test image wheelhouse ## Measure the shipped worker against Celery's defaults; writes docs/benchmarks.md (BENCH_ARGS=--quick)
	$(BIN)/python -m bench $(BENCH_ARGS)

.PHONY: clean
clean: ## Remove the virtualenv, build output and stamps
	rm -rf $(VENV) build $(STAMPS)
