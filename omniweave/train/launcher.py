"""``omniweave train --nproc N``: check the run here, lock its output folder, then run
torchrun's elastic agent in this process, so that the workers are its children (they die
with it) and a worker's known error is printed as one line instead of torchrun's report."""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from omniweave.train.supervision import ERROR_DIR, output_lock, reported_error


class AgentLog(logging.Handler):
    """Keeps the agent's warnings for a failure report; says when it restarts the workers."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.kept: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "will restart worker group" in message:
            print(f"omniweave: a worker failed; restarting all ({message.strip()})", flush=True)
        elif record.levelno >= logging.WARNING:
            self.kept.append(f"{record.levelname} {record.name}: {message}")

    def install(self) -> AgentLog:
        root = logging.getLogger("torch.distributed")
        root.handlers, root.propagate = [self], False
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.INFO)
        return self


def launch(cfg, config: str, overrides: list[str], nproc: int, max_restarts: int) -> int:
    """Train ``config`` in ``nproc`` local worker processes; returns the exit code."""
    arguments = ["--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}"]
    arguments += ["-m", "omniweave.cli", "train", config, *overrides]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from omniweave.train.checks import validate

    validate(cfg, nproc)  # before the lock: a mistake leaves no output folder behind
    with output_lock(cfg.train.output_dir), tempfile.TemporaryDirectory() as errors:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run

        os.environ[ERROR_DIR] = errors
        log = AgentLog().install()
        try:
            run(parse_args(arguments))
        except ChildFailedError as failure:
            reported = reported_error(errors)
            if reported:
                print(reported["line"], file=sys.stderr)
                return reported["exit_code"]
            print("\n".join([*log.kept, failure.format_msg()]), file=sys.stderr)
            return 1
        except SignalException as stopped:  # the workers were sent it too: they checkpoint
            reported = reported_error(errors)
            line = reported["line"] if reported else f"omniweave: stopped by {stopped.sigval.name}"
            print(line, file=sys.stderr)
            return 128 + stopped.sigval
        finally:
            del os.environ[ERROR_DIR]
    return 0
