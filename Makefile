# Echelon: `make demo` runs the multi-site demo, `make test` runs the tests.
# Both create the virtual environment and install what they need first, from the
# hashed locks in requirements/ (docs/installing.md).

PYTHON ?= python3
VENV ?= .venv
CACHE ?= .cache
BIN := $(VENV)/bin

# The build of PyTorch: cpu (default) or cuda, e.g. `make test VARIANT=cuda`.
VARIANT ?= cpu
TORCH_VERSION := 2.13.0
# What `make lock` asks pip for, per variant. PyPI's Linux wheel of torch is the
# CUDA build (CUDA 13.0); `===` keeps a local +cpu wheel from matching it.
TORCH_REQ_cpu := torch==$(TORCH_VERSION)+cpu
TORCH_REQ_cuda := torch===$(TORCH_VERSION)
# Where torch comes from when pip's own indexes lack it (PyTorch's index).
TORCH_INDEX_cpu := https://download.pytorch.org/whl/cpu
TORCH_INDEX_cuda :=
TORCH_INDEX ?= $(TORCH_INDEX_$(VARIANT))
# Extra pip options for the install, e.g. PIP_OPTS="--no-index --find-links wheelhouse".
PIP_OPTS ?=

TORCH_LOCK := requirements/torch-$(VARIANT).txt
LOCK := requirements/lock-$(VARIANT).txt
# The stamp names what was installed: variant and a digest of the locks and
# pyproject.toml. Another variant or lock gives another stamp, and a fresh venv.
LOCK_DIGEST := $(shell cat $(TORCH_LOCK) $(LOCK) pyproject.toml 2>/dev/null | $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:12])')
STAMP := $(VENV)/.installed-$(VARIANT)-$(LOCK_DIGEST)
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: venv lock proto check-proto corpus deploy-tools demo demo-netns test lint typecheck bench clean
.PHONY: docker-tools docker-engine docker-engine-stop image image-prometheus demo-docker

venv: $(STAMP)

$(STAMP):
	@test -f $(TORCH_LOCK) -a -f $(LOCK) || { echo "no lock for VARIANT=$(VARIANT): $(TORCH_LOCK), $(LOCK)"; exit 1; }
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "the locks are for Python 3.11, got " + sys.version'
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --require-hashes --no-deps --only-binary=:all: $(PIP_OPTS) -r $(TORCH_LOCK) \
	  || { test -n "$(TORCH_INDEX)" && echo "retrying torch with --extra-index-url $(TORCH_INDEX)" \
	       && $(PIP) install --quiet --require-hashes --no-deps --only-binary=:all: $(PIP_OPTS) --extra-index-url $(TORCH_INDEX) -r $(TORCH_LOCK); }
	$(PIP) install --quiet --require-hashes --no-deps --only-binary=:all: $(PIP_OPTS) -r $(LOCK)
	$(PIP) install --quiet --no-deps --no-build-isolation $(PIP_OPTS) -e .
	$(PIP) check
	echo $(VARIANT) > $(VENV)/echelon-variant
	touch $(STAMP)

# Regenerates the locks of VARIANT (or `make lock VARIANT=cuda`) from pyproject.toml
# through pip's configured indexes; needs the registries, not the venv.
lock:
	$(PYTHON) tools/lock.py $(VARIANT) --torch "$(TORCH_REQ_$(VARIANT))" --torch-index "$(TORCH_INDEX)"

proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

# Fails when the committed echelon_proto/ differs from what `make proto` writes.
check-proto: $(STAMP)
	rm -rf $(VENV)/proto-check
	$(BIN)/python tools/gen_proto.py --out $(VENV)/proto-check
	diff -r -x __pycache__ $(VENV)/proto-check/echelon_proto echelon_proto \
	  || { echo "echelon_proto/ is stale: run 'make proto' and commit"; exit 1; }
	rm -rf $(VENV)/proto-check

corpus: $(STAMP)
	$(BIN)/python -m echelon_tools.corpus fetch --cache $(CACHE)/corpus

# What the deploy checks need beyond the venv (kubectl, kubernetes-validate, yamllint and
# hadolint are wheels in the locks): promtool and prometheus from Debian, and
# docker-compose for the compose lint (root, or present).
deploy-tools:
	sh tools/install_prometheus.sh
	sh tools/install_docker.sh compose

demo: $(STAMP) corpus
	$(BIN)/echelon demo --cache $(CACHE)

# The demo across an emulated WAN: the global plane and each organization in a network namespace
# of its own, veth links with NETNS_WAN_MS of one-way delay (delaying proxies) and NETNS_LOSS %
# packet loss each way (iptables), namespaces always removed (echelon_tools/netns.py). Root only:
# skipped with a message otherwise. DEMO_ARGS go to `echelon demo`, e.g. DEMO_ARGS="--windows 4".
NETNS_WAN_MS ?= 50
NETNS_LOSS ?= 1
demo-netns: $(STAMP) corpus
	$(BIN)/python -m echelon_tools.netns --cache $(CACHE) --wan-ms $(NETNS_WAN_MS) \
	  --loss $(NETNS_LOSS) --root var/demo-netns $(DEMO_ARGS)

# `make demo-docker`: the same demo in containers (deploy/docker, deploy/compose): a
# private engine on its own socket, images built locally without network access (a
# debootstrap base, wheels from the hashed locks), two organizations, the global plane and
# three Prometheus servers under docker-compose, torn down at the end, also on failure.
# The engine stays up for the next run (its images are cached): make docker-engine-stop.
DOCKER_STATE ?= /var/lib/echelon-docker
DOCKER_SOCK ?= /run/echelon-docker.sock
DOCKER := DOCKER_HOST=unix://$(DOCKER_SOCK)
IMAGE ?= echelon:0.1.0$(if $(filter cuda,$(VARIANT)),-cuda)
PROMETHEUS_IMAGE ?= echelon-prometheus:2.42
DOCKERFILE_cpu := deploy/docker/Dockerfile
DOCKERFILE_cuda := deploy/docker/Dockerfile.cuda

# Debian's docker.io, docker-compose (v1) and debootstrap when missing (root only).
docker-tools:
	sh tools/install_docker.sh

docker-engine: docker-tools
	sh deploy/docker/engine.sh $(DOCKER_STATE) $(DOCKER_SOCK)

docker-engine-stop:
	sh deploy/docker/engine.sh $(DOCKER_STATE) $(DOCKER_SOCK) stop

# Base image (debootstrap), wheelhouse (pip download, hash-checked), build context, then
# `docker build --network none`: the build itself reaches no network.
image: $(STAMP) docker-engine
	$(DOCKER) nice -n 19 sh deploy/docker/build-base.sh $(CACHE)/docker
	PYTHON=$(BIN)/python sh deploy/docker/wheelhouse.sh $(VARIANT) $(CACHE)/wheelhouse-$(VARIANT)
	$(BIN)/python deploy/docker/context.py --variant $(VARIANT) \
	  --wheelhouse $(CACHE)/wheelhouse-$(VARIANT) --out $(CACHE)/docker/context-$(VARIANT)
	$(DOCKER) DOCKER_BUILDKIT=0 nice -n 19 docker build --network none \
	  --build-arg REVISION=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) \
	  -f $(DOCKERFILE_$(VARIANT)) -t $(IMAGE) $(CACHE)/docker/context-$(VARIANT)

image-prometheus: docker-engine
	$(DOCKER) nice -n 19 sh deploy/docker/build-base.sh $(CACHE)/docker
	$(DOCKER) nice -n 19 sh deploy/docker/build-prometheus.sh $(CACHE)/docker $(PROMETHEUS_IMAGE)

demo-docker: $(STAMP) corpus image image-prometheus
	$(DOCKER) IMAGE=$(IMAGE) PROMETHEUS_IMAGE=$(PROMETHEUS_IMAGE) \
	  $(BIN)/python deploy/compose/demo_docker.py --cache $(CACHE)

# Deploy tests fail, not skip, when a tool is missing (tests/deploy/conftest.py). Not an
# ECHELON_* name: the services refuse unknown ECHELON_* variables, and test services inherit it.
test: $(STAMP) deploy-tools
	REQUIRE_DEPLOY_TOOLS=1 $(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check echelon services echelon_tools tests benchmarks tools
	$(BIN)/ruff format --check echelon services echelon_tools tests benchmarks tools

typecheck: $(STAMP)
	$(BIN)/mypy

# bench_trust: the same deployment with mTLS, authorization and proofs on, against all off.
# bench_e2e: real deployments against the same devices with no sync (a few minutes); it uses
# the corpus that `make corpus` fetched, or the standard-library texts where it is missing.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_secagg.py
	$(BIN)/python benchmarks/bench_audit.py
	$(BIN)/python benchmarks/bench_e2e.py $(BENCH_E2E_ARGS)
	$(BIN)/python benchmarks/bench_trust.py

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
