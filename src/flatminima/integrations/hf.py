"""Hugging Face ``Trainer`` with Entropy-SGD, Replicated-SGD and SAM.

Install with ``pip install flatminima[transformers]``. The Trainer runs, per batch,
``training_step`` (forward + backward), optional clipping, then ``optimizer.step()`` *without* a
closure. :class:`FlatMinimaTrainer` makes each flatminima optimizer fit that loop:

* **Entropy-SGD** with ``one_batch_per_step=True``: each ``step()`` is one Langevin step on the
  current batch's gradient, every ``inner_steps``-th also the outer update (the closure form is
  refused: the Trainer has no closure to call).
* **SAM**: ``training_step`` runs both passes, davda54's two-call protocol (first pass,
  ``first_step(zero_grad=True)``, second pass with BatchNorm statistics frozen), and the
  Trainer's ``optimizer.step()`` becomes ``second_step()`` through :class:`SAMTwoCall`.
* **Replicated-SGD**: the model is a :class:`~flatminima.optim.ReplicatedModule` whose replicas
  each return ``{"loss", "logits"}``; the wrapper returns the summed loss, so the Trainer's
  ``backward(); step()`` is one Replicated-SGD step (a batch of ``y * B`` samples is ``y``
  minibatches of ``B``). Evaluation (eval mode) runs the centre.
* **Coupling schedules**: :class:`GammaCallback`.

Evaluation and prediction run with Entropy-SGD's anchor weights, and so does
``save_model()`` when called by the user (the Trainer's own checkpoints keep the live training
state, so resuming is exact).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import OrderedDict
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

try:
    from transformers import Trainer, TrainerCallback
    from transformers.utils import find_labels
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "flatminima.integrations.hf needs transformers and accelerate: "
        "pip install 'flatminima[transformers]'"
    ) from exc

from flatminima.integrations._common import (
    check_optimizer,
    evaluation_weights,
    unwrap_optimizer,
    warn_sam_batchnorm,
)
from flatminima.integrations.schedulers import _resolve_unit, advance_gamma
from flatminima.optim import SAM, ReplicatedModule, disable_running_stats
from flatminima.optim.schedules import GammaScheduler

__all__ = ["FlatMinimaTrainer", "GammaCallback", "SAMTwoCall"]

logger = logging.getLogger(__name__)

_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class SAMTwoCall(Optimizer):
    """SAM seen by a loop that calls ``optimizer.step()`` once, without a closure.

    ``step()`` is :meth:`SAM.second_step` (restore ``w``, base step with the gradient at
    ``w + e``): the loop's training step must already have run the first pass,
    :meth:`SAM.first_step` and the second pass (:meth:`FlatMinimaTrainer.training_step` does).
    ``step(closure)`` is the full :meth:`SAM.step`. Param groups, state, ``zero_grad`` and state
    dicts are SAM's own (shared, so LR schedulers act on SAM).

    Args:
        sam: the :class:`~flatminima.optim.SAM` optimizer.

    Raises:
        TypeError: if ``sam`` is not a SAM.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> sam = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> opt = SAMTwoCall(sam)
        >>> net(torch.ones(4, 2)).pow(2).mean().backward()
        >>> sam.first_step(zero_grad=True)
        >>> net(torch.ones(4, 2)).pow(2).mean().backward()
        >>> opt.step()
        >>> sam.grad_evals
        2
    """

    def __init__(self, sam: SAM) -> None:
        if not isinstance(sam, SAM):
            raise TypeError(f"SAMTwoCall wraps a flatminima SAM, got {type(sam).__name__}")
        # Optimizer.__init__ is not called: the groups and state are SAM's, not copies.
        self.optimizer = sam
        self.defaults = sam.defaults
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """SAM's param groups (those of its base optimizer)."""
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The base optimizer's state."""
        return self.optimizer.base_optimizer.state

    def step(self, closure: Any = None) -> Any:
        """``second_step()``; with a closure, the full two-pass :meth:`SAM.step`."""
        if closure is not None:
            return self.optimizer.step(closure)
        self.optimizer.second_step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """SAM's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """SAM's state dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into SAM."""
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to SAM."""
        self.optimizer.add_param_group(param_group)


class FlatMinimaTrainer(Trainer):
    """``transformers.Trainer`` that runs flatminima optimizers correctly (see the module doc).

    Pass the optimizer as ``optimizers=(opt, None)`` (or ``(opt, lr_scheduler)``); a plain torch
    optimizer trains exactly as in the base Trainer. For a
    :class:`~flatminima.optim.ReplicatedModule` model the label names and dataset columns are read
    off a replica's ``forward`` (the wrapper's is ``*args, **kwargs``), and no
    ``num_items_in_batch`` keyword is passed (the replicas compute their own minibatch-mean
    losses).

    Raises (from :meth:`create_optimizer`, when training starts):
        ValueError: Entropy-SGD without ``one_batch_per_step``; ReplicatedSGD whose buffers went
            stale; SAM with ``gradient_accumulation_steps > 1`` (the second pass would see the
            last micro-batch only) or ``fp16`` (the GradScaler would skip steps unseen by SAM).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.model, ReplicatedModule):
            self._inspect_replica(self.model.replicas[0])

    def _inspect_replica(self, replica: nn.Module) -> None:
        """Read labels and input columns off a replica (the wrapper's forward is ``*args``)."""
        self.model_accepts_loss_kwargs = False
        if self.args.label_names is None:
            self.label_names = find_labels(type(replica))
        columns = list(inspect.signature(replica.forward).parameters)
        labels = sorted({"label", "label_ids", *self.label_names})
        self._signature_columns = columns + labels  # type: ignore[assignment]

    def _sam(self) -> SAM | None:
        inner = unwrap_optimizer(self.optimizer)
        return inner if isinstance(inner, SAM) else None

    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        """The base Trainer's optimizer, checked; SAM is wrapped in :class:`SAMTwoCall`."""
        opt = super().create_optimizer(model)
        check_optimizer(opt, "the Hugging Face Trainer")
        inner = unwrap_optimizer(opt)
        if isinstance(inner, SAM):
            if self.args.gradient_accumulation_steps != 1:
                raise ValueError(
                    f"SAM with gradient_accumulation_steps={self.args.gradient_accumulation_steps}"
                    ": the second pass would see the last micro-batch only; use 1"
                )
            if self.args.fp16:
                raise ValueError("SAM with fp16=True is not supported here; use bf16 or fp32")
            warn_sam_batchnorm(inner, model if model is not None else self.model)  # type: ignore[arg-type]
            if not isinstance(opt, SAMTwoCall):
                self.optimizer = opt = SAMTwoCall(inner)
        return opt

    def create_scheduler(self, num_training_steps: int, optimizer: Optimizer | None = None) -> Any:
        """The base scheduler, after checking the optimizer again (accelerate's ``prepare``
        has moved the model by now)."""
        check_optimizer(self.optimizer, "the Hugging Face Trainer")
        return super().create_scheduler(num_training_steps, optimizer)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """The base step; for SAM both passes (the returned loss is the first pass's)."""
        sam = self._sam()
        if sam is None:
            return super().training_step(model, inputs, num_items_in_batch)
        loss = super().training_step(model, copy.copy(inputs), num_items_in_batch)
        sam.first_step(zero_grad=True)
        try:
            with disable_running_stats(model):
                super().training_step(model, copy.copy(inputs), num_items_in_batch)
        except BaseException:
            sam.restore()  # leave the weights at w
            raise
        return loss

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate`` with the evaluation weights (Entropy-SGD's anchor)."""
        with evaluation_weights(self.optimizer):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.predict`` with the evaluation weights (Entropy-SGD's anchor)."""
        with evaluation_weights(self.optimizer):
            return super().predict(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the evaluation weights when called by the user, the live state in checkpoints."""
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            return
        with evaluation_weights(self.optimizer):
            super().save_model(output_dir, _internal_call=False)


class GammaCallback(TrainerCallback):
    """Steps a coupling schedule after every optimizer step of a ``Trainer``.

    Args:
        gamma_scheduler: a :class:`~flatminima.optim.schedules.GammaScheduler` built on the
            optimizer given to the Trainer.
        unit: as in :class:`~flatminima.integrations.GammaLR` (``"auto"``: Entropy-SGD's
            schedule counts outer steps, every other optimizer's counts optimizer steps).

    Raises:
        TypeError: if ``gamma_scheduler`` is not a GammaScheduler.
        ValueError: on an unknown ``unit``.
    """

    def __init__(self, gamma_scheduler: GammaScheduler, unit: str = "auto") -> None:
        if not isinstance(gamma_scheduler, GammaScheduler):
            raise TypeError(
                f"GammaCallback needs a flatminima GammaScheduler, got "
                f"{type(gamma_scheduler).__name__}"
            )
        self.gamma_scheduler = gamma_scheduler
        self.unit = _resolve_unit(gamma_scheduler, unit)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Catch up with a resumed run: the schedule's step becomes the Trainer's global step
        (``"step"``) or the optimizer's loaded ``outer_steps`` (``"outer"``)."""
        if self.unit == "outer":
            advance_gamma(self.gamma_scheduler, "outer")
            return
        while self.gamma_scheduler.last_step < state.global_step:
            self.gamma_scheduler.step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Advance the schedule (right after ``optimizer.step()``)."""
        advance_gamma(self.gamma_scheduler, self.unit)
