"""Hold 0-dim parameters as shape [1] while training, and give them back their shape on export.

DeepSpeed 0.19.8 fails in `deepspeed.initialize` on any scalar `nn.Parameter` ("self.dim()
cannot be 0 to view Float as Byte"): open_clip's `logit_scale`, HF BLIP's `logit_scale`, and
the like. Every op these models apply to such a parameter (exp, clamp, multiply) broadcasts the
same over shape [1], so holding them as [1] during training changes no number. Checkpoints must
keep the original shape [] or open_clip / transformers refuse to load them, hence the restore.

The names reshaped are remembered on the root module (`SCALARS_ATTR`), so `restore_scalar_params`
needs no arguments; `restore_scalar_state_dict` does the same for a gathered state dict (ZeRO-3
exports a consolidated state dict, not the module).
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping

import torch
from torch import nn

__all__ = [
    "SCALARS_ATTR",
    "reshape_scalar_params",
    "restore_scalar_params",
    "restore_scalar_state_dict",
    "scalar_param_names",
]

SCALARS_ATTR = "_vlm_scalar_param_names"


def scalar_param_names(model: nn.Module) -> list[str]:
    """Names of the parameters of `model` that are 0-dim now."""
    return [name for name, p in model.named_parameters() if p.dim() == 0]


def _set_shape(p: nn.Parameter, shape: tuple[int, ...]) -> None:
    # `.data =` swaps the storage view in place, so optimizers/hooks holding `p` see the change.
    p.data = p.data.reshape(shape)
    if p.grad is not None:
        p.grad = p.grad.reshape(shape)


def reshape_scalar_params(model: nn.Module) -> list[str]:
    """Reshape every 0-dim parameter of `model` to shape [1], in place; returns their names.

    Call before building the optimizer and before `deepspeed.initialize`. The names are
    remembered on `model` (added to any remembered before) for `restore_scalar_params`.
    """
    names = scalar_param_names(model)
    for name in names:
        _set_shape(model.get_parameter(name), (1,))
    remembered = tuple(getattr(model, SCALARS_ATTR, ()))
    setattr(model, SCALARS_ATTR, remembered + tuple(n for n in names if n not in remembered))
    return names


def restore_scalar_params(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Give the parameters reshaped by `reshape_scalar_params` their shape [] back, in place.

    Args:
        model: the module `reshape_scalar_params` was called on.
        names: which parameters to restore; default: the ones remembered on `model`.

    Returns:
        The names restored (those that were shape [1]); the remembered list is cleared.
    """
    names = tuple(getattr(model, SCALARS_ATTR, ()) if names is None else names)
    restored = []
    for name in names:
        p = model.get_parameter(name)
        if p.shape == (1,):
            _set_shape(p, ())
            restored.append(name)
    if hasattr(model, SCALARS_ATTR):
        delattr(model, SCALARS_ATTR)
    return restored


def restore_scalar_state_dict(
    state_dict: MutableMapping[str, torch.Tensor], names: Iterable[str]
) -> MutableMapping[str, torch.Tensor]:
    """Reshape the shape-[1] entries `names` of `state_dict` to shape [] (in place; returned).

    For exports made from a gathered state dict (DeepSpeed ZeRO-3) rather than the module;
    `names` are the ones `reshape_scalar_params` returned. A name may carry a wrapper prefix
    (`module.`) in the state dict; entries are matched on the name or `<prefix>.<name>`.
    """
    wanted = tuple(names)
    for key in list(state_dict):
        if any(key == n or key.endswith("." + n) for n in wanted) and state_dict[key].shape == (1,):
            state_dict[key] = state_dict[key].reshape(())
    return state_dict
