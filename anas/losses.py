"""GAN objectives, one registry. Each entry gives the discriminator's and the generator's loss
from logits; both are minimised, so the discriminator "ascending its objective" is descending
`d_loss`."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anas.registry import Registry


@dataclass(frozen=True)
class GANLoss:
    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (real_logits, fake_logits)
    g_loss: Callable[[torch.Tensor], torch.Tensor]  # (fake_logits)


LOSSES: Registry[GANLoss] = Registry("loss")

# Hinge loss, the default of the published AdversarialNAS code.
LOSSES.add(
    "hinge",
    GANLoss(
        d_loss=lambda real, fake: F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean(),
        g_loss=lambda fake: -fake.mean(),
    ),
)

# The original minimax log-loss (Goodfellow et al., 2014) written with softplus for stability:
# log(1 + exp(-x)) = -log(sigmoid(x)). The generator uses the non-saturating form
# -log D(G(z)), because log(1 - D(G(z))) has vanishing gradients early in training.
LOSSES.add(
    "minimax",
    GANLoss(
        d_loss=lambda real, fake: F.softplus(-real).mean() + F.softplus(fake).mean(),
        g_loss=lambda fake: F.softplus(-fake).mean(),
    ),
)
