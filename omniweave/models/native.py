"""Hugging Face multimodal models trained as shipped: Qwen2-VL, Qwen2.5-VL, the Qwen2.5-Omni
thinker.

A record's ``<image>`` / ``<video>`` / ``<audio>`` marker becomes the processor's token
layout (e.g. ``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch +
``<|vision_end|>``), and the file itself the HF image processor's ``pixel_values`` /
``image_grid_thw`` (a clip's frames in temporal patches: ``pixel_values_videos``) or the
Whisper feature extractor's log-mel ``input_features``. Per micro-batch,
``NativeInputs`` gives the model these inputs and the multimodal RoPE positions of
every sample (computed per sample, so they restart in a packed row), and keeps the
towers in step across ranks (``keep_in_step``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from omniweave.data.media import load_frame_files, load_image_file, load_wav
from omniweave.models.omni.model import OmniParts

NATIVE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni_thinker")
SAMPLE_RATE = 16_000  # Whisper features
FRAME_SECONDS = 0.5  # a clip that gives no frame durations is read at 2 frames a second


@dataclass
class ImageItem:
    pixel_values: torch.Tensor  # [patches, channels x temporal x patch^2]
    grid_thw: torch.Tensor  # [1, 3]: the image in patches (time, height, width)


@dataclass
class VideoItem:
    pixel_values: torch.Tensor  # [patches, channels x temporal x patch^2]
    grid_thw: torch.Tensor  # [1, 3]: the clip in patches (time, height, width)
    seconds_per_grid: float  # the time one temporal patch spans (Qwen2.5-VL's M-RoPE)


@dataclass
class AudioItem:
    features: torch.Tensor  # [mel bins, frames]


def _preprocessor(path: str | None, cls, options: dict, **defaults):
    """``cls`` from ``model.path``'s ``preprocessor_config.json`` if it has one, else from
    ``defaults``; ``options`` (``model.processor``) override either."""
    if path and os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        return cls.from_pretrained(path, **options)
    return cls(**{**defaults, **options})


class ImageFiles:
    """Image files read by the HF Qwen2-VL image processor (PIL backend). Its ``size:
    {shortest_edge, longest_edge}`` options are the fewest and most pixels an image is
    resized to."""

    def __init__(self, vision, path: str | None, options: dict):
        from transformers import Qwen2VLImageProcessorPil

        self.preprocessor = _preprocessor(
            path,
            Qwen2VLImageProcessorPil,
            options,
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
        )
        self.merge = vision.spatial_merge_size
        self.patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2

    def load_item(self, path: str) -> ImageItem:
        out = self.preprocessor(images=[load_image_file(path)], return_tensors="pt")
        return ImageItem(out["pixel_values"], out["image_grid_thw"])

    def num_tokens(self, item: ImageItem) -> int:
        return int(item.grid_thw.prod()) // self.merge**2

    def dummy_item(self) -> ImageItem:
        m = self.merge
        return ImageItem(torch.zeros(m * m, self.patch_dim), torch.tensor([[1, m, m]]))


class VideoFiles:
    """Animated images (GIF, APNG, WebP) as Qwen2-VL videos: each frame resized and
    normalised by the image processor, then ``temporal_patch_size`` consecutive frames in
    each patch (the last frame repeated to fill the last patch), in the layout of HF's
    Qwen2-VL video processor."""

    def __init__(self, images: ImageFiles, vision):
        self.images, self.preprocessor = images, images.preprocessor
        self.channels, self.temporal = vision.in_channels, vision.temporal_patch_size

    def load_item(self, path: str) -> VideoItem:
        frames, seconds = load_frame_files(path)
        out = self.images.preprocessor(images=frames, return_tensors="pt")
        _, height, width = out["image_grid_thw"][0].tolist()  # Pillow gives whole frames
        shape = (len(frames), height * width, self.channels, self.temporal, -1)
        pixels = out["pixel_values"].view(shape)[:, :, :, 0]  # each frame, copied over time
        pixels = torch.cat([pixels, pixels[-1:].expand(-len(frames) % self.temporal, -1, -1, -1)])
        steps = pixels.shape[0] // self.temporal
        pixels = pixels.view(steps, self.temporal, *pixels.shape[1:]).permute(0, 2, 3, 1, 4)
        grid = torch.tensor([[steps, height, width]])
        flat = pixels.reshape(steps * height * width, -1)
        return VideoItem(flat, grid, (seconds or FRAME_SECONDS) * self.temporal)

    def num_tokens(self, item: VideoItem) -> int:
        return self.images.num_tokens(item)

    def dummy_item(self) -> VideoItem:
        image = self.images.dummy_item()
        return VideoItem(image.pixel_values, image.grid_thw, 1.0)


class AudioFiles:
    """Audio files as Whisper log-mel features (at 16 kHz, not padded to 30 s), for the
    Qwen2.5-Omni audio tower: two stride-2 stages, so about one token per 4 frames."""

    def __init__(self, audio, path: str | None, options: dict):
        from transformers import WhisperFeatureExtractor

        self.preprocessor = _preprocessor(
            path,
            WhisperFeatureExtractor,
            options.get("audio", {}),
            feature_size=audio.num_mel_bins,
            sampling_rate=SAMPLE_RATE,
        )
        self.window = audio.n_window

    def load_item(self, path: str) -> AudioItem:
        waveform = load_wav(path, SAMPLE_RATE).numpy()
        out = self.preprocessor(
            waveform, sampling_rate=SAMPLE_RATE, padding="longest", truncation=False,
            return_tensors="pt",
        )  # fmt: skip
        return AudioItem(out["input_features"][0])

    def num_tokens(self, item: AudioItem) -> int:
        after_conv = (item.features.shape[-1] - 1) // 2 + 1
        return (after_conv - 2) // 2 + 1

    def dummy_item(self) -> AudioItem:
        return AudioItem(torch.zeros(self.preprocessor.feature_size, 2 * self.window))


def native_parts(config, path: str | None, options: dict | None) -> OmniParts | None:
    """What data loading needs of a native multimodal model; None for a text-only family."""
    if config.model_type not in NATIVE_FAMILIES:
        return None
    options = dict(options or {})
    audio_options = {"audio": options.pop("audio", {})}
    encoders = {"image": ImageFiles(config.vision_config, path, options)}
    placeholders = {"image": config.image_token_id}
    brackets = {"image": ([config.vision_start_token_id], [config.vision_end_token_id])}
    encoders["video"] = VideoFiles(encoders["image"], config.vision_config)
    placeholders["video"] = config.video_token_id
    brackets["video"] = brackets["image"]
    if config.model_type == "qwen2_5_omni_thinker":
        encoders["audio"] = AudioFiles(config.audio_config, path, audio_options)
        placeholders["audio"] = config.audio_token_id
        brackets["audio"] = ([config.audio_start_token_id], [config.audio_end_token_id])
    return OmniParts(encoders, placeholders, brackets=brackets)


def preprocessor_config(parts: OmniParts) -> dict:
    """A native model's ``preprocessor_config.json``: the settings of its image processor and
    (the thinker's) audio feature extractor in one file, as Qwen2.5-Omni ships them. Saved
    with an export, it gives a run from that folder the same media inputs."""
    merged = {}
    for files in parts.encoders.values():
        merged.update(files.preprocessor.to_dict())
    return merged


VISION_INPUTS = {  # the model's argument names for the pixels and grids of each modality
    "image": ("pixel_values", "image_grid_thw"),
    "video": ("pixel_values_videos", "video_grid_thw"),
}


def _vision_inputs(modality: str, items: list[ImageItem | VideoItem]) -> dict:
    if not items:
        return {}
    pixels, grids = VISION_INPUTS[modality]
    return {pixels: torch.cat([item.pixel_values for item in items]), grids: _grids(items)}


def _grids(items: list[ImageItem | VideoItem]) -> torch.Tensor | None:
    """``[items, 3]``: each item's (time, height, width) in patches; None for no item."""
    return torch.cat([item.grid_thw for item in items]) if items else None


def _audio_inputs(items: list[AudioItem]) -> dict:
    """``input_features [audios, mel, frames]`` right-padded, and their frame mask."""
    if not items:
        return {}
    longest = max(item.features.shape[-1] for item in items)
    features = torch.zeros(len(items), items[0].features.shape[0], longest)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for index, item in enumerate(items):
        frames = item.features.shape[-1]
        features[index, :, :frames] = item.features
        mask[index, :frames] = 1
    return {"input_features": features, "feature_attention_mask": mask}


def media_inputs(media: dict[str, list]) -> dict[str, torch.Tensor]:
    """The model's media arguments (pixels, grids, audio features) for loaded items."""
    inputs = _vision_inputs("image", media.get("image", []))
    inputs.update(_vision_inputs("video", media.get("video", [])))
    inputs.update(_audio_inputs(media.get("audio", [])))
    return inputs


MODALITY_TYPES = {"image": 1, "video": 2}  # transformers' mm_token_type_ids
SECONDS_PER_GRID = {  # the argument of the clips' seconds per temporal patch, where one is
    "qwen2_5_vl": "second_per_grid_ts",
    "qwen2_5_omni_thinker": "video_second_per_grid",
}


def prompt_inputs(config, parts: OmniParts, ids: torch.Tensor, media: dict) -> dict:
    """``generate``'s arguments besides ``input_ids`` for a prompt ``[1, tokens]``: the media,
    each token's modality (Qwen2-VL's and Qwen2.5-VL's M-RoPE) and the clips' seconds per
    temporal patch."""
    inputs = media_inputs(media)
    if config.model_type != "qwen2_5_omni_thinker":  # the thinker finds its media itself
        types = torch.zeros_like(ids)
        for modality, placeholder in parts.placeholders.items():
            types += MODALITY_TYPES[modality] * (ids == placeholder).long()
        inputs["mm_token_type_ids"] = types
    seconds = [item.seconds_per_grid for item in media.get("video", [])]
    if seconds and config.model_type in SECONDS_PER_GRID:
        inputs[SECONDS_PER_GRID[config.model_type]] = torch.tensor(seconds)
    return inputs


class NativeInputs:
    """The model inputs of a micro-batch beyond its token ids, for a native model."""

    def __init__(self, model: nn.Module, parts: OmniParts):
        self.model, self.parts = model, parts
        self.thinker = model.config.model_type == "qwen2_5_omni_thinker"
        inner = model.model
        passes = [  # the vision tower on the images, then again on the videos
            (inner.visual, lambda: self._dummy_pass("image")),
            (inner.visual, lambda: self._dummy_pass("video")),
        ]
        if self.thinker:  # its forward runs the audio tower first
            passes.insert(0, (inner.audio_tower, lambda: self._dummy_pass("audio")))
        keep_in_step(passes, inner.language_model)

    def __call__(self, input_ids: torch.Tensor, segments: list[tuple[int, int, int]], media):
        """The media inputs and ``position_ids`` ``[3, rows, tokens]`` of a micro-batch.
        ``segments``: (row, start, length) of each sample, in order; the rest is padding."""
        device = input_ids.device
        positions = torch.arange(input_ids.shape[1], device=device).expand(3, *input_ids.shape)
        positions = positions.clone()
        used = dict.fromkeys(self.parts.encoders, 0)
        for row, start, length in segments:
            ids = input_ids[row : row + 1, start : start + length]
            items = {}
            for modality, encoder in self.parts.encoders.items():
                tokens = int((ids == self.parts.placeholders[modality]).sum())
                first = used[modality]
                while tokens > 0:
                    tokens -= encoder.num_tokens(media[modality][used[modality]])
                    used[modality] += 1
                items[modality] = media.get(modality, [])[first : used[modality]]
            positions[:, row, start : start + length] = self._rope(ids, items)[:, 0]
        inputs = {"position_ids": positions, **media_inputs(media)}
        return {key: value.to(device) for key, value in inputs.items()}

    def _rope(self, ids: torch.Tensor, items: dict[str, list]) -> torch.Tensor:
        """``[3, 1, tokens]`` M-RoPE positions of one sample, by the model's own function."""
        grids = {"image_grid_thw": _grids(items["image"]), "video_grid_thw": _grids(items["video"])}
        seconds = [item.seconds_per_grid for item in items["video"]]
        seconds = torch.tensor(seconds) if seconds else None
        if not self.thinker:
            types = (ids == self.parts.placeholders["image"]).int()
            types += 2 * (ids == self.parts.placeholders["video"]).int()
            if self.model.config.model_type == "qwen2_5_vl":
                grids["second_per_grid_ts"] = seconds
            return self.model.model.get_rope_index(ids, types, **grids)[0]
        frames = [item.features.shape[-1] for item in items["audio"]]
        return self.model.model.get_rope_index(
            ids,
            **grids,
            attention_mask=torch.ones_like(ids),
            audio_seqlens=torch.tensor(frames) if frames else None,
            second_per_grids=seconds,
        )[0]

    def _dummy_pass(self, modality: str) -> torch.Tensor:
        """The tower of ``modality`` run by the model's own method on a dummy item; the sum of
        its outputs (so every parameter is in the graph)."""
        device = self.model.get_input_embeddings().weight.device
        item = self.parts.encoders[modality].dummy_item()
        inner = self.model.model
        if modality == "audio":
            features, inputs = inner.get_audio_features, _audio_inputs([item])
        else:
            features = inner.get_image_features if modality == "image" else inner.get_video_features
            inputs = _vision_inputs(modality, [item])
        return _total(features(**{k: v.to(device) for k, v in inputs.items()}))


def _total(output) -> torch.Tensor:
    """The sum of every tensor in a model output (nested tuples and dicts)."""
    if torch.is_tensor(output):
        return output.sum()
    values = output.values() if isinstance(output, dict) else output
    return sum(_total(value) for value in values if value is not None)


def keep_in_step(passes: list[tuple[nn.Module, Callable]], stack: nn.Module) -> None:
    """Make every forward that reaches ``stack`` run the same tower passes, on every rank
    alike. ``passes``: (tower, dummy_pass) in the order the model's forward runs them (a
    tower may run more than once: Qwen2-VL's vision tower on images, then on videos).
    Before a tower runs, and before ``stack`` runs, each earlier pass that did not happen
    is made by its ``dummy_pass()``; the dummy outputs enter ``stack``'s inputs times
    zero, so the backward pass reaches those towers too. So a rank whose micro-batch has no
    image, video or audio gathers and reduces the same FSDP units in the same order as the
    others, and its gradients are those of the unsharded run. (A step without, say, any
    image on any rank gives the vision tower zero gradients, so Adam's momentum still
    moves it.)"""
    state = {"done": 0, "dummy": False}  # passes made in this forward; in a dummy pass
    pending = []

    def make_dummies(upto: int) -> None:
        state["dummy"] = True
        for _, dummy_pass in passes[state["done"] : upto]:
            pending.append(dummy_pass())
        state["dummy"] = False
        state["done"] = upto

    def before(tower):
        def hook(_module, args, kwargs):
            if state["dummy"]:
                return None
            later = [i for i in range(state["done"], len(passes)) if passes[i][0] is tower]
            if later:
                make_dummies(later[0])
                state["done"] = later[0] + 1
            return None

        return hook

    for tower in {id(tower): tower for tower, _ in passes}.values():
        # Before FSDP's own pre-hook (which gathers this tower), so gathers keep their order.
        tower.register_forward_pre_hook(before(tower), with_kwargs=True, prepend=True)

    def before_stack(_module, args, kwargs):
        make_dummies(len(passes))
        if pending:
            extra = sum(pending).to(kwargs["inputs_embeds"].device)
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"] + 0.0 * extra
        pending.clear()
        state["done"] = 0
        return args, kwargs

    stack.register_forward_pre_hook(before_stack, with_kwargs=True)
