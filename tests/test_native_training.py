"""Native HF multimodal models (Qwen2-VL, Qwen2.5-VL, the Qwen2.5-Omni thinker, as shipped)
trained by ``omniweave train`` on image, video and audio records: sharded and
sequence-parallel runs against HF's own single-process model, which computes its multimodal
RoPE positions itself, one sample per forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed
from tests.models import IN_PROCESS_DATA

STEPS, GLOBAL_BATCH, LR = 3, 4, 1e-3
FIRST_SPECIAL = 512  # the models' media tokens come after the corpus BPE's 512 ids
PROCESSOR = {"size": {"shortest_edge": 64, "longest_edge": 576}}  # 8x8 to 24x24 pixels
# Media of the 12 records, in order. At 2 data-parallel ranks (samples 0, 2 | 1, 3 in step 1):
# Qwen2-VL: rank 0 has a video and no image in step 1, only a video (and no rank an image) in
# step 2, both in step 3; Qwen2.5-VL: rank 1 has only a video in step 1, nothing in step 2
# (its windowed tower runs on dummy items). The thinker: rank 0 has only images and rank 1
# only audio in step 1, rank 1 has only a video (and no image) in step 2, neither in step 3.
MEDIA = {
    "qwen2_vl": [
        "", "image", "video", "image", "", "", "video", "", "image", "image", "image video",
        "image",
    ],
    "qwen2_5_vl": [
        "image", "", "image", "video", "", "", "image", "", "image", "image", "", "video",
    ],
    "qwen2_5_omni_thinker": [
        "image", "audio", "", "audio", "image audio", "video", "", "", "audio", "", "image video",
        "",
    ],
}  # fmt: skip
# The argument of the clips' seconds per temporal patch (M-RoPE), where the family has one.
SECONDS_PER_GRID = {
    "qwen2_5_vl": "second_per_grid_ts",
    "qwen2_5_omni_thinker": "video_second_per_grid",
}
EXTENSIONS = {"image": "png", "video": "gif", "audio": "wav"}
MODELS = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "tiny_qwen2_vl", "image_token"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "tiny_qwen2_5_vl", "image_token"),
    "qwen2_5_omni_thinker": (
        "Qwen2_5OmniThinkerForConditionalGeneration", "tiny_qwen2_5_omni_thinker", "audio_token",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def native_data(tmp_path_factory, corpus) -> dict[str, dict[str, str]]:
    """Per family: records with captioned images of 3 sizes, tones of 3 lengths (16 kHz),
    clips of 3 to 5 frames (GIF) and plain text (see ``MEDIA``), and the tiny model saved
    by ``save_pretrained``."""
    import soundfile
    from PIL import Image

    from tests import models

    root = tmp_path_factory.mktemp("native")
    rng = np.random.default_rng(0)
    words = ["red", "blue", "square", "noise", "a", "picture", "of", "the", "cat"]
    sizes = [(16, 24), (24, 24), (8, 16)]
    data = {}
    for family, media in MEDIA.items():
        lines = []
        for index, kinds in enumerate(media):
            caption = " ".join(rng.choice(words, size=3 + index % 4))
            files = {}
            for kind in kinds.split():
                name = f"{family}_{index}.{EXTENSIONS[kind]}"
                if kind == "image":
                    pixels = rng.integers(0, 256, (*sizes[index % 3], 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / name)
                elif kind == "video":
                    frames = rng.integers(0, 256, (3 + index % 3, *sizes[index % 3], 3))
                    clip = [Image.fromarray(frame.astype(np.uint8)) for frame in frames]
                    clip[0].save(root / name, save_all=True, append_images=clip[1:], duration=250)
                else:
                    seconds = np.arange(1600 * (2 + index % 3)) / 16_000
                    soundfile.write(root / name, np.sin(2e3 * seconds * (1 + index)), 16_000)
                files[kind] = [name]
            if not files:
                lines.append({"text": caption})
                continue
            prompt = " ".join(f"<{kind}>" for kind in files) + " :"
            lines.append({"prompt": prompt, "text": " " + caption, "media": files})
        path = root / f"{family}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        _, builder, token = MODELS[family]
        model_dir = root / family
        getattr(models, builder)(seed=3, **{token: FIRST_SPECIAL}).save_pretrained(model_dir)
        data[family] = {
            **corpus, "train_path": str(path), "model_path": str(model_dir), "out": str(root),
        }  # fmt: skip
    return data


def _samples(data: dict, model_path: str | None = None, processor: dict | None = PROCESSOR):
    """The records as loaded for the model at ``model_path`` (default: the tiny model's)."""
    from omniweave.data.loader import load_samples
    from omniweave.data.processors import load_tokenizer
    from omniweave.models.loader import load_hf_config
    from omniweave.models.native import native_parts

    model_path = model_path or data["model_path"]
    config = load_hf_config(model_path, None, "sdpa")
    parts = native_parts(config, model_path, processor)
    tokenizer = load_tokenizer(data["tokenizer_path"])
    samples, _, _ = load_samples(data["train_path"], tokenizer, 256, "error", parts)
    assert len(samples) == GLOBAL_BATCH * STEPS
    return samples


def _hf_media_inputs(media: dict) -> dict:
    """A sample's media as its HF processor gives them to the model."""
    inputs = {}
    if media.get("image"):
        inputs["pixel_values"] = torch.cat([i.pixel_values for i in media["image"]])
        inputs["image_grid_thw"] = torch.cat([i.grid_thw for i in media["image"]])
    if media.get("video"):
        inputs["pixel_values_videos"] = torch.cat([v.pixel_values for v in media["video"]])
        inputs["video_grid_thw"] = torch.cat([v.grid_thw for v in media["video"]])
    if media.get("audio"):
        (audio,) = media["audio"]
        inputs["input_features"] = audio.features[None]
        inputs["feature_attention_mask"] = torch.ones(1, audio.features.shape[-1], dtype=int)
    return inputs


def _reference(family: str, data: dict):
    """HF's model as shipped: one sample per forward, its own M-RoPE positions (from the
    token types or the attention mask), torch's AdamW and clip_grad_norm_. Returns (loss,
    grad norm) per step and the trained model."""
    import transformers

    cls = getattr(transformers, MODELS[family][0])
    model = cls.from_pretrained(data["model_path"], dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    samples = _samples(data)
    results = []
    for step in range(STEPS):
        batch = samples[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
        count = sum(sum(label != -100 for label in s.labels[1:]) for s in batch)
        total = 0.0
        for sample in batch:
            ids = torch.tensor([sample.input_ids])
            if family == "qwen2_5_omni_thinker":
                rope = {"attention_mask": torch.ones_like(ids)}
            else:  # token types: image 1, video 2
                types = (ids == FIRST_SPECIAL).int() + 2 * (ids == FIRST_SPECIAL + 1).int()
                rope = {"mm_token_type_ids": types}
            inputs = _hf_media_inputs(sample.media)
            if family in SECONDS_PER_GRID and sample.media.get("video"):
                seconds = [video.seconds_per_grid for video in sample.media["video"]]
                inputs[SECONDS_PER_GRID[family]] = torch.tensor(seconds)
            logits = model(input_ids=ids, **rope, **inputs).logits[0, :-1]
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
    return results, model


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
            "train.output_dir": f"{data['model_path']}_runs/{name}",
            "train.max_steps": STEPS,
            "train.global_batch_size": GLOBAL_BATCH,
            "train.lr": LR,
            "train.lr_schedule": "constant",
            "train.weight_decay": 0.0,
            "train.peak_flops": 1e12,
            **IN_PROCESS_DATA,
            "checkpoint.every_steps": 0,
            "log.progress": False,
            "log.tensorboard": False,
            "log.plot": False,
        }
        overrides = [f"--{key}={json.dumps(value)}" for key, value in settings.items()]
        rows = Trainer(load_config(None, overrides + layout)).run()
        curves[name] = [(row["loss"], row["grad_norm"]) for row in rows]
    return curves


@pytest.mark.parametrize("family", list(MEDIA))
def test_native_model_trains_sharded_and_sequence_parallel_like_hf(native_data, family):
    data = native_data[family]
    reference, trained = _reference(family, data)
    layouts = {
        "dp2_sp2_packed": [
            "--parallel.dp_shard=2",
            "--parallel.sp=2",
            "--data.packing=true",
            "--train.micro_batch_size=2",
        ],
        "dp4_padded": [
            "--parallel.dp_shard=4",
            "--train.micro_batch_size=1",
            "--train.export_hf_at_end=true",
            f"--checkpoint.every_steps={STEPS}",
        ],
    }
    per_rank = run_distributed(_train, 4, data, layouts)
    for name in layouts:
        curve = per_rank[0][name]
        assert len(curve) == STEPS
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(
            zip(curve, reference, strict=True)
        ):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"{name}: loss at step {step + 1}"
            assert norm == pytest.approx(ref_norm, rel=1e-4), f"{name}: grad norm, step {step + 1}"
    import transformers

    cls = getattr(transformers, MODELS[family][0])
    export = f"{data['model_path']}_runs/dp4_padded/hf"
    exported = cls.from_pretrained(export, dtype=torch.float32)
    expected = dict(trained.named_parameters())
    for name, param in exported.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    # Its preprocessor_config.json: training from the export reads the media as this run did
    # (with model.processor's sizes, not the processors' defaults).
    for ours, again in zip(_samples(data), _samples(data, export, None), strict=True):
        assert again.input_ids == ours.input_ids
        for key, value in _hf_media_inputs(ours.media).items():
            torch.testing.assert_close(_hf_media_inputs(again.media)[key], value, msg=key)
    from omniweave.train.export import export_checkpoint  # the same file, exported offline

    export_checkpoint(f"{data['model_path']}_runs/dp4_padded", f"{export}_offline")
    live, offline = (
        json.loads(Path(folder, "preprocessor_config.json").read_text())
        for folder in (export, f"{export}_offline")
    )
    assert offline == live


def test_clip_patches_follow_the_hf_video_processor_layout(tmp_path):
    """A clip's patches: frames normalised as the image processor does, the last repeated to
    fill the temporal patch, then the view and permutation of HF's Qwen2-VL video processor
    (which needs torchvision, so it is restated here)."""
    from PIL import Image, ImageSequence

    from omniweave.models.native import native_parts
    from tests.models import tiny_qwen2_vl

    config = tiny_qwen2_vl().config
    files = native_parts(config, None, PROCESSOR).encoders["video"]
    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 24, 3)).astype(np.uint8)
    clip = [Image.fromarray(frame) for frame in frames]
    clip[0].save(tmp_path / "clip.gif", save_all=True, append_images=clip[1:], duration=200)
    with Image.open(tmp_path / "clip.gif") as gif:  # the frames in the GIF's palette colours
        read = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]
    processor = files.preprocessor
    pixels = torch.tensor(np.stack(read), dtype=torch.float32) / 255
    pixels = (pixels - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    video = torch.cat([pixels, pixels[-1:]]).permute(0, 3, 1, 2)  # [4 frames, C, H, W]
    p, m, t = 4, 2, 2  # the tiny tower's patch, merge and temporal patch sizes
    patches = video.reshape(1, 2, t, 3, 16 // p // m, m, p, 24 // p // m, m, p)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(2 * 4 * 6, 3 * t * p * p)
    item = files.load_item(str(tmp_path / "clip.gif"))
    assert item.grid_thw.tolist() == [[2, 4, 6]]
    assert item.seconds_per_grid == pytest.approx(0.4)
    assert files.num_tokens(item) == 2 * 4 * 6 // 4
    torch.testing.assert_close(item.pixel_values, patches, rtol=1e-5, atol=1e-5)
