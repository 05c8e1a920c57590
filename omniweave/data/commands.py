"""``omniweave data ...``: build tokenizers and corpora from the command line."""

import argparse

from omniweave.data.tokenizers import CHAT_TEMPLATES

DEFAULT_FORTUNES = "/usr/share/games/fortunes"


def register(subparsers) -> None:
    """Add the ``data`` command and its sub-commands to the main CLI's subparsers."""
    data = subparsers.add_parser("data", help="build tokenizers and corpora")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    p = commands.add_parser("train-tokenizer", help="train a byte-level BPE on a record file")
    p.add_argument("--input", required=True, help="records (.jsonl or .parquet)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output tokenizer folder")
    p.add_argument(
        "--chat-template",
        choices=sorted(CHAT_TEMPLATES),
        default="chatml",
        help="how messages records are rendered (compact: prompt, newline, answer, end of text)",
    )
    p.set_defaults(func=_train_tokenizer)

    p = commands.add_parser("qwen-tokenizer", help="write a Qwen2-compatible tokenizer folder")
    p.add_argument("--out", required=True, help="output tokenizer folder")
    p.set_defaults(func=_qwen_tokenizer)

    p = commands.add_parser("fortunes", help="convert fortune files to text JSONL")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("paths", nargs="*", default=[DEFAULT_FORTUNES], help="fortune files/folders")
    p.set_defaults(func=_fortunes)

    p = commands.add_parser("train-vq", help="train the VQ image tokenizer of an image decoder")
    p.add_argument("images", nargs="+", help="image files or folders of .png/.jpg files")
    p.add_argument("--out", required=True, help="output file (load it as tokenizer_path)")
    p.add_argument("--channels", type=int, default=1, help="1 (grayscale) or 3 (RGB)")
    p.add_argument("--codebook-size", type=int, default=128)
    p.add_argument("--downsample", type=int, default=1, help="stride-2 stages (grid = H / 2^d)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train_vq)

    p = commands.add_parser("build-demo", help="build the omni demo's data set")
    p.add_argument("out", help="output folder (train.jsonl, eval.jsonl, media)")
    p.add_argument("--root", default="/", help="where the Debian packages are unpacked")
    p.add_argument("--fortunes", type=int, default=300, help="plain-text records")
    p.add_argument("--no-synthesis", action="store_true", help="no synthesised speech")
    p.set_defaults(func=_build_demo)


def _train_tokenizer(args: argparse.Namespace) -> None:
    from omniweave.data.records import record_texts
    from omniweave.data.sources import read_records
    from omniweave.data.tokenizers import train_tokenizer

    records = read_records(args.input)
    texts = (t for r in records for t in record_texts(r))
    train_tokenizer(texts, args.vocab_size, args.out, args.chat_template)
    print(f"trained a {args.vocab_size}-token tokenizer on {len(records)} records -> {args.out}")


def _qwen_tokenizer(args: argparse.Namespace) -> None:
    from omniweave.data.tokenizers import qwen_tokenizer

    qwen_tokenizer(args.out)
    print(f"Qwen2 tokenizer -> {args.out}")


def _fortunes(args: argparse.Namespace) -> None:
    from omniweave.data.corpora import fortunes_to_jsonl

    count = fortunes_to_jsonl(args.paths, args.out)
    print(f"wrote {count} fortunes -> {args.out}")


def _train_vq(args: argparse.Namespace) -> None:
    import os

    import torch

    from omniweave.data.media import load_image
    from omniweave.models.omni.vq import save_vq, train_vq

    files = []
    for path in args.images:
        if os.path.isdir(path):
            names = sorted(os.listdir(path))
            files += [os.path.join(path, n) for n in names if n.lower().endswith((".png", ".jpg"))]
        else:
            files.append(path)
    if not files:
        raise ValueError(f"no .png/.jpg images in {args.images}")
    images = [load_image(f, args.channels, 2**args.downsample) for f in files]
    if len({tuple(image.shape) for image in images}) > 1:
        raise ValueError("train-vq needs images of one size; resize them first")
    model, losses = train_vq(
        torch.stack(images),
        steps=args.steps,
        seed=args.seed,
        codebook_size=args.codebook_size,
        downsample=args.downsample,
    )
    save_vq(model, args.out)
    print(f"VQ tokenizer on {len(files)} images: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(
        f"  -> {args.out} ({args.codebook_size} codes, grid {tuple(images[0].shape[1:])} / "
        f"{2**args.downsample})"
    )


def _build_demo(args: argparse.Namespace) -> None:
    from omniweave.data.demo import build_demo

    build_demo(args.out, args.root, fortunes=args.fortunes, synthesize=not args.no_synthesis)
