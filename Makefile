# torchserve-cam: `make serve` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-serve test test-peer serve stop lint typecheck archives

# Two installs, so that serving never pulls test tools or AGPL code:
#   $(SERVE_STAMP)  `make serve` and the archives: torch + this package (its core dependencies only);
#   $(STAMP)        `make test` and the other tools: + the test, yolo (Ultralytics, AGPL-3.0), docs, load
#                   and bench extras.
# pip runs without -q: torch is a download of several GB, and its progress is worth seeing.
SERVE_STAMP := $(VENV)/.installed-serve
PIP := $(PY) -m pip install --progress-bar on
TEST_EXTRAS ?= test,yolo,docs,load,bench

$(SERVE_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== pip: upgrading pip"
	$(PIP) --upgrade pip
	@echo "== pip: torch and torchvision (several GB on a fresh machine: a few minutes)"
	$(PIP) torch==2.14.1 torchvision==0.29.1
	@echo "== pip: torchserve-cam and what serving needs"
	$(PIP) -e . --config-settings editable_mode=compat
	touch $(SERVE_STAMP)

$(STAMP): $(SERVE_STAMP)
	@echo "== pip: the extras for tests and tools ($(TEST_EXTRAS))"
	$(PIP) -e '.[$(TEST_EXTRAS)]' --config-settings editable_mode=compat
	touch $(STAMP)

# One extra on top of the serving install: $(VENV)/.installed-extra-load (make loadtest), -bench (make report),
# -yolo (make serve MODELS=yolov8n EXTRAS=yolo: Ultralytics is AGPL-3.0, installed only when asked for).
$(VENV)/.installed-extra-%: $(SERVE_STAMP)
	@echo "== pip: the $* extra"
	$(PIP) -e '.[$*]' --config-settings editable_mode=compat
	touch $@

comma := ,
EXTRAS ?=
EXTRA_STAMPS := $(foreach e,$(subst $(comma), ,$(EXTRAS)),$(VENV)/.installed-extra-$(e))

install-serve: $(SERVE_STAMP) $(EXTRA_STAMPS)
install: $(STAMP)

test: $(STAMP) chromium nginx lint typecheck
	$(PY) -m pytest

# The heavy agreement grids that `make test` samples (tests marked peer: aug_smooth for every method, ...),
# then grad-cam 1.5.7's own test suite (from its sdist, cached under ~/.cache/torchserve-cam) against
# cam_engine: the whole grid, then against grad-cam itself for the baseline.
test-peer: $(STAMP)
	$(PY) -m pytest -q --peer -m peer
	GRADCAM_SUITE=full $(PY) -m pytest -q tests/test_gradcam_suite.py -s
	$(PY) -m tests.helpers.gradcam_suite pytorch_grad_cam

# Headless Chromium for the audit report test (apt-get install only when /usr/bin/chromium is missing).
.PHONY: chromium
chromium:
	@tests/ensure_debian.sh chromium 'test -x /usr/bin/chromium'

# Debian's nginx for the front-door tests (tests/test_nginx*.py) and make deploy-check (nginx -t), when missing.
.PHONY: nginx
nginx:
	@tests/ensure_debian.sh nginx 'test -x /usr/sbin/nginx'

lint: $(STAMP)
	$(VENV)/bin/ruff check cam_engine handlers model_store tests bench torchserve_cam_cli load_tests deploy

# mypy over cam_engine, handlers and model_store ([tool.mypy] in pyproject.toml says in which mode).
typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Archives are rebuilt when their inputs change; ports come from INFERENCE_PORT/MANAGEMENT_PORT/METRICS_PORT
# (8080-8082 by default) and GRPC_INFERENCE_PORT/GRPC_MANAGEMENT_PORT (free ports by default; printed at start).
# make serve MODELS="efficientnet_lite0 resnet50"   several models (archives built as needed)
# ALLOW_RANDOM_WEIGHTS=1: build configs that have no real weights with random ones (tries, demos)
# make serve MODELS=fasterrcnn_demo ALLOW_RANDOM_WEIGHTS=1   an offline detector demo: boxes and per-box CAMs with
#                                                           random weights (a random COCO detector answers no box)
# RESTART=1: stop the TorchServe already running from this directory first (otherwise `make serve` refuses)
# GRACE=30: seconds `make stop` drains in-flight requests before stopping
DEFAULT_MODEL ?= efficientnet_lite0
MODELS ?= $(DEFAULT_MODEL)
ARCHIVES := $(foreach m,$(MODELS),model_store/$(m).mar)
ARCHIVE_CODE := $(wildcard handlers/*.py handlers/*/*.py cam_engine/*.py cam_engine/*/*.py model_store/build.py)
GRACE ?= 30

model_store/%.mar: $(SERVE_STAMP) $(EXTRA_STAMPS) model_store/configs/%.yaml $(ARCHIVE_CODE)
	$(PY) -m model_store.build $* --output model_store $(if $(filter 1 yes true,$(ALLOW_RANDOM_WEIGHTS)),--allow-random-weights)

archives: $(ARCHIVES)

serve: $(ARCHIVES)
	$(PY) -m model_store.serve start $(foreach m,$(MODELS),--model $(m)) $(if $(filter 1 yes true,$(RESTART)),--restart)

stop:
	@if [ -x $(PY) ]; then $(PY) -m model_store.serve stop --grace $(GRACE); else echo "nothing to stop (no $(VENV))"; fi

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

# The manifests with your image: make deploy-render REGISTRY=ghcr.io/acme [VERSION=...] writes, under DEPLOY_OUT,
# kustomize/<overlay>/ (kubectl apply -k), kubernetes/<overlay>.yaml (rendered) and kserve/*.yaml (needs kubectl).
# make deploy-check: the offline checks (kubectl kustomize + kubernetes-validate 1.30 --strict, hadolint, nginx -t on
# the front's config rendered from each manifest), also on
# what deploy-render wrote when DEPLOY_OUT exists. No cluster, no Docker engine.
DEPLOY_OUT ?= build/deploy
.PHONY: deploy-render deploy-check
deploy-render:
	$(PYTHON) deploy/deploy_render.py --registry $(REGISTRY) --version $(VERSION) --out $(DEPLOY_OUT)
deploy-check: $(VENV)/.installed-extra-deploy nginx
	$(PY) deploy/deploy_check.py $(if $(wildcard $(DEPLOY_OUT)/kubernetes),--rendered $(DEPLOY_OUT)/kubernetes)

# The README's method gallery (docs/gallery_*.jpg): every cam_engine method, real EfficientNet-Lite0, CPU.
.PHONY: gallery
gallery: $(STAMP)
	$(PY) -m torchserve_cam_cli gallery docs/chelsea.jpg --device cpu --out docs/gallery_chelsea.jpg
	$(PY) -m torchserve_cam_cli gallery docs/chelsea.jpg docs/coffee.jpg --target "Egyptian cat" --target espresso \
		--tile-height 100 --max-width 1040 --device cpu --out docs/gallery_cat_espresso.jpg
# Load tests (Locust) against the TorchServe that `make serve` started; reports under load_tests/results/<timestamp>/.
# make loadtest USERS=8 SPAWN_RATE=8 RUN_TIME=30s MAX_REQUESTS=0 SCENARIO=mix|predictions|explanations MODEL=efficientnet_lite0
#               MIX=predictions=2,explanations=2,explain_flag=1,method=1 SLO=load_tests/slo.yaml WARMUP=2
#               LOAD_REQUEST_OPTIONS='{"concept": "cat"}'   (merged into every request: embedding models need it)
# Ports: INFERENCE_PORT / MANAGEMENT_PORT as for `make serve`. The report path is printed whatever the outcome;
# on an SLO breach or a failed warm-up Locust exits 1, so `make loadtest` fails (make's own exit code: 2).
USERS ?= 8
SPAWN_RATE ?= $(USERS)
RUN_TIME ?= 30s
MAX_REQUESTS ?= 0
SCENARIO ?= mix
MODEL ?= $(DEFAULT_MODEL)
MIX ?= predictions=2,explanations=2,explain_flag=1,method=1
SLO ?= load_tests/slo.yaml
WARMUP ?= 2
LOAD_REQUEST_OPTIONS ?=
KEY_FILE ?= key_file.json
RESULTS ?= load_tests/results/$(shell date -u +%Y%m%dT%H%M%SZ)
LOAD_HOST ?= http://127.0.0.1:$(or $(INFERENCE_PORT),8080)
LOAD_MANAGEMENT ?= http://127.0.0.1:$(or $(MANAGEMENT_PORT),8081)
.PHONY: loadtest report
loadtest: $(VENV)/.installed-extra-load
	@test -f $(KEY_FILE) || { echo "no $(KEY_FILE) here: start the server with 'make serve' first"; exit 2; }
	@mkdir -p $(RESULTS)
	$(VENV)/bin/locust -f load_tests/locustfile.py --headless --only-summary \
		--host $(LOAD_HOST) --management-url $(LOAD_MANAGEMENT) --key-file $(KEY_FILE) \
		--tags $(SCENARIO) --model $(MODEL) --mix '$(MIX)' --slo '$(SLO)' --warmup $(WARMUP) \
		--request-options '$(LOAD_REQUEST_OPTIONS)' \
		-u $(USERS) -r $(SPAWN_RATE) -t $(RUN_TIME) --max-requests $(MAX_REQUESTS) --stop-timeout 60 \
		--csv $(RESULTS)/locust --html $(RESULTS)/report.html; \
	code=$$?; if [ -f $(RESULTS)/report.html ]; then echo "reports in $(RESULTS)/ (locust exit code $$code)"; \
	else echo "no report (locust exit code $$code)"; fi; exit $$code

# One-shot GPU check (at most 8 minutes): the tests marked cuda, ResNet-50 fp16 explanation/forward throughput,
# Lite0 served on the GPU under a 60 s Locust run; one JSON report. Skips (exit 0) on a machine without CUDA.
# make gpu-check GPU_CHECK_ARGS="--report load_tests/results/gpu_check.json --budget 480"
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# Performance report: builds its own archives, starts/stops its own TorchServe on loopback ports: free ones, or
# INFERENCE_PORT/MANAGEMENT_PORT/METRICS_PORT (and GRPC_*_PORT) when set, or REPORT_ARGS="--inference-port N ...".
# make report REPORT_ARGS="--duration 20 --users 1,4,8"
REPORT_ARGS ?=
report: $(VENV)/.installed-extra-load $(VENV)/.installed-extra-bench
	$(PY) load_tests/report.py $(REPORT_ARGS)

# The docs site (docs/, mkdocs.yml): built strictly (a broken link, anchor or docstring fails) into site/.
# Only the docs extra on top of the serving install: building the site never changes what the server runs with.
# make docs-serve: the same site, live-reloaded, on http://127.0.0.1:8000 (loopback only).
.PHONY: docs docs-serve
docs: $(VENV)/.installed-extra-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site
docs-serve: $(VENV)/.installed-extra-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict --dev-addr 127.0.0.1:8000
