"""Sharded training with torch's FSDP2 (``fully_shard``), one code path for CPU (gloo) and GPUs (NCCL).

accelerate's FSDP plugin is silently ignored with ``Accelerator(cpu=True)`` (it wraps in DDP), so the
training loop shards the model itself: :func:`shard_model` applies ``fully_shard`` to every decoder
layer and then to the root on a device mesh of all processes; parameters become DTensor shards.
Checkpoint code gathers full tensors with :func:`full_tensor` and loads them back with
:func:`local_shard`; :func:`unshard_model` turns the model plain again after training so that merge,
convert and save see ordinary tensors.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from dsq.core.errors import TrainingError

log = logging.getLogger(__name__)


def is_dtensor(t: object) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The full tensor behind a sharded one (a collective: every rank must call it); others as given."""
    return t.full_tensor() if is_dtensor(t) else t


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full``, laid out as the sharded tensor ``like`` (no communication:
    every rank holds ``full``)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` (or inside it)."""
    return bool(_fsdp_modules(model))


def reshard(model: nn.Module) -> None:
    """Register the sharded parameters again (the root keeps its gathered ones after a forward)."""
    for m in _fsdp_modules(model):
        m.reshard()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers model, bare or inside peft: the units FSDP gathers one at a time.

    They are the modules whose class the model lists in ``_no_split_modules`` (a ``layers``
    ``ModuleList``'s children otherwise).
    """
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = [c for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.split(".")[-1] == "layers" for c in m]
    if not layers:
        raise TrainingError(f"fsdp: no decoder layers found in {type(model).__name__} (no _no_split_modules, no 'layers' list)")
    return layers


def _check_shardable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise TrainingError(f"fsdp: parameter {name} is {p.dtype} ({type(p).__name__}); only floating-point "
                                "parameters can be sharded (a bitsandbytes QLoRA base cannot: train it without fsdp)")
        if p.dim() == 0:
            raise TrainingError(f"fsdp: parameter {name} is a scalar; FSDP shards dimension 0")


def broadcast_trainable(model: nn.Module, accelerator) -> None:
    """Give every rank the main process's trainable parameters (as DDP does when it wraps).

    Freshly initialised adapters or scales may differ between ranks; sharding them as they are
    would train a mixture. The frozen rest is loaded from the same checkpoint on every rank.
    """
    device = accelerator.device
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                t = p.detach().to(device)
                torch.distributed.broadcast(t, src=0)
                if t.data_ptr() != p.data_ptr():  # moved to the accelerator for the broadcast
                    p.copy_(t)


def shard_model(model: nn.Module, accelerator, *, reshard_root: bool = False) -> dict:
    """Apply FSDP2 in place: ``fully_shard`` every decoder layer, then the root, over all processes.

    The mesh has the accelerator's device type (gloo on CPU, NCCL on CUDA); parameters move to
    that device layer by layer and become ``DTensor`` s holding this rank's dim-0 shard. The
    trainable parameters are first broadcast from the main process (:func:`broadcast_trainable`).

    Args:
        model: the model to train (plain, QAT-prepared or peft), already on its final structure.
        accelerator: the run's ``Accelerator`` (its process group and device).
        reshard_root: free the root's gathered parameters after each forward too (forward-only
            models such as a distillation teacher).

    Returns:
        Facts for the result: the number of sharded layers, and for one trainable matrix its full
        numel and the numel this rank holds, and this rank's numel of all parameters.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _check_shardable(model)
    broadcast_trainable(model, accelerator)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True if reshard_root else None)
    named = [(n, p) for n, p in model.named_parameters()]
    in_layer = {id(p) for p in layers[0].parameters()}  # a trainable matrix of the first layer, else any
    probe = next(((n, p) for n, p in named if id(p) in in_layer and p.requires_grad and p.dim() >= 2),
                 next(((n, p) for n, p in named if p.requires_grad), named[0]))
    return {"layers": len(layers), "param": probe[0], "full_numel": probe[1].numel(),
            "local_numel": probe[1].to_local().numel(), "local_params": sum(p.to_local().numel() for _, p in named)}


def _strip_fsdp(module: nn.Module) -> None:
    """Take FSDP's hooks, state and class off ``module`` (parameters already replaced by plain ones)."""
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping

    state = module._get_fsdp_state()
    handles = [state._pre_forward_hook_handle, state._post_forward_hook_handle]
    group = state._fsdp_param_group
    if group is not None:
        handles += [*group._module_to_pre_save_state_dict_hook_handle.values(),
                    *group._module_to_pre_load_state_dict_hook_handle.values()]
        handles += [fp._post_load_hook_handle for fp in group.fsdp_params]
    for handle in handles:
        if handle is not None:
            handle.remove()
    module.__class__ = type(module).__mro__[type(module)._orig_cls_mro_index]
    for key in (STATE_KEY, REGISTRY_KEY):
        module.__dict__.pop(key, None)
    _module_state_mapping.pop(module, None)  # so that the module can be sharded again


def unshard_model(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Undo :func:`shard_model` in place: every parameter becomes a plain full tensor on ``device``.

    A collective: every rank calls it, and every rank ends with the same full model. The gathers
    go one parameter at a time, so the accelerator never holds more than one full tensor.
    """
    fsdp_modules = _fsdp_modules(model)
    if not fsdp_modules:
        return
    reshard(model)
    plain: dict[int, nn.Parameter] = {}  # tied parameters stay tied
    with torch.no_grad():
        for m in model.modules():
            for name, p in list(m._parameters.items()):
                if p is None:
                    continue
                if id(p) not in plain:
                    plain[id(p)] = nn.Parameter(full_tensor(p.detach()).to(device), requires_grad=p.requires_grad)
                m._parameters[name] = plain[id(p)]
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = b.to(device)
    for m in fsdp_modules:
        _strip_fsdp(m)
    for m in model.modules():
        for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            m.__dict__.pop(attr, None)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def gather_objects(obj: object, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out
