"""Differentiable all-to-all in two halves, so that compute can run while it is in flight.

``start_all_to_all`` launches the exchange (``async_op=True``) and returns the buffer it
fills; ``wait_all_to_all`` waits and hands the buffer on. In backward the halves swap
roles: the wait's backward launches the gradient's exchange, the start's backward waits
for it, so the autograd engine can run other nodes in between. Used by Ulysses (the value
exchange starts when the value projection is done) and by chunked EP dispatch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Pending:
    """One exchange in flight: its work handles and the buffers they read and fill."""

    def __init__(self, group, send: list[int] | None, receive: list[int] | None):
        self.group, self.send, self.receive = group, send, receive
        self.work = self.grad_work = None
        self.sent = self.grad_sent = self.grad = None


def _exchange(x: torch.Tensor, rows: list[int] | None, split_in, split_out, group):
    """Launch ``all_to_all_single`` of ``x``'s rows; the output buffer, the work, the input."""
    x = x.contiguous()
    out = x.new_empty((sum(rows), *x.shape[1:])) if rows is not None else torch.empty_like(x)
    work = dist.all_to_all_single(out, x, split_out, split_in, group=group, async_op=True)
    return out, work, x


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pending: Pending):
        ctx.pending = pending
        out, pending.work, pending.sent = _exchange(
            x, pending.receive, pending.send, pending.receive, pending.group
        )
        return out

    @staticmethod
    def backward(ctx, _stand_in):
        pending = ctx.pending
        pending.grad_work.wait()
        grad = pending.grad
        pending.grad_work = pending.grad = pending.grad_sent = None  # no cycle through the work
        return grad, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, pending: Pending):
        ctx.pending = pending
        pending.work.wait()
        pending.work = pending.sent = None  # the work holds ``out``, whose graph holds us
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        p = ctx.pending
        p.grad, p.grad_work, p.grad_sent = _exchange(grad, p.send, p.receive, p.send, p.group)
        return grad, None  # a stand-in: the start's backward returns the exchanged ``p.grad``


def start_all_to_all(
    x: torch.Tensor, group, send: list[int] | None = None, receive: list[int] | None = None
) -> tuple[torch.Tensor, Pending]:
    """Launch the exchange of ``x``'s rows (``send``/``receive`` row counts per rank, or
    equal parts); returns the buffer being filled and the handle for ``wait_all_to_all``."""
    pending = Pending(group, send, receive)
    return _Start.apply(x, pending), pending


def wait_all_to_all(buffer: torch.Tensor, pending: Pending) -> torch.Tensor:
    """The filled buffer of ``start_all_to_all``, once its exchange is complete."""
    return _Wait.apply(buffer, pending)


def all_to_all_rows(x: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` of rows with split sizes (zeros allowed)."""
    return wait_all_to_all(*start_all_to_all(x, group, send, receive))
