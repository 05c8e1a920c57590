"""Data: sample records, tokenizers, processors and corpora."""
