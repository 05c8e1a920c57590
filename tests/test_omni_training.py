"""`omniweave train` on image/audio/video/text records with an OmniModel (model.omni): the same
loss curve in 1 process and at dp_shard=2 x sp=2 (dense, and MoE at ep=2), and clear errors for
bad media."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.models import TINY
from tests.test_parity import _assert_close, _train_runs

IMAGE, AUDIO, VIDEO = 512, 513, 514  # past the 512-token BPE's ids
CODES, CODEBOOK = 520, 16  # the image decoder's tokens: ids 520..535
ENCODERS = {
    "image": {"type": "vision", "placeholder": IMAGE, "width": 32, "heads": 2, "patch": 4},
    "audio": {"type": "audio", "placeholder": AUDIO, "width": 32, "heads": 2, "n_mels": 16},
    "video": {"type": "video", "placeholder": VIDEO, "width": 32, "heads": 2, "patch": 4},
}


def _write_clip(root, rng) -> str:
    """An animated GIF: a bright square sliding across 4-6 frames."""
    from PIL import Image

    clip = root / f"clip{rng.integers(1e9)}.gif"
    frames = []
    for t in range(rng.integers(4, 7)):
        array = np.zeros((8, 12), dtype=np.uint8)
        array[2:6, t : t + 4] = 255
        frames.append(Image.fromarray(array))
    frames[0].save(clip, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return clip.name


def _write_media(root, rng) -> tuple[str, str]:
    from PIL import Image

    image = root / f"img{rng.integers(1e9)}.png"
    height, width = 4 * rng.integers(2, 5), 4 * rng.integers(2, 5)
    Image.fromarray(rng.integers(0, 255, (height, width), dtype=np.uint8)).save(image)
    audio = root / f"snd{rng.integers(1e9)}.wav"
    with wave.open(str(audio), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
        f.writeframes(rng.integers(-3000, 3000, 800 * rng.integers(1, 4), dtype="<i2").tobytes())
    return image.name, audio.name


@pytest.fixture(scope="module")
def omni_data(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("omni")
    rng = np.random.default_rng(0)
    words = ["a", "digit", "sound", "of", "the", "model", "hears", "sees", "one", "two"]
    records = []
    for index in range(24):
        text = " ".join(rng.choice(words, 4 + index % 5))
        image, audio = _write_media(root, rng)
        kind = index % 4
        if kind == 0:
            records.append({"text": f"<image> {text}", "media": {"image": [image]}})
        elif kind == 1:
            records.append({"text": f"{text} <audio> {text}", "media": {"audio": [audio]}})
        elif kind == 2:
            media = {"image": [image], "audio": [audio]}
            records.append({"text": f"<audio> {text} <image>", "media": media})
        elif index % 8 == 3:
            media = {"video": [_write_clip(root, rng)]}
            records.append({"text": f"<video> {text}", "media": media})
        else:
            records.append({"text": text})
    from PIL import Image

    from omniweave.models.omni.vq import save_vq, train_vq

    squares = np.zeros((64, 1, 8, 8), dtype=np.float32)
    for index, square in enumerate(squares):  # a 4x4 square at one of 25 places
        square[0, index % 5 : index % 5 + 4, index // 13 : index // 13 + 4] = 1.0
    vq, _ = train_vq(torch.from_numpy(squares), steps=60, codebook_size=CODEBOOK, code_dim=8)
    save_vq(vq, str(root / "vq.pt"))
    merged = []
    for index, record in enumerate(records):  # every 4th record: text-to-image
        merged.append(record)
        if index % 3 == 2:
            name = f"square{index}.png"
            Image.fromarray((squares[index, 0] * 255).astype(np.uint8)).save(root / name)
            merged.append({"text": f"draw {index % 5} <draw>", "media": {"draw": [name]}})
    records = merged
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"train_path": str(data), "tokenizer_path": corpus["tokenizer_path"], "root": root}


def _args(data: dict, out: str, **extra) -> list[str]:
    settings = {
        "model.config": {**TINY["qwen2"], "vocab_size": CODES + CODEBOOK},
        "model.omni": {
            "encoders": ENCODERS,
            "decoders": {
                "draw": {
                    "type": "image",
                    "tokenizer_path": str(data["root"] / "vq.pt"),
                    "code_offset": CODES,
                }
            },
        },
        "data.train_path": data["train_path"],
        "data.tokenizer_path": data["tokenizer_path"],
        "data.max_seq_len": 256,
        "data.shuffle": False,
        "data.packing": True,
        "train.output_dir": out,
        "train.max_steps": 5,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 2,
        "train.lr": 1e-3,
        "train.peak_flops": 1e12,
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
        **extra,
    }
    return [f"--{key}={json.dumps(value)}" for key, value in settings.items()]


def _imageless_steps(data: dict, dp: int) -> list[int]:
    """Steps at which a data-parallel rank has a one-sample micro-batch with no image in or
    out (its encoder and decoder run on nothing): samples are the records, in file order."""
    from omniweave.data.order import SampleOrder

    lines = (data["root"] / "train.jsonl").read_text().splitlines()
    media = [set(json.loads(line).get("media", {})) for line in lines]
    order = SampleOrder([len(media)], [1.0], 4, 0, shuffle=False)
    return [  # one sample per micro-batch: every record is some rank's micro-batch
        step + 1
        for step in range(5)
        if any(not media[index] & {"image", "draw"} for _, index in order.global_batch(step))
    ]


def test_omni_training_matches_across_layouts(omni_data, tmp_path):
    """Dense Qwen2 and Qwen3-MoE (ep=2 at 4 processes) foundations, one launch per size."""
    layout = {"parallel.dp_shard": 2, "parallel.sp": 2, "train.micro_batch_size": 1}
    save = {"train.save_final": True}
    foundations = {"qwen2": {}, "qwen3_moe": {"parallel.ep": 2}}
    single, sharded = [], []
    for family, extra in foundations.items():
        model = {"model.config": {**TINY[family], "vocab_size": CODES + CODEBOOK}, **save}
        single.append((family, _args(omni_data, str(tmp_path / family / "a"), **model)))
        out = str(tmp_path / family / "b")
        sharded.append((family, _args(omni_data, out, **model, **layout, **extra)))
    one = run_distributed(_train_runs, 1, single)[0]
    four = run_distributed(_train_runs, 4, sharded)
    assert all(r == four[0] for r in four)
    assert _imageless_steps(omni_data, dp=2)
    for family in foundations:
        reference = one[family]
        assert reference[-1][0] < reference[0][0], family  # it learns
        metrics = (tmp_path / family / "a" / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in metrics]
        assert all(row["loss_draw"] > 0 and row["loss_text"] > 0 for row in rows), family
        assert all(row["samples_dropped"] == 0 for row in rows), family  # samples = records
        _assert_close(four[0][family], reference, f"{family} dp_shard=2 x sp=2")
        _assert_same_final_weights(tmp_path / family / "a", tmp_path / family / "b")


def _assert_same_final_weights(single: Path, sharded: Path) -> None:
    """The unsharded weights gathered from FSDP/EP shards equal the 1-process run's (atol: 5
    Adam steps of lr 1e-3 move a weight up to 5e-3; float noise in near-zero gradients moves
    it ~3e-6), and load into a plain single-process OmniModel (as ``omniweave eval`` does)."""
    from safetensors.torch import load_file

    from omniweave.train.evaluate import load_trained

    expected = load_file(single / "final" / "model.safetensors")
    gathered = load_file(sharded / "final" / "model.safetensors")
    assert gathered.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(gathered[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    model, _, _ = load_trained(str(sharded))
    state = model.state_dict()
    for name, tensor in gathered.items():
        assert torch.equal(state[name], tensor), name


def test_missing_media_file_names_file_and_record(omni_data, tmp_path):
    from omniweave.config import load_config
    from omniweave.train.trainer import Trainer

    bad = omni_data["root"] / "bad.jsonl"  # media paths are relative to the data file
    text = (omni_data["root"] / "train.jsonl").read_text().splitlines()
    text[2] = json.dumps({"text": "<image> gone", "media": {"image": ["missing.png"]}})
    bad.write_text("\n".join(text) + "\n")
    data = {**omni_data, "train_path": str(bad)}
    trainer = Trainer(load_config(None, _args(data, str(tmp_path / "out"))))
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: .*missing.png: cannot read"):
        trainer.run()  # the step that reads line 3 stops the run


def test_bad_samples_are_skipped_and_counted_when_asked(omni_data, tmp_path):
    lines = (omni_data["root"] / "train.jsonl").read_text().splitlines()
    lines[1] = '{"text": "unterminated'  # malformed JSON
    lines[4] = json.dumps({"messages": "not a list"})  # a record of the wrong shape
    lines[6] = json.dumps({"text": "<image> gone", "media": {"image": ["missing.png"]}})
    bad = omni_data["root"] / "bad_skip.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    data = {**omni_data, "train_path": str(bad)}
    out = tmp_path / "skip"
    args = _args(data, str(out), **{"data.on_bad_sample": "skip", "train.max_steps": 2})
    run_distributed(_train_runs, 1, [("skip", args)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    read = [4, 8]  # records read by the end of steps 1 and 2, in file order (no shuffle)
    assert [row["samples_skipped_bad"] for row in rows] == [
        sum(line < n for line in (1, 4, 6)) for n in read
    ]


def _generate(data: dict, out: str) -> list:
    from omniweave.config import load_config
    from omniweave.train.trainer import Trainer

    trainer = Trainer(load_config(None, _args(data, out, **{"train.max_steps": 1})))
    trainer.run()
    decoder = trainer.omni_parts.decoders["draw"]
    prompt = trainer.tokenizer("draw 3 ", add_special_tokens=False)["input_ids"]
    return list(decoder.lm_generate(trainer.model, prompt).shape)


def test_image_decoder_generates_an_image(omni_data, tmp_path):
    assert run_distributed(_generate, 1, omni_data, str(tmp_path / "gen"))[0] == [1, 8, 8]


def test_chunked_cross_entropy_trains_an_omni_model_like_the_naive_loss(omni_data, tmp_path):
    chunked = {"train.cross_entropy": "chunked", "train.cross_entropy_chunk": 32}
    runs = [
        ("naive", _args(omni_data, str(tmp_path / "naive"))),
        ("chunked", _args(omni_data, str(tmp_path / "chunked"), **chunked)),
    ]
    curves = run_distributed(_train_runs, 1, runs)[0]
    _assert_close(curves["chunked"], curves["naive"], "chunked cross-entropy")
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        for name in ("naive", "chunked")
    }
    for a, b in zip(rows["chunked"], rows["naive"], strict=True):  # per output modality too
        assert a["loss_draw"] == pytest.approx(b["loss_draw"], rel=1e-5)
        assert a["loss_text"] == pytest.approx(b["loss_text"], rel=1e-5)


def test_bf16_trains_an_omni_model_close_to_fp32(omni_data, tmp_path):
    """Every encoder's input (pixels, video tubes, log-mel features) is cast to its weights'
    dtype, so a bf16 run trains and stays near the fp32 curve."""
    runs = [
        ("fp32", _args(omni_data, str(tmp_path / "fp32"))),
        ("bf16", _args(omni_data, str(tmp_path / "bf16"), **{"model.dtype": "bfloat16"})),
    ]
    curves = run_distributed(_train_runs, 1, runs)[0]
    assert len(curves["bf16"]) == len(curves["fp32"])
    for (loss, _), (ref_loss, _) in zip(curves["bf16"], curves["fp32"], strict=True):
        assert loss == pytest.approx(ref_loss, rel=2e-2)


def test_an_omni_model_pipelines_and_replicates_like_one_process(omni_data, tmp_path):
    """pp=2: the encoders and the embeddings on the first stage, the image decoder's codes
    learned on the last; dp_replicate=2 (DDP), with steps where a rank has no image for its
    encoders; the curves, each output modality's loss and the final weights are the
    1-process run's."""
    config = {**TINY["qwen2"], "vocab_size": CODES + CODEBOOK, "tie_word_embeddings": False}
    model = {"model.config": config, "train.micro_batch_size": 1}
    save = {"train.save_final": True}  # not under pp: a pipeline exports from a checkpoint
    ddp = {"parallel.dp_replicate": 2, "parallel.dp_shard": 1, **save}
    one = ("one", _args(omni_data, str(tmp_path / "one"), **model, **save))
    pp = ("pp", _args(omni_data, str(tmp_path / "pp"), **model, **{"parallel.pp": 2}))
    replicas = ("ddp", _args(omni_data, str(tmp_path / "ddp"), **model, **ddp))
    reference = run_distributed(_train_runs, 1, [one])[0]["one"]
    two = run_distributed(_train_runs, 2, [pp, replicas])
    assert two[0] == two[1], "ranks disagree"
    assert _imageless_steps(omni_data, dp=2)
    for name in ("pp", "ddp"):
        _assert_close(two[0][name], reference, name)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        references = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").open()]
        for a, b in zip(rows, references, strict=True):
            assert a["loss_draw"] == pytest.approx(b["loss_draw"], rel=1e-5), name
            assert a["loss_text"] == pytest.approx(b["loss_text"], rel=1e-5), name
    _assert_same_final_weights(tmp_path / "one", tmp_path / "ddp")
