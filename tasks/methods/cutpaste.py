"""CutPaste (Li et al., CVPR 2021), as in the kitchen-board thesis sections 4.2 and 5.4.

Self-supervised training: an ImageNet CNN (the encoder) with a projection head
and a classification head learns to tell normal images from the same images
with a synthetic defect (``tasks/augmentations.py``), with cross-entropy
(thesis eq. 4.11). Variants:

* ``binary`` (alias ``2way``, the thesis's choice): class 0 normal, class 1 any
  augmentation; each training image gives its normal view and one view with a
  randomly chosen augmentation from ``augmentations`` (Li et al.'s
  "CutPaste-Union" when that holds several).
* ``nway``: class 0 normal plus one class per augmentation, in the order
  listed; each image gives its normal view and one view per augmentation.
* ``3way``: the paper's CutPaste-3way, i.e. ``nway`` with
  ``augmentations = ("cutpaste", "scar")``.

After training, a Gaussian density (GDE, thesis eq. 4.12) is fitted to the
embeddings of the normal training images: their mean and Ledoit-Wolf shrunk
covariance. The image score is the Mahalanobis distance of the test embedding.
The embedding is the encoder's pooled feature (as in the paper and in Yolyan's
implementation the thesis builds on), or the projection head's output
(``embedding="projection"``).

Localization (thesis 5.4.4, paper section 4.2): the image is cut into
overlapping sub-patches (``loc_patch`` px every ``loc_stride`` px, at the
network's input size), each is embedded and scored by a second GDE fitted on
the sub-patches of (up to ``loc_fit_images``) normal training images; the
scores are averaged where sub-patches overlap and smoothed with a Gaussian
(sigma 4). Grad-CAM maps (thesis 5.4.5) are an extra view, ``gradcam_maps``.

CPU cost. The paper fine-tunes the whole network on every image every epoch;
on a 2-core CPU that takes minutes per epoch at 224 px. The defaults therefore
draw ``images_per_epoch`` images per epoch (seeded) and fine-tune only the last
``finetune_stages`` encoder stages (for EfficientNet-Lite0: blocks.5, blocks.6
and the 1x1 head convolution), the earlier stages keeping their ImageNet weights;
that halves the cost of a step. ``finetune_stages=None`` and
``images_per_epoch=None`` train as in the paper (sensible on a GPU).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from .augmentations import AUGMENTATIONS
from ..features import preprocess
from ..patches import grid_positions, iter_patch_pixels
from .base import Detector, PatchSet
from .cutpaste_net import CutPasteNet, EarlyStopping, GaussianDensity, anomaly_logit

VARIANTS = ("binary", "2way", "3way", "nway")
ENCODERS = ("efficientnet_lite0", "resnet18", "resnet50")
EMBEDDINGS = ("encoder", "projection")


@dataclass(frozen=True)
class CutPasteParams:
    augmentations: tuple[str, ...] = ("cutpaste", "scar")   # names in AUGMENTATIONS
    variant: str = "binary"               # binary / 2way, 3way, nway (see the module docstring)
    encoder: str = "efficientnet_lite0"   # resnet18 / resnet50: weights in the torch cache
    head_layers: tuple[int, ...] = (512,) * 7 + (128,)   # projection head widths (thesis 5.4.2)
    embedding: str = "encoder"            # what the GDE models: "encoder" or "projection" features
    epochs: int = 8
    batch_size: int = 64                  # training samples (normal and augmented views) per step
    learning_rate: float = 1e-4           # SGD, thesis 5.4.3
    momentum: float = 0.9
    weight_decay: float = 3e-5
    images_per_epoch: int | None = 256    # images drawn per epoch; None: all of them
    finetune_stages: int | None = 3       # last encoder stages trained; None: all, 0: none
    freeze_encoder_epochs: int = 0        # epochs training only the heads, before the encoder
    validation_fraction: float = 0.1      # held-out training images for early stopping
    patience: int = 3                     # epochs without a better validation loss before stopping
    min_delta: float = 0.0                # smallest decrease of the validation loss that counts
    loc_patch: int = 32                   # localization sub-patch side, px at the input size
    loc_stride: int = 16
    loc_fit_images: int = 100             # good training images whose sub-patches fit the local GDE
    smoothing_sigma: float = 4.0          # Gaussian blur of the anomaly maps
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "augmentations", tuple(self.augmentations))
        object.__setattr__(self, "head_layers", tuple(int(w) for w in self.head_layers))
        unknown = [name for name in self.augmentations if name not in AUGMENTATIONS]
        if not self.augmentations or unknown:
            raise ValueError(f"augmentations must be names from {list(AUGMENTATIONS)}, "
                             f"got {list(self.augmentations)}")
        if len(set(self.augmentations)) != len(self.augmentations):
            raise ValueError(f"augmentations repeat a name: {list(self.augmentations)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "3way" and self.augmentations != ("cutpaste", "scar"):
            raise ValueError("variant '3way' is normal / cutpaste / scar: use augmentations "
                             "('cutpaste', 'scar'), or variant 'nway' for other augmentations")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.finetune_stages is not None and self.finetune_stages < 0:
            raise ValueError(f"finetune_stages must be None or >= 0, got {self.finetune_stages}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if not self.head_layers or min(self.head_layers) < 1:
            raise ValueError(f"head_layers must be positive widths, got {self.head_layers}")
        if self.epochs < 1 or self.batch_size < 2 or self.loc_fit_images < 1:
            raise ValueError("epochs and loc_fit_images must be >= 1, batch_size >= 2")
        if self.images_per_epoch is not None and self.images_per_epoch < 1:
            raise ValueError(f"images_per_epoch must be None or >= 1, got {self.images_per_epoch}")
        if self.learning_rate < 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("learning_rate and weight_decay must be >= 0, momentum in [0, 1)")
        if self.freeze_encoder_epochs < 0 or self.patience < 1 or self.min_delta < 0:
            raise ValueError("freeze_encoder_epochs and min_delta must be >= 0, patience >= 1")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.loc_patch < 8 or self.loc_stride < 1:
            raise ValueError("loc_patch must be >= 8 px and loc_stride >= 1")
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be >= 0, got {self.smoothing_sigma}")

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class 0 is "normal"; the others are what the classification head tells apart."""
        if self.variant in ("binary", "2way"):
            return ("normal", "augmented")
        return ("normal", *self.augmentations)


# ---------------------------------------------------------------- input helpers


def _resize(crop: np.ndarray, size: int) -> np.ndarray:
    """A crop at the network's input size, resized the way ``features.preprocess`` does."""
    if crop.shape[:2] == (size, size):
        return crop
    shrinking = crop.shape[0] > size or crop.shape[1] > size
    return cv2.resize(crop, (size, size),
                      interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def subpatch_windows(size: int, patch: int, stride: int) -> list[tuple[int, int]]:
    """Top-left (x, y) of the overlapping localization sub-patches covering a size x size input."""
    patch = min(patch, size)
    offsets = grid_positions(size, patch, stride)
    return [(x, y) for y in offsets for x in offsets]


# ------------------------------------------------------------------- detector


class CutPaste(Detector):
    name = "cutpaste"
    export_refusal = ("its own trained network and its sliding-window localization "
                      "have no export path yet")
    Params = CutPasteParams

    def __init__(self, params: CutPasteParams | None = None):
        super().__init__(params)
        self.network: CutPasteNet | None = None
        self.image_density: GaussianDensity | None = None
        self.local_density: GaussianDensity | None = None
        self.device = "cpu"

    def _place(self, device: str) -> None:
        """Move the network to ``device``; channels_last runs EfficientNet's depthwise
        convolutions much faster on a CPU."""
        self.device = device
        self.network.to(device=device, memory_format=torch.channels_last)

    def _tensor(self, inputs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalized inputs (B, 3, s, s) as a tensor on the network's device and layout."""
        tensor = torch.as_tensor(inputs, device=self.device)
        return tensor.contiguous(memory_format=torch.channels_last)

    # -- training ----------------------------------------------------------------
    def fit(self, train: PatchSet) -> "CutPaste":
        p = self.params
        torch.manual_seed(p.seed)
        rng = np.random.default_rng(p.seed)
        # Augmentations act on uint8 pixels, so the training images are read as
        # pixels at the input size (not as normalized inputs) and kept in memory.
        labels = train.labels
        images = [_resize(crop, train.input_size)
                  for pos, crop in iter_patch_pixels(train.table, train.paths) if labels[pos] == 0]
        if len(images) < 2:
            raise ValueError(f"CutPaste needs at least 2 good training images, got {len(images)}")
        images = np.stack(images)
        mean, std = train.mean, train.std

        order = rng.permutation(len(images))
        n_val = int(round(p.validation_fraction * len(images)))
        if p.validation_fraction > 0 and len(images) >= 4:
            n_val = max(n_val, 1)
        val_images, fit_images = images[order[:n_val]], images[order[n_val:]]

        self.network = CutPasteNet(p.encoder, p.head_layers, len(p.class_names))
        self._place(train.device)
        self._train(fit_images, val_images, mean, std, rng)
        self.network.eval()

        self.image_density = GaussianDensity.fit(self._embed_images(images, mean, std))
        local_pick = np.sort(rng.permutation(len(images))[:p.loc_fit_images])
        self.local_density = GaussianDensity.fit(
            np.concatenate([self._embed_subpatches(chunk) for chunk in
                            self._normalized_chunks(images[local_pick], mean, std)]))
        return self

    def _train(self, fit_images, val_images, mean, std, rng) -> None:
        p = self.params
        net = self.network
        optimizer = torch.optim.SGD([w for w in net.parameters()], lr=p.learning_rate,
                                    momentum=p.momentum, weight_decay=p.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=p.epochs)
        # The validation views are drawn once, so the losses of all epochs compare.
        val_rng = np.random.default_rng([p.seed, 1])
        val_views = self._views(val_images, val_rng, mean, std) if len(val_images) else None
        stopper = EarlyStopping(p.patience, p.min_delta)
        best_state = None
        self.history = {"train_loss": [], "val_loss": [], "val_accuracy": []}
        images_per_step = max(p.batch_size // self._views_per_image, 1)
        stages = net.encoder.stage_names
        trainable_from = (0 if p.finetune_stages is None
                          else max(len(stages) - p.finetune_stages, 0))
        frozen_all = len(stages)
        for epoch in range(p.epochs):
            # Heads only for the first freeze_encoder_epochs, then the last finetune_stages.
            net.encoder.set_trainable_from(frozen_all if epoch < p.freeze_encoder_epochs
                                           else trainable_from)
            net.train()
            picked = rng.permutation(len(fit_images))[:p.images_per_epoch]
            total, count = 0.0, 0
            for start in range(0, len(picked), images_per_step):
                inputs, targets = self._views(fit_images[picked[start:start + images_per_step]],
                                              rng, mean, std)
                loss = F.cross_entropy(net(inputs)[2], targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(targets)
                count += len(targets)
            scheduler.step()
            self.history["train_loss"].append(total / count)
            if val_views is None:
                continue
            val_loss, val_accuracy = self._evaluate(*val_views)
            self.history["val_loss"].append(val_loss)
            self.history["val_accuracy"].append(val_accuracy)
            if stopper.step(val_loss):
                best_state = copy.deepcopy(net.state_dict())
            elif stopper.should_stop:
                break
        net.encoder.set_trainable_from(0)   # Grad-CAM needs gradients through every stage
        if best_state is not None:  # the checkpoint with the best validation loss
            net.load_state_dict(best_state)
        if not self.history["val_loss"]:
            del self.history["val_loss"], self.history["val_accuracy"]

    @property
    def _views_per_image(self) -> int:
        """Normal view plus one augmented view (binary) or one per augmentation (n-way)."""
        if self.params.variant in ("binary", "2way"):
            return 2
        return 1 + len(self.params.augmentations)

    def _views(self, images: np.ndarray, rng: np.random.Generator, mean, std
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized network inputs and class targets for the views of ``images``."""
        names = self.params.augmentations
        binary = self.params.variant in ("binary", "2way")
        views, targets = [], []
        for image in images:
            views.append(image)
            targets.append(0)
            if binary:
                views.append(AUGMENTATIONS[names[rng.integers(len(names))]](image, rng))
                targets.append(1)
            else:
                for k, name in enumerate(names, start=1):
                    views.append(AUGMENTATIONS[name](image, rng))
                    targets.append(k)
        inputs = np.stack([preprocess(view, image.shape[0], mean, std) for view in views])
        return self._tensor(inputs), torch.as_tensor(targets, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def _evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        """Validation loss and accuracy (eval mode: batch norm uses its running statistics)."""
        self.network.eval()
        losses, correct = [], 0
        for start in range(0, len(targets), self.params.batch_size):
            part = slice(start, start + self.params.batch_size)
            logits = self.network(inputs[part])[2]
            losses.append(F.cross_entropy(logits, targets[part], reduction="sum").item())
            correct += int((logits.argmax(1) == targets[part]).sum())
        return sum(losses) / len(targets), correct / len(targets)

    # -- embeddings ----------------------------------------------------------------
    def _normalized_chunks(self, images: np.ndarray, mean, std, chunk: int = 32):
        for start in range(0, len(images), chunk):
            yield np.stack([preprocess(image, image.shape[0], mean, std)
                            for image in images[start:start + chunk]])

    @torch.no_grad()
    def _embed(self, inputs: np.ndarray | torch.Tensor) -> np.ndarray:
        """GDE embeddings of normalized inputs (B, 3, s, s)."""
        if self.params.embedding == "encoder":
            # The heads are not needed: they are ~1/4 of the work on a 32 px sub-patch.
            chosen, _ = self.network.encoder(self._tensor(inputs))
        else:
            _, chosen, _, _ = self.network(self._tensor(inputs))
        return chosen.float().cpu().numpy()

    def _embed_images(self, images: np.ndarray, mean, std) -> np.ndarray:
        return np.concatenate([self._embed(chunk)
                               for chunk in self._normalized_chunks(images, mean, std)])

    def _embed_subpatches(self, inputs: np.ndarray, chunk: int = 512) -> np.ndarray:
        """(B * K, D) embeddings of every sub-patch of every input, image by image."""
        size = inputs.shape[-1]
        patch = min(self.params.loc_patch, size)
        windows = subpatch_windows(size, patch, self.params.loc_stride)
        crops = np.stack([inputs[:, :, y:y + patch, x:x + patch] for x, y in windows], axis=1)
        crops = crops.reshape(-1, 3, patch, patch)
        return np.concatenate([self._embed(crops[start:start + chunk])
                               for start in range(0, len(crops), chunk)])

    # -- scoring ------------------------------------------------------------------
    def score(self, batch: PatchSet) -> tuple[np.ndarray, np.ndarray]:
        size = batch.input_size
        self._place(batch.device)
        self.network.eval()
        scores = np.zeros(len(batch), dtype=np.float32)
        anomaly_maps = np.zeros((len(batch), size, size), dtype=np.float32)
        patch = min(self.params.loc_patch, size)
        windows = subpatch_windows(size, patch, self.params.loc_stride)
        for positions, inputs in batch.input_batches(32):
            scores[positions] = self.image_density.distance(self._embed(inputs))
            local = self.local_density.distance(self._embed_subpatches(inputs))
            local = local.reshape(len(inputs), len(windows))
            for row, position in enumerate(positions):
                anomaly_maps[position] = self._anomaly_map(local[row], windows, patch, size)
        return scores, anomaly_maps

    def _anomaly_map(self, patch_scores, windows, patch: int, size: int) -> np.ndarray:
        """Sub-patch scores spread over their windows, averaged where they overlap, smoothed."""
        total = np.zeros((size, size), np.float64)
        cover = np.zeros((size, size), np.float64)
        for value, (x, y) in zip(patch_scores, windows):
            total[y:y + patch, x:x + patch] += value
            cover[y:y + patch, x:x + patch] += 1
        amap = total / np.maximum(cover, 1)
        if self.params.smoothing_sigma > 0:
            amap = gaussian_filter(amap, sigma=self.params.smoothing_sigma)
        return amap.astype(np.float32)

    def gradcam_maps(self, batch: PatchSet, layer: str | None = None) -> np.ndarray:
        """Grad-CAM maps (n, S, S) of the anomaly logit with respect to encoder stage ``layer``.

        ``layer`` is a name from ``cutpaste_net.encoder_stages`` (default: the last stage;
        the thesis used an early one, ``stem`` here). A stage's channels are
        weighted by their mean gradient, summed, passed through ReLU, upsampled
        bilinearly and smoothed like the anomaly maps. Values are not
        normalized, so maps compare across images; scale them for display.
        """
        stages = self.network.encoder.stage_names
        layer = stages[-1] if layer is None else layer
        if layer not in stages:
            raise ValueError(f"layer must be one of {stages}, got {layer!r}")
        size = batch.input_size
        self._place(batch.device)
        self.network.eval()
        maps = np.zeros((len(batch), size, size), dtype=np.float32)
        for positions, inputs in batch.input_batches(32):
            with torch.enable_grad():
                _, _, logits, activation = self.network(self._tensor(inputs), capture=layer)
                # Images are independent in eval mode, so one backward gives every gradient.
                gradient, = torch.autograd.grad(anomaly_logit(logits).sum(), activation)
            weights = gradient.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
            cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)
            cam = cam[:, 0].cpu().numpy()
            if self.params.smoothing_sigma > 0:
                cam = np.stack([gaussian_filter(m, sigma=self.params.smoothing_sigma) for m in cam])
            maps[positions] = cam
        return maps

    # -- persistence -----------------------------------------------------------------
    def _save_state(self, directory: Path) -> None:
        torch.save(self.network.state_dict(), directory / "network.pt")
        np.savez(directory / "gde.npz",
                 image_mean=self.image_density.mean, image_precision=self.image_density.precision,
                 local_mean=self.local_density.mean, local_precision=self.local_density.precision)

    def _load_state(self, directory: Path) -> None:
        p = self.params
        # Architecture only: the saved state replaces every weight, so none are read.
        self.network = CutPasteNet(p.encoder, p.head_layers, len(p.class_names), pretrained=False)
        self.network.load_state_dict(torch.load(directory / "network.pt", map_location="cpu",
                                                weights_only=True))
        self._place("cpu")
        self.network.eval()
        with np.load(directory / "gde.npz") as stats:
            self.image_density = GaussianDensity(stats["image_mean"], stats["image_precision"])
            self.local_density = GaussianDensity(stats["local_mean"], stats["local_precision"])
