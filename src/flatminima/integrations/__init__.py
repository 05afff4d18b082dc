"""Integrations: flatminima optimizers inside the training loops people already use.

=====================  ==================================  ====================================
loop                   what to use                         install
=====================  ==================================  ====================================
plain PyTorch          the optimizers directly             ``pip install flatminima``
PyTorch Lightning      :mod:`.lightning`                   ``pip install flatminima[lightning]``
Hugging Face Trainer   :mod:`.hf`                          ``pip install flatminima[transformers]``
=====================  ==================================  ====================================

What each optimizer needs in a loop that calls ``step()`` once per batch:

* Entropy-SGD: ``EntropySGD(..., one_batch_per_step=True)``; each ``step()`` is one Langevin
  step on the current batch, every ``inner_steps``-th also the outer update;
  :func:`evaluation_weights` (or ``opt.anchor_weights()``) puts the anchor ``x`` in the model for
  evaluation and export.
* SAM: two forward/backward passes per step: ``step(closure)`` where the loop has a closure
  (plain loops, Lightning), else ``first_step``/``second_step`` (the HF Trainer subclass).
* Replicated-SGD: a :class:`~flatminima.optim.ReplicatedModule` (a batch of ``y * B`` samples is
  ``y`` minibatches of ``B``, one per replica) and ``ReplicatedSGD(module.replicas, ...)``.
* Coupling schedules: :class:`GammaLR` (an ``LRScheduler``) or the HF ``GammaCallback``.

This package imports neither Lightning nor transformers; its submodules ``lightning`` and ``hf``
do.
"""

from flatminima.integrations._common import (
    check_optimizer,
    eval_state_dicts,
    evaluation_weights,
    unwrap_optimizer,
)
from flatminima.integrations.schedulers import GammaLR, advance_gamma

__all__ = [
    "GammaLR",
    "advance_gamma",
    "check_optimizer",
    "eval_state_dicts",
    "evaluation_weights",
    "unwrap_optimizer",
]
