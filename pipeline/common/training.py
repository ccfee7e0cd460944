"""The one minibatch loop of the classifiers this project trains: the students (``eval/students.py``) and
prior-quality's judge (``prior/quality.py``).

Each caller keeps its own model, optimiser, schedule, augmentation and loss (a student's loss may relabel
each batch with a frozen teacher: soft labels, ``eval/students.py``); the loop owns the order of
the draws, which is what makes a result reproducible: per epoch one permutation from ``generator``, then
per minibatch ``batch_loss(indices)`` (whatever it draws, it draws here, in batch order) and one
zero_grad / backward / optimiser step / scheduler step.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def train_minibatches(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, n: int, batch_size: int,
                      epochs: int, generator: torch.Generator, batch_loss: Callable[[torch.Tensor], torch.Tensor],
                      end_epoch: Callable[[int], None] | None = None, device=None) -> nn.Module:
    """``epochs`` passes over ``n`` items in minibatches (the last one smaller); the model in eval mode.

    ``model.train()`` starts every epoch, so ``end_epoch(epoch)`` (epochs count from 1) may evaluate it.
    ``device``: where the index permutation goes (the generator draws it on the CPU).
    """
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator)
        if device is not None:
            order = order.to(device)
        for start in range(0, n, batch_size):
            loss = batch_loss(order[start:start + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if end_epoch is not None:
            end_epoch(epoch)
    return model.eval()
