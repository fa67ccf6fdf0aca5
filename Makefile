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
DOCKER ?= docker
APPTAINER ?= apptainer
ENROOT ?= enroot
# When make started: the demo's time includes the install.
STARTED := $(shell date +%s)

.PHONY: install install-dev demo test test-long lint format tensorboard clean container sif sqsh

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
	$(PY) -m pytest -q -m "not long"

test-long: install-dev
	$(PY) -m pytest -q -m long

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

container:
	@command -v $(DOCKER) >/dev/null 2>&1 || { echo "make container needs docker ('$(DOCKER)' not found). Without docker: 'make sif' builds an Apptainer image, or build on a machine with docker and copy the image over."; exit 2; }
	@$(DOCKER) info >/dev/null 2>&1 || { echo "'$(DOCKER)' is installed but its daemon does not answer ('$(DOCKER) info' failed): start it, or use another engine (make container DOCKER=podman)"; exit 2; }
	$(DOCKER) build -f containers/Dockerfile --build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION) .

sif:
	@command -v $(APPTAINER) >/dev/null 2>&1 || { echo "make sif needs apptainer (or singularity: make sif APPTAINER=singularity); '$(APPTAINER)' not found"; exit 2; }
	$(APPTAINER) build $(IMAGE)-$(VERSION).sif containers/toolkit.def

sqsh:
	@command -v $(ENROOT) >/dev/null 2>&1 || { echo "make sqsh needs enroot ('$(ENROOT)' not found), and the image from 'make container' in the local docker daemon"; exit 2; }
	$(ENROOT) import -o $(IMAGE)-$(VERSION).sqsh dockerd://$(IMAGE):$(VERSION)
