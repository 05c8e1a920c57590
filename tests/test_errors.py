"""User mistakes end in one clear message and a non-zero exit, before any collective."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from omniweave.distributed.parallel_state import resolve_degrees
from tests.models import TINY


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, corpus) -> str:
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    config = {
        "model": {"config": TINY["qwen2"]},
        "data": dict(corpus),
        "train": {"output_dir": str(path.parent / "out"), "max_steps": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (
            ["--nproc", "4", "--parallel.sp=3"],
            "parallel.pp x dp_replicate x cp x sp x tp = 1 x 1 x 1 x 3 x 1",
        ),
        (["--nproc", "3", "--parallel.sp=3"], "parallel.sp=3 must divide the model's 4 attention"),
        (["--data.max_tokens_per_microbatch=64"], "below data.max_seq_len=2048"),
        (["--nproc", "4", "--parallel.ep=3"], "parallel.ep=3 must divide the FSDP ranks"),
        (["--nproc", "2", "--parallel.ep=2"], "needs a mixture-of-experts model"),
        (
            [
                "--nproc",
                "4",
                "--parallel.ep=4",
                f"--model.config={json.dumps(TINY['qwen3_moe_6x3'])}",
            ],
            "parallel.ep=4 must divide the model's 6 experts",
        ),
        (["--train.lerning_rate=1e-3"], "did you mean 'train.lr'"),
        (["--model.config=null", "--model.path=/no/such/model"], "model.path '/no/such/model'"),
        (["--nproc", "2", "--data.tokenizer_path=/no/such/tok"], "Tokenizer folder /no/such/tok"),
        (["--checkpoint.resume=/no/ckpt"], "checkpoint.resume: '/no/ckpt' is not a folder"),
    ],
)
def test_cli_errors_are_one_paragraph(config_file, arguments, expected):
    from omniweave.cli import main

    out, err = io.StringIO(), io.StringIO()  # in this process: each fails before any group
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", config_file, *arguments])
    assert code != 0
    assert expected in err.getvalue()
    assert "Traceback" not in err.getvalue() + out.getvalue()
    assert err.getvalue().strip().count("\n") == 0, err.getvalue()  # one paragraph


def test_degrees_fill_and_validate():
    assert resolve_degrees(8, dp_replicate=2).dp_shard == 4
    assert resolve_degrees(8, dp_replicate=2, sp=2).fsdp == 4
    with pytest.raises(ValueError, match="does not divide the world size 4"):
        resolve_degrees(4, sp=3)
    with pytest.raises(ValueError, match="2 x 1 x 1 x 1 x 1 = 2, but 4 processes"):
        resolve_degrees(4, dp_replicate=2, dp_shard=1)
    assert resolve_degrees(8, dp_replicate=2, tp=2).dp_shard == 2
    assert resolve_degrees(8, ep=2, tp=2).dp_shard == 4  # experts split over the FSDP ranks
    assert resolve_degrees(8, pp=2, dp_replicate=2).dp_shard == 2
    assert resolve_degrees(8, pp=2, cp=2).dp_shard == 2
    with pytest.raises(ValueError, match="pp=2 composes with dp_shard, dp_replicate, tp, cp"):
        resolve_degrees(4, pp=2, ep=2)
    assert resolve_degrees(8, cp=2, sp=2).fsdp == 8  # context- and sequence-parallel ranks shard
    assert resolve_degrees(8, cp=2, tp=2).fsdp == 4  # tp ranks share their shards
    with pytest.raises(ValueError, match="parallel.ep=4 must divide the FSDP ranks"):
        resolve_degrees(4, dp_replicate=2, ep=4)
    with pytest.raises(ValueError, match=r"HSDP\) is not supported"):
        resolve_degrees(4, dp_replicate=2, ep=2)
    with pytest.raises(ValueError, match="degrees must be >= 1"):
        resolve_degrees(4, sp=0)
