"""Random weights for parity tests against transformers, shared by the checkpoint and feature tests."""

from __future__ import annotations

import torch


def fill_random(module: torch.nn.Module) -> None:
    """Random values in every parameter, norms' scales near 1.

    transformers zero-initialises biases, query tokens and the q/v biases, so a parity test on its
    fresh models would not see a bias that is dropped or mapped to the wrong key.
    """
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.2 * torch.randn_like(parameter))
