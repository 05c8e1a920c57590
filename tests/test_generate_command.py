"""``omniweave generate``: greedy decoding equals transformers' ``generate``; a run, its
checkpoint and its HF export give the same text; mistakes are one line."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import torch

from tests.models import TINY

PROMPT = "the quick brown fox"


def _generate(source, *extra: str) -> subprocess.CompletedProcess:
    """``omniweave generate`` in this process (no interpreter start-up per call), with the
    exit code, stdout and stderr a subprocess would give."""
    from omniweave.cli import main

    argv = ["generate", str(source), *extra]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def test_greedy_generation_matches_transformers_generate(corpus, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from omniweave.data.processors import load_tokenizer
    from omniweave.train.evaluate import turn_ends

    fields = dict(TINY["qwen2"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(fields.pop("model_type"), **fields)
    )
    tokenizer = load_tokenizer(corpus["tokenizer_path"])
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    ours = _generate(tmp_path / "hf", "--prompt", PROMPT, "--max-new-tokens", "12")
    assert ours.returncode == 0, ours.stderr
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        theirs = model.eval().generate(
            ids, do_sample=False, max_new_tokens=12, eos_token_id=sorted(turn_ends(tokenizer))
        )
    expected = tokenizer.decode(theirs[0, ids.shape[1] :], skip_special_tokens=True)
    assert ours.stdout == expected + "\n"
    sampled = [
        _generate(tmp_path / "hf", "--prompt", PROMPT, "--temperature", "1.5", "--seed", seed)
        for seed in ("1", "1", "2")
    ]
    assert sampled[0].stdout == sampled[1].stdout != sampled[2].stdout  # seeded draws


def test_a_run_its_checkpoint_and_its_hf_export_generate_alike(corpus, tmp_path):
    from omniweave.cli import main

    config = {
        "model": {"config": TINY["qwen2"]},
        "data": {**corpus, "max_seq_len": 64, "num_workers": 0},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "global_batch_size": 4,
                  "lr": 3e-3, "peak_flops": 1e12},
        "checkpoint": {"every_steps": 4},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    train = [sys.executable, "-m", "omniweave.cli", "train", str(tmp_path / "run.yaml")]
    assert subprocess.run(train, capture_output=True).returncode == 0
    assert main(["export", str(tmp_path / "run"), "--format", "hf", str(tmp_path / "hf")]) == 0
    sources = [tmp_path / "run", tmp_path / "run/checkpoints/step_00000004", tmp_path / "hf"]
    texts = [_generate(s, "--prompt", PROMPT, "--max-new-tokens", "8").stdout for s in sources]
    assert texts[0] and texts[0] == texts[1] == texts[2]


def test_generate_mistakes_are_one_line(corpus, tmp_path):
    missing = _generate(tmp_path, "--prompt", PROMPT)
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"omniweave: error: '{tmp_path}' is not an HF model folder")
    assert len(missing.stderr.splitlines()) == 1
    wrong = _generate(tmp_path, "--prompt", PROMPT, "--top-p", "0")
    assert wrong.returncode == 2 and "0 < --top-p <= 1" in wrong.stderr


def test_an_omni_model_answers_from_the_image(corpus, tmp_path):
    from PIL import Image

    records = []
    for index in range(16):
        shade, word = (20, "dark") if index % 2 else (235, "light")
        Image.new("L", (16, 16), shade + index).save(tmp_path / f"{index}.png")
        records.append({"text": f"<image> is {word}", "media": {"image": [f"{index}.png"]}})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    encoder = {"type": "vision", "placeholder": 512, "width": 32, "heads": 2, "patch": 4}
    config = {
        "model": {"config": {**TINY["qwen2"], "vocab_size": 513},
                  "omni": {"encoders": {"image": encoder}}},
        "data": {"train_path": str(tmp_path / "train.jsonl"),
                 "tokenizer_path": corpus["tokenizer_path"], "max_seq_len": 32,
                 "num_workers": 0},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 60, "global_batch_size": 8,
                  "micro_batch_size": 8, "lr": 3e-3, "peak_flops": 1e12, "save_final": True},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    train = [sys.executable, "-m", "omniweave.cli", "train", str(tmp_path / "run.yaml")]
    trained = subprocess.run(train, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    answers = {}
    for shade, word in ((25, "dark"), (230, "light")):  # images it has not seen
        Image.new("L", (16, 16), shade).save(tmp_path / f"{word}.png")
        answer = _generate(tmp_path / "run", "--prompt", "<image> is", "--image",
                           str(tmp_path / f"{word}.png"), "--max-new-tokens", "4")  # fmt: skip
        assert answer.returncode == 0, answer.stderr
        answers[word] = answer.stdout.strip()
    assert answers == {"dark": "dark", "light": "light"}, answers
    text_only = _generate(tmp_path / "run", "--prompt", "hello", "--image", "x.png")
    assert text_only.returncode == 2  # a missing image file is one line
    assert len(text_only.stderr.splitlines()) == 1, text_only.stderr


def test_a_native_multimodal_model_generates_from_an_image_as_transformers_does(corpus, tmp_path):
    import numpy as np
    from PIL import Image

    from omniweave.data.processors import load_tokenizer
    from omniweave.models.loader import load_hf_config
    from omniweave.models.native import native_parts
    from omniweave.train.evaluate import turn_ends
    from tests.models import tiny_qwen2_vl

    model = tiny_qwen2_vl(seed=3, image_token=512).eval()
    tokenizer = load_tokenizer(corpus["tokenizer_path"])
    model.save_pretrained(tmp_path / "vl")
    tokenizer.save_pretrained(tmp_path / "vl")
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    ours = _generate(tmp_path / "vl", "--prompt", PROMPT, "--image", str(tmp_path / "x.png"))
    assert ours.returncode == 0, ours.stderr

    # transformers' generate on the image's pixels and the processor's token layout
    parts = native_parts(load_hf_config(str(tmp_path / "vl"), None, "sdpa"), None, None)
    image = parts.encoders["image"].load_item(str(tmp_path / "x.png"))
    placeholders = int(image.grid_thw.prod()) // 4  # 2 x 2 patches merge into one token
    ids = [
        514,
        *[512] * placeholders,
        515,
        *tokenizer(PROMPT, add_special_tokens=False)["input_ids"],
    ]
    ids = torch.tensor([ids])
    with torch.no_grad():
        theirs = model.generate(
            ids, pixel_values=image.pixel_values, image_grid_thw=image.grid_thw,
            do_sample=False, max_new_tokens=64, eos_token_id=sorted(turn_ends(tokenizer)),
        )  # fmt: skip
    expected = tokenizer.decode(theirs[0, ids.shape[1] :], skip_special_tokens=True)
    assert expected and ours.stdout == expected + "\n"
    no_image = _generate(tmp_path / "vl", "--prompt", PROMPT)
    assert no_image.returncode == 0 and no_image.stdout != ours.stdout  # the image counts
    audio = _generate(tmp_path / "vl", "--prompt", PROMPT, "--audio", str(tmp_path / "x.png"))
    assert audio.returncode == 2 and "encoders are ['image', 'video']" in audio.stderr
