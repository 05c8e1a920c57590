"""Typed run config: one dataclass per YAML section, dotted CLI overrides, strict checks.

A typo or bad value ends in one clear `ConfigError`, never a silently ignored setting.
Cross-section checks (model.path vs model.config, files, world size) live with their owners.
"""

import dataclasses
import difflib
import operator
import os
import pathlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in the config file or the command-line overrides."""


def _opt(default: Any, **rules: Any) -> Any:
    """A field with its YAML `key`, typo-hint `aliases` and validation rules in its metadata."""
    return field(default=default, metadata=rules)


@dataclass
class ModelConfig:
    """Which model to train: a local HF folder (`path`) or an inline HF config (`config`)."""

    path: str | None = None
    config: dict | None = field(default=None, metadata={"required_keys": ("model_type",)})
    dtype: str = _opt("float32", choices=("float32", "bfloat16"))  # bf16: fp32 master + reduce
    attn_implementation: str = _opt("sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    omni: dict | None = field(default=None, metadata={"required_keys": ("encoders",)})
    processor: dict | None = None  # options of a native multimodal model's image processor
    lora: dict | None = None  # LoRA adapters: {rank, alpha, dropout, target_modules}


@dataclass
class DataConfig:
    """Training data (files, directories or globs of JSONL, JSONL.gz, JSON, Parquet or
    `datasets` folders), tokenization, packing, batching and the loading workers."""

    train_path: str | None = None
    sources: list[dict] | None = None  # a weighted mix instead: [{path, weight}, ...]
    tokenizer_path: str | None = None
    max_seq_len: int = _opt(2048, ge=1)
    packing: bool = False
    max_tokens_per_microbatch: int | None = _opt(None, ge=1)  # token budget per micro-batch
    # Rows' lengths round up to a multiple of this (padding, never a target), so GEMM shapes
    # repeat; None: 64 for bfloat16 on CPU (oneDNN builds a kernel per new shape), else 1.
    pad_to_multiple_of: int | None = _opt(None, ge=1)
    budget_counts: str = _opt("tokens", choices=("tokens", "labels"))  # what the budget counts
    shuffle: bool = True
    on_overlong: str = _opt("truncate", choices=("truncate", "drop", "error"))
    on_bad_sample: str = _opt("error", choices=("error", "skip"))  # malformed record / media
    num_workers: int | None = _opt(None, ge=0)  # processes preparing steps; None: by the cores
    prefetch: int = _opt(2, ge=1)  # steps prepared ahead of the trainer
    allow_changed_sources: bool = False  # resume although a shard was added, removed or edited
    eval_path: str | None = None  # held-out data (any source train_path takes) for eval_loss


@dataclass
class ParallelConfig:
    """Degrees of the device mesh axes; `dp_shard=-1` takes whatever is left."""

    dp_replicate: int = _opt(1, ge=1)
    dp_shard: int = _opt(-1, ge=1, allow=(-1,))
    sp: int = _opt(1, ge=1)
    ep: int = _opt(1, ge=1)
    tp: int = _opt(1, ge=1)  # tensor parallel: each layer's weights split over tp ranks
    cp: int = _opt(1, ge=1)  # ring context parallel: each row split over cp ranks
    pp: int = _opt(1, ge=1)  # pipeline parallel: the decoder layers cut into pp stages
    pp_schedule: str = _opt("1f1b", choices=("1f1b", "gpipe", "interleaved_1f1b"))
    pp_virtual_stages: int = _opt(1, ge=1)  # stages per pipeline rank (interleaved_1f1b: >= 2)
    grouped_experts: bool = False  # MoE experts as one grouped GEMM instead of a loop
    ep_chunks: int = _opt(1, ge=1)  # EP dispatch in parts: exchange overlaps expert compute
    async_ulysses: bool = True  # start each value all-to-all when its projection is done
    cpu_offload: bool = False
    # FSDP: free each unit's gathered weights after its forward (false: keep them for the
    # backward, one all-gather per unit and micro-batch fewer, the whole model's weights held
    # meanwhile); None: true on a GPU, false on CPU (see fsdp.gpu_default)
    reshard_after_forward: bool | None = None
    # FSDP accumulation: reduce-scatter each micro-batch's gradients into the shards (true) or
    # hold the whole model's fp32 gradients until the step's last; None: true on a GPU only
    accumulate_sharded: bool | None = None
    timeout_s: float = _opt(600.0, gt=0)  # a collective (or the data workers) waiting longer


@dataclass
class TrainConfig:
    """The optimisation loop: steps, batch sizes, optimizer, LR schedule, logging cadence."""

    output_dir: str = "runs/default"
    max_steps: int = _opt(100, ge=1)
    global_batch_size: int = _opt(8, ge=1)
    micro_batch_size: int = _opt(1, ge=1)
    eval_every: int = _opt(0, ge=0)  # steps between eval_loss passes (and at the end); 0: end
    eval_max_samples: int | None = _opt(None, ge=1)  # eval on the first N records only
    lr: float = _opt(3e-4, gt=0, aliases=("learning_rate",))
    lr_schedule: str = _opt("cosine", choices=("constant", "linear", "cosine"))
    warmup_steps: int = _opt(0, ge=0)
    min_lr_ratio: float = _opt(0.1, ge=0, le=1)
    weight_decay: float = _opt(0.1, ge=0)
    adam_betas: list[float] = field(
        default_factory=lambda: [0.9, 0.95], metadata={"length": 2, "ge": 0, "lt": 1}
    )
    adam_eps: float = _opt(1e-8, gt=0)
    max_grad_norm: float = _opt(1.0, ge=0, aliases=("grad_clip",))  # 0 disables clipping
    seed: int = 0
    log_every: int = _opt(1, ge=1)
    peak_flops: float | None = _opt(None, gt=0)  # device peak FLOP/s for MFU; None = measure
    save_final: bool = False  # unsharded weights in output_dir/final/model.safetensors
    # Recompute blocks in backward: none, full (each block), or only its attention / mlp;
    # `activation_checkpointing_every: k` takes every k-th block. Offload: saved tensors to host.
    activation_checkpointing: str = _opt("none", choices=("none", "full", "attention", "mlp"))
    activation_checkpointing_every: int = _opt(1, ge=1)
    activation_offload: bool = False
    # chunked: LM head + loss a chunk of tokens at a time (no whole [tokens, vocab] logits)
    cross_entropy: str = _opt("naive", choices=("naive", "chunked"))
    cross_entropy_chunk: int = _opt(512, ge=1)  # tokens per chunk (x vocab x 4 bytes at a time)
    # The loss is the mean over the batch's target tokens, or over its samples (each sample's
    # own token mean), so short answers (a spoken digit) weigh as much as long ones (an image).
    loss_average: str = _opt("tokens", choices=("tokens", "samples"))
    kernels: str = _opt("torch", choices=("torch", "liger"))  # liger: fused ops on a CUDA GPU
    compile: bool = False  # torch.compile each decoder block and the loss
    export_hf_at_end: bool = False  # `omniweave export --format hf` of the end state, in hf/
    max_bad_steps: int = _opt(10, ge=0)  # NaN/Inf steps in a row that stop the run; 0 = never


@dataclass
class CheckpointConfig:
    """Periodic DCP checkpoints and resuming."""

    every_steps: int = _opt(0, ge=0)  # 0 = no periodic checkpoints
    resume: str = "auto"  # auto: the run's latest checkpoint if any; none; or a folder
    async_save: bool = _opt(False, key="async")  # `async` is a Python keyword
    keep_last: int = _opt(3, ge=0)


@dataclass
class LogConfig:
    """Where metrics go: TensorBoard, a loss plot, a progress bar; rank 0 only by default."""

    tensorboard: bool = True
    plot: bool = True
    progress: bool = True
    all_ranks: bool = False


@dataclass
class Config:
    """The whole run configuration, one attribute per YAML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}


def _unknown(kind: str, name: Any, valid: dict[str, str], prefix: str = "") -> ConfigError:
    """An error for an unknown name; `valid` maps valid names and aliases to the valid name."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    if close:
        hint = f"did you mean '{prefix}{valid[close[0]]}'?"
    else:
        hint = "valid: " + ", ".join(sorted(set(valid.values())))
    return ConfigError(f"unknown config {kind} '{prefix}{name}'; {hint}")


def _lookup(section: Any, key: Any) -> tuple[dataclasses.Field, Any]:
    """The field for YAML `section.key` and its resolved type hint; unknown names raise."""
    if section not in SECTIONS:
        raise _unknown("section", section, {s: s for s in SECTIONS})
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    # YAML/CLI names are the attribute names unless metadata gives a `key` (for `async`)
    known = {f.metadata.get("key", f.name): (f, hints[f.name]) for f in dataclasses.fields(cls)}
    if key not in known:
        valid = {a: k for k, (f, _) in known.items() for a in f.metadata.get("aliases", ())}
        raise _unknown("key", key, valid | {k: k for k in known}, prefix=f"{section}.")
    return known[key]


def _mapping(value: Any, what: str) -> dict:
    """`value` if it is a mapping, {} if None; otherwise a ConfigError about `what`."""
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping; got {value!r}")
    return value or {}


_MISMATCH = object()


def _coerce(value: Any, tp: Any) -> Any:
    """Return `value` converted to type `tp`, or `_MISMATCH` when it does not fit."""
    if isinstance(tp, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg)
            if out is not _MISMATCH:
                return out
        return _MISMATCH
    if tp is type(None):
        return None if value is None else _MISMATCH
    if tp is float:  # numbers, and numeric strings: YAML reads `1e-3` as a str
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            return _MISMATCH
        try:
            return float(value)
        except ValueError:
            return _MISMATCH
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if tp is dict:
        return dict(value) if isinstance(value, dict) else _MISMATCH
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            return _MISMATCH
        items = [_coerce(v, typing.get_args(tp)[0]) for v in value]
        return _MISMATCH if any(i is _MISMATCH for i in items) else items
    return value if type(value) is tp else _MISMATCH  # bool, str: exact type only


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}  # metadata rule -> operator


def _accepts(tp: Any, kind: type) -> bool:
    """Whether a field typed `tp` (maybe `X | None`) holds values of `kind`."""
    return kind in (typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,))


def _check_rules(name: str, value: Any, rules: typing.Mapping[str, Any]) -> None:
    """Check choices, length and numeric bounds declared in a field's metadata."""
    if value is None:
        return
    if "choices" in rules and value not in rules["choices"]:
        allowed = ", ".join(repr(c) for c in rules["choices"])
        raise ConfigError(f"{name} must be one of {allowed}; got {value!r}")
    if "length" in rules and len(value) != rules["length"]:
        raise ConfigError(f"{name} needs exactly {rules['length']} values; got {value!r}")
    missing = [k for k in rules.get("required_keys", ()) if k not in value]
    if missing:
        raise ConfigError(f"{name} needs the key(s) {', '.join(missing)}; got {value!r}")
    for item in value if isinstance(value, list) else [value]:
        if item in rules.get("allow", ()):
            continue
        for rule, sign in _BOUNDS.items():
            if rule in rules and not getattr(operator, rule)(float(item), rules[rule]):
                also = "".join(f" or {a}" for a in rules.get("allow", ()))
                raise ConfigError(f"{name} must be {sign} {rules[rule]}{also}; got {value!r}")


def _build_section(section: str, raw: Any) -> Any:
    """Build one section dataclass from its raw YAML mapping, validating every key."""
    kwargs = {}
    for key, value in _mapping(raw, f"config section '{section}'").items():
        f, tp = _lookup(section, key)
        name, out = f"{section}.{key}", _coerce(value, tp)
        if out is _MISMATCH:
            expected = tp.__name__ if isinstance(tp, type) else str(tp)
            raise ConfigError(f"{name} expects {expected}; got {value!r} ({type(value).__name__})")
        _check_rules(name, out, f.metadata)
        kwargs[f.name] = out
    return SECTIONS[section](**kwargs)


def config_from_dict(raw: dict | None) -> Config:
    """Build and validate a `Config` from a nested plain dict (as read from YAML)."""
    raw = _mapping(raw, "config")
    for section in raw:
        if section not in SECTIONS:
            raise _unknown("section", section, {s: s for s in SECTIONS})
    return Config(**{s: _build_section(s, raw.get(s)) for s in SECTIONS})


def _apply_override(raw: dict, override: str) -> None:
    """Apply one `--section.key[.subkey...]=value` override to the raw config dict."""
    dotted, sep, value_text = override.removeprefix("--").partition("=")
    parts = dotted.split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"bad override {override!r}; expected --section.key=value")
    section, key, *deeper = parts
    tp = _lookup(section, key)[1]
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        raise ConfigError(f"override {override!r}: {value_text!r} is not valid YAML") from None
    if isinstance(value, int | float) and _accepts(tp, str):
        value = value_text  # a str field: keep `--train.output_dir=2024` as typed
    if deeper and not _accepts(tp, dict):
        raise ConfigError(f"{section}.{key} is not a mapping; cannot set {dotted}")
    target = raw
    for i, part in enumerate(parts[:-1]):
        target[part] = _mapping(target.get(part), ".".join(parts[: i + 1]))
        target = target[part]
    target[parts[-1]] = _merged(target.get(parts[-1]), value)


def _merged(old: Any, new: Any) -> Any:
    """`new` deep-merged over `old` when both are mappings, else `new` (how overrides combine)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    return old | {k: _merged(old.get(k), v) for k, v in new.items()}


def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (None = all defaults), apply dotted overrides, validate strictly."""
    raw = None
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {os.fspath(path)}")
        with open(path, encoding="utf-8") as fh:
            try:
                raw = yaml.safe_load(fh)
            except yaml.YAMLError as e:
                raise ConfigError(f"cannot parse config file {os.fspath(path)}: {e}") from None
    raw = _mapping(raw, "config")
    for override in overrides:
        _apply_override(raw, override)
    return config_from_dict(raw)


def config_to_dict(cfg: Config) -> dict:
    """The config as a nested plain dict keyed by YAML names (`async`, not `async_save`)."""
    out = dataclasses.asdict(cfg)  # deep copies dicts and lists
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):  # re-insert every key, keeping the field order
            out[name][f.metadata.get("key", f.name)] = out[name].pop(f.name)
    return out


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML; `load_config(path)` gives back an equal `Config`."""
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False, default_flow_style=False)
