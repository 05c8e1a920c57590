"""Turn records into token ids and labels with a local Hugging Face tokenizer."""

import os
import re

IGNORE_INDEX = -100
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | None):
    """Load a fast tokenizer from the local folder ``path`` (never from a hub)."""
    hint = (
        "set data.tokenizer_path to a local tokenizer folder "
        "(make one with `omniweave data train-tokenizer`)"
    )
    if path is None:
        raise ValueError(f"No tokenizer given: {hint}.")
    if not os.path.isdir(path):
        raise ValueError(f"Tokenizer folder {path} does not exist: {hint}.")
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ValueError(f"Tokenizer folder {path} has no tokenizer files: {hint}.")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(f"Tokenizer in {path} is not a fast tokenizer (needs tokenizer.json).")
    return tokenizer


def tokenize_record(record: dict, tokenizer, max_seq_len: int) -> dict:
    """Return ``input_ids`` and unshifted ``labels`` (-100 = no loss), cut to ``max_seq_len``."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    if record.get("text") is not None:
        input_ids, labels = _tokenize_text(record.get("prompt", ""), record["text"], tokenizer)
    else:
        input_ids, labels = _tokenize_messages(record["messages"], tokenizer)
    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]}


def _tokenize_text(prompt: str, text: str, tokenizer) -> tuple[list[int], list[int]]:
    """``prompt`` (no labels) then ``text`` (labelled), as the tokenizer would split them."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; text records need one")
    ids = tokenizer(prompt + text, add_special_tokens=True)["input_ids"]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    if prompt_ids[-1:] == [tokenizer.eos_token_id]:  # a tokenizer that ends every text
        prompt_ids = prompt_ids[:-1]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the end of 'prompt' and the start of 'text' merge into one token")
    return ids, [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]


def _tokenize_messages(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Label only the assistant turns: their content and the token that closes them."""
    full, spans = _assistant_spans(messages, tokenizer)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    for t, (start, _end) in enumerate(encoded["offset_mapping"]):
        if any(lo <= start < hi for lo, hi in spans):
            labels[t] = input_ids[t]
    return input_ids, labels


def _assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the chat template, and the character span of each
    assistant turn in it."""
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template; messages records need one")
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        # The turn is the text the assistant message adds after its generation prompt;
        # trailing whitespace (the newline between turns) is template, not target.
        spans.append((len(before), len(through.rstrip())))
    return full, spans


def _labelled_pieces(record: dict, tokenizer) -> list[tuple[str, bool]]:
    """A record's text in order, each piece with whether it is learned: ``prompt`` then
    ``text``, or a rendered conversation whose assistant turns are learned."""
    if record.get("text") is not None:
        return [(record.get("prompt", ""), False), (record["text"], True)]
    full, spans = _assistant_spans(record["messages"], tokenizer)
    pieces, at = [], 0
    for lo, hi in spans:
        pieces += [(full[at:lo], False), (full[lo:hi], True)]
        at = hi
    return [*pieces, (full[at:], False)]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def tokenize_multimodal(record: dict, tokenizer, omni, base_dir: str) -> dict:
    """A text or messages record with ``<modality>`` markers (``omni``: an ``OmniParts``). An
    encoder's marker becomes ``num_tokens(item)`` placeholder ids (never labels); a
    decoder's marker becomes the item's own tokens (``lm_encode``), which are labels where
    the text around them is (``text``, assistant turns). A text record ends with the
    end-of-text token, a conversation with its template's. Returns ``input_ids``,
    ``labels`` and the encoders' ``media`` tensors."""
    from omniweave.data.media import load_item

    parts = {**omni.encoders, **omni.decoders}
    paths = record.get("media") or {}
    unknown = sorted(set(paths) - set(parts))
    if unknown:
        raise ValueError(f"media of unknown modality {unknown}; the model has {sorted(parts)}")
    items = {m: [load_item(parts[m], base_dir, p) for p in paths.get(m, [])] for m in parts}
    segments = [
        (piece, labelled)
        for text, labelled in _labelled_pieces(record, tokenizer)
        for piece in _segments(text, parts)
    ]
    ids, labels, used = [], [], dict.fromkeys(parts, 0)
    for (piece, modality), labelled in segments:
        if modality is None:
            tokens = tokenizer(piece, add_special_tokens=False)["input_ids"]
        elif used[modality] == len(items[modality]):
            raise ValueError(f"more <{modality}> markers than media files ({len(items[modality])})")
        else:
            item = items[modality][used[modality]]
            used[modality] += 1
            if modality in omni.encoders:
                count = omni.encoders[modality].num_tokens(item)
                if not count:
                    path = paths[modality][used[modality] - 1]
                    raise ValueError(f"{path}: too small for the {modality} encoder (no tokens)")
                before, after = omni.brackets.get(modality, ([], []))
                marked = before + [omni.placeholders[modality]] * count + after
                ids += marked
                labels += [IGNORE_INDEX] * len(marked)
                continue
            tokens = omni.decoders[modality].lm_encode([item])[0]
        ids += tokens
        labels += tokens if labelled else [IGNORE_INDEX] * len(tokens)
    unused = [m for m in parts if used[m] != len(items[m])]
    if unused:
        raise ValueError(f"media without a <marker> in the text: {unused}")
    if record.get("text") is not None:
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    media = {m: items[m] for m in omni.encoders}
    return {"input_ids": ids, "labels": labels, "media": media}


def _segments(text: str, modalities) -> list[tuple[str, str | None]]:
    """``text`` cut at its ``<modality>`` markers: (text, None) and ("", modality) pieces."""
    pieces = re.split("<(" + "|".join(map(re.escape, modalities)) + ")>", text)
    return [("", piece) if index % 2 else (piece, None) for index, piece in enumerate(pieces)]
