# torchserve-cam: `make serve` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test serve stop lint archives

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) chromium
	$(PY) -m pytest

# Headless Chromium for the audit report test (apt-get install only when /usr/bin/chromium is missing).
.PHONY: chromium
chromium:
	@tests/ensure_chromium.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check cam_engine handlers model_store tests bench

# Archives are rebuilt when their inputs change; ports come from INFERENCE_PORT/MANAGEMENT_PORT/METRICS_PORT.
DEFAULT_MODEL ?= efficientnet_lite0
ARCHIVE := model_store/$(DEFAULT_MODEL).mar
ARCHIVE_INPUTS := model_store/configs/$(DEFAULT_MODEL).yaml $(wildcard handlers/*.py cam_engine/*.py model_store/build.py)

$(ARCHIVE): $(STAMP) $(ARCHIVE_INPUTS)
	$(PY) -m model_store.build $(DEFAULT_MODEL) --output model_store

archives: $(ARCHIVE)

serve: $(ARCHIVE)
	@$(PY) -m model_store.serve stop >/dev/null 2>&1 || true
	$(PY) -m model_store.serve start --model $(DEFAULT_MODEL)

stop:
	@if [ -x $(PY) ]; then $(PY) -m model_store.serve stop; else echo "nothing to stop (no $(VENV))"; fi

# Container images (needs a Docker engine; the machines here have none, so tests lint the Dockerfiles).
REGISTRY ?= registry.example.com/ml
VERSION  ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
.PHONY: image image-cpu image-gpu push
image: image-cpu image-gpu
image-cpu:
	docker build -f deploy/docker/Dockerfile.cpu -t $(REGISTRY)/torchserve-cam:$(VERSION)-cpu .
image-gpu:
	docker build -f deploy/docker/Dockerfile.gpu -t $(REGISTRY)/torchserve-cam:$(VERSION)-gpu .
push: image
	docker push $(REGISTRY)/torchserve-cam:$(VERSION)-cpu
	docker push $(REGISTRY)/torchserve-cam:$(VERSION)-gpu
