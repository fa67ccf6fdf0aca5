# hybrid-toolkit. `make demo` and `make test` install what is missing into .venv first: the
# demo only what the toolkit needs to run (.venv/.installed); tests and lint add the dev extras
# (.venv/.installed-dev: pytest, ruff, transformers, lm-eval, torchao, hadolint).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (it lies on this machine's disk); a plain `torch` requirement would pull
# a multi-GB CUDA build. Override on GPU hosts: make install TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= torch==2.13.0
LOGDIR ?= runs
PIP := $(PY) -m pip install --disable-pip-version-check -q
# Images: containers/ (see README "Containers"). Tools are variables so a site can point elsewhere.
IMAGE ?= hybrid-toolkit
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# docker or podman, whichever answers first (docker only if its daemon does): CONTAINER_ENGINE=...
CONTAINER_ENGINE ?=
# The GPU image's base is the Dockerfile's (NGC PyTorch); the CPU image's a plain Debian:
# CPU_BASE=localhost/debian:bookworm after `make debian-base` where no image registry is reachable.
CPU_BASE ?= docker.io/library/debian:bookworm-slim
DEBIAN_MIRROR ?= http://deb.debian.org/debian
# A folder of wheels that may hold torch's CPU build (pip's find-links here); none: the index.
# pip's CA bundle here (PIP_CERT or pip config's cert), handed to the build's pip as a secret.
PIP_CERT_FILE ?= $(or $(PIP_CERT),$(shell $(PYTHON) -m pip config get global.cert 2>/dev/null))
WHEELHOUSE ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
APPTAINER ?= apptainer
ENROOT ?= enroot
# When make started: the demo's time includes the install.
STARTED := $(shell date +%s)

.PHONY: install install-dev demo test test-long test-container lint format tensorboard clean \
	container container-cpu debian-base sif sqsh

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev]"
	@touch $@

# Status 3 from the launcher: a signal stopped the training before its last step (checkpoint
# saved). The demo then says so and stops, rather than generate and call itself finished.
demo: install
	@rm -rf runs/tiny_hybrid; \
	$(PY) launchers/submit.py recipes/tiny_hybrid.toml --local; status=$$?; \
	if [ $$status -eq 3 ]; then \
		echo "demo stopped: a signal cut the training short (its last step is checkpointed in runs/tiny_hybrid/checkpoints; '$(PY) launchers/submit.py recipes/tiny_hybrid.toml --local' resumes it)" >&2; \
		exit 3; \
	fi; \
	if [ $$status -ne 0 ]; then echo "demo failed: training exited with status $$status" >&2; exit $$status; fi; \
	$(PY) -m toolkit.inference.generate --checkpoint runs/tiny_hybrid/checkpoints \
		--prompt "def " --prompt "import " --max-new-tokens 200 \
		--temperature 0.7 --top-k 20 --seed 0 || exit $$?; \
	echo "demo finished in $$(( $$(date +%s) - $(STARTED) )) s (install included); TensorBoard: make tensorboard LOGDIR=runs/tiny_hybrid/tensorboard"

# make test stays within ~15 minutes on 2 cores; the longer multi-process, launcher and cluster
# checks (marked `long`) run in make test-long, which CI runs after it.
test: install-dev
	$(PY) -m pytest -q -m "not long and not container"

test-long: install-dev
	$(PY) -m pytest -q -m "long and not container"

# The CPU image built with podman (from the Debian base `make debian-base` makes, when missing)
# and the toolkit run inside it, a Slurm job included; pytest reports the build's and each
# test's time (--durations).
test-container: install-dev
	$(PY) -m pytest -q -m container --durations=0 tests/test_container_image.py

lint: install-dev
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/ruff format --check .

format: install-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

tensorboard: install
	$(VENV)/bin/tensorboard --logdir $(LOGDIR) --host 127.0.0.1 --port 6006

clean:
	rm -rf runs .pytest_cache .ruff_cache

# podman builds with chroot isolation, as tested here (DESIGN.md section 7); docker needs no flags.
PODMAN_BUILD_FLAGS ?= --isolation chroot
container container-cpu:
	@engine="$(CONTAINER_ENGINE)"; \
	if [ -z "$$engine" ]; then \
		if docker info >/dev/null 2>&1; then engine=docker; \
		elif command -v podman >/dev/null 2>&1; then engine=podman; \
		else echo "make $@ needs docker or podman (neither answers here; CONTAINER_ENGINE= names another). Without them: 'make sif' builds an Apptainer image"; exit 2; fi; \
	elif ! command -v "$$engine" >/dev/null 2>&1; then \
		echo "make $@ needs docker or podman ('$$engine' not found; CONTAINER_ENGINE=docker or podman)"; exit 2; \
	elif ! "$$engine" info >/dev/null 2>&1; then \
		echo "'$$engine' is installed but does not answer ('$$engine info' failed): start its daemon, or use another engine (make $@ CONTAINER_ENGINE=podman)"; exit 2; \
	fi; \
	flags=""; case "$$engine" in *podman*) flags="$(PODMAN_BUILD_FLAGS)";; esac; \
	wheels="$(firstword $(WHEELHOUSE))"; [ -d "$$wheels" ] || wheels=$$(mktemp -d); \
	cert="$(PIP_CERT_FILE)"; [ -f "$$cert" ] && flags="$$flags --secret id=pip-cert,src=$$cert"; \
	if [ "$@" = container-cpu ]; then args="--build-arg FLAVOUR=cpu --build-arg BASE_IMAGE=$(CPU_BASE)"; tag=$(IMAGE):$(VERSION)-cpu; \
	else args=""; tag=$(IMAGE):$(VERSION); fi; \
	set -x; $$engine build $$flags -f containers/Dockerfile $$args --build-arg VERSION=$(VERSION) \
		--build-context wheels="$$wheels" -t $$tag .

# A Debian base image from Debian's own packages, for hosts that reach no image registry.
debian-base:
	@command -v debootstrap >/dev/null 2>&1 && command -v podman >/dev/null 2>&1 || { echo "make debian-base needs debootstrap and podman (apt-get install debootstrap podman)"; exit 2; }
	@dir=$$(mktemp -d) && trap 'rm -rf "$$dir"' EXIT && \
	debootstrap --variant=minbase bookworm "$$dir" $(DEBIAN_MIRROR) >/dev/null && \
	tar -C "$$dir" -c . | podman import - localhost/debian:bookworm

sif:
	@command -v $(APPTAINER) >/dev/null 2>&1 || { echo "make sif needs apptainer (or singularity: make sif APPTAINER=singularity); '$(APPTAINER)' not found"; exit 2; }
	$(APPTAINER) build $(IMAGE)-$(VERSION).sif containers/toolkit.def

sqsh:
	@command -v $(ENROOT) >/dev/null 2>&1 || { echo "make sqsh needs enroot ('$(ENROOT)' not found), and the image from 'make container' in the local docker daemon or podman"; exit 2; }
	$(ENROOT) import -o $(IMAGE)-$(VERSION).sqsh $(if $(filter podman,$(CONTAINER_ENGINE)),podman,dockerd)://$(IMAGE):$(VERSION)
