PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATA := .data
OMNI := $(DATA)/omni
DEBROOT := $(DATA)/deb/root

.PHONY: test demo demo-text lint clean

$(VENV)/.done: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,demo,bench]'
	touch $@

$(VENV): $(VENV)/.done

test: $(VENV) $(DATA)/tokenizer
	OMP_NUM_THREADS=1 $(BIN)/pytest -q --durations=15

# The omni demo: build the data, its BPE and VQ tokenizers, train with FSDP,
# SP and EP in 2 processes, then score held-out samples (runs/omni_demo/eval.json).
demo: $(VENV) $(OMNI)/tokenizer $(OMNI)/vq.pt
	OMP_NUM_THREADS=1 $(BIN)/omniweave train configs/omni_demo.yaml --nproc 2
	OMP_NUM_THREADS=2 $(BIN)/omniweave eval runs/omni_demo $(OMNI)

# The text-only demo: a 4-layer Qwen2 on Debian's fortunes, 2x2 HSDP.
demo-text: $(VENV) $(DATA)/tokenizer
	OMP_NUM_THREADS=1 $(BIN)/omniweave train configs/demo.yaml --nproc 4

lint: $(VENV)
	$(BIN)/ruff check omniweave tests bench
	$(BIN)/ruff format --check omniweave tests bench

clean:
	rm -rf $(VENV) $(DATA) runs

# Demo corpus: Debian's fortune quotes, fetched without root (apt-get download + dpkg-deb -x).
$(DATA)/fortunes.jsonl: | $(VENV)
	mkdir -p $(DATA)/deb/root
	cd $(DATA)/deb && apt-get download fortunes-min fortunes
	for deb in $(DATA)/deb/*.deb; do dpkg-deb -x $$deb $(DATA)/deb/root; done
	$(BIN)/omniweave data fortunes --out $@ $(DATA)/deb/root/usr/share/games/fortunes

$(DATA)/tokenizer: $(DATA)/fortunes.jsonl | $(VENV)
	$(BIN)/omniweave data train-tokenizer --input $< --vocab-size 4096 --out $@

# Omni demo sources. Data packages are unpacked without root (apt-get download + dpkg-deb);
# the speech synthesisers are installed where apt-get may install, skipped otherwise.
DEMO_PACKAGES := fortunes-min fortunes fonts-noto-color-emoji asterisk-core-sounds-en \
  asterisk-core-sounds-en-wav pocketsphinx-testdata
SPEECH_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k

$(DEBROOT)/.omni:
	mkdir -p $(DEBROOT)
	for pkg in $(DEMO_PACKAGES); do \
	  (cd $(DATA)/deb && apt-get download -q $$pkg) || echo "demo: skipped $$pkg (apt-get download failed)"; \
	done
	for deb in $(DATA)/deb/*.deb; do [ ! -e $$deb ] || dpkg-deb -x $$deb $(DEBROOT); done
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q $(SPEECH_PACKAGES) >/dev/null || echo "demo: could not install $(SPEECH_PACKAGES)"; \
	else echo "demo: skipped installing $(SPEECH_PACKAGES) (needs root and apt-get)"; fi
	touch $@

$(OMNI)/train.jsonl: $(DEBROOT)/.omni omniweave/data/demo.py omniweave/data/demo_sources.py | $(VENV)
	$(BIN)/omniweave data build-demo $(OMNI) --root $(DEBROOT)

$(OMNI)/tokenizer: $(OMNI)/train.jsonl
	$(BIN)/omniweave data train-tokenizer --input $< --vocab-size 2048 --chat-template compact --out $@

$(OMNI)/vq.pt: $(OMNI)/train.jsonl
	$(BIN)/omniweave data train-vq $(OMNI)/images/train --out $@ --codebook-size 64 --downsample 1 --steps 1000
