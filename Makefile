PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATA := .data

.PHONY: test demo lint clean

$(VENV)/.done: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(VENV): $(VENV)/.done

test: $(VENV)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q

demo: $(VENV) $(DATA)/tokenizer
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
