"""The trained model's description: what inference needs to rebuild the network and its preprocessing.

Training writes ``models/model_config.json`` next to ``models/model.pt`` (each time the best model is
saved, by :class:`scripts.training.checkpoint.BestModelSaver`), and ``configs/inference.yaml`` reads
it, so ``run inference --input_dir DIR`` needs no flag that repeats the training run's settings::

    {
      "format": 1,
      "variant": "cct_r",
      "networks": {"a": {"type": "BasicUNet", "spatial_dims": 2, ...},
                   "b": {"type": "scripts.training.networks.SwinUNETR2D", ...}},
      "branch": "mean",                       # default inference branch: mean of both logits, a or b
      "branch_names": ["cnn", "transformer"],
      "patch_size": [96, 96], "slice_axis": "auto",
      "class_names": ["background", "RV", "myocardium", "LV"],
      "intensity": {"type": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0},
      "label_mapping": null,
      "largest_component": true              # inference keeps the largest 3D piece of each class
    }

A *spec* is a plain dict: ``type`` (a MONAI name such as ``BasicUNet`` or a dotted path, as a bundle
config's ``_target_``) plus the constructor's keyword arguments, all JSON values. The training
configs declare their networks and intensity transform as specs (``net_a_spec``, ``net_b_spec``,
``intensity_spec``) and build them with :func:`build`, so the description written is exactly what
was trained. With one network (``ls``, ``fs``, ``tac``) ``networks`` has only ``"a"`` and the model
is that network alone; with two, it is :class:`scripts.training.networks.EnsembleNet`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from scripts.config_values import flag, optional
from scripts.data.atomic_io import write_json
from scripts.user_errors import BundleInputError

__all__ = [
    "ModelConfigError",
    "build",
    "build_model",
    "checked_patch_size",
    "checked_flip_tta",
    "largest_component",
    "trained_with_flips",
    "read_model_config",
    "write_model_config",
    "load_weights",
]

FORMAT = 1
_REQUIRED = ("networks", "patch_size", "class_names", "intensity")


class ModelConfigError(BundleInputError):
    """A model description that cannot be used, or a checkpoint that does not fit it."""


def build(spec: Mapping[str, Any]):
    """Instantiate a spec (``{"type": ..., **kwargs}``) as a bundle config would a ``_target_`` dict."""
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ModelConfigError(f"a spec needs a 'type' and keyword arguments, got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    return ConfigParser({"obj": {"_target_": spec["type"], **_plain(kwargs)}}).get_parsed_content("obj")


def _plain(value):
    """JSON-like copy (tuples to lists) so that specs survive a round trip through JSON unchanged."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def build_model(config: Mapping[str, Any], branch: str | None = None) -> torch.nn.Module:
    """The inference network of a model description: one network, or the two-network ensemble.

    Args:
        config: the description (:func:`read_model_config`).
        branch: ``mean`` / ``a`` / ``b`` (or ``cnn`` / ``transformer``) for a two-network model;
            ``None``: the description's default. A one-network model accepts ``None``, ``a`` or ``mean``.
    """
    networks = config["networks"]
    if set(networks) == {"a"}:
        if branch not in (None, "a", "mean", "cnn", "ensemble"):
            raise ModelConfigError(f"branch {branch!r}: this model has one network (variant {config.get('variant')!r})")
        return build(networks["a"])
    if set(networks) != {"a", "b"}:
        raise ModelConfigError(f"'networks' must be {{'a'}} or {{'a', 'b'}}, got {sorted(networks)}")
    from scripts.training.networks import EnsembleNet

    return EnsembleNet(build(networks["a"]), build(networks["b"]), branch=branch or config.get("branch", "mean"))


def checked_patch_size(config: Mapping[str, Any], requested: Any = None) -> list[int]:
    """The patch size to infer at: the training one; a ``requested`` other size is refused.

    A slice is resized to the patch before the network sees it, so another patch size segments at
    another scale than the model learnt."""
    trained = [int(v) for v in config["patch_size"]]
    if requested is None:
        return trained
    requested = [int(v) for v in (requested if isinstance(requested, (list, tuple)) else [requested] * len(trained))]
    if requested != trained:
        raise ModelConfigError(
            f"patch_size {requested} differs from the {trained} this model was trained at (model_config.json); "
            "inference at another patch size segments at another scale. Leave --patch_size unset"
        )
    return trained


def trained_with_flips(config: Mapping[str, Any]) -> bool:
    """Whether the model was trained with mirror flips. ``model_config.json`` records ``flip_augmentation``
    since 0.4.2; a description without it was written by a run that trained with flips, the only kind
    before the CT overlay turned them off."""
    return bool(config.get("flip_augmentation", True))


def checked_flip_tta(config: Mapping[str, Any], requested: bool) -> bool:
    """Mirror test-time augmentation, refused for a model not :func:`trained_with_flips`."""
    if requested and not trained_with_flips(config):
        raise ModelConfigError(
            "flip_tta: this model was trained without mirror flips (flip_augmentation false in model_config.json, "
            "e.g. abdominal CT, where a mirror image swaps left and right organs); leave --flip_tta unset"
        )
    return bool(requested)


def largest_component(config: Mapping[str, Any], requested: Any = None) -> bool:
    """Whether inference keeps only the largest 3D connected piece of each class.

    ``requested`` (``--largest_component true|false``) wins; ``None`` / ``null``: the model's own setting,
    ``largest_component`` in ``model_config.json`` (written since 0.9.0; a description without it was
    written by a bundle that did not post-process, so ``False``)."""
    requested = optional(requested)
    if requested is None:
        return bool(config.get("largest_component", False))
    return flag(requested, "largest_component")


def write_model_config(path: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """Write the description atomically (checked first, so a bad one never reaches disk)."""
    config = {"format": FORMAT, **_plain(config)}
    _check(config, str(path))
    write_json(path, config)


def _check(config: Mapping[str, Any], where: str) -> None:
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ModelConfigError(f"{where}: model description lacks {missing}")
    if int(config.get("format", FORMAT)) > FORMAT:
        raise ModelConfigError(f"{where}: format {config['format']} is newer than this bundle reads ({FORMAT})")
    nets = config["networks"]
    if not isinstance(nets, Mapping) or "a" not in nets or not set(nets) <= {"a", "b"}:
        raise ModelConfigError(f"{where}: 'networks' must map 'a' (and optionally 'b') to network specs")
    for name, spec in nets.items():
        if not isinstance(spec, Mapping) or "type" not in spec:
            raise ModelConfigError(f"{where}: network {name!r} has no 'type'")


def read_model_config(
    path: str | os.PathLike, default: Mapping[str, Any] | None = None, model_path: str | os.PathLike | None = None
) -> dict:
    """Read ``model_config.json``; ``default`` (if given) when the file does not exist and there is no
    trained model either (``model_path`` missing: a fresh clone, e.g. for ``verify_net_in_out``).

    A ``model.pt`` without its ``model_config.json`` is refused: the built-in description would rebuild
    the bundle's default network at its patch size, which is wrong for weights trained otherwise.

    Raises:
        ModelConfigError: unreadable or incomplete file, weights without their description, or no file and no default.
    """
    path = Path(path)
    if not path.exists():
        if model_path is not None and Path(model_path).exists():
            raise ModelConfigError(
                f"{model_path} has no model description beside it ({path} is missing): copy the model_config.json written "
                "with these weights next to them, or pass --model_config_file PATH to the one to use"
            )
        if default is None:
            raise ModelConfigError(f"{path}: no model description; train a model first (run training writes it)")
        return {"format": FORMAT, **_plain(default)}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelConfigError(f"{path}: not a readable model description ({e})") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path}: not a model description (a JSON object is expected)")
    _check(config, str(path))
    return config


def load_weights(
    network: torch.nn.Module,
    model_path: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load ``model.pt`` (a flat ``state_dict``, read with ``weights_only=True``) into ``network``.

    A checkpoint that does not fit the network gets one message naming both files' variants and the
    first mismatching keys, instead of ``load_state_dict``'s traceback.
    """
    model_path = Path(model_path)
    if not model_path.exists():
        raise ModelConfigError(f"{model_path}: no such model file; train a model first or pass --model_path")
    try:
        state = torch.load(model_path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - one readable message for any unreadable checkpoint
        raise ModelConfigError(f"{model_path}: not a readable model checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # a checkpoint saved as {"model": state_dict}
    target = network.module if hasattr(network, "module") else network
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        variant = (config or {}).get("variant", "?")
        details = []
        if missing:
            details.append(f"{len(missing)} weights missing (first: {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        if shapes:
            k = shapes[0]
            details.append(
                f"{len(shapes)} of another shape (first: {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise ModelConfigError(
            f"{model_path} does not fit the network of the model description (variant {variant!r}): "
            + "; ".join(details)
            + ". Use the model_config.json written with this model.pt, or pass the matching --model_config_file"
        )
    target.load_state_dict(state)
    return network
