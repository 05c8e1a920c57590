"""``omniweave data ...``: build tokenizers and corpora from the command line."""

import argparse

DEFAULT_FORTUNES = "/usr/share/games/fortunes"


def register(subparsers) -> None:
    """Add the ``data`` command and its sub-commands to the main CLI's subparsers."""
    data = subparsers.add_parser("data", help="build tokenizers and corpora")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    p = commands.add_parser("train-tokenizer", help="train a byte-level BPE on a record file")
    p.add_argument("--input", required=True, help="records (.jsonl or .parquet)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output tokenizer folder")
    p.set_defaults(func=_train_tokenizer)

    p = commands.add_parser("qwen-tokenizer", help="write a Qwen2-compatible tokenizer folder")
    p.add_argument("--out", required=True, help="output tokenizer folder")
    p.set_defaults(func=_qwen_tokenizer)

    p = commands.add_parser("fortunes", help="convert fortune files to text JSONL")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("paths", nargs="*", default=[DEFAULT_FORTUNES], help="fortune files/folders")
    p.set_defaults(func=_fortunes)


def _train_tokenizer(args: argparse.Namespace) -> None:
    from omniweave.data.records import read_records, record_texts
    from omniweave.data.tokenizers import train_tokenizer

    records = read_records(args.input)
    train_tokenizer((t for r in records for t in record_texts(r)), args.vocab_size, args.out)
    print(f"trained a {args.vocab_size}-token tokenizer on {len(records)} records -> {args.out}")


def _qwen_tokenizer(args: argparse.Namespace) -> None:
    from omniweave.data.tokenizers import qwen_tokenizer

    qwen_tokenizer(args.out)
    print(f"Qwen2 tokenizer -> {args.out}")


def _fortunes(args: argparse.Namespace) -> None:
    from omniweave.data.corpora import fortunes_to_jsonl

    count = fortunes_to_jsonl(args.paths, args.out)
    print(f"wrote {count} fortunes -> {args.out}")
