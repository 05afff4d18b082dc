"""One adapter per algorithm, so that a single training loop drives all of them.

An :class:`Algorithm` owns the model(s), the optimizer and the coupling schedule, and knows how many
minibatches (per data stream) and backward passes one optimizer step takes, from its entry
``spec`` in :data:`flatminima.optim.registry.REGISTRY` (a pass: one backward pass of one minibatch;
samples through backward = passes x batch size). The loop hands it a ``next_batch`` callable
(``next_batch(stream)`` returns the next ``(x, y)`` of data stream ``stream``: one stream, or one
per replica for rSGD) and asks it for the models to evaluate. :data:`ALGORITHMS` holds one adapter
per registry name (a test checks that they agree).

Gradient clipping (``cfg.grad_clip = max_norm``): every adapter rescales each minibatch gradient
``g`` of one network, after backward and before the optimizer uses it, to
``g * min(1, max_norm / (||g||_2 + 1e-6))`` with ``||g||_2`` the global L2 norm over all the
network's parameters (``torch.nn.utils.clip_grad_norm_``). SGD: the step's gradient; SAM: both
passes (the first only sets the ascent direction ``g / ||g||``, which a uniform rescale leaves as
it is; the second's gradient is the step); eSGD: each inner step's minibatch gradient, before the
coupling ``gamma (w' - x)`` is added; rSGD: each replica's gradient separately, before the
coupling (:func:`clip_grad_norm_rows_`). The coupling and weight decay are never clipped.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flatminima.optim import SAM, EntropySGD, Replicas, ReplicatedSGD
from flatminima.optim.registry import REGISTRY, OptimizerSpec, optimizer_spec
from flatminima.optim.schedules import ExponentialGamma
from flatminima.train.config import TrainConfig

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
NextBatch = Callable[[int], Batch]

#: added to the norm before dividing, as in ``torch.nn.utils.clip_grad_norm_``
CLIP_EPS = 1e-6


@torch.no_grad()
def clip_grad_norm_rows_(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    r"""Clip the gradient of each replica (row) to a global L2 norm of at most ``max_norm``.

    The gradients of ``y`` replicas are given as flat buffers ``grads[k]`` of shape ``[y, N_k]``
    (one per dtype/device, as in :class:`flatminima.optim.Replicas`; row ``a`` of every buffer
    belongs to replica ``a``). With :math:`n_a = \sqrt{\sum_k \|g_k[a]\|_2^2}`, every row is
    scaled in place::

        factor_a = min(1, max_norm / (n_a + 1e-6))
        g_k[a] <- factor_a * g_k[a]

    which is ``torch.nn.utils.clip_grad_norm_`` applied to each replica on its own: a replica
    with a large gradient does not shrink the others' (as clipping the joint norm over all
    replicas would).

    Args:
        grads: flat gradient buffers, each ``[y, N_k]`` with the same ``y``.
        max_norm: the largest norm a row may keep (> 0).

    Returns:
        The row norms :math:`n_a` before clipping, shape ``[y]`` (on the first buffer's device).

    Raises:
        ValueError: if ``max_norm`` is not a finite number > 0, or the buffers are not 2-d with
            a common number of rows.
    """
    if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"Invalid max_norm value: {max_norm!r} (must be a finite number > 0)")
    grads = list(grads)
    if not grads:
        raise ValueError("clip_grad_norm_rows_ got no gradient buffers")
    if any(g.dim() != 2 or g.shape[0] != grads[0].shape[0] for g in grads):
        shapes = [tuple(g.shape) for g in grads]
        raise ValueError(f"expected [y, N] buffers with a common y, got shapes {shapes}")
    device = grads[0].device
    row_norms = [torch.linalg.vector_norm(g, 2, dim=1).to(device) for g in grads]
    norms = row_norms[0] if len(row_norms) == 1 else torch.stack(row_norms).norm(2, dim=0)
    factor = (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.to(device=g.device, dtype=g.dtype)[:, None])
    return norms


class Algorithm:
    """Base adapter: a plain model trained by a torch optimizer (SGD)."""

    #: the registry entry this adapter trains
    spec: ClassVar[OptimizerSpec] = REGISTRY["sgd"]
    name = spec.name
    #: data streams (independent shuffles) the algorithm draws from
    num_streams = 1
    #: minibatches drawn from each stream per optimizer step (``spec.minibatches_per_step``)
    batches_per_step = 1
    #: backward passes of one minibatch per optimizer step, over all copies
    #: (``spec.passes_per_step``); samples through backward per step = this x batch size
    passes_per_step = 1

    def __init__(
        self, cfg: TrainConfig, model_factory: Callable[[], nn.Module], device: torch.device
    ) -> None:
        self._init_common(cfg, device)
        self.model: nn.Module = model_factory().to(device)
        self.optimizer = self._make_optimizer()

    # ------------------------------------------------------------------ building blocks
    def _init_common(self, cfg: TrainConfig, device: torch.device) -> None:
        """Settings every adapter shares: config, device, step cost, mixed precision, coupling."""
        self.cfg = cfg
        self.device = device
        self.batches_per_step = self.spec.minibatches_per_step(cfg)
        self.passes_per_step = self.spec.passes_per_step(cfg)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
        self.gamma_scheduler: Any = None
        if cfg.grad_clip is not None and self.scaler is not None:
            raise ValueError(
                f"grad_clip={cfg.grad_clip!r} is not supported with amp='fp16': "
                "use amp=bf16 or none"
            )

    def clip_gradients(self) -> None:
        """Clip the model's minibatch gradient to global L2 norm ``cfg.grad_clip`` (None: no-op).

        ``g <- g * min(1, grad_clip / (||g||_2 + 1e-6))`` over all parameters
        (``torch.nn.utils.clip_grad_norm_``); call it after backward, before the optimizer
        reads the gradient.
        """
        if self.cfg.grad_clip is not None:
            # foreach=None: the fused kernels on CPU and CUDA, the per-tensor loop elsewhere
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        return torch.optim.SGD(self.model.parameters(), **sgd_settings(c))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        with self.autocast():
            out = model(x)
        return F.cross_entropy(out.float(), y)

    def make_gamma_scheduler(self, total_steps: int) -> None:
        """Attach the exponential coupling schedule ("scoping") when the algorithm has a gamma.

        The optimizer's param groups carry ``gamma`` exactly for the coupled algorithms (eSGD,
        rSGD, in one process or distributed); SGD and SAM get no schedule.
        """
        if self.current_gamma() is None:
            return
        self.gamma_scheduler = ExponentialGamma(
            self.optimizer,
            self.cfg.gamma,
            growth=self.cfg.gamma_growth,
            total_steps=max(total_steps, 1),
            gamma_max=self.cfg.gamma_max,
        )

    # ------------------------------------------------------------------ the step
    def train_mode(self) -> None:
        self.model.train()

    def step(self, next_batch: NextBatch) -> float:
        """One optimizer step; returns the mean minibatch loss it saw."""
        batch = next_batch(0)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.model, batch)
        self._backward_and_step(loss)
        return float(loss.detach())

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` and the optimizer step: through the GradScaler under AMP, else
        plain backward, :meth:`clip_gradients` and the step."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.clip_gradients()
            self.optimizer.step()

    def _closure_backward(self, loss: torch.Tensor) -> None:
        """Backward of one pass inside a closure: scaled under AMP (the optimizer unscales each
        pass itself), else plain backward and :meth:`clip_gradients` of this pass's gradient."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
            self.clip_gradients()

    def after_step(self) -> None:
        if self.gamma_scheduler is not None:
            self.gamma_scheduler.step()

    # ------------------------------------------------------------------ evaluation
    def eval_models(self, recalibrate_data: Iterator[Batch] | None = None) -> dict[str, nn.Module]:
        """The networks to evaluate; the first one is the one reported as *the* result."""
        return {"model": self.model}

    def ensemble_members(self) -> list[nn.Module]:
        return []

    def current_gamma(self) -> float | None:
        group = self.optimizer.param_groups[0]
        return float(group["gamma"]) if "gamma" in group else None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.gamma_scheduler is not None:
            state["gamma_scheduler"] = self.gamma_scheduler.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.gamma_scheduler is not None and "gamma_scheduler" in state:
            self.gamma_scheduler.load_state_dict(state["gamma_scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class EntropySGDAlgorithm(Algorithm):
    spec = REGISTRY["esgd"]
    name = spec.name
    optimizer: EntropySGD

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        return EntropySGD(
            self.model.parameters(),
            **sgd_settings(c),
            inner_steps=c.inner_steps,
            inner_lr=c.inner_lr,
            noise=c.noise,
            mu_decay=c.mu_decay,
            gamma=c.gamma,
            scale_by_gamma=c.scale_by_gamma,
            seed=c.seed,
        )

    def step(self, next_batch: NextBatch) -> float:
        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(self.model, next_batch(0))
            self._closure_backward(loss)  # clipping: each inner step's minibatch gradient
            return loss.detach()

        return float(self.optimizer.step(closure, grad_scaler=self.scaler))


class SAMAlgorithm(Algorithm):
    spec = REGISTRY["sam"]
    name = spec.name
    optimizer: SAM

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        return SAM(
            self.model.parameters(),
            torch.optim.SGD,
            rho=c.rho,
            adaptive=c.adaptive,
            model=self.model,
            **sgd_settings(c),
        )

    def step(self, next_batch: NextBatch) -> float:
        batch = next_batch(0)  # both passes see the same minibatch
        first: list[float] = []

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(self.model, batch)
            self._closure_backward(loss)  # clipping: both passes (the first: direction unchanged)
            first.append(float(loss.detach()))
            return loss.detach()

        self.optimizer.step(closure, grad_scaler=self.scaler)
        return first[0]  # the loss at w, not at the ascent point


class ReplicatedSGDAlgorithm(Algorithm):
    spec = REGISTRY["rsgd"]
    name = spec.name

    def __init__(
        self, cfg: TrainConfig, model_factory: Callable[[], nn.Module], device: torch.device
    ) -> None:
        self._init_common(cfg, device)
        self.num_streams = cfg.num_replicas
        self.replicas = Replicas(
            model_factory, cfg.num_replicas, init=cfg.replica_init, seed=cfg.seed
        ).to(device)
        self.model = self.replicas  # what state_dict() saves
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        return ReplicatedSGD(self.replicas, **replicated_settings(c))

    def step(self, next_batch: NextBatch) -> float:
        self.optimizer.zero_grad()
        total = None
        for a, replica in enumerate(self.replicas):
            loss = self.loss(replica, next_batch(a))
            total = loss if total is None else total + loss
        assert total is not None
        self._backward_and_step(total)
        return float(total.detach()) / len(self.replicas)

    def clip_gradients(self) -> None:
        """Clip each replica's gradient to norm ``cfg.grad_clip`` on its own (None: no-op).

        Per replica ``a``: ``g_a <- g_a * min(1, grad_clip / (||g_a||_2 + 1e-6))``, on the flat
        ``[y, N]`` gradient buffers (:func:`clip_grad_norm_rows_`), before the coupling is added.
        """
        if self.cfg.grad_clip is not None:
            self.replicas.sync_grads()
            clip_grad_norm_rows_(self.replicas.flat_grads, self.cfg.grad_clip)

    def eval_models(self, recalibrate_data: Iterator[Batch] | None = None) -> dict[str, nn.Module]:
        center = self.replicas.center()
        if self.cfg.bn == "recalibrate" and recalibrate_data is not None:
            self.replicas.recalibrate_bn(recalibrate_data)
        return center_and_replicas(center, self.replicas)

    def ensemble_members(self) -> list[nn.Module]:
        return list(self.replicas)


def sgd_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The torch-SGD settings of ``cfg`` that every optimizer here takes (SAM: its base SGD)."""
    return {
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "nesterov": cfg.nesterov,
        "weight_decay": cfg.weight_decay,
    }


def replicated_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings of ``cfg`` that Replicated-SGD takes, in one process or distributed."""
    return {**sgd_settings(cfg), "gamma": cfg.gamma, "coupling_every": cfg.coupling_every}


def center_and_replicas(center: nn.Module, replicas: Iterable[nn.Module]) -> dict[str, nn.Module]:
    """What a replica algorithm evaluates: ``{"center": c, "replica0": w_0, "replica1": ...}``."""
    models: dict[str, nn.Module] = {"center": center}
    for a, replica in enumerate(replicas):
        models[f"replica{a}"] = replica
    return models


_ADAPTERS: tuple[type[Algorithm], ...] = (
    Algorithm,
    EntropySGDAlgorithm,
    ReplicatedSGDAlgorithm,
    SAMAlgorithm,
)

ALGORITHMS: dict[str, type[Algorithm]] = {
    name: cls for name in REGISTRY for cls in _ADAPTERS if cls.spec.name == name
}
"""registry name -> adapter class, in registry order (one adapter per registry entry)."""


def build_algorithm(
    cfg: TrainConfig, model_factory: Callable[[], nn.Module], device: torch.device
) -> Algorithm:
    """The adapter of ``cfg.optimizer``.

    Raises:
        ValueError: a name not in the registry, or a registry entry without an adapter.
    """
    spec = optimizer_spec(cfg.optimizer)
    try:
        cls = ALGORITHMS[spec.name]
    except KeyError:
        raise ValueError(
            f"Optimizer {spec.name!r} has no training adapter; valid: {', '.join(ALGORITHMS)}"
        ) from None
    return cls(cfg, model_factory, device)
