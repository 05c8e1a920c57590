"""``omniweave generate``: continue a prompt with a trained model, greedy or sampled.

The model comes from an HF folder (``config.json``), an OmniModel export
(``omni_index.json``), a run folder (its newest intact checkpoint) or one checkpoint folder
(the run's ``config.yaml`` two levels up says what model it holds); a run's ``final/``
weights are used where it has them. Decoding runs in this
process on the unsharded model with a KV cache.
"""

from __future__ import annotations

import os

import torch

from omniweave.config import load_config
from omniweave.data.processors import load_tokenizer, tokenize_multimodal
from omniweave.models.loader import load_hf_config
from omniweave.models.native import native_parts, prompt_inputs
from omniweave.models.omni.decoders import greedy_decode
from omniweave.models.omni.model import OmniModel, OmniParts, build_decoders, import_plugins
from omniweave.models.registry import model_class, model_from_config
from omniweave.models.weights import load_full_weights
from omniweave.train.checkpoint import resolve_resume
from omniweave.train.evaluate import turn_ends
from omniweave.train.export import INDEX, load_omni, plain_state


def load_source(source: str) -> tuple[torch.nn.Module, object, OmniParts | None]:
    """The model (eval mode), its tokenizer and, for an OmniModel, its parts."""
    if os.path.isfile(os.path.join(source, INDEX)):
        model = load_omni(source)
        return model, load_tokenizer(source), _parts(model, {})
    if os.path.isfile(os.path.join(source, "config.json")):
        config = load_hf_config(source, None, "sdpa")
        model = model_class(config.model_type).from_pretrained(source, dtype=torch.float32)
        return model.eval(), load_tokenizer(source), native_parts(config, source, None)
    run, checkpoint = source, None
    if not os.path.isfile(os.path.join(source, "config.yaml")):  # OUTPUT/checkpoints/step_N
        run, checkpoint = os.path.dirname(os.path.dirname(os.path.abspath(source))), source
    if not os.path.isfile(os.path.join(run, "config.yaml")):
        raise ValueError(
            f"'{source}' is not an HF model folder (config.json), an OmniModel export "
            f"({INDEX}), a run folder (config.yaml) or a checkpoint of one."
        )
    final = os.path.join(run, "final")
    if checkpoint is None and not os.path.isdir(final):
        checkpoint = resolve_resume("auto", run)
        if checkpoint is None:
            raise ValueError(
                f"run '{run}' has neither final weights (train.save_final) nor a checkpoint."
            )
    cfg = load_config(os.path.join(run, "config.yaml"))
    hf_config = load_hf_config(cfg.model.path, cfg.model.config, "sdpa")
    model = model_from_config(hf_config)
    omni = cfg.model.omni
    if omni:
        import_plugins(omni)
        model = OmniModel.from_config(model, omni["encoders"])
    if checkpoint:
        model.load_state_dict(plain_state(checkpoint, cfg, hf_config))
    else:
        load_full_weights(model, final)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    if omni:
        return model.eval(), tokenizer, _parts(model, omni.get("decoders", {}))
    return model.eval(), tokenizer, native_parts(hf_config, cfg.model.path, cfg.model.processor)


def _parts(model: OmniModel, decoders: dict) -> OmniParts:
    text = model.foundation.config.get_text_config()
    built = build_decoders(text.hidden_size, text.vocab_size, decoders)
    return OmniParts(dict(model.encoders), model.placeholders, built)


def generate(
    source: str,
    prompt: str,
    max_new_tokens: int = 64,
    chat: bool = False,
    media: dict[str, list[str]] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """The continuation of ``prompt`` (greedy when ``temperature`` is 0), as text. ``media``:
    modality -> files, for an OmniModel's encoders or a native multimodal model; a prompt
    without a ``<modality>`` marker gets one per file in front."""
    if not prompt:
        raise ValueError("--prompt is empty; give the text to continue.")
    model, tokenizer, parts = load_source(source)
    media = {modality: files for modality, files in (media or {}).items() if files}
    for modality in media:
        if parts is None or modality not in parts.encoders:
            has = sorted(parts.encoders) if parts else "none"
            raise ValueError(f"--{modality}: the model's media encoders are {has}.")
    markers = "".join(
        f"<{modality}>" * len(files)
        for modality, files in media.items()
        if f"<{modality}>" not in prompt
    )
    text = markers + prompt
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("--chat: the tokenizer has no chat template; leave --chat out.")
        messages = [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    stops = turn_ends(tokenizer)
    generator = torch.Generator().manual_seed(seed)

    def choose(logits: torch.Tensor) -> int | None:
        token = (
            int(logits.argmax())
            if temperature == 0
            else _sample(logits, temperature, top_p, generator)
        )
        return None if token in stops else token

    with torch.no_grad():
        if parts is None:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            chosen = greedy_decode(
                model, {"input_ids": torch.tensor([ids])}, max_new_tokens, choose
            )
        else:
            files = {
                modality: [os.path.abspath(p) for p in paths] for modality, paths in media.items()
            }
            record = {"text": text, "media": files}
            tokens = tokenize_multimodal(record, tokenizer, parts, os.getcwd())
            ids = torch.tensor([tokens["input_ids"][:-1]])  # without the end-of-text token
            if isinstance(model, OmniModel):
                embeds = model.embed(ids, tokens["media"])
                inputs = {"inputs_embeds": embeds}
                chosen = greedy_decode(model.foundation, inputs, max_new_tokens, choose)
            else:  # a native model: transformers places its M-RoPE positions, step by step
                inputs = prompt_inputs(model.config, parts, ids, tokens["media"])
                chosen = _hf_generate(model, ids, inputs, max_new_tokens, choose, stops)
    return tokenizer.decode(chosen, skip_special_tokens=True)


def _hf_generate(model, ids: torch.Tensor, inputs: dict, steps: int, choose, stops) -> list[int]:
    """``model.generate`` with each token picked by ``choose`` (None: stop), for the models
    whose positions only transformers' ``generate`` knows how to advance."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Chosen(LogitsProcessor):
        def __call__(self, input_ids, scores):
            token = choose(scores[0])
            forced = torch.full_like(scores, float("-inf"))
            forced[0, min(stops) if token is None else token] = 0.0
            return forced

    out = model.generate(
        ids, **inputs, max_new_tokens=steps, do_sample=False,
        logits_processor=LogitsProcessorList([Chosen()]), eos_token_id=sorted(stops) or None,
    )  # fmt: skip
    return [token for token in out[0, ids.shape[1] :].tolist() if token not in stops]


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """A token drawn from softmax(logits / temperature), cut to the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p  # the smallest set reaching top_p
    ordered = ordered * keep
    return int(order[torch.multinomial(ordered / ordered.sum(), 1, generator=generator)])
