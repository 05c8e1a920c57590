"""Greedy decoding with a KV cache (``omniweave eval``'s captions, the image decoder's drawings)
gives the tokens of decoding without one, which reruns the whole sequence at every step."""

from __future__ import annotations

import pytest
import torch

from omniweave.models.omni.decoders import ImageDecoder, greedy_decode
from omniweave.models.omni.model import OmniModel
from omniweave.models.omni.vq import save_vq, train_vq
from omniweave.train.evaluate import generate_text
from tests.models import hf_model

IMAGE, CODES, CODEBOOK = 500, 480, 16
VISION = {"type": "vision", "placeholder": IMAGE, "width": 32, "heads": 2, "patch": 4}


def _uncached(lm, embeds: torch.Tensor, steps: int, choose) -> list[int]:
    """The reference: the whole sequence through ``lm`` again for every new token."""
    table, chosen = lm.get_input_embeddings(), []
    for _ in range(steps):
        logits = lm(inputs_embeds=embeds, use_cache=False).logits[0, -1]
        token = choose(logits)
        if token is None:
            break
        chosen.append(token)
        embeds = torch.cat([embeds, table(torch.tensor([[token]]))], dim=1)
    return chosen


@pytest.fixture(params=["qwen2", "qwen3_moe"])
def omni(request):
    # Untied and widely spread weights, so that greedy decoding does not repeat one token.
    lm = hf_model(request.param, seed=1, tie_word_embeddings=False, initializer_range=0.2)
    return OmniModel.from_config(lm, {"image": VISION}).eval()


@torch.no_grad()
def test_cached_greedy_decoding_matches_rerunning_the_sequence(omni):
    prompt = torch.randint(0, 400, (1, 7))
    embeds = omni.foundation.get_input_embeddings()(prompt)
    argmax = lambda logits: int(logits.argmax())  # noqa: E731
    cached = greedy_decode(omni.foundation, {"input_ids": prompt}, 12, argmax)
    assert cached == _uncached(omni.foundation, embeds, 12, argmax)
    assert len(set(cached)) > 1  # a sequence, not one token repeated


@torch.no_grad()
def test_generated_text_with_an_image_stops_at_eos(omni):
    image = torch.rand(1, 8, 8)
    ids = [5, 6] + [IMAGE] * omni.encoders["image"].num_tokens(image) + [7]
    embeds = omni.embed(torch.tensor([ids]), {"image": [image]})
    reference = _uncached(omni.foundation, embeds, 10, lambda logits: int(logits.argmax()))
    eos = reference[4]
    assert generate_text(omni, ids, {"image": [image]}, {eos}, limit=10) == reference[:4]


def test_image_decoder_draws_the_uncached_codes(omni, tmp_path):
    vq, _ = train_vq(torch.rand(8, 1, 8, 8), steps=2, codebook_size=CODEBOOK, code_dim=8)
    save_vq(vq, str(tmp_path / "vq.pt"))
    decoder = ImageDecoder(64, str(tmp_path / "vq.pt"), CODES)
    prompt = [3, 9, 27]
    image = decoder.lm_generate(omni, prompt)
    lm = omni.foundation
    with torch.no_grad():
        codes = _uncached(
            lm,
            lm.get_input_embeddings()(torch.tensor([prompt])),
            decoder.grid[0] * decoder.grid[1],
            lambda logits: CODES + int(decoder.lm_head(logits).argmax()),
        )
        expected = decoder.vq.decode(torch.tensor(codes).view(1, *decoder.grid) - CODES)[0]
    torch.testing.assert_close(image, expected, rtol=0, atol=0)
    assert len(set(codes)) > 1
