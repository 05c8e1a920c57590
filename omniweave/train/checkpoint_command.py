"""``omniweave checkpoint verify RUN``: check every checkpoint of a run against its manifest."""

import argparse
import os

from omniweave.train.checkpoint import checkpoints_dir, latest_step, saved_steps, step_name
from omniweave.train.manifest import verify


def register(subparsers) -> None:
    """Add the ``checkpoint`` command and its sub-commands to the main CLI's subparsers."""
    checkpoint = subparsers.add_parser("checkpoint", help="inspect a run's checkpoints")
    commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True)
    p = commands.add_parser(
        "verify",
        help="check each checkpoint's files against its manifest (sizes and CRC-32)",
        description="Print one row per checkpoint of RUN; exit 1 when any is damaged.",
    )
    p.add_argument("run", help="a run's train.output_dir")
    p.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    folder = checkpoints_dir(args.run)
    if not os.path.isdir(folder):
        raise ValueError(f"'{args.run}' has no checkpoints/ folder: not a run, or none saved yet.")
    latest = latest_step(args.run)
    rows, intact, damaged = [], 0, 0
    for step in saved_steps(args.run):
        path = os.path.join(folder, step_name(step))
        problem = verify(path)
        intact, damaged = intact + (problem is None), damaged + (problem is not None)
        size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
        mark = " (latest)" if step == latest else ""
        rows.append((f"{step}{mark}", f"{size / 2**20:,.1f}", problem or "intact"))
    for name in sorted(os.listdir(folder)):
        if name.endswith(".damaged"):
            rows.append((name, "", "set aside after a failed verification"))
        elif name.endswith(".tmp"):
            rows.append((name, "", "an unfinished save (removed by the next save)"))
    if not rows:
        print(f"no checkpoints in {folder}")
        return 0
    widths = [max(len(row[i]) for row in [*rows, ("step", "MiB", "status")]) for i in range(3)]
    for row in [("step", "MiB", "status"), *rows]:
        print(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]}")
    print(f"{intact} intact, {damaged} damaged")
    return 1 if damaged else 0
