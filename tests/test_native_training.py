"""A native HF multimodal model (Qwen2-VL as shipped) trained by ``omniweave train`` on image
records: sharded and sequence-parallel runs against HF's own single-process model, which
computes its multimodal RoPE positions itself, one sample per forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed
from tests.models import tiny_qwen2_vl

STEPS, GLOBAL_BATCH, LR = 3, 4, 1e-3
IMAGE_TOKEN = 512  # above the corpus BPE's 512 ids
PROCESSOR = {"size": {"shortest_edge": 64, "longest_edge": 576}}  # 8x8 to 24x24 pixels


@pytest.fixture(scope="module")
def vl_data(tmp_path_factory, corpus) -> dict[str, str]:
    """12 records: images of 3 sizes with a caption, and plain text. In step 1 the samples
    of one data-parallel rank (of 2) have no image, in step 2 none of any rank."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vl")
    rng = np.random.default_rng(0)
    words = ["red", "blue", "square", "noise", "a", "picture", "of", "the", "cat"]
    with_image = [False, True, False, True, False, False, False, False, True, True, False, True]
    sizes = [(16, 24), (24, 24), (8, 16)]
    lines = []
    for index, image in enumerate(with_image):
        caption = " ".join(rng.choice(words, size=3 + index % 4))
        if not image:
            lines.append({"text": caption})
            continue
        height, width = sizes[index % 3]
        name = f"{index}.png"
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
        lines.append(
            {"prompt": "look <image> :", "text": " " + caption, "media": {"image": [name]}}
        )
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    model_dir = root / "model"
    tiny_qwen2_vl(seed=3, image_token=IMAGE_TOKEN).save_pretrained(model_dir)
    return {**corpus, "train_path": str(data), "model_path": str(model_dir), "out": str(root)}


def _samples(data: dict):
    from omniweave.config import load_config
    from omniweave.data.loader import load_samples
    from omniweave.data.processors import load_tokenizer
    from omniweave.models.loader import load_hf_config
    from omniweave.models.native import native_parts

    cfg = load_config(None, [f"--model.path={data['model_path']}"])
    config = load_hf_config(cfg.model.path, None, "sdpa")
    parts = native_parts(config, cfg.model.path, PROCESSOR)
    tokenizer = load_tokenizer(data["tokenizer_path"])
    samples, _, _ = load_samples(data["train_path"], tokenizer, 256, "error", parts)
    return samples


def _reference(data: dict) -> list[tuple[float, float]]:
    """HF's model as shipped: one sample per forward, its own M-RoPE positions (from
    ``mm_token_type_ids``), torch's AdamW and clip_grad_norm_."""
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(data["model_path"], dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    samples = _samples(data)
    results = []
    for step in range(STEPS):
        batch = samples[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
        count = sum(sum(label != -100 for label in s.labels[1:]) for s in batch)
        total = 0.0
        for sample in batch:
            ids = torch.tensor([sample.input_ids])
            images = {}
            if sample.media["image"]:
                images = {
                    "pixel_values": torch.cat([i.pixel_values for i in sample.media["image"]]),
                    "image_grid_thw": torch.cat([i.grid_thw for i in sample.media["image"]]),
                }
            types = (ids == IMAGE_TOKEN).int()
            logits = model(input_ids=ids, mm_token_type_ids=types, **images).logits[0, :-1]
            targets = torch.tensor(sample.labels[1:])
            loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / count
            loss.backward()
            total += loss.item()
        for param in model.parameters():  # a step without images: the tower's gradients are
            if param.grad is None:  # zero (its Adam momentum still moves it), as when sharded
                param.grad = torch.zeros_like(param)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        results.append((total, norm.item()))
    return results


def _train(data: dict, layouts: dict[str, list[str]]) -> dict[str, list[tuple[float, float]]]:
    from omniweave.config import load_config
    from omniweave.train.trainer import Trainer

    curves = {}
    for name, layout in layouts.items():
        settings = {
            "model.path": data["model_path"],
            "model.processor": PROCESSOR,
            "data.train_path": data["train_path"],
            "data.tokenizer_path": data["tokenizer_path"],
            "data.max_seq_len": 256,
            "data.shuffle": False,
            "train.output_dir": f"{data['out']}/{name}",
            "train.max_steps": STEPS,
            "train.global_batch_size": GLOBAL_BATCH,
            "train.lr": LR,
            "train.lr_schedule": "constant",
            "train.weight_decay": 0.0,
            "train.peak_flops": 1e12,
            "checkpoint.every_steps": 0,
            "log.progress": False,
            "log.tensorboard": False,
            "log.plot": False,
        }
        overrides = [f"--{key}={json.dumps(value)}" for key, value in settings.items()]
        rows = Trainer(load_config(None, overrides + layout)).run()
        curves[name] = [(row["loss"], row["grad_norm"]) for row in rows]
    return curves


def test_qwen2_vl_trains_sharded_and_sequence_parallel_like_hf(vl_data):
    reference = _reference(vl_data)
    layouts = {
        "dp2_sp2_packed": [
            "--parallel.dp_shard=2",
            "--parallel.sp=2",
            "--data.packing=true",
            "--train.micro_batch_size=2",
        ],
        "dp4_padded": ["--parallel.dp_shard=4", "--train.micro_batch_size=1"],
    }
    per_rank = run_distributed(_train, 4, vl_data, layouts)
    for name in layouts:
        curve = per_rank[0][name]
        assert len(curve) == STEPS
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(
            zip(curve, reference, strict=True)
        ):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"{name}: loss at step {step + 1}"
            assert norm == pytest.approx(ref_norm, rel=1e-4), f"{name}: grad norm, step {step + 1}"
