# `make demo` runs the main job on the embedded shapes set; `make test` runs the whole suite.
# Both create .venv on first use and reinstall only when setup.cfg changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_WORKDIR ?= demo_workdir
# The demo runs on the CPU by default; on a TPU VM use `make demo JAX_PLATFORMS=tpu`.
JAX_PLATFORMS ?= cpu

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# clip-benchmark only provides the caption corpus for the tokenizer: its own dependencies
# (torch with CUDA, open_clip, ...) are not needed, hence --no-deps.
$(VENV)/.installed-demo: setup.cfg pyproject.toml | $(PY)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps clip-benchmark==1.6.2
	touch $@

# dall-e and clip-anytorch are the references the dVAE and CLIP parity tests compare against;
# their declared dependencies (torchvision, blobfile, ...) are not needed to load the modules
# the tests use (dall_e; clip/model.py and clip/simple_tokenizer.py from their files), hence --no-deps.
$(VENV)/.installed-test: $(VENV)/.installed-demo
	$(PIP) install -q -e ".[test,aot,convert]"
	$(PIP) install -q --no-deps dall-e==0.1 clip-anytorch==2.6.0
	touch $@

demo: $(VENV)/.installed-demo
	JAX_PLATFORMS=$(JAX_PLATFORMS) $(PY) -m mmjax.main --config=mmjax/configs/shapes_demo.py --workdir=$(DEMO_WORKDIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(VENV)/.installed-test
	$(PY) bench/input_pipeline.py

clean:
	rm -rf $(VENV) $(DEMO_WORKDIR)
