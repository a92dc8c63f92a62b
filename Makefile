# deepfleet — see README.md. Every target is a thin wrapper around the `deepfleet` CLI.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# V=1: everything the libraries print too (it always goes to the job logs)
DF := $(VENV)/bin/deepfleet$(if $(filter 1,$(V)), -v)
FLAVOR ?= cpu
BASE_IMAGE ?= local
LAB_NODES ?= 2
LAB_DIR := .lab

# Without NODES, commands aim at the simulated LAN when it is up.
ifeq ($(strip $(NODES)),)
ifneq ($(wildcard $(LAB_DIR)/nodes),)
NODES := $(shell cat $(LAB_DIR)/nodes)
SSH_CONFIG ?= $(LAB_DIR)/ssh_config
COMPOSE_OVERRIDE ?= $(LAB_DIR)/compose.override.yml
endif
endif
UP_ARGS := $(if $(SSH_CONFIG),--ssh-config $(SSH_CONFIG)) \
           $(if $(COMPOSE_OVERRIDE),--compose-override $(COMPOSE_OVERRIDE)) \
           $(if $(CPU_SLOTS),--cpu-slots $(CPU_SLOTS)) $(if $(IMAGE),--image $(IMAGE))
TRAIN_ARGS := $(if $(MODEL),--model $(MODEL)) $(if $(DATA),--data $(DATA)) \
              $(if $(CONFIG),--config $(CONFIG)) $(if $(RUN),--run $(RUN)) \
              $(if $(STEPS),--steps $(STEPS)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
              $(if $(SLOTS),--slots "$(SLOTS)") $(if $(SAVE_EVERY),--save-every $(SAVE_EVERY)) \
              $(if $(filter 1,$(RESUME)),--resume)
INFER_ARGS := $(if $(MODEL),--model $(MODEL)) $(if $(RUN),--run $(RUN)) \
              $(if $(PROMPTS),--prompts $(PROMPTS)) $(if $(OUTPUT),--output $(OUTPUT)) \
              $(if $(MAX_NEW_TOKENS),--max-new-tokens $(MAX_NEW_TOKENS)) \
              $(if $(SLOTS),--slots "$(SLOTS)") $(if $(MODE),--mode $(MODE))
SERVE_ARGS := $(if $(MODEL),--model $(MODEL)) $(if $(RUN),--run $(RUN)) \
              $(if $(PORT),--port $(PORT)) $(if $(LISTEN),--listen $(LISTEN)) \
              $(if $(SLOTS),--slots "$(SLOTS)") $(if $(filter 1,$(STOP)),--stop)
PROMPT ?= The lighthouse keeper

.PHONY: setup docker venv images lab-up lab-down up status train infer serve logs shell down \
        doctor \
        fetch-model \
        demo test bench push-image \
        test-unit test-slow test-node test-integration lint fmt clean

setup: docker venv

docker:
	@scripts/ensure-docker.sh

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

images: setup
	$(DF) build-image --flavor $(FLAVOR) --base-image $(BASE_IMAGE)

# LAB_CPUS="0.9 0.5 0.3" LAB_MEM="6g 4g 2g": each machine's CPU quota and memory limit
# LAB_LINK=200mbit: each machine's link (and the operator's) capped, as on a real LAN
# LAB_REGISTRY=1: the lab's registry on this machine; LAB_SLURM=2: Slurm on lab1, lab2
lab-up: setup
	$(VENV)/bin/python docker/lab.py up --nodes $(LAB_NODES) --base-image $(BASE_IMAGE) \
	  $(if $(LAB_CPUS),--cpus "$(LAB_CPUS)") $(if $(LAB_MEM),--mem "$(LAB_MEM)") \
	  $(if $(LAB_LINK),--link "$(LAB_LINK)") $(if $(filter 1,$(LAB_REGISTRY)),--registry) \
	  $(if $(LAB_SLURM),--slurm $(LAB_SLURM))

lab-down: venv
	$(VENV)/bin/python docker/lab.py down

up: venv
	$(DF) up $(UP_ARGS) $(NODES)

status: venv
	$(DF) status

train: venv
	$(DF) train $(TRAIN_ARGS)

infer: venv
	$(DF) infer $(INFER_ARGS) $(if $(PROMPTS),,--prompt "$(PROMPT)")

# MODEL=dir|RUN=name PORT=8000 LISTEN=0.0.0.0 (with DEEPFLEET_API_KEY set); STOP=1 ends it
serve: venv
	$(DF) serve $(SERVE_ARGS)

# MACHINE=lab2 one machine only, FOLLOW=1 keep printing, JOB=run a named job's logs
logs: venv
	$(DF) logs $(MACHINE) $(if $(filter 1,$(FOLLOW)),-f) $(if $(JOB),--job $(JOB))

shell: venv
	$(DF) shell $(or $(MACHINE),$(firstword $(NODES)))

down: venv
	$(DF) down

doctor: venv
	$(DF) doctor $(if $(SSH_CONFIG),--ssh-config $(SSH_CONFIG)) $(NODES)

fetch-model: venv
	$(DF) fetch-model $(if $(RUN),--run $(RUN)) $(if $(DEST),--dest $(DEST))

bench: setup
	scripts/bench.sh

# REGISTRY=host:port [CERT_DIR=dir-with-ca.crt] [FLAVOR=cuda]: push, record the digest
push-image: venv
	$(DF) push-image $(REGISTRY) --flavor $(FLAVOR) $(if $(CERT_DIR),--cert-dir $(CERT_DIR))

demo: setup
	@scripts/demo.sh

test: setup
	scripts/test.sh

test-unit: venv
	$(VENV)/bin/pytest -q tests/unit

# The cases `make test` leaves out to stay in CI's time (marker slow: the node image moved
# whole between the lab's machines again, e.g. pulled from the lab registry by all three)
test-slow: images
	$(VENV)/bin/pytest -q -m slow tests/integration

# The node image's tests inside deepfleet/$(FLAVOR) (builds it first): make test-node FLAVOR=cuda
test-node: images
	scripts/test-node.sh $(FLAVOR)

# ruff, then the layers of pyproject.toml's [tool.importlinter] (which folder may import which)
lint: venv
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check . && $(VENV)/bin/lint-imports

fmt: venv
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean: lab-down
	rm -rf .deepfleet outputs images/context
