"""The layer-sequential calibration driver shared by every calibrated method and architecture.

The calibration set runs through the embeddings once; the inputs of decoder layer 0 (and the
keyword arguments transformers passes to every layer: rotary embeddings, causal mask,
positions) are captured. Then, for each decoder layer in turn, the method's callback collects
statistics by running the layer (with hooks of its own), quantizes the layer's modules, and
the driver recomputes the layer's outputs *with the quantized weights*; those feed the next
layer, so every layer is calibrated on the activations it will really see. Only one layer's
inputs and outputs are held at a time.

MoE experts (transformers' fused 3-D experts) are observed through :func:`observe_experts`:
the forward keeps the routed mix, and for statistics every calibration token is sent through
every expert, so a rarely routed expert still gets well-conditioned statistics. The routed
token count of every expert is recorded for the report.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm


from .activation_store import BatchStore
from .modules import GatedActivation, is_fused_experts, set_module
from dsq.core.errors import QuantizationError
from dsq.core.layout import decoder_layers
from dsq.core.ranks import SINGLE, Ranks


class _StopForward(Exception):
    """Raised by the capture hook once layer 0's inputs are recorded."""


@dataclass
class LayerInputs:
    """Inputs of one decoder layer for every calibration batch.

    Attributes:
        hidden: ``[batch, seq, hidden]`` per batch (held on disk beyond the store's budget).
        kwargs: keyword arguments transformers passed to the layer (per batch; shared by all layers).
    """

    hidden: BatchStore
    kwargs: list[dict]


def first_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layer: nn.Module, batches: list[torch.Tensor],
                         budget_bytes: int | None = None) -> LayerInputs:
    """Run ``model`` on ``batches`` up to ``layer`` and record that layer's inputs (beyond ``budget_bytes`` on disk)."""
    captured = LayerInputs(hidden=BatchStore(budget_bytes), kwargs=[])

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, budget_bytes: int | None = None) -> BatchStore:
    """Outputs of ``layer`` for every captured batch (beyond ``budget_bytes`` on disk)."""
    outputs = BatchStore(budget_bytes)
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        outputs.append(first_tensor(layer(h, **kw)))
    return outputs


@dataclass(frozen=True)
class LayerRunner:
    """Runs one decoder layer on its calibration inputs: ``runner()`` returns the outputs of every batch.

    Attributes:
        layer: the decoder layer.
        inputs: its inputs (per batch), for methods that run the layer themselves (e.g. to train it).
        budget_bytes: outputs beyond this many bytes go to disk (None: all in memory).
    """

    layer: nn.Module
    inputs: LayerInputs
    budget_bytes: int | None = None

    def __call__(self) -> BatchStore:
        return run_layer(self.layer, self.inputs, self.budget_bytes)

    @torch.no_grad()
    def run_until(self, module: nn.Module) -> None:
        """Run every batch only as far as ``module`` (its forward included), for the statistics of the modules
        that run before it: the rest of the layer is not computed, and nothing is returned."""
        def stop(mod, args, output):
            raise _StopForward

        handle = module.register_forward_hook(stop)
        try:
            for h, kw in zip(self.inputs.hidden, self.inputs.kwargs):
                try:
                    self.layer(h, **kw)
                except _StopForward:
                    pass
        finally:
            handle.remove()


LayerCallback = Callable[[str, nn.Module, LayerRunner], None]


class LayerLifecycle(Protocol):
    """Where decoder layers live while a method walks them.

    The driver calls ``load`` before a layer is used and ``release`` once its quantized outputs are
    computed. :class:`ResidentLayers` (every layer already in memory) does nothing; the streaming
    runner (:mod:`dsq.quantize.streaming`) reads the layer's tensors from the checkpoint's shards on ``load``
    and writes the quantized layer to the output shards and frees it on ``release``.
    """

    def load(self, index: int, name: str, layer: nn.Module) -> None: ...

    def release(self, index: int, name: str, layer: nn.Module) -> None: ...

    @property
    def resident(self) -> bool:
        """True when every layer stays in memory (methods that need the whole model check this)."""


class ResidentLayers:
    """Every layer is in memory already: nothing to load or release."""

    resident = True

    def load(self, index: int, name: str, layer: nn.Module) -> None:
        pass

    def release(self, index: int, name: str, layer: nn.Module) -> None:
        pass


RESIDENT = ResidentLayers()


class OnDevice:
    """Each decoder layer goes to ``device`` (an accelerator) while it is calibrated and quantized.

    Wraps another lifecycle: ``load`` loads the layer (from the shards when streaming) and moves it
    to ``device``; ``release`` moves the quantized layer back to CPU and hands it on (to be written
    out when streaming). Embeddings, the other layers and the head stay on CPU, so the accelerator
    holds one layer, its calibration activations and its statistics.

    Args:
        inner: the lifecycle that loads and releases layers (:data:`RESIDENT` or a streaming one).
        device: e.g. ``"cuda"``, ``"cuda:1"``.
    """

    def __init__(self, inner: "LayerLifecycle", device: str | torch.device) -> None:
        self.inner = inner
        self.device = torch.device(device)

    @property
    def resident(self) -> bool:
        return self.inner.resident

    def load(self, index: int, name: str, layer: nn.Module) -> None:
        self.inner.load(index, name, layer)
        layer.to(self.device)

    def release(self, index: int, name: str, layer: nn.Module) -> None:
        layer.to("cpu")
        self.inner.release(index, name, layer)


def execution_device(lifecycle: "LayerLifecycle", model: nn.Module) -> torch.device:
    """Where layers run: the lifecycle's device, else the model's."""
    device = getattr(lifecycle, "device", None)
    return device if device is not None else next(model.parameters()).device


def sequential_calibrate(
    model: nn.Module,
    input_ids: torch.Tensor,
    on_layer: LayerCallback,
    *,
    batch_size: int = 8,
    progress: bool = True,
    lifecycle: LayerLifecycle = RESIDENT,
    budget_bytes: int | None = None,
    ranks: Ranks = SINGLE,
) -> BatchStore:
    """Drive ``on_layer`` over the decoder layers in order.

    Args:
        model: a transformers causal LM.
        input_ids: ``(samples, seq_len)`` calibration tokens.
        on_layer: ``on_layer(layer_name, layer, run)``; ``run()`` runs the layer on all calibration
            inputs (with whatever hooks the callback installed) and returns the outputs; ``run.inputs``
            are those inputs. The callback quantizes the layer in place.
        batch_size: calibration sequences per forward.
        progress: show a progress bar.
        lifecycle: loads each layer before it is used and releases it after its outputs are computed.
        budget_bytes: a layer's cached inputs (and outputs) beyond this many bytes go to disk (None: all
            in memory).
        ranks: with several processes each runs its contiguous share of the batches (the callback combines
            the statistics, :meth:`~.stats.StatsCollector.reduce`).

    Returns:
        The hidden states after the last layer (``[batch, seq, hidden]`` per batch, on the execution
        device), for a head stage.
    """
    prefix, layers = decoder_layers(model)
    model_device = next(model.parameters()).device
    batches = _my_batches(input_ids.split(batch_size), ranks)
    batches = [b.to(model_device) for b in batches]
    inputs = capture_layer_inputs(model, layers[0], batches, budget_bytes)
    device = execution_device(lifecycle, model)
    if device != model_device:
        from accelerate.utils import send_to_device

        hidden = BatchStore.of((h.to(device) for h in inputs.hidden), budget_bytes)
        inputs = LayerInputs(hidden=hidden, kwargs=send_to_device(inputs.kwargs, device))
    for i in tqdm(range(len(layers)), desc="calibrate layers", disable=not progress, unit="layer"):
        layer = layers[i]
        lifecycle.load(i, f"{prefix}.{i}", layer)
        on_layer(f"{prefix}.{i}", layer, LayerRunner(layer, inputs, budget_bytes))
        outputs = run_layer(layer, inputs, budget_bytes)  # with the quantized weights
        lifecycle.release(i, f"{prefix}.{i}", layers[i])
        inputs.hidden.close()
        inputs = LayerInputs(hidden=outputs, kwargs=inputs.kwargs)
    return inputs.hidden


def _my_batches(batches: tuple[torch.Tensor, ...], ranks: Ranks) -> list[torch.Tensor]:
    """This rank's contiguous share of the calibration batches; every rank needs at least one."""
    if len(batches) < ranks.world:
        raise QuantizationError(
            f"calibration has {len(batches)} batch(es) of quantize.calibration.batch_size sequences; {ranks.world} "
            "processes need at least one each (more samples or a smaller batch_size)"
        )
    return [batches[i] for i in ranks.share(len(batches))]


# ----------------------------------------------------------------------------- observation


@contextmanager
def observe_inputs(modules: dict[str, nn.Module], callback: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``callback(name, input)`` for every forward of each module in ``modules``."""
    handles = []
    for name, module in modules.items():
        def hook(mod, args, name=name):
            callback(name, args[0].detach())
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_calls(modules: dict[str, nn.Module], limit: int) -> Iterator[dict[str, list[tuple[tuple, dict]]]]:
    """Record the first ``limit`` ``(args, kwargs)`` each module in ``modules`` is called with."""
    captured: dict[str, list[tuple[tuple, dict]]] = {n: [] for n in modules}
    handles = []
    for name, module in modules.items():
        def hook(mod, args, kwargs, name=name):
            if len(captured[name]) < limit:
                captured[name].append((args, dict(kwargs)))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


class ExpertObserver(Protocol):
    """Receives every calibration token's activations for each fused MoE expert."""

    def experts_input(self, name: str, x: torch.Tensor) -> None:
        """``x`` ``(tokens, H)``: the input every expert's ``gate_up_proj`` sees (all tokens)."""

    def expert_tokens(self, name: str, expert: int, x: torch.Tensor, h: torch.Tensor, routed: torch.Tensor) -> None:
        """Expert ``expert`` on all tokens: input ``x`` ``(tokens, H)``, ``h = act(gate) * up``
        ``(tokens, I)`` (its ``down_proj`` input), ``routed`` ``(tokens,)`` bool: routed to it."""


@dataclass
class ExpertTokenCounts:
    """Routed calibration tokens per expert, per experts module."""

    counts: dict[str, list[int]] = field(default_factory=dict)

    def add(self, name: str, top_k_index: torch.Tensor, num_experts: int) -> None:
        new = torch.bincount(top_k_index.reshape(-1).cpu(), minlength=num_experts)[:num_experts].tolist()
        old = self.counts.get(name, [0] * num_experts)
        self.counts[name] = [a + b for a, b in zip(old, new)]

    def reduce(self, ranks: Ranks) -> None:
        """Every rank's counts summed (each rank counted its share of the batches)."""
        if not ranks.several:
            return
        for name in sorted(self.counts):
            total = ranks.sum_(torch.tensor(self.counts[name], dtype=torch.int64))
            self.counts[name] = total.tolist()

    def starved(self) -> dict[str, list[int]]:
        """Experts that received no routed calibration token, per module."""
        return {n: [e for e, c in enumerate(cs) if c == 0] for n, cs in self.counts.items() if 0 in cs}


class ObservedExperts(nn.Module):
    """Wraps fused experts: the routed forward is unchanged; statistics see every token in every expert."""

    def __init__(self, experts: nn.Module, name: str, observer: ExpertObserver, counts: ExpertTokenCounts) -> None:
        super().__init__()
        self.inner = experts
        self.name = name
        self.observer = observer
        self.counts = counts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        experts = self.inner
        num_experts = experts.gate_up_proj.shape[0]
        self.counts.add(self.name, top_k_index, num_experts)
        x = hidden_states.detach()  # (tokens, H)
        self.observer.experts_input(self.name, x)
        for e in range(num_experts):
            gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            routed = (top_k_index == e).any(dim=-1)  # (tokens,)
            self.observer.expert_tokens(self.name, e, x, GatedActivation.of(experts)(gate, up), routed)
        return experts(hidden_states, top_k_index, top_k_weights)


def fused_experts_in(layer: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Full name -> fused experts module, for every fused experts module inside ``layer``."""
    return {f"{prefix}.{n}": m for n, m in layer.named_modules() if n and is_fused_experts(m)}


@contextmanager
def observe_experts(layer: nn.Module, prefix: str, observer: ExpertObserver, counts: ExpertTokenCounts) -> Iterator[None]:
    """Swap every fused experts module of ``layer`` for an :class:`ObservedExperts` while inside."""
    originals = {n: m for n, m in layer.named_modules() if n and is_fused_experts(m)}
    for n, m in originals.items():
        set_module(layer, n, ObservedExperts(m, f"{prefix}.{n}", observer, counts))
    try:
        yield
    finally:
        for n, m in originals.items():
            set_module(layer, n, m)
