"""Tests for omniweave.config: defaults, YAML loading, overrides, strict errors, round trip."""

import dataclasses
import glob
import pathlib
import subprocess
import sys

import pytest
import yaml

from omniweave.config import (
    SECTIONS,
    CheckpointConfig,
    Config,
    ConfigError,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


def write_yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_from_none_path():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.dtype == "float32"
    assert cfg.model.attn_implementation == "sdpa"
    assert cfg.data.max_seq_len == 2048 and cfg.data.on_overlong == "truncate"
    assert cfg.parallel.dp_shard == -1 and cfg.parallel.sp == 1
    assert cfg.train.lr == 3e-4 and cfg.train.lr_schedule == "cosine"
    assert cfg.train.adam_betas == [0.9, 0.95]
    assert cfg.checkpoint.async_save is False and cfg.checkpoint.keep_last == 3
    assert cfg.log.tensorboard is True and cfg.log.all_ranks is False


def test_default_list_is_not_shared():
    a, b = Config(), Config()
    a.train.adam_betas.append(0.5)
    assert b.train.adam_betas == [0.9, 0.95]


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == Config()
    assert load_config(write_yaml(tmp_path, "train:\n")) == Config()


def test_yaml_file_load(tmp_path):
    path = write_yaml(
        tmp_path,
        """
model:
  config: {model_type: qwen2, hidden_size: 32}
  dtype: bfloat16
data:
  train_path: data/train.jsonl
  packing: true
  max_tokens_per_microbatch: 4096
parallel:
  dp_shard: 2
  sp: 2
train:
  lr: 1e-3
  max_steps: 7
  adam_betas: [0.9, 0.99]
  peak_flops: 1.0e+15
checkpoint:
  async: true
  every_steps: 5
""",
    )
    cfg = load_config(str(path))
    assert cfg.model.config == {"model_type": "qwen2", "hidden_size": 32}
    assert cfg.model.dtype == "bfloat16"
    assert cfg.data.train_path == "data/train.jsonl"
    assert cfg.data.packing is True
    assert cfg.data.max_tokens_per_microbatch == 4096
    assert (cfg.parallel.dp_shard, cfg.parallel.sp) == (2, 2)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7
    assert cfg.train.adam_betas == [0.9, 0.99]
    assert cfg.train.peak_flops == 1e15
    assert cfg.checkpoint.async_save is True and cfg.checkpoint.every_steps == 5
    assert cfg.train.global_batch_size == 8  # untouched keys keep their defaults


def test_overrides_scalar_types(tmp_path):
    path = write_yaml(tmp_path, "train:\n  max_steps: 3\n")
    cfg = load_config(
        path,
        [
            "--train.max_steps=11",
            "--train.lr=1e-3",
            "--train.weight_decay=0",
            "--data.packing=true",
            "checkpoint.async=true",  # no dashes; `async` maps to async_save
            "--train.output_dir=2024",  # a str field keeps the text as typed
            "--data.tokenizer_path=null",
        ],
    )
    assert cfg.train.max_steps == 11
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.data.packing is True
    assert cfg.checkpoint.async_save is True
    assert cfg.train.output_dir == "2024"
    assert cfg.data.tokenizer_path is None


def test_override_later_wins_and_beats_file(tmp_path):
    path = write_yaml(tmp_path, "train:\n  seed: 1\n")
    cfg = load_config(path, ["--train.seed=2", "--train.seed=3"])
    assert cfg.train.seed == 3


def test_override_dict_values():
    cfg = load_config(None, ["--model.config={model_type: llama, hidden_size: 64}"])
    assert cfg.model.config == {"model_type": "llama", "hidden_size": 64}
    cfg = load_config(
        None,
        [
            "--model.config.model_type=qwen2",  # creates the dict from None
            "--model.config.hidden_size=64",
            "--model.config.rope_scaling.factor=2.0",
        ],
    )
    assert cfg.model.config == {
        "model_type": "qwen2",
        "hidden_size": 64,
        "rope_scaling": {"factor": 2.0},
    }


def test_override_nested_merges_into_file(tmp_path):
    path = write_yaml(tmp_path, "model:\n  config: {model_type: qwen2, hidden_size: 32}\n")
    cfg = load_config(path, ["--model.config.hidden_size=64"])
    assert cfg.model.config == {"model_type": "qwen2", "hidden_size": 64}


def test_override_dict_merges_into_existing_dict(tmp_path):
    path = write_yaml(tmp_path, "model:\n  config: {model_type: qwen2, rope: {a: 1, b: 2}}\n")
    cfg = load_config(path, ["--model.config={hidden_size: 64, rope: {b: 3}}"])
    assert cfg.model.config == {"model_type": "qwen2", "hidden_size": 64, "rope": {"a": 1, "b": 3}}
    assert load_config(path, ["--model.config=null"]).model.config is None


def test_override_value_not_yaml():
    with pytest.raises(ConfigError, match=r"'\[1' is not valid YAML"):
        load_config(None, ["--train.adam_betas=[1"])


def test_override_deeper_into_non_dict_field():
    with pytest.raises(ConfigError, match=r"train\.lr is not a mapping"):
        load_config(None, ["--train.lr.x=1"])


@pytest.mark.parametrize("bad", ["--train.lr", "--train=1", "--.lr=1", "train.lr"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        load_config(None, [bad])


def test_unknown_key_in_file_suggests(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == "unknown config key 'train.lerning_rate'; did you mean 'train.lr'?"


def test_unknown_key_override_suggests_nearest():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--train.max_step=5"])
    assert "'train.max_step'" in str(err.value)
    assert "did you mean 'train.max_steps'?" in str(err.value)

    with pytest.raises(ConfigError) as err:
        load_config(None, ["--checkpoint.async_save=true"])
    assert "'checkpoint.async_save'" in str(err.value)
    assert "did you mean 'checkpoint.async'?" in str(err.value)


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--log.zzzz=1"])
    msg = str(err.value)
    assert "'log.zzzz'" in msg and "tensorboard" in msg and "all_ranks" in msg


def test_unknown_section(tmp_path):
    path = write_yaml(tmp_path, "trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config section 'trian'.*did you mean 'train'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'paralel'.*did you mean 'parallel'"):
        load_config(None, ["--paralel.sp=2"])


@pytest.mark.parametrize(
    ("override", "expected", "received"),
    [
        ("--train.max_steps=1.5", "int", "1.5"),
        ("--train.max_steps=true", "int", "True"),
        ("--train.lr=fast", "float", "'fast'"),
        ("--data.packing=1", "bool", "1"),
        ("--model.dtype=[1]", "str", "[1]"),
        ("--model.config=5", "dict | None", "5"),
        ("--train.adam_betas=[0.9, x]", "list[float]", "[0.9, 'x']"),
        ("--train.adam_betas=0.9", "list[float]", "0.9"),
        ("--data.max_tokens_per_microbatch=big", "int | None", "'big'"),
    ],
)
def test_wrong_type_message(override, expected, received):
    key = override.removeprefix("--").split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert key in msg and f"expects {expected}" in msg and received in msg


def test_wrong_type_in_file(tmp_path):
    path = write_yaml(tmp_path, "log:\n  plot: 'yes'\n")
    with pytest.raises(ConfigError, match=r"log\.plot expects bool; got 'yes' \(str\)"):
        load_config(path)


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        load_config(write_yaml(tmp_path, "train: 3\n"))
    with pytest.raises(ConfigError, match="config must be a mapping"):
        load_config(write_yaml(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("--model.dtype=float16", "'float32', 'bfloat16'"),
        ("--model.attn_implementation=flash", "'sdpa', 'eager', 'flash_attention_2'"),
        ("--train.lr_schedule=step", "'constant', 'linear', 'cosine'"),
        ("--data.on_overlong=skip", "'truncate', 'drop', 'error'"),
    ],
)
def test_bad_choice_lists_allowed(override, allowed):
    key, value = override.removeprefix("--").split("=")
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == f"{key} must be one of {allowed}; got '{value}'"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("--train.max_steps=0", "train.max_steps must be >= 1"),
        ("--train.global_batch_size=0", "train.global_batch_size must be >= 1"),
        ("--train.micro_batch_size=-2", "train.micro_batch_size must be >= 1"),
        ("--train.log_every=0", "train.log_every must be >= 1"),
        ("--train.lr=0", "train.lr must be > 0"),
        ("--train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
        ("--parallel.sp=0", "parallel.sp must be >= 1"),
        ("--parallel.ep=-1", "parallel.ep must be >= 1"),
        ("--parallel.dp_replicate=0", "parallel.dp_replicate must be >= 1"),
        ("--parallel.dp_shard=0", "parallel.dp_shard must be >= 1 or -1"),
        ("--parallel.dp_shard=-2", "parallel.dp_shard must be >= 1 or -1"),
        ("--train.adam_betas=[0.9, 1.0]", "train.adam_betas must be < 1"),
        ("--train.adam_betas=[0.9]", "train.adam_betas needs exactly 2 values"),
        ("--model.config={hidden_size: 8}", "model.config needs the key(s) model_type"),
    ],
)
def test_value_ranges(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_valid_edge_values():
    cfg = load_config(None, ["--parallel.dp_shard=-1", "--train.max_grad_norm=0"])
    assert cfg.parallel.dp_shard == -1 and cfg.train.max_grad_norm == 0.0
    assert load_config(None, ["--parallel.dp_shard=4"]).parallel.dp_shard == 4


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(missing))


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_config_to_dict_uses_yaml_keys():
    data = config_to_dict(Config(checkpoint=CheckpointConfig(async_save=True)))
    assert list(data) == ["model", "data", "parallel", "train", "checkpoint", "log"]
    assert data["checkpoint"]["async"] is True and "async_save" not in data["checkpoint"]
    assert data["train"]["adam_betas"] == [0.9, 0.95]


def test_config_to_dict_is_a_copy():
    cfg = Config(model=ModelConfig(config={"model_type": "qwen2", "rope": {"theta": 1.0}}))
    data = config_to_dict(cfg)
    data["model"]["config"]["rope"]["theta"] = 2.0
    data["train"]["adam_betas"].append(0.1)
    assert cfg.model.config["rope"]["theta"] == 1.0
    assert cfg.train.adam_betas == [0.9, 0.95]


def test_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "--model.config={model_type: qwen2, hidden_size: 64, layer_types: [a, b]}",
            "--model.dtype=bfloat16",
            "--data.max_tokens_per_microbatch=1024",
            "--train.lr=1e-3",
            "--train.peak_flops=9.89e14",
            "--train.adam_betas=[0.8, 0.9]",
            "--checkpoint.async=true",
            "--checkpoint.resume=latest",
            "--log.plot=false",
        ],
    )
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    assert "async: true" in path.read_text()
    loaded = load_config(path)
    assert loaded == cfg
    assert dataclasses.asdict(loaded) == dataclasses.asdict(cfg)
    assert yaml.safe_load(path.read_text()) == config_to_dict(cfg)


def test_round_trip_defaults(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(Config(), path)
    assert load_config(path) == Config()


@pytest.mark.parametrize(
    "path", sorted(glob.glob(str(pathlib.Path(__file__).parents[1] / "configs" / "*.yaml")))
)
def test_shipped_configs_load(path):
    """Every shipped recipe parses with no unknown key or bad value."""
    cfg = load_config(path)
    assert cfg.data.train_path and cfg.train.output_dir.startswith("runs/")


def test_config_command_prints_the_resolved_config_and_train_help_its_sections(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "m"}, "train": {"max_steps": 7}}))
    command = [sys.executable, "-m", "omniweave.cli", "config", str(path), "--train.lr=3e-4"]
    shown = subprocess.run(command, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    printed = yaml.safe_load(shown.stdout)
    assert config_from_dict(printed) == load_config(path, ["--train.lr=3e-4"])
    for name, section in SECTIONS.items():  # every key present, defaults filled in
        keys = [f.metadata.get("key", f.name) for f in dataclasses.fields(section)]
        assert list(printed[name]) == keys
    assert printed["train"]["max_steps"] == 7 and printed["train"]["lr"] == 3e-4
    assert printed["data"]["prefetch"] == 2  # not in the file: the default
    wrong = subprocess.run([*command[:-1], "--train.lrr=3"], capture_output=True, text=True)
    assert wrong.returncode == 2
    expected = "omniweave: error: unknown config key 'train.lrr'; did you mean 'train.lr'?\n"
    assert wrong.stderr == expected
    helped = subprocess.run([*command[:3], "train", "--help"], capture_output=True, text=True)
    for name, section in SECTIONS.items():
        assert f"  {name}: " in helped.stdout
        for f in dataclasses.fields(section):
            assert f.metadata.get("key", f.name) in helped.stdout
