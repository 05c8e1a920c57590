"""Code in the docs runs as written."""

from __future__ import annotations

import json
import pathlib
import re
import runpy

import numpy as np

from tests.distributed import run_distributed
from tests.models import TINY

DOCS = pathlib.Path(__file__).parents[1] / "docs"


def _train_with_plugin(folder: str, overrides: list[str]) -> list[float]:
    import sys

    from omniweave.config import load_config
    from omniweave.train.trainer import Trainer

    sys.path.insert(0, folder)  # where imu_example.py is, as a user's module would be
    return [row["loss"] for row in Trainer(load_config(None, overrides)).run()]


def test_adding_a_modality_example_runs_and_trains(tmp_path, corpus):
    text = (DOCS / "adding-a-modality.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    assert len(code.strip().splitlines()) < 100  # the promise of the guide
    module = tmp_path / "imu_example.py"
    module.write_text(code)
    runpy.run_path(str(module), run_name="__main__")  # its own quick check

    rng = np.random.default_rng(0)
    records = []
    for index in range(8):
        np.save(tmp_path / f"walk{index}.npy", rng.normal(size=(16 * (2 + index % 3), 6)))
        media = {"imu": [f"walk{index}.npy"]}
        records.append({"text": f"<imu> walking {'up down'[index % 2 :: 2]}", "media": media})
    (tmp_path / "walks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    omni = {"plugins": ["imu_example"], "encoders": {"imu": {"type": "imu", "placeholder": 513}}}
    settings = {
        "model.config": {**TINY["qwen2"], "vocab_size": 520},
        "model.omni": omni,
        "data.train_path": str(tmp_path / "walks.jsonl"),
        "data.tokenizer_path": corpus["tokenizer_path"],
        "train.output_dir": str(tmp_path / "run"),
        "train.max_steps": 3,
        "train.global_batch_size": 4,
        "train.peak_flops": 1e12,
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
    }
    overrides = [f"--{key}={json.dumps(value)}" for key, value in settings.items()]
    losses = run_distributed(_train_with_plugin, 1, str(tmp_path), overrides)[0]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_the_docs_link_only_files_of_the_repository():
    root = DOCS.parent
    pages = [root / "README.md", *sorted(DOCS.glob("*.md"))]
    assert DOCS / "architecture.md" in pages
    linked = set()
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)", text) + re.findall(r"`([\w./-]+\.md)`", text):
            if target.startswith(("http://", "https://")):
                continue
            path = (page.parent / target).resolve()
            assert path.is_relative_to(root), f"{page.name} links {target}, outside the repository"
            assert path.exists(), f"{page.name} links {target}, which does not exist"
            linked.add(path)
    assert (DOCS / "architecture.md").resolve() in linked
