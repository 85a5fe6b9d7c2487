"""Run calibration tokens through a checkpoint one decoder layer at a time, holding one layer in memory.

The model is built on the meta device (no weights); only the modules that run before the first decoder
layer (embeddings) get real weights. One pass with every decoder layer replaced by a recorder gives the
first layer's inputs and the keyword arguments each layer is called with (rotary embeddings, masks).
After that each layer is loaded from the checkpoint alone, run on the stored hidden states, and
unloaded (DESIGN.md, "Calibrated conversion").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qpissa import UserError
from qpissa.checkpoint import CheckpointReader


@dataclass
class DecoderStack:
    """The decoder layers of a model skeleton and where their weights are in the checkpoint.

    Attributes:
        base: the module whose forward runs the embeddings and then the layers (e.g. `LlamaModel`).
        layers: its decoder layers, parameters on the meta device until `loaded_layer`.
        prefix: checkpoint name prefix of the layers (`model.layers`): layer i's tensors are `prefix.i.*`.
        device: where the weights are loaded and the calibration pass runs (the conversion's device).
    """

    base: torch.nn.Module
    layers: torch.nn.ModuleList
    prefix: str
    device: torch.device


@dataclass
class LayerInputs:
    """What every decoder layer is called with, per calibration batch.

    Attributes:
        hidden: the hidden states entering the current layer, `[batch, seq, hidden]` per batch.
        kwargs: per layer, per batch: the keyword arguments the model passes (masks, rotary embeddings).
    """

    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]


def open_stack(
    reader: CheckpointReader, targets: set[str], dtype: torch.dtype, device: torch.device
) -> DecoderStack:
    """Build the model skeleton and give real weights to the modules before the first decoder layer.

    Args:
        reader: the checkpoint.
        targets: target module names; the decoder layers are the module list that holds them.
        dtype: dtype of the embeddings' weights (the compute dtype of the calibration pass).
        device: where the calibration pass runs; the skeleton's buffers (rotary frequencies) move there.

    Raises:
        UserError: the architecture has no list of decoder layers holding the targets.
    """
    import transformers
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    config = transformers.AutoConfig.from_pretrained(reader.model_dir)
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) real
        try:
            model = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:
            model = transformers.AutoModel.from_config(config)
    prefix, layers = _decoder_layers(model, targets)
    base_name = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    base = model.get_submodule(base_name)
    for name, buffer in list(base.named_buffers()):
        set_module_tensor_to_device(base, name, device, value=buffer)
    for name, _ in base.named_parameters():
        full = f"{base_name}.{name}" if base_name else name
        if not full.startswith(prefix + "."):
            _load_tensor(base, name, reader, full, dtype, device)
    base.eval()
    return DecoderStack(base=base, layers=layers, prefix=prefix, device=device)


@torch.no_grad()
def first_layer_inputs(stack: DecoderStack, batches: list[torch.Tensor]) -> LayerInputs:
    """Run the model up to its first decoder layer on each batch of token ids `[batch, seq]`.

    Every layer is swapped for a recorder that returns its input unchanged, so one pass records the
    arguments of all layers without any layer weights. The weights before the first layer (embeddings)
    are needed for this pass only: they go back to the meta device after it.
    """
    originals = list(stack.layers)
    calls: list[list[dict]] = [[] for _ in originals]
    hidden: list[torch.Tensor] = []
    for index in range(len(originals)):
        stack.layers[index] = _Recorder(calls[index], hidden if index == 0 else None)
    try:
        for ids in batches:
            stack.base(input_ids=ids.to(stack.device), use_cache=False)
    finally:
        for index, layer in enumerate(originals):
            stack.layers[index] = layer
    _unload_outside_layers(stack)
    return LayerInputs(hidden=hidden, kwargs=calls)


def _unload_outside_layers(stack: DecoderStack) -> None:
    """Give the parameters outside the decoder layers (embeddings, final norm) back to the meta device."""
    from accelerate.utils import set_module_tensor_to_device

    layer_params = {id(p) for p in stack.layers.parameters()}
    for name, param in list(stack.base.named_parameters()):
        if id(param) not in layer_params:
            set_module_tensor_to_device(stack.base, name, "meta")


@contextmanager
def loaded_layer(
    stack: DecoderStack, index: int, reader: CheckpointReader, dtype: torch.dtype
) -> Iterator[torch.nn.Module]:
    """Decoder layer `index` with its checkpoint weights in `dtype` on the stack's device, unloaded (back
    to meta) on exit."""
    layer = stack.layers[index]
    for name, _ in layer.named_parameters():
        _load_tensor(layer, name, reader, f"{stack.prefix}.{index}.{name}", dtype, stack.device)
    layer.eval()
    try:
        yield layer
    finally:
        layer.to("meta")


@torch.no_grad()
def run_layer(
    layer: torch.nn.Module, inputs: LayerInputs, index: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Layer `index`'s outputs for every batch, computed in `dtype`, stored like the inputs."""
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs[index], strict=True):
        result = layer(hidden.to(dtype), **kwargs)
        result = result[0] if isinstance(result, tuple) else result
        outputs.append(result.to(hidden.dtype))
    return outputs


SYMMETRIC_BLOCK_ROWS = 3  # measured on 2 CPU cores: 2 and 4 block rows were slower at 1536 wide


class InputStatistics:
    """`H = Σ xᵀx / n` over the calibration tokens of each given Linear's input: each batch's product in
    `product_dtype` (its block upper triangle, mirrored once at the end), the sum over batches in float64
    (no drift however many tokens).

    bf16 products (2.3x faster than float32 on AVX512-BF16) are rounded to bf16 before the sum: H stays
    close (the demo model's held-out KL moved by 1 % or less), but not positive definite to 1e-2 of its mean
    diagonal, which error-compensated codes need (their Cholesky of H + 0.01·mean(diag H)·I failed).

    Linears fed the same tensor (q/k/v, gate/up) share one sum, computed once per batch: at Llama-3-8B
    shapes a down_proj's H alone is 1.6 GB. Use as a context manager around `run_layer`: the hooks are
    removed on exit.

    Args:
        layer: the decoder layer being run.
        linears: `{name: Linear}` inside `layer` whose inputs to collect.
        product_dtype: dtype of each batch's `xᵀx`.
    """

    def __init__(
        self, layer: torch.nn.Module, linears: dict[str, torch.nn.Module], product_dtype: torch.dtype
    ) -> None:
        self.layer, self.linears, self.product_dtype = layer, linears, product_dtype
        self.tokens = 0
        self._group: dict[str, int] = {}  # Linear name -> index of the shared sum of its input
        self._sums: list[torch.Tensor] = []
        # this batch's inputs -> (the tensor, its sum's index); holding the tensor keeps its memory from
        # being reused by a later input, which would then look like the same one
        self._batch: dict[int, tuple[torch.Tensor, int]] = {}
        self._hooks: list = []

    def __enter__(self) -> InputStatistics:
        self._hooks.append(self.layer.register_forward_pre_hook(self._new_batch, with_kwargs=True))
        for name, linear in self.linears.items():
            self._hooks.append(linear.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._batch.clear()
        for total in self._sums:
            _mirror_upper_blocks(total)

    def hessian(self, name: str) -> torch.Tensor:
        """`[in, in]` float32 mean of x xᵀ over the tokens seen (undamped), once the context has exited."""
        return (self._sums[self._group[name]] / max(self.tokens, 1)).float()

    def _new_batch(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._batch.clear()
        hidden = args[0] if args else kwargs["hidden_states"]
        self.tokens += hidden.shape[:-1].numel()

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            if id(x) in self._batch:  # the tensor another Linear already added this batch
                self._group.setdefault(name, self._batch[id(x)][1])
                return
            flat = x.reshape(-1, x.shape[-1]).to(self.product_dtype)  # [tokens, in]
            if name not in self._group:
                self._group[name] = len(self._sums)
                self._sums.append(
                    torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=x.device)
                )
            _add_upper_blocks(self._sums[self._group[name]], flat)
            self._batch[id(x)] = (x, self._group[name])

        return hook


def _add_upper_blocks(total: torch.Tensor, flat: torch.Tensor) -> None:
    """Add the block upper triangle of `flatᵀ flat` (in `flat`'s dtype) to `total` (float64, widened
    inside the add).

    x xᵀ is symmetric, so the blocks below the diagonal are not computed: with 3 block rows a
    1536-wide input's product takes 45 % less time (the diagonal blocks are computed whole).
    """
    step = _block_rows(flat.shape[1])
    for start in range(0, flat.shape[1], step):
        total[start : start + step, start:].add_(flat[:, start : start + step].T @ flat[:, start:])


def _mirror_upper_blocks(total: torch.Tensor) -> None:
    """Fill the blocks below the diagonal that `_add_upper_blocks` left at zero, in place."""
    step = _block_rows(total.shape[0])
    for start in range(step, total.shape[0], step):
        total[start : start + step, :start] = total[:start, start : start + step].T


def _block_rows(width: int) -> int:
    return -(-width // SYMMETRIC_BLOCK_ROWS)


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer: records its call and passes the hidden states through."""

    def __init__(self, calls: list[dict], hidden: list[torch.Tensor] | None) -> None:
        super().__init__()
        self.calls, self.hidden = calls, hidden

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if args:
            raise UserError(
                "this architecture passes positional arguments to its decoder layers, which calibration "
                "cannot replay; convert without --calib"
            )
        self.calls.append(kwargs)
        if self.hidden is not None:
            self.hidden.append(hidden_states.detach().clone())
        return hidden_states


def _decoder_layers(model: torch.nn.Module, targets: set[str]) -> tuple[str, torch.nn.ModuleList]:
    """The module list whose entries hold the targets, e.g. `model.layers`."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module):
            count = sum(target.startswith(name + ".") for target in targets)
            if count > best_count:
                best, best_count = name, count
    if best is None:
        raise UserError(
            "calibration needs a model built from a list of decoder layers, and none holds the targets; "
            "convert without --calib"
        )
    return best, model.get_submodule(best)


def _load_tensor(
    module: torch.nn.Module,
    name: str,
    reader: CheckpointReader,
    full_name: str,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    from accelerate.utils import set_module_tensor_to_device

    if full_name not in reader.location:
        raise UserError(
            f"{reader.model_dir} has no tensor {full_name}, which calibration needs; convert without --calib"
        )
    value = reader.read(full_name)
    if value.is_floating_point():  # accelerate would cast to the skeleton's dtype, not ours
        set_module_tensor_to_device(module, name, device, value=value, dtype=dtype)
    else:
        set_module_tensor_to_device(module, name, device, value=value)
