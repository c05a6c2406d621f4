"""CutPaste's network and its training helpers: the ImageNet encoder as named stages, the
projection and classification heads, early stopping, and the Gaussian density (GDE) of
normal embeddings that gives the anomaly score (see ``cutpaste`` for the method)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def encoder_stages(name: str) -> list[str]:
    """Stage names of an encoder, shallow to deep: the Grad-CAM layers, and what
    ``finetune_stages`` counts from the end."""
    if name == "efficientnet_lite0":
        return ["stem", *(f"blocks.{i}" for i in range(7)), "head"]
    return ["stem", "layer1", "layer2", "layer3", "layer4"]


def _build_classifier(name: str, pretrained: bool) -> nn.Module:
    """The ImageNet classifier behind ``name``; without weights when a saved state follows."""
    if pretrained:
        from ..backbones import load_classifier  # local weights only; clear error when missing

        return load_classifier(name)
    if name == "efficientnet_lite0":
        import timm

        return timm.create_model("tf_efficientnet_lite0", pretrained=False)
    from torchvision import models

    return getattr(models, name)(weights=None)


class Encoder(nn.Module):
    """An ImageNet CNN as named stages plus global average pooling: (B, 3, H, W) -> (B, D).

    ``forward(x, capture)`` also returns the activation of stage ``capture``
    (for Grad-CAM). Stages before ``trainable_from`` run without gradients.
    """

    def __init__(self, name: str, pretrained: bool = True):
        super().__init__()
        model = _build_classifier(name, pretrained)
        if name == "efficientnet_lite0":
            # timm's bn1/bn2 are BatchNormAct2d: batch norm and ReLU6 in one module.
            modules = [nn.Sequential(model.conv_stem, model.bn1), *model.blocks,
                       nn.Sequential(model.conv_head, model.bn2)]
            self.feature_dim = model.num_features
        else:
            modules = [nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool),
                       model.layer1, model.layer2, model.layer3, model.layer4]
            self.feature_dim = model.fc.in_features
        self.stage_names = encoder_stages(name)
        self.stages = nn.ModuleList(modules)
        self.trainable_from = 0

    def set_trainable_from(self, index: int) -> None:
        """Train stages ``index`` and later; the earlier ones keep their weights and statistics.

        0 trains the whole encoder, ``len(stages)`` freezes it.
        """
        self.trainable_from = index
        for position, module in enumerate(self.stages):
            module.requires_grad_(position >= index)

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        for module in self.stages[:self.trainable_from]:
            module.train(False)   # frozen stages keep their batch-norm statistics too
        return self

    def forward(self, x: torch.Tensor, capture: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        captured = None
        for index, (name, stage) in enumerate(zip(self.stage_names, self.stages)):
            if index < self.trainable_from:
                with torch.no_grad():
                    x = stage(x)
            else:
                x = stage(x)
            if name == capture:
                captured = x
        return x.mean(dim=(2, 3)), captured


class CutPasteNet(nn.Module):
    """Encoder, projection head (Linear + BatchNorm1d + ReLU per layer) and classification head."""

    def __init__(self, encoder: str, head_layers, n_classes: int, pretrained: bool = True):
        super().__init__()
        self.encoder = Encoder(encoder, pretrained)
        widths = [self.encoder.feature_dim, *head_layers]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.BatchNorm1d(width_out),
                       nn.ReLU(inplace=True)]
        self.head = nn.Sequential(*layers)
        self.classifier = nn.Linear(widths[-1], n_classes)

    def forward(self, x: torch.Tensor, capture: str | None = None):
        """(encoder features, projection, logits, captured stage activation or None)."""
        features, captured = self.encoder(x, capture)
        projection = self.head(features)
        return features, projection, self.classifier(projection), captured


def anomaly_logit(logits: torch.Tensor) -> torch.Tensor:
    """Log-odds of "some augmentation" against "normal": logit_1 - logit_0 for two classes."""
    return torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]


# ------------------------------------------------------------ training helpers


class EarlyStopping:
    """Stops training when the validation loss has not improved for ``patience`` epochs.

    An improvement is a loss below the best so far by more than ``min_delta``.
    ``step(loss)`` returns True when this epoch is the new best (the caller
    keeps its weights); ``should_stop`` then says whether to stop.
    """

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience = patience
        self.min_delta = min_delta
        self.best = float("inf")
        self.epochs_without_improvement = 0

    def step(self, loss: float) -> bool:
        if loss < self.best - self.min_delta:
            self.best = loss
            self.epochs_without_improvement = 0
            return True
        self.epochs_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.epochs_without_improvement >= self.patience


@dataclass
class GaussianDensity:
    """GDE (Rippel et al., 2020): mean and Ledoit-Wolf shrunk precision of normal embeddings."""

    mean: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, embeddings: np.ndarray) -> "GaussianDensity":
        from scipy.linalg import cho_factor, cho_solve
        from sklearn.covariance import LedoitWolf

        # Shrinkage keeps the covariance positive definite even with fewer samples
        # than dimensions, so a Cholesky solve inverts it (sklearn's own
        # precision_ goes through an eigendecomposition, ~10x slower at 1280 dims).
        estimate = LedoitWolf(store_precision=False).fit(np.asarray(embeddings, np.float64))
        covariance = estimate.covariance_
        precision = cho_solve(cho_factor(covariance), np.eye(len(covariance)))
        return cls(estimate.location_, (precision + precision.T) / 2)

    def distance(self, embeddings: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row: the anomaly score (higher = less likely normal)."""
        centred = np.asarray(embeddings, np.float64) - self.mean
        squared = np.sum((centred @ self.precision) * centred, axis=1)   # a BLAS product
        return np.sqrt(np.maximum(squared, 0)).astype(np.float32)
