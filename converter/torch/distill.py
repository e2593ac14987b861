"""Knowledge-distillation recovery of a pruned model: the unpruned model teaches it.

The loss is one function, :func:`kd_loss` (Hinton et al. 2015): KL divergence between the
temperature-softened outputs of teacher and student, scaled by T² so its gradients keep their
size across temperatures, plus ``alpha`` × cross-entropy with the labels when there are any.
The loop is plain: seeded shuffling, Adam, a held-out split scored after every interval for
early stopping (the best state is kept), a tqdm bar with the loss and no other I/O.

Data-parallel: under ``torchrun --nproc-per-node N`` (``WORLD_SIZE``/``RANK`` set by torchrun)
the student is wrapped in DistributedDataParallel (gloo) and every rank takes an equal slice
of each global batch, so the averaged gradient is that of the one-process batch and the
result matches the one-process run up to float rounding.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from converter.core.render import progress_bar

__all__ = [
    "kd_loss",
    "DistillSettings",
    "DistillHistory",
    "distill",
    "predict",
    "World",
    "world",
]

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    T: float,
    labels: torch.Tensor | None = None,
    alpha: float = 0.5,
) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over samples, weighted
    (1 − alpha), plus alpha · cross-entropy(student, labels) when labels are given (without
    labels the KL term alone, unweighted). Logits have classes on the last axis."""
    classes = student_logits.shape[-1]
    s = student_logits.reshape(-1, classes) / T
    t = teacher_logits.reshape(-1, classes) / T
    kl = F.kl_div(
        F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True
    )
    soft = kl * T * T
    if labels is None:
        return soft
    hard = F.cross_entropy(student_logits.reshape(-1, classes), labels.reshape(-1))
    return (1 - alpha) * soft + alpha * hard


@dataclass(frozen=True)
class DistillSettings:
    """``temperature`` and ``alpha`` of :func:`kd_loss`; ``epochs`` passes over the training
    split, or exactly ``steps`` optimizer steps when given; Adam at ``lr``; ``batch_size``
    samples per step (global, over all ranks); early stop after ``patience`` held-out scores
    without improvement; ``seed`` fixes the shuffling."""

    temperature: float = 4.0
    alpha: float = 0.5
    epochs: int = 10
    steps: int | None = None
    lr: float = 1e-3
    batch_size: int = 64
    patience: int = 3
    seed: int = 0


@dataclass
class DistillHistory:
    """The loss curve: training loss per step, held-out loss at each evaluated step."""

    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    best_step: int = 0
    stopped_early: bool = False


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (size 1, rank 0 without torchrun)."""

    size: int = 1
    rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group (after training; only rank 0 goes on to export)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def world() -> World:
    """Read torchrun's contract (WORLD_SIZE, RANK) and join the gloo process group."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return World(size, dist.get_rank())


def _logits(output) -> torch.Tensor:
    """The tensor distilled: the output, or the first one of a tuple/list/dict output."""
    while not isinstance(output, torch.Tensor):
        output = next(iter(output.values())) if isinstance(output, Mapping) else output[0]
    return output


def _forward(model: nn.Module, batch: Batch, inputs: list[str]) -> torch.Tensor:
    return _logits(model(*(batch[n] for n in inputs)))


def predict(model: nn.Module, data: Batch, inputs: list[str], chunk: int = 256) -> torch.Tensor:
    """The model's logits on every sample of ``data``, ``chunk`` samples at a time (eval
    mode, no gradients), so memory does not grow with the sample count."""
    model.eval()
    samples = len(data[inputs[0]])
    with torch.no_grad():
        parts = [
            _forward(model, {n: data[n][lo : lo + chunk] for n in inputs}, inputs)
            for lo in range(0, samples, chunk)
        ]
    return torch.cat(parts)


def _take(tensors: Batch, idx: torch.Tensor) -> Batch:
    return {k: v[idx] for k, v in tensors.items()}


def held_out_loss(
    student: nn.Module,
    teacher_logits: torch.Tensor,
    data: Batch,
    inputs: list[str],
    settings: DistillSettings,
) -> float:
    """kd_loss of the student on the held-out samples (eval mode, no gradients)."""
    was_training = student.training
    logits = predict(student, data, inputs)
    with torch.no_grad():
        loss = kd_loss(
            logits, teacher_logits, settings.temperature, data.get("labels"), settings.alpha
        )
    student.train(was_training)
    return float(loss)


def _schedule(samples: int, settings: DistillSettings) -> tuple[int, int]:
    """(total steps, steps between held-out scores)."""
    per_epoch = max(1, -(-samples // settings.batch_size))
    total = settings.steps if settings.steps is not None else settings.epochs * per_epoch
    return total, max(1, min(per_epoch, total // 10 or 1))


def _order(samples: int, total: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Sample indices for ``total`` steps: seeded epoch permutations, concatenated."""
    needed = total * batch
    perms = [torch.randperm(samples, generator=generator) for _ in range(-(-needed // samples))]
    return torch.cat(perms)[:needed].reshape(total, batch)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train: Batch,
    held_out: Batch,
    inputs: list[str],
    settings: DistillSettings,
    progress: bool = True,
    where: World = World(),
) -> DistillHistory:
    """Train ``student`` towards ``teacher`` on ``train`` (input arrays and optional
    ``labels``); returns the loss curve. The student ends in eval mode holding the weights
    of its best held-out score."""
    torch.manual_seed(settings.seed)
    teacher_train = predict(teacher, train, inputs)
    teacher_held = predict(teacher, held_out, inputs)
    samples = len(teacher_train)
    batch = min(settings.batch_size, samples)
    total, every = _schedule(samples, settings)
    order = _order(samples, total, batch, torch.Generator().manual_seed(settings.seed))
    model = _parallel(student, where)
    optimizer = torch.optim.Adam(student.parameters(), lr=settings.lr)
    history = DistillHistory()
    best = (
        held_out_loss(student, teacher_held, held_out, inputs, settings),
        copy.deepcopy(student.state_dict()),
    )
    history.eval_steps.append(0)
    history.eval_loss.append(best[0])
    bar = progress_bar(range(total), desc="distilling", progress=progress and where.main)
    student.train()
    for step in bar:
        idx = order[step][where.rank :: where.size]
        optimizer.zero_grad()
        loss = kd_loss(
            _forward(model, _take(train, idx), inputs),
            teacher_train[idx],
            settings.temperature,
            train["labels"][idx] if "labels" in train else None,
            settings.alpha,
        )
        loss.backward()
        optimizer.step()
        history.train_loss.append(loss.item())
        bar.set_postfix(loss=f"{history.train_loss[-1]:.4f}")
        if (step + 1) % every == 0 or step + 1 == total:
            best = _score(
                student, teacher_held, held_out, inputs, settings, history, step + 1, best
            )
            if history.stopped_early:
                break
    bar.close()
    student.load_state_dict(best[1])
    return history


def _score(student, teacher_held, held_out, inputs, settings, history, step, best):
    """Score the held-out split, keep the best state, decide early stopping."""
    value = held_out_loss(student, teacher_held, held_out, inputs, settings)
    history.eval_steps.append(step)
    history.eval_loss.append(value)
    if value < best[0]:
        history.best_step = step
        return value, copy.deepcopy(student.state_dict())
    since = sum(1 for s in history.eval_steps if s > history.best_step)
    history.stopped_early = since >= settings.patience
    if history.stopped_early:
        logger.info("early stop at step %d: held-out loss best at step %d", step, history.best_step)
    return best


def _parallel(student: nn.Module, where: World) -> nn.Module:
    """The module the loop calls: DDP over gloo under torchrun, else the student itself."""
    if where.size <= 1:
        return student
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(student)
