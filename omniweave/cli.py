"""``omniweave`` command line: train, config, generate, eval, export, checkpoint, bench,
data."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from typing import NoReturn

from omniweave.config import load_config


def _fail(message: str) -> int:
    """Print a user error once per node, without a traceback; return the exit code."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"omniweave: error: {message}", file=sys.stderr)
    return 2


def train_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from omniweave.train import supervision

    cfg = None
    try:
        cfg = load_config(args.config, overrides)
        if args.max_restarts and not args.nproc:
            raise ValueError("--max-restarts restarts torchrun's workers: give --nproc N too.")
        if args.nproc:
            from omniweave.train.launcher import launch

            return launch(cfg, args.config, overrides, args.nproc, args.max_restarts)
        from omniweave.train.control import TrainingStopped
        from omniweave.train.trainer import Trainer

        if "LOCAL_RANK" in os.environ:  # a worker of ours or of torchrun: die with it
            supervision.die_with_parent()
        lock = contextlib.nullcontext()  # the launcher holds it, or rank 0 takes it here
        if not supervision.under_launcher() and os.environ.get("RANK", "0") == "0":
            lock = supervision.output_lock(cfg.train.output_dir)
        try:
            with lock:
                Trainer(cfg).run()
        except TrainingStopped as stopped:
            if not supervision.report_to_launcher(str(stopped), stopped.exit_code) and (
                stopped.every_rank or os.environ.get("RANK", "0") == "0"
            ):
                print(stopped, file=sys.stderr)
            return stopped.exit_code
    except ValueError as error:  # ConfigError included: user mistakes, one paragraph each
        if "RANK" in os.environ:  # a worker's: the traceback kept in its run's logs/
            supervision.log_traceback(cfg and cfg.train.output_dir)
        if supervision.report_to_launcher(f"omniweave: error: {error}", 2):
            return 2
        return _fail(str(error))
    except Exception as error:
        if supervision.another_rank_reported():  # an echo of that rank's failure
            supervision.log_traceback(cfg and cfg.train.output_dir)
            return 1
        if supervision.lost_a_peer(error):  # the dead rank is the story, not this traceback
            supervision.log_traceback(cfg and cfg.train.output_dir)
            rank = os.environ.get("RANK", "0")
            print(f"omniweave: rank {rank} lost its connection to a rank whose process died",
                  file=sys.stderr)  # fmt: skip
            return 1
        raise
    return 0


def _end_rank(code: int) -> NoReturn:
    """A launched rank's process ends here, without the interpreter's teardown of torch:
    destroying a gloo process group just after a collective can deadlock (its destructor waits,
    holding the GIL, for a gloo thread that needs the GIL to drop its last work) or abort in
    C++ (``terminate called without an active exception``), both seen in 4-process runs. By
    now the run has closed what it wrote, stopped its data workers and finished its saves."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _generate(args: argparse.Namespace) -> None:
    from omniweave.train.generate import generate

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--max-new-tokens must be >= 1, --temperature >= 0, 0 < --top-p <= 1.")
    text = generate(
        args.source, args.prompt, args.max_new_tokens, args.chat,
        {"image": args.image, "video": args.video, "audio": args.audio},
        args.temperature, args.top_p, args.seed,
    )  # fmt: skip
    print(text)


def _evaluate(args: argparse.Namespace) -> None:
    import json

    from omniweave.train.evaluate import evaluate

    result = evaluate(args.run, args.data)
    summary = {k: v for k, v in result.items() if not k.endswith("_n") and k != "examples"}
    print(json.dumps(summary, indent=2))
    print(f"omniweave: {os.path.join(args.run, 'eval.json')}")


def _bench(arguments: list[str]) -> int:
    report = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "report.py")
    if not os.path.isfile(report):
        return _fail("omniweave bench runs the bench/ scripts of a source checkout; none here.")
    return subprocess.run([sys.executable, report, *arguments], check=False).returncode


def config_sections() -> str:
    """Each config section with its summary and keys (for ``train --help``)."""
    import dataclasses
    import textwrap

    from omniweave.config import SECTIONS

    lines = ["config sections (YAML, or --section.key=value on the command line):"]
    for name, section in SECTIONS.items():
        summary = " ".join(section.__doc__.split()).split(". ")[0].rstrip(".")
        keys = ", ".join(f.metadata.get("key", f.name) for f in dataclasses.fields(section))
        lines += textwrap.wrap(f"{name}: {summary}.", 88, initial_indent="  ",
                               subsequent_indent="    ")  # fmt: skip
        lines += textwrap.wrap(f"keys: {keys}", 88, initial_indent="    ",
                               subsequent_indent="      ")  # fmt: skip
    lines.append("`omniweave config CONFIG` prints a config with every default filled in.")
    return "\n".join(lines)


def _print_config(args: argparse.Namespace, overrides: list[str]) -> int:
    import yaml

    from omniweave.config import config_to_dict

    cfg = load_config(args.config, overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omniweave", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from CONFIG; override any key with --section.key=value.",
        epilog=config_sections(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="YAML config file")
    train.add_argument(
        "--nproc",
        type=int,
        default=0,
        help="check the run, then train in N local worker processes (torchrun's agent)",
    )
    train.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restart all workers up to K times when one fails; each restart resumes from "
        "the newest intact checkpoint (with checkpoint.every_steps and checkpoint.resume: auto)",
    )
    generate = commands.add_parser(
        "generate",
        help="continue a prompt with a trained model (a run, a checkpoint or an HF folder)",
        description="Greedy by default; --temperature T > 0 samples (with --top-p, --seed).",
    )
    generate.add_argument("source", help="HF folder, OmniModel export, run or checkpoint")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--chat", action="store_true", help="apply the chat template")
    for modality in ("image", "video", "audio"):
        generate.add_argument(
            f"--{modality}",
            action="append",
            default=[],
            help=f"a file for the model's {modality} encoder (repeatable); the prompt gets a "
            f"<{modality}> marker per file unless it has one",
        )
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(func=_generate)
    show = commands.add_parser(
        "config",
        help="print a config fully resolved (every default filled in) and exit",
        description="Read CONFIG, apply --section.key=value overrides, check it and print it.",
    )
    show.add_argument("config", help="YAML config file")
    evaluate = commands.add_parser(
        "eval", help="score a trained OmniModel on the held-out prompts of a demo data set"
    )
    evaluate.add_argument("run", help="train.output_dir of a run with train.save_final")
    evaluate.add_argument("data", help="folder written by `omniweave data build-demo`")
    evaluate.set_defaults(func=_evaluate)
    commands.add_parser(
        "bench",
        help="run bench/ on this machine and write docs/benchmarks.md (source checkout)",
        description="Options are bench/report.py's: --only NAME ..., --out PATH.",
    )
    from omniweave.data.commands import register
    from omniweave.train.checkpoint_command import register as register_checkpoint
    from omniweave.train.export_command import register as register_export

    register(commands)
    register_export(commands)
    register_checkpoint(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "train":
        return train_command(args, unknown)
    if args.command == "config":
        try:
            return _print_config(args, unknown)
        except ValueError as error:
            return _fail(str(error))
    if args.command == "bench":
        return _bench(unknown)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args) or 0
    except ValueError as error:
        return _fail(str(error))


if __name__ == "__main__":
    exit_code = main()
    if "RANK" in os.environ:
        _end_rank(exit_code)
    sys.exit(exit_code)
