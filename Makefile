# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PARITY := $(VENV)/bin/parity
STAMP  := $(VENV)/.parity-installed
# CPU build of torch (a wheel on disk here); an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# The documented gate for the FP8 candidate (measured: README "Thresholds").
FP8_GATE := --min-cos 0.995 --threshold '*.mlp=0.99'

.PHONY: setup demo test gate lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The main job: the seed's bug 1 planted in the flash+FP8 candidate. Exit code 1 from
# parity means "divergence found"; the demo succeeds when it is found.
demo: setup
	@$(PARITY) diff --ref pytorch --cand flash_fp8 --inject nomask; rc=$$?; \
	echo "parity exit code $$rc (1 = divergence found, as planted)"; test $$rc -eq 1

# parity gates its own bundled candidates the way a user's CI would.
gate: setup
	$(PARITY) diff --ref pytorch --cand flash --json reports/gate_flash.json > reports/gate_flash.txt
	$(PARITY) diff --ref pytorch --cand flash_fp8 $(FP8_GATE) --json reports/gate_flash_fp8.json > reports/gate_flash_fp8.txt
	$(PARITY) weights --ref pytorch --cand flash_fp8 --json reports/gate_weights_flash_fp8.json > reports/gate_weights_flash_fp8.txt
	@echo "gate: flash and flash_fp8 pass (taps and weights)"

test: setup lint gate
	$(PY) -m pytest -q

# ruff is pinned in the test extra; its rules are in pyproject.toml.
lint: setup
	$(PY) -m ruff check parity probes tests bench examples tools

clean:
	rm -rf $(VENV) reports/*.h5 reports/*.json reports/*.txt
