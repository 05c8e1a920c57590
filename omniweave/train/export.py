"""``omniweave export``: DCP checkpoints to Hugging Face folders and back.

``--format hf``: a checkpoint (``OUTPUT/checkpoints/step_N`` or a run folder, meaning its
``latest``) becomes a folder written by the model's own ``save_pretrained`` (safetensors,
config, generation config) plus the run's tokenizer, so ``transformers`` loads it with
``from_pretrained``. An OmniModel becomes one folder per component::

    OUT/omni_index.json            {"foundation": "foundation", "encoders": {name: folder},
                                    "decoders": {name: folder}, "plugins": [...]}
    OUT/foundation/                the foundation LM and the tokenizer, as above
    OUT/encoders/NAME/             model.safetensors + config.json (its model.omni entry)
    OUT/decoders/NAME/             config.json (+ its VQ tokenizer file, path made relative)

``load_omni`` rebuilds the OmniModel from such a folder.

``--format dcp``: an HF folder (or an OmniModel export) becomes a model-only DCP checkpoint,
``OUT/checkpoints/step_00000000``, keyed by parameter name like the trainer's, for a warm
start; its ``trainer.json`` says ``"model_only": true`` (no optimizer, schedule or data state).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from omniweave.config import load_config
from omniweave.data.processors import load_tokenizer
from omniweave.models.loader import build_model, load_hf_config
from omniweave.models.lora import LoraSettings, merge_adapters, write_peft_adapter
from omniweave.models.native import native_parts, preprocessor_config
from omniweave.models.omni.model import OmniModel, import_plugins
from omniweave.models.registry import model_class, model_from_config
from omniweave.models.weights import gather_full_state
from omniweave.train.checkpoint import LATEST, checkpoints_dir, resolve_resume, step_name
from omniweave.train.manifest import record_folder

INDEX = "omni_index.json"


def read_model_state(checkpoint: str) -> dict[str, torch.Tensor]:
    """The ``model`` entries of a DCP checkpoint as full CPU tensors, read in this process
    alone (no process group; the optimizer state is not read)."""
    metadata = dcp.FileSystemReader(checkpoint).read_metadata()
    state = {
        key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=checkpoint, no_dist=True)
    return state


def write_hf(
    state: dict[str, torch.Tensor],
    hf_config: PretrainedConfig,
    tokenizer,
    out: str,
    omni: dict | None = None,
    dtype: torch.dtype | None = None,
    preprocessor: dict | None = None,
) -> None:
    """Write ``state`` (full tensors keyed as the trained model's parameters) as an HF folder,
    or an OmniModel's component folders and index; ``dtype`` casts the weights (default: as
    trained); ``preprocessor``: a native multimodal model's ``preprocessor_config.json``.
    Writes ``out.tmp``, then replaces ``out``."""
    out = os.path.normpath(out)
    staging = out + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    if omni is None:
        _write_foundation(state, hf_config, tokenizer, staging, dtype)
        if preprocessor:
            with open(os.path.join(staging, "preprocessor_config.json"), "w") as f:
                json.dump(preprocessor, f, indent=2)
    else:
        _write_omni(state, hf_config, tokenizer, staging, omni, dtype)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)


def _write_foundation(state, hf_config, tokenizer, folder: str, dtype) -> None:
    """``save_pretrained`` of the HF model assembled from ``state`` (transformers applies its
    own on-disk conversions, e.g. fused MoE experts back to one tensor per expert)."""
    config = copy.deepcopy(hf_config)
    config._attn_implementation = "sdpa"  # the run's may be a name registered in-process
    with torch.device("meta"):
        model = model_from_config(config)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assign=True replaced the tied parameter on one side only
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the {config.model_type} model of the run config: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _write_omni(state, hf_config, tokenizer, folder: str, omni: dict, dtype) -> None:
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    _write_foundation(part("foundation."), hf_config, tokenizer, f"{folder}/foundation", dtype)
    index = {"foundation": "foundation", "encoders": {}, "decoders": {}}
    index["plugins"] = omni.get("plugins", [])  # load_omni imports them
    for name, entry in omni["encoders"].items():
        index["encoders"][name] = _write_component(folder, f"encoders/{name}", entry)
        tensors = {
            k: v.to(dtype or v.dtype).contiguous() for k, v in part(f"encoders.{name}.").items()
        }
        save_file(tensors, f"{folder}/encoders/{name}/model.safetensors")
    for name, entry in omni.get("decoders", {}).items():
        component, entry = f"decoders/{name}", dict(entry)
        os.makedirs(f"{folder}/{component}")
        if "tokenizer_path" in entry:  # the VQ tokenizer travels with the export
            copied = f"{component}/{os.path.basename(entry['tokenizer_path'])}"
            shutil.copyfile(entry["tokenizer_path"], f"{folder}/{copied}")
            entry["tokenizer_path"] = copied
        index["decoders"][name] = _write_component(folder, component, entry)
    with open(f"{folder}/{INDEX}", "w") as f:
        json.dump(index, f, indent=2)


def _write_component(folder: str, component: str, entry: dict) -> str:
    """``folder/component/config.json``: the component's ``model.omni`` entry."""
    os.makedirs(f"{folder}/{component}", exist_ok=True)
    with open(f"{folder}/{component}/config.json", "w") as f:
        json.dump(entry, f, indent=2)
    return component


def load_omni(folder: str) -> OmniModel:
    """The OmniModel (CPU, fp32, eval mode) of a folder written by ``write_hf`` with ``omni``."""
    with open(os.path.join(folder, INDEX)) as f:
        index = json.load(f)
    import_plugins(index)
    foundation = AutoModelForCausalLM.from_pretrained(
        os.path.join(folder, index["foundation"]), dtype=torch.float32
    )
    entries = {}
    for name, component in index["encoders"].items():
        with open(os.path.join(folder, component, "config.json")) as f:
            entries[name] = json.load(f)
    model = OmniModel.from_config(foundation, entries)
    for name, component in index["encoders"].items():
        weights = load_file(os.path.join(folder, component, "model.safetensors"))
        model.encoders[name].load_state_dict(weights)
    return model.eval()


def export_live(
    model: nn.Module,
    hf_config: PretrainedConfig,
    tokenizer,
    out: str,
    is_main: bool,
    omni: dict | None = None,
    preprocessor: dict | None = None,
) -> str:
    """``write_hf`` of a live (FSDP/EP-sharded or plain) model: every rank calls it (the full
    state is gathered to CPU on rank 0), rank 0 writes ``out``. Returns ``out``."""
    state = gather_full_state(model)
    if is_main:
        write_hf(state, hf_config, tokenizer, out, omni, preprocessor=preprocessor)
    return out


def export_checkpoint(
    source: str, out: str, dtype: torch.dtype | None = None, peft: bool = False
) -> str:
    """``write_hf`` of a checkpoint folder (or a run folder's latest); the model, tokenizer and
    OmniModel layout come from the run's ``config.yaml``. A LoRA run's adapters are merged
    into its base weights, or with ``peft`` written alone as a PEFT adapter folder. Returns
    the checkpoint used."""
    if os.path.isfile(os.path.join(source, "config.yaml")):
        run, checkpoint = source, resolve_resume("auto", source)
    else:  # OUTPUT/checkpoints/step_N
        run, checkpoint = os.path.dirname(os.path.dirname(os.path.abspath(source))), source
    if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, ".metadata")):
        raise ValueError(
            f"'{source}' is neither a DCP checkpoint (checkpoints/step_N with .metadata) nor a "
            "run folder with a checkpoint (config.yaml and checkpoints/latest)."
        )
    config_file = os.path.join(run, "config.yaml")
    if not os.path.isfile(config_file):
        raise ValueError(f"no run config at '{config_file}' to say which model '{source}' holds.")
    cfg = load_config(config_file)
    if peft and (not cfg.model.lora or cfg.model.omni):
        raise ValueError(
            f"--format peft writes a LoRA adapter; '{source}' is "
            + ("an OmniModel run: use --format hf." if cfg.model.lora else "not a LoRA run.")
        )
    hf_config = load_hf_config(cfg.model.path, cfg.model.config, "sdpa")
    if peft:
        lora = LoraSettings.from_config(cfg.model.lora)
        write_peft_adapter(read_model_state(checkpoint), lora, out, cfg.model.path)
        return checkpoint
    state = plain_state(checkpoint, cfg, hf_config)
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    parts = native_parts(hf_config, cfg.model.path, cfg.model.processor)
    write_hf(
        state, hf_config, tokenizer, out, cfg.model.omni, dtype,
        preprocessor=preprocessor_config(parts) if parts else None,
    )  # fmt: skip
    return checkpoint


def plain_state(checkpoint: str, cfg, hf_config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """A checkpoint's weights named as in the plain model. A LoRA run's checkpoint holds the
    adapters only: the frozen weights are rebuilt as the run built them (from ``model.path``
    or the seed), in this process, and the adapters merged into them."""
    state = read_model_state(checkpoint)
    if not cfg.model.lora:
        return state
    lora = LoraSettings.from_config(cfg.model.lora)
    if cfg.model.omni:
        import_plugins(cfg.model.omni)
    model = build_model(
        hf_config, None, cfg.model.path, cfg.train.seed, omni=cfg.model.omni, lora=lora
    )
    return merge_adapters({**model.state_dict(), **state}, lora.scaling)


def import_hf(source: str, out: str) -> str:
    """Write the weights of an HF folder (or of an OmniModel export) as a model-only DCP
    checkpoint ``out/checkpoints/step_00000000`` and point ``latest`` at it; returns it."""
    if os.path.isfile(os.path.join(source, INDEX)):
        model = load_omni(source)
    elif os.path.isfile(os.path.join(source, "config.json")):
        cls = model_class(AutoConfig.from_pretrained(source).model_type)
        model = cls.from_pretrained(source, dtype=torch.float32)
    else:
        raise ValueError(f"'{source}' is neither an HF model folder (config.json) nor an {INDEX}.")
    folder = checkpoints_dir(out)
    final = os.path.join(folder, step_name(0))
    staging = final + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    dcp.save({"model": model.state_dict()}, checkpoint_id=staging, no_dist=True)
    with open(os.path.join(staging, "trainer.json"), "w") as f:
        json.dump(
            {"step": 0, "world_size": 1, "model_only": True, "source": os.path.abspath(source)}, f
        )
    record_folder(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    with open(os.path.join(folder, LATEST), "w") as f:
        f.write(step_name(0) + "\n")
    return final
