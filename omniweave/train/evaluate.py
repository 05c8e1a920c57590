"""``omniweave eval RUN DATA``: score a trained OmniModel on the held-out prompts of
``DATA/eval.jsonl`` (written by ``omniweave data build-demo``) in one process.

Text tasks are decoded greedily and scored by the digit word they name; drawn digits
are scored by a scikit-learn classifier trained on ``load_digits``' training images.
Writes ``RUN/eval.json`` and ``RUN/generated.png`` (the drawn digits).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from omniweave.config import load_config
from omniweave.data.demo import EVAL_DIGITS
from omniweave.data.demo_sources import DIGIT_WORDS, handwritten_digits
from omniweave.data.processors import load_tokenizer, tokenize_multimodal
from omniweave.data.tokenizers import IM_END
from omniweave.models.loader import load_hf_config
from omniweave.models.omni.decoders import greedy_decode
from omniweave.models.omni.model import OmniModel, OmniParts, build_decoders, import_plugins
from omniweave.models.weights import load_full_weights


def load_trained(run: str) -> tuple[OmniModel, OmniParts, object]:
    """The run's OmniModel (unsharded, eval mode) with its final weights, and its tokenizer."""
    cfg = load_config(os.path.join(run, "config.yaml"))
    omni = cfg.model.omni
    import_plugins(omni)
    hf_config = load_hf_config(cfg.model.path, cfg.model.config, "sdpa")
    foundation = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model = OmniModel.from_config(foundation, omni["encoders"])
    load_full_weights(model, os.path.join(run, "final"))
    text = hf_config.get_text_config()
    decoders = build_decoders(text.hidden_size, text.vocab_size, omni.get("decoders", {}))
    parts = OmniParts(dict(model.encoders), model.placeholders, decoders)
    return model.eval(), parts, load_tokenizer(cfg.data.tokenizer_path)


def generate_text(model: OmniModel, ids: list[int], media: dict, stops: set, limit: int = 16):
    """Greedy continuation of ``ids`` (with media at its placeholders) up to a token of
    ``stops``."""

    def choose(logits: torch.Tensor) -> int | None:
        token = int(logits.argmax())
        return None if token in stops else token

    with torch.no_grad():
        embeds = model.embed(torch.tensor([ids]), media)
    return greedy_decode(model.foundation, {"inputs_embeds": embeds}, limit, choose)


def named_digit(text: str) -> int | None:
    """The first digit word in ``text``, as a number."""
    for word in text.replace(".", " ").split():
        if word in DIGIT_WORDS:
            return DIGIT_WORDS.index(word)
    return None


def digit_classifier() -> tuple[object, float]:
    """An SVM on the training images of ``load_digits`` and its held-out accuracy."""
    from sklearn.svm import SVC

    images, labels = handwritten_digits()
    features = images.reshape(len(images), -1) / 255.0
    split = len(images) - EVAL_DIGITS
    classifier = SVC(gamma="scale").fit(features[:split], labels[:split])
    return classifier, float(classifier.score(features[split:], labels[split:]))


def prompt_tokens(prompt: dict, tokenizer, parts: OmniParts, data: str) -> tuple[list, dict]:
    """An eval prompt's ids (its conversation and the generation prompt, as the chat
    template renders them) and its media tensors."""
    chat = tokenizer.apply_chat_template(
        prompt["messages"], add_generation_prompt=True, tokenize=False
    )
    tokens = tokenize_multimodal(
        {"text": chat, "media": prompt.get("media", {})}, tokenizer, parts, data
    )
    return tokens["input_ids"][:-1], tokens["media"]  # without the end-of-text token


def turn_ends(tokenizer) -> set[int]:
    """The tokens that may close an assistant turn: end of text, and ChatML's ``<|im_end|>``
    where the vocabulary has it."""
    ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)}
    return ends - {None, tokenizer.unk_token_id}


def evaluate(run: str, data: str) -> dict:
    """Score every prompt of ``data/eval.jsonl``; write ``eval.json`` and ``generated.png``."""
    start = time.perf_counter()
    model, parts, tokenizer = load_trained(run)
    with open(os.path.join(data, "eval.jsonl")) as f:
        prompts = [json.loads(line) for line in f]
    classifier, classifier_accuracy = digit_classifier()
    scores: dict[str, list[bool]] = {}
    drawings, examples = [], {}
    for prompt in prompts:
        task = prompt["task"]
        ids, media = prompt_tokens(prompt, tokenizer, parts, data)
        if task == "draw":
            decoder = next(iter(parts.decoders.values()))
            image = decoder.lm_generate(model, ids)[0].clamp(0, 1).numpy()
            predicted = int(classifier.predict(image.reshape(1, -1))[0])
            drawings.append((prompt["label"], image))
            scores.setdefault("draw", []).append(predicted == prompt["label"])
            continue
        generated = generate_text(model, ids, media, turn_ends(tokenizer))
        text = tokenizer.decode(generated).strip()
        examples.setdefault(task, []).append({"label": prompt["label"], "generated": text})
        scores.setdefault(task, []).append(named_digit(text) == prompt["label"])
        if "answer" in prompt:
            scores.setdefault(f"{task}_exact", []).append(text == prompt["answer"])
    names = {
        "caption": "digit_captioning_accuracy",
        "asr": "spoken_digit_accuracy",
        "video": "video_digit_accuracy",
        "video_exact": "video_caption_exact_match",
        "draw": "generated_digit_accuracy",
    }
    result = {names[task]: float(np.mean(hits)) for task, hits in scores.items()}
    result |= {f"{names[task]}_n": len(hits) for task, hits in scores.items()}
    result["digit_classifier_accuracy_on_real_digits"] = classifier_accuracy
    result["examples"] = {task: found[:10] for task, found in examples.items()}
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(run, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    if drawings:
        save_grid(drawings, os.path.join(run, "generated.png"))
    return result


def save_grid(drawings: list[tuple[int, np.ndarray]], path: str, scale: int = 8) -> None:
    """The drawn digits side by side, in prompt order, each ``scale`` times enlarged."""
    from PIL import Image

    tiles = [np.kron(image, np.ones((scale, scale))) for _, image in drawings]
    strip = np.concatenate([np.pad(t, 2, constant_values=0.5) for t in tiles], axis=1)
    Image.fromarray((strip * 255).astype(np.uint8)).save(path)
