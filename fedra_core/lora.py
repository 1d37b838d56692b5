"""LoRA on a (sub-)model with peft, and its trainable state under global names.

The global names are the sub-model's own parameter names without peft's adapter
segment: ``blocks.7.attn.proj.lora_A.weight``, ``head.weight``. Because the sub-model
names its blocks by their global index (see ``fedra_core.backbone``), this module is
the only place where local and global names meet.
"""

from collections.abc import Mapping

import torch
from torch import nn

from fedra_core._compat import ensure_torchvision_importable
from fedra_core.backbone import classifier_keys
from fedra_core.config import LoraSettings

State = dict[str, torch.Tensor]

ensure_torchvision_importable()  # peft imports transformers, which imports torchvision

from peft import (  # noqa: E402
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)


class StateMismatchError(ValueError):
    """A received state does not fit the model: names or shapes differ."""


def attach_lora(model: nn.Module, settings: LoraSettings, *, head_seed: int) -> nn.Module:
    """Freeze ``model``, add LoRA adapters to the target modules, unfreeze or fix the head.

    Parameters
    ----------
    model : nn.Module
        An assembled (sub-)model.
    settings : LoraSettings
        Rank, alpha, dropout, target modules (suffixes such as ``attn.proj``) and
        whether the head trains.
    head_seed : int
        The run's seed. A head that does not train (``train_head: false``) is never
        sent, so the server and every client draw it from this seed alone and hold
        the same one; a trained head is part of the sent state and keeps its draw.

    Returns
    -------
    nn.Module
        The same model, adapted in place.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules))
    try:
        model = inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ValueError(f"backbone.lora.target_modules {list(settings.target_modules)}: {err}") from err
    for module in model.modules():
        # peft casts a LoRA layer's input to the adapter's dtype (float32) before the adapter; under
        # bf16/fp16 autocast the adapter's matmuls run in half precision anyway, so that cast only
        # copies every adapted activation to float32 and back (a quarter of a step's GPU time on
        # ViT-B/16, bench/gpu.py). Without it the dropout sees the half-precision activation.
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    if settings.train_head:
        for param in model.get_classifier().parameters():
            param.requires_grad_(True)
    else:
        draw_head(model.get_classifier(), head_seed)
    return model


@torch.no_grad()
def draw_head(head: nn.Module, seed: int) -> None:
    """Re-draw a linear classifier from ``seed`` alone, on the CPU, as ``nn.Linear`` initializes.

    The same seed gives the same head on every node and device, whatever the
    node's random state or the blocks it holds.
    """
    params = dict(head.named_parameters())
    if not params:
        return  # no classifier (num_classes 0)
    weight = params.get("weight")
    if weight is None or weight.dim() != 2 or set(params) - {"weight", "bias"}:
        raise ValueError(f"a frozen head must be a linear layer to be drawn from the seed, got {head}")
    bound = 1.0 / weight.shape[1] ** 0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    generator = torch.Generator().manual_seed(seed)
    for param in params.values():
        draw = torch.rand(param.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
        param.copy_(draw.to(param.dtype))


def _head_keys(model: nn.Module) -> set[str]:
    """Trainable tensors outside LoRA: the head, and extra classifiers a method adds (DepthFL)."""
    keys = classifier_keys(model)
    params = dict(model.named_parameters())
    extra = {k for k, p in params.items() if p.requires_grad and "lora_" not in k}
    return {k for k in keys if k in params and params[k].requires_grad} | extra


def trainable_state(model: nn.Module) -> State:
    """Copy of every trainable tensor, keyed by global names."""
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    full = model.state_dict()
    for key in sorted(_head_keys(model)):
        state[key] = full[key].detach().clone()
    return state


def check_state_fits(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Raise ``StateMismatchError`` unless ``state`` has exactly the expected names and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise StateMismatchError(f"state does not fit: missing {missing[:4]} ({len(missing)}), "
                                 f"unexpected {unexpected[:4]} ({len(unexpected)})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise StateMismatchError(f"{key}: shape {tuple(value.shape)}, "
                                     f"expected {tuple(expected[key].shape)}")


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a global-named trainable state; every trainable tensor must be given, nothing else."""
    check_state_fits(trainable_state(model), state)
    heads = _head_keys(model)
    lora = {k: v for k, v in state.items() if k not in heads}
    result = set_peft_model_state_dict(model, lora)
    unplaced = [k for k in result.unexpected_keys]
    unloaded = [k for k in result.missing_keys if "lora_" in k]
    if unplaced or unloaded:
        raise StateMismatchError(f"LoRA tensors not placed: {unplaced[:4]}; not loaded: {unloaded[:4]}")
    if heads:
        model.load_state_dict({k: state[k] for k in heads}, strict=False)


def is_block_key(key: str) -> bool:
    """True for tensors that belong to a transformer block (``blocks.<i>.…``)."""
    return key.startswith("blocks.") and key.split(".", 2)[1].isdigit()


def block_of(key: str) -> int | None:
    """Global block index of a key, or None for shared tensors (head, embedding)."""
    return int(key.split(".", 2)[1]) if is_block_key(key) else None


def slice_state(state: Mapping[str, torch.Tensor], layers: list[int]) -> State:
    """The part of a global state a client holding ``layers`` needs: its blocks and shared keys."""
    held = set(layers)
    return {k: v for k, v in state.items() if block_of(k) is None or block_of(k) in held}
