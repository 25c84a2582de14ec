# Cairn: the two commands are `make run` and `make test`.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
TOOLS ?= $(CURDIR)/.tools
RUN_DIR ?= $(CURDIR)/.run
NODE_ID ?= $(shell hostname)
# Build outputs kept between runs, outside the clone, keyed on their versions: the
# Kubernetes binaries and sidecars, the base image and the driver image of the cluster tier.
CAIRN_CACHE ?= /var/cache/cairn
export VENV TOOLS CAIRN_CACHE

.PHONY: run demo test e2e lint unit integration conformance bench deploy proto setup-run setup-test clean

## run: start the driver on the embedded local backend (root needed to stage volumes)
run: setup-run
	@echo "Cairn serves on unix://$(RUN_DIR)/csi.sock (node $(NODE_ID)); data in $(RUN_DIR)/local"
	@echo "Try:  $(VENV)/bin/cairn-csi client --endpoint unix://$(RUN_DIR)/csi.sock info"
	@echo "      $(VENV)/bin/cairn-csi client --endpoint unix://$(RUN_DIR)/csi.sock create my-volume --size 1Gi"
	@echo "Stop with Ctrl-C (SIGTERM works too)."
	exec $(VENV)/bin/cairn-csi --endpoint unix://$(RUN_DIR)/csi.sock --node-id $(NODE_ID) \
		--data-dir $(RUN_DIR)/local --state-dir $(RUN_DIR)/node

## demo: a full lifecycle through the socket, printing each step
demo: setup-run
	scripts/demo.sh $(VENV)/bin/cairn-csi

## test: install everything, then lint, type-check and run every test tier
test: setup-test lint
	CAIRN_REQUIRE_ALL=1 PATH="$(TOOLS)/bin:$$PATH" $(VENV)/bin/pytest --durations=30

lint:
	$(VENV)/bin/ruff check csi tests bench
	$(VENV)/bin/ruff format --check csi tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

## unit: the tests that need no root, VM, cluster or external server
unit: setup-test
	$(VENV)/bin/pytest -m unit

## e2e: the cluster tier alone: Kubernetes, the image and the chart, built or reused from
## the cache ($(CAIRN_CACHE)), then every flow through kubectl and helm (root)
e2e: setup-test
	CAIRN_REQUIRE_ALL=1 PATH="$(TOOLS)/bin:$$PATH" $(VENV)/bin/pytest -m cluster

integration conformance: setup-test
	CAIRN_REQUIRE_ALL=1 PATH="$(TOOLS)/bin:$$PATH" $(VENV)/bin/pytest -m $@

## bench: the local backend against a do-nothing gRPC server and the raw operations, with
## throughput, the listing curve and a py-spy profile; the other backends against theirs (root)
bench: setup-test
	$(VENV)/bin/python bench/provision.py --profile
	$(VENV)/bin/python bench/rbd_backend.py
	$(VENV)/bin/python bench/nfs_backend.py
	$(VENV)/bin/python bench/lvm_backend.py

## deploy: re-render deploy/cairn-csi.yaml from the chart
deploy: setup-test
	HELM=$(TOOLS)/bin/helm deploy/render.sh

## proto: regenerate csi/generated from the pinned CSI spec
proto: setup-test
	PYTHON=$(VENV)/bin/python proto/generate.sh

setup-run:
	scripts/setup.sh run

setup-test:
	scripts/setup.sh test

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
