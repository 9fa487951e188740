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
LOGS := build/logs
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

$(STAMPS)/venv: requirements-dev.txt worker/pyproject.toml $(STAMPS)/host-lab | $(STAMPS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt -e worker
	@touch $@

.PHONY: venv
venv: $(STAMPS)/venv ## Python virtualenv with Ansible, Molecule, the test tools and the worker

.PHONY: docker
docker: $(STAMPS)/host-lab ## Start the Docker engine if it is not running
	scripts/start-docker.sh

.PHONY: image
image: docker ## Build the local Debian 12 systemd base image (debootstrap + docker import)
	scripts/build-base-image.sh

# pip evaluates dependency markers for this Python, not the hosts' (Debian 12: 3.11.2): redis-py
# needs async-timeout below 3.11.3, so it is named here.
.PHONY: wheelhouse
wheelhouse: $(STAMPS)/venv ## Build the worker and all its dependencies as wheels for the hosts
	rm -rf $(WHEELHOUSE)
	$(BIN)/pip wheel -q --wheel-dir $(WHEELHOUSE) ./worker 'async-timeout>=4.0.3'

.PHONY: lint
lint: $(STAMPS)/venv ## ruff, yamllint and ansible-lint (production profile)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint

.PHONY: test-python
test-python: $(STAMPS)/venv $(STAMPS)/host-test ## Application tests against real Redis, PostgreSQL, Dovecot and SMTP
	$(BIN)/pytest tests

.PHONY: test-molecule
test-molecule: $(STAMPS)/venv image wheelhouse ## Every Molecule scenario on local systemd containers
	mkdir -p $(LOGS)
	rm -f $(LOGS)/verify-*.xml
	status=0; failed=; \
	for scenario in $$(ls molecule); do \
	  [ -f molecule/$$scenario/molecule.yml ] || continue; \
	  log=$(LOGS)/molecule-$$scenario.log; \
	  if ! $(BIN)/molecule test -s $$scenario 2>&1 | tee $$log; then \
	    status=1; failed="$$failed $$scenario"; \
	  fi; \
	done; \
	for scenario in $$failed; do \
	  scripts/failure-summary.py $(LOGS)/molecule-$$scenario.log $(LOGS)/verify-$$scenario.xml; \
	done; \
	exit $$status

.PHONY: test
test: lint test-python test-molecule ## Everything CI runs

.PHONY: lab
lab: $(STAMPS)/venv image wheelhouse ## Deploy the whole stack into local containers and print Flower's URL
	$(BIN)/ansible-playbook playbooks/lab.yml
	$(BIN)/ansible-playbook -i inventories/lab playbooks/site.yml
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
