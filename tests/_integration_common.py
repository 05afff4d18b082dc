"""Helpers shared by the integration tests (Lightning, Hugging Face Trainer, schedulers)."""

from __future__ import annotations

import torch
from torch import nn

from flatminima.optim import EntropySGD


def assert_same(a: nn.Module, b: nn.Module) -> None:
    """The two modules hold bit-identical parameters and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def esgd(params, one_batch: bool = True, **kw) -> EntropySGD:
    """The Entropy-SGD every integration test runs (L = 3, noise on, fixed seed)."""
    return EntropySGD(
        params,
        lr=0.5,
        momentum=0.9,
        inner_steps=3,
        inner_lr=0.1,
        gamma=0.03,
        noise=1e-3,
        seed=0,
        one_batch_per_step=one_batch,
        **kw,
    )
