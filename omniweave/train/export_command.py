"""``omniweave export SRC --format {hf,peft,dcp} OUT`` (the work is in ``export.py``, imported only
when the command runs)."""

import argparse
import os

DTYPES = ("bfloat16", "float16", "float32")


def register(subparsers) -> None:
    """Add the ``export`` command to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "export",
        help="convert a checkpoint to a Hugging Face folder, or an HF folder to a checkpoint",
        description="--format hf: a checkpoint (or a run folder's latest) to an HF folder that "
        "transformers loads with from_pretrained (a LoRA run's adapters merged in); --format "
        "peft: a LoRA run's adapters as a folder PeftModel.from_pretrained loads; --format dcp: "
        "an HF folder to a model-only DCP checkpoint OUT/checkpoints/step_00000000 for a warm "
        "start.",
    )
    p.add_argument("source", help="hf, peft: checkpoints/step_N or a run folder; dcp: an HF folder")
    p.add_argument("--format", required=True, choices=("hf", "peft", "dcp"), help="what to write")
    p.add_argument("out", help="output folder (new or empty)")
    p.add_argument("--dtype", choices=DTYPES, help="hf: cast the weights (default: as trained)")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> None:
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise ValueError(f"'{args.out}' exists and is not empty; choose a new output folder.")
    if args.format != "hf" and args.dtype:
        raise ValueError("--dtype applies to --format hf; checkpoints hold float32 weights.")
    import torch

    from omniweave.train.export import export_checkpoint, import_hf

    if args.format == "hf":
        dtype = getattr(torch, args.dtype) if args.dtype else None
        checkpoint = export_checkpoint(args.source, args.out, dtype)
        print(f"omniweave: {checkpoint} -> {args.out} (load it with from_pretrained)")
    elif args.format == "peft":
        checkpoint = export_checkpoint(args.source, args.out, peft=True)
        print(f"omniweave: {checkpoint} -> {args.out} (load it with PeftModel.from_pretrained)")
    else:
        checkpoint = import_hf(args.source, args.out)
        print(f"omniweave: {args.source} -> {checkpoint} (model only, for a warm start)")
