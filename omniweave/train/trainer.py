"""The training loop: build everything from a Config, then step, log and report."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from tqdm import tqdm

from omniweave.config import Config, save_config
from omniweave.data.loader import (
    DataTimeout,
    build_step_batches,
    default_workers,
    prefetched,
    worker_context,
)
from omniweave.data.packing import MicroBatch
from omniweave.distributed.activations import offload_activations
from omniweave.distributed.fsdp import DTYPES, gpu_default, sync_gradients
from omniweave.distributed.parallel_state import (
    ParallelState,
    device_for_rank,
    init_process_group,
)
from omniweave.distributed.ring import balanced_slice, ring_inputs
from omniweave.distributed.tensor_parallel import sum_gradients, token_local_parameters
from omniweave.models.native import preprocessor_config
from omniweave.models.registry import model_from_config
from omniweave.models.weights import save_full_weights
from omniweave.train.checkpoint import Checkpointer, choose_checkpoint, set_aside
from omniweave.train.checks import validate
from omniweave.train.control import StopConditions, TrainingStopped, timeout_stop
from omniweave.train.export import export_live
from omniweave.train.host_memory import keep_freed_host_memory
from omniweave.train.metrics import (
    MetricsWriter,
    Utilisation,
    flops_per_token,
    max_over_ranks,
    peak_memory_gb,
)
from omniweave.train.model_setup import build_training_model
from omniweave.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from omniweave.train.router import RouterLoss, is_moe
from omniweave.train.sample_log import SampleLog
from omniweave.train.validation import eval_batches, eval_losses


class Trainer:
    """Owns model, optimizer, data and metrics for one run; ``run()`` trains to max_steps."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        degrees, hf_config, self.tokenizer = validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        workers = cfg.data.num_workers
        self.data_workers = default_workers() if workers is None else workers
        if self.data_workers:
            # their server imports what unpickling the data path needs while the model is built
            worker_context(type(self.tokenizer).__module__)
        init_process_group(cfg.parallel.timeout_s)
        self.state = ParallelState(degrees, device_for_rank(int(os.environ.get("LOCAL_RANK", "0"))))
        self.is_main = self.state.rank == 0
        if self.state.device.type == "cpu":  # activations live in host memory
            keep_freed_host_memory()
        if not (self.is_main or cfg.log.all_ranks):
            quiet_this_rank()
        seed_everything(cfg.train.seed)
        built = build_training_model(cfg, hf_config, self.state, self._local, self._ring_inputs)
        self.model, self.foundation, self.pipeline = built.model, built.foundation, built.pipeline
        self.omni_parts, self.output_ranges = built.omni_parts, built.output_ranges
        self.native, self.loss_head, self.lora = built.native, built.loss_head, built.lora
        self.token_losses = built.token_losses
        self.hf_config = hf_config
        t, d = cfg.train, cfg.data
        self.loss_context = loss_parallel if degrees.tp > 1 else contextlib.nullcontext
        self.router_loss = (
            RouterLoss(self.foundation, self.state.token_mesh.get_group())
            if is_moe(self.model)
            else None
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.accumulate_sharded = gpu_default(cfg.parallel.accumulate_sharded, self.state.device)
        # tp: MoE blocks run on each rank's slice of the sequence; their gradients are partial
        self.tp_partial = token_local_parameters(self.foundation) if degrees.tp > 1 else []
        self.optimizer = build_optimizer(
            self.model, t.lr, tuple(t.adam_betas), t.adam_eps, t.weight_decay
        )
        self.scheduler = build_scheduler(
            self.optimizer, t.lr_schedule, t.warmup_steps, t.max_steps, t.min_lr_ratio
        )
        whole = self.model
        if self.pipeline is not None:  # FLOPs of the whole model, not of this rank's stage
            with torch.device("meta"):
                whole = model_from_config(hf_config)
        self.dense_flops, self.attention_flops = flops_per_token(whole, hf_config)
        self.batches = build_step_batches(
            cfg,
            self.state,
            self.tokenizer,
            self.omni_parts,
            self.attention_flops / self.dense_flops,
        )
        group = self.state.dp_mesh.get_group()
        self.sample_log = SampleLog(t.output_dir, group, self.state.device, self.is_main)
        self.mfu = Utilisation(t.peak_flops, self.state.device, self.state.world_size)
        self.tokens_seen, self.start_step = 0, 0
        self.stops = StopConditions(t.max_bad_steps, self.state.device)
        self.checkpointer = None
        self.eval_set = None
        if d.eval_path:
            self.eval_set = eval_batches(cfg, self.state, self.batches.make, self.batches.pad_id)
        resume = self._choose_resume()
        if resume:
            self._resume(resume)

    def _choose_resume(self) -> str | None:
        """Rank 0 verifies the checkpoints (checksums) and picks one, setting damaged ones
        aside; every rank gets its choice, or the same one-line error."""
        choice: list = [None]
        if self.is_main:
            try:
                path, damaged = choose_checkpoint(
                    self.cfg.checkpoint.resume, self.cfg.train.output_dir
                )
                for folder, problem in damaged:
                    print(f"omniweave: checkpoint {folder} is damaged ({problem}); set aside")
                if damaged:
                    set_aside(damaged, path)
                choice = [("path", path)]
            except ValueError as error:
                choice = [("error", str(error))]
        dist.broadcast_object_list(choice, src=0)
        kind, value = choice[0]
        if kind == "error":
            raise ValueError(value)
        return value

    def _checkpointer(self) -> Checkpointer:
        if self.checkpointer is None:  # collective (a process group): every rank at once
            c = self.cfg.checkpoint
            self.checkpointer = Checkpointer(
                self.cfg.train.output_dir, self.model, self.optimizer, c.keep_last, c.async_save,
                self.cfg.parallel.timeout_s, trained_only=self.lora is not None,
            )  # fmt: skip
        return self.checkpointer

    def _resume(self, path: str) -> None:
        state = self._checkpointer().load(path)
        if state.get("model_only"):  # warm start: new optimizer, schedule and data order
            if self.is_main:
                print(f"omniweave: warm start from the weights of {path}")
            return
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.check_resume(state["data"], self.cfg.data.allow_changed_sources)
        self.start_step, self.tokens_seen = state["step"], state["tokens"]
        self.stops.bad_steps = state["bad_steps"]
        if self.is_main:
            print(f"omniweave: resumed from {path} at step {self.start_step}")

    def save_checkpoint(self, step: int) -> str:
        """Checkpoint the state after ``step`` optimizer steps; returns its folder."""
        data = {**self.batches.state_dict(), "step": step}
        state = {
            "tokens": self.tokens_seen,
            "bad_steps": self.stops.bad_steps,
            "scheduler": self.scheduler.state_dict(),
            "data": data,
        }
        return self._checkpointer().save(step, state)

    def train_step(self, step: int, batches: list[MicroBatch] | None = None) -> dict:
        """One optimizer step over this rank's micro-batches (prepared here unless given);
        returns global figures."""
        device = self.state.device
        if batches is None:
            batches = self.batches.micro_batches(step)
        lengths = [n for batch in batches for n in batch.lengths]
        counts = torch.tensor(
            [
                sum(batch.label_tokens for batch in batches),
                sum(batch.labelled_samples for batch in batches),
                sum(lengths),
                sum(n * n for n in lengths),
                sum(batch.input_ids.numel() for batch in batches),
                *(
                    sum(int(self._in_range(batch.targets, modality).sum()) for batch in batches)
                    for modality in self.output_ranges
                ),
            ],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(counts, group=self.state.dp_mesh.get_group())
        label_tokens, samples, input_tokens, squared_lengths, row_tokens, *output_tokens = (
            counts.tolist()
        )
        by_sample = self.cfg.train.loss_average == "samples"
        # Gradients are averaged over all ranks (data- and sequence-parallel): scale so the
        # result is the sum of token losses over the global batch / its number of label tokens
        # (or / its samples, each token loss weighted by 1 / its sample's label tokens).
        denominator = max(samples if by_sample else label_tokens, 1)  # 0: all samples dropped
        scale = self.state.degrees.dp * self.state.degrees.sequence / denominator
        # Each output modality's token-loss sum, then all tokens' (unweighted) for the text's.
        output_sums = torch.zeros(len(self.output_ranges) + 1, dtype=torch.float64, device=device)
        if self.pipeline is not None:  # the last stage's losses; every stage's gradients
            dtype = DTYPES[self.cfg.model.dtype]
            with self.loss_context():  # tp: the losses of split logits, forward and backward
                loss_sum, output_sums = self.pipeline.step(batches, scale, dtype, by_sample)
            dist.all_reduce(loss_sum, group=self.state.pp_group)
            dist.all_reduce(output_sums, group=self.state.pp_group)
            aux_sum, expert_counts = 0.0, None
        else:
            loss_sum, aux_sum, expert_counts = self._backward(
                batches, scale, by_sample, output_sums
            )
        if self.tp_partial:
            sum_gradients(self.tp_partial, self.state.tp_mesh.get_group())
        grad_norm = clip_grad_norm(self.params, self.cfg.train.max_grad_norm, self.state.pp_group)
        dist.all_reduce(loss_sum, group=self.state.loss_mesh.get_group())
        # Both figures are global, so every rank takes the same decision.
        bad = not (math.isfinite(float(grad_norm)) and math.isfinite(float(loss_sum)))
        lr = self.scheduler.get_last_lr()[0]
        if not bad:  # a NaN/Inf step leaves the weights and optimizer state as they were
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        per_modality = {}
        if self.output_ranges:  # text and each output modality's own token-mean loss
            dist.all_reduce(output_sums, group=self.state.loss_mesh.get_group())
            *modality_sums, all_sum = output_sums.tolist()
            text_tokens = label_tokens - sum(output_tokens)
            per_modality["loss_text"] = (all_sum - sum(modality_sums)) / max(text_tokens, 1)
            for modality, total, tokens in zip(
                self.output_ranges, modality_sums, output_tokens, strict=True
            ):
                per_modality[f"loss_{modality}"] = total / tokens if tokens else None
        flops = self.dense_flops * input_tokens + self.attention_flops * squared_lengths
        moe = {}
        if expert_counts is not None:
            load = expert_counts.double()
            moe = {
                "aux_loss": aux_sum,
                "expert_load_max_over_mean": float((load.max(1).values / load.mean(1)).max()),
            }
        coefficient = self.router_loss.coefficient if moe else 0.0
        return {
            **moe,
            **per_modality,
            "loss": float(loss_sum) / denominator + coefficient * aux_sum,
            "grad_norm": float(grad_norm),
            "bad": bad,
            "lr": lr,
            "step_tokens": int(input_tokens),
            "non_padding": input_tokens / row_tokens,
            "flops": flops,
        }

    def _backward(
        self, batches: list[MicroBatch], scale: float, by_sample: bool, output_sums: torch.Tensor
    ) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """Forward and backward of each micro-batch, its loss times ``scale``; adds each output
        modality's token losses to ``output_sums``. Returns the token-loss sum, the mean aux
        loss and the tokens per expert (MoE)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.state.device)
        aux_sum, expert_counts = 0.0, None
        tp, tp_rank = self.state.degrees.tp, self.state.tp_rank
        for index, batch in enumerate(batches):
            sync_gradients(self.model, index == len(batches) - 1, self.accumulate_sharded)
            token_losses, targets, router_logits = self._token_loss(batch)
            if by_sample:
                token_loss = (token_losses * self._local(batch.sample_weights).flatten()).sum()
            else:
                token_loss = token_losses.sum()
            loss = token_loss * scale
            for slot, modality in enumerate(self.output_ranges):
                in_range = self._in_range(targets, modality)
                output_sums[slot] += token_losses.detach()[in_range].sum()
            output_sums[-1] += token_losses.detach().sum()
            if router_logits is not None:
                real = self._local(batch.real).chunk(tp, dim=-1)[tp_rank]  # the router's tokens
                aux, expert_tokens = self.router_loss(router_logits, real.flatten())
                # Every rank holds the same aux value; its gradient reaches each rank's tokens
                # through the gather, summed over ranks, which the gradient average undoes
                # (and, over tp, which sums its MoE gradients, the 1 / tp).
                loss = loss + self.router_loss.coefficient * aux / len(batches) / tp
                aux_sum += float(aux.detach()) / len(batches)
                expert_counts = (
                    expert_tokens if expert_counts is None else expert_counts + expert_tokens
                )
            with self.loss_context():
                loss.backward()
            loss_sum += token_loss.detach()
        return loss_sum, aux_sum, expert_counts

    def _local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full-sequence tensor (the sequence dim is last): its two
        chunks of the ring's split, then its Ulysses slice of those."""
        d = self.state.degrees
        if d.cp > 1:
            t = balanced_slice(t, d.cp, self.state.cp_rank)
        return t.chunk(d.sp, dim=-1)[self.state.sp_rank].to(self.state.device)

    def _ring_inputs(self, position_ids: torch.Tensor) -> dict:
        """Where this rank's tokens of whole rows sit, for ring attention (none without it)."""
        d = self.state.degrees
        if d.cp == 1:
            return {}
        return ring_inputs(position_ids, d.cp, self.state.cp_rank, self.state.device)

    def _in_range(self, targets: torch.Tensor, modality: str) -> torch.Tensor:
        low, high = self.output_ranges[modality]
        return (targets >= low) & (targets < high)

    def _token_loss(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """Per-token cross-entropy of this rank's slice of the micro-batch (0 where there is
        no target), the slice's targets, and the router logits of MoE models."""
        extra = {} if batch.cu_seqlens is None else {"cu_seq_lens_q": batch.cu_seqlens}
        if self.router_loss is not None:
            extra["output_router_logits"] = True
        device = self.state.device
        if self.native is not None:  # the whole sequence; the decoder stack takes its slice
            input_ids = batch.input_ids.to(device)
            inputs = {"input_ids": input_ids, **self.native(input_ids, batch.segments, batch.media)}
        elif self.foundation is not self.model:  # OmniModel: the same
            inputs = {
                "input_ids": batch.input_ids.to(device),
                "position_ids": batch.position_ids.to(device),
                "media": batch.media,
            }
        else:
            inputs = {
                "input_ids": self._local(batch.input_ids),
                "position_ids": self._local(batch.position_ids),
            }
        extra |= self._ring_inputs(batch.position_ids)
        targets = self._local(batch.targets).flatten()
        if self.loss_head is not None:
            self.loss_head.targets = targets
        with offload_activations(self.cfg.train.activation_offload):
            outputs = self.model(**inputs, use_cache=False, **extra)
        if self.loss_head is not None:
            token_losses = outputs.logits.flatten()
        else:
            with self.loss_context():  # tp: logits split over the vocabulary, loss in place
                token_losses = self.token_losses(outputs.logits, targets)
            if isinstance(token_losses, DTensor):
                token_losses = token_losses.to_local()
        router_logits = outputs.router_logits if self.router_loss is not None else None
        return token_losses, targets, router_logits

    def run(self) -> list[dict]:
        """Train to ``train.max_steps``; rank 0 writes the outputs. Returns the logged rows."""
        t, out = self.cfg.train, self.cfg.train.output_dir
        writer = None
        if self.is_main:
            os.makedirs(out, exist_ok=True)
            save_config(self.cfg, os.path.join(out, "config.yaml"))
            writer = MetricsWriter(out, self.cfg.log.tensorboard, self.start_step)
            sources = self.batches.sources
            print(
                f"omniweave: {self.state.describe()}; {sum(sources.sizes):,} records in "
                f"{sum(map(len, sources.shards))} shard(s); {self._parameter_counts()}"
            )
        bar = tqdm(
            initial=self.start_step,
            total=t.max_steps,
            disable=not (self.is_main and self.cfg.log.progress),
            unit="step",
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 30,  # a log file gets a line per 30 s
        )
        rows = []
        stop = None
        steps = prefetched(
            self.batches,
            self.start_step,
            t.max_steps,
            self.data_workers,
            self.cfg.data.prefetch,
            self.cfg.parallel.timeout_s,
        )
        with self.stops:
            for step in range(self.start_step, t.max_steps):
                try:
                    stop = self._step(step, steps, bar, rows, writer)
                except DataTimeout as error:
                    message = f"omniweave: rank {self.state.rank}: {error}."
                    raise TrainingStopped(message, 1, every_rank=True) from None
                except RuntimeError as error:  # a collective of the step or its save timed out
                    timeout_s = self.cfg.parallel.timeout_s
                    stopped = timeout_stop(error, self.state.rank, timeout_s, step + 1)
                    if stopped is None:
                        raise
                    raise stopped from error
                if stop:
                    break
        del steps  # stops the data workers
        bar.close()
        self.sample_log.report(self.cfg.data.max_seq_len)
        if self.checkpointer:
            self.checkpointer.finish()
        if stop:
            if writer:
                writer.close(self.cfg.log.plot)
            raise stop
        final = hf = None
        if t.save_final:
            final = save_full_weights(self.model, os.path.join(out, "final"), self.is_main)
        if t.export_hf_at_end:
            hf = os.path.join(out, "hf")
            native = None if self.native is None else preprocessor_config(self.omni_parts)
            export_live(
                self.model, self.hf_config, self.tokenizer, hf, self.is_main, self.cfg.model.omni,
                preprocessor=native,
            )  # fmt: skip
        if writer:
            plot = writer.close(self.cfg.log.plot)
            print(f"omniweave: outputs in {os.path.abspath(out)}")
            print(f"  metrics: {writer.path}")
            if plot:
                print(f"  loss plot: {plot}")
            if final:
                print(f"  weights: {final}")
            if hf:
                print(f"  Hugging Face export: {hf}")
        return rows

    def _parameter_counts(self) -> str:
        """'N parameters', or 'T trainable of N parameters (P%)' when some are frozen."""
        total = sum(p.numel() for p in self.model.parameters())
        trained = sum(p.numel() for p in self.params)
        if trained == total:
            return f"{total / 1e6:.2f}M parameters"
        return (
            f"{trained / 1e6:.3f}M trainable of {total / 1e6:.2f}M parameters "
            f"({100 * trained / total:.2f}%)"
        )

    def _step(self, step: int, steps, bar, rows: list, writer):
        """Train, log and checkpoint one step (its data from ``steps``); a TrainingStopped when
        the run must stop."""
        t, every = self.cfg.train, self.cfg.checkpoint.every_steps
        start = time.perf_counter()
        data = next(steps)
        data_wait = time.perf_counter() - start
        if data.error:
            raise ValueError(data.error)
        self.sample_log.note(data)
        result = self.train_step(step, data.batches)
        elapsed = time.perf_counter() - start
        self.tokens_seen += result["step_tokens"]
        stop = self.stops.after_step(result["bad"])
        tokens_per_s = result["step_tokens"] / elapsed
        bar.update(1)
        bar.set_postfix(loss=f"{result['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        last = step + 1 == t.max_steps
        evaluating = self.eval_set is not None and (
            last or (t.eval_every and (step + 1) % t.eval_every == 0)
        )
        evals = eval_losses(self, self.eval_set) if evaluating else {}
        if (step + 1) % t.log_every == 0 or last or evaluating:
            memory = peak_memory_gb(self.state.device)
            peak_mem, slowest = max_over_ranks(self.state.device, memory, elapsed)
            row = {
                "step": step + 1,
                "loss": result["loss"],
                "grad_norm": result["grad_norm"],
                "lr": result["lr"],
                "tokens": self.tokens_seen,
                "tokens_per_s": tokens_per_s,
                "mfu": self.mfu(result["flops"], slowest),
                "peak_mem_gb": peak_mem,
                "non_padding": result["non_padding"],
                "data_wait_s": data_wait,
                **self.sample_log.so_far(),
                "skipped_steps": self.stops.bad_steps,
                **evals,
            }
            row.update(
                (key, value)
                for key, value in result.items()
                if key.startswith("loss_") or key in ("aux_loss", "expert_load_max_over_mean")
            )
            rows.append(row)
            if self.cfg.log.all_ranks and not self.is_main:
                print(f"[rank {self.state.rank}] {json.dumps(row)}", flush=True)
            if writer:
                writer.log(row)
        if stop or every and ((step + 1) % every == 0 or step + 1 == t.max_steps):
            saved = self.save_checkpoint(step + 1)
        if stop:
            code, why = stop
            return TrainingStopped(f"{why} Checkpoint of step {step + 1}: {saved}", code)
        return None


def quiet_this_rank() -> None:
    """Silence library warnings on ranks other than 0 (``log.all_ranks`` keeps them)."""
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
