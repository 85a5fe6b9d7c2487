"""The model transformers builds for a checkpoint, and where the checkpoint's matrices land in it.

Conversion, the output's config and adapter, export and loading ask a checkpoint the same questions:
which class transformers builds for its config (the one in `architectures`, so a bare encoder is a
`BertModel`, not a causal LM) and with which Auto class a user loads it; which matrices sit in layers
that bitsandbytes replaces by `Linear4bit` (plain `nn.Linear`, and GPT-2's `Conv1D`, whose weight is
stored transposed as `[in, out]`); under which name each is stored and under which the model holds it
(transformers renames and merges tensors at load: a base-model prefix, Mixtral's `block_sparse_moe`);
and which matrices stay unquantized whatever the targets (MoE experts merged into 3-D parameters at load,
routers, layers the model keeps in float32), and which tensors of any shape the model does not load. The
model is built on the meta device: no weight is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from qpissa import UserError
from qpissa.checkpoint import CheckpointReader, auto_config

CAUSAL_LM = "AutoModelForCausalLM"
# Auto classes in the order a checkpoint's architecture is looked up; with their PEFT task type
_AUTO_CLASSES = {
    CAUSAL_LM: ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    "AutoModel": ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"),
    "AutoModelForMaskedLM": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", None),
    "AutoModelForSeq2SeqLM": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
    # a plain PeftModel for models with a task head: PEFT's SEQ_CLS, TOKEN_CLS and QUESTION_ANS add the
    # head to `modules_to_save` and expect its weights in the adapter, which holds only A and B
    "AutoModelForSequenceClassification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", None),
    "AutoModelForTokenClassification": ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", None),
    "AutoModelForQuestionAnswering": ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", None),
}
# why a matrix stays unquantized whatever --targets says (qpissa_report.json's `kept_unquantized`, convert's
# summary)
KEPT_EXPERTS = (
    "MoE expert weights: transformers merges them into 3-D parameters at load, which bitsandbytes cannot "
    "hold in 4 bits"
)
KEPT_NOT_LINEAR = (
    "matrices the model holds outside a Linear layer (e.g. a router), which bitsandbytes does not quantize"
)
KEPT_UNUSED = (
    "tensors the model does not load (neither a parameter nor a saved buffer of it): copied to the output "
    "unchanged, and left out by transformers when it loads the model"
)
KEPT_FLOAT32 = "layers the model keeps in float32 (_keep_in_fp32_modules), never quantized"
KEPT_SUBCLASS = (
    "layers of a subclass of nn.Linear, which transformers' bitsandbytes loading leaves unquantized"
)


@dataclass(frozen=True)
class LinearLayer:
    """A matrix in a layer that loads as a bitsandbytes `Linear4bit`.

    Attributes:
        module: the model's module path: PEFT's adapter keys and `llm_int8_skip_modules` use it.
        shape: `(out, in)`.
        transposed: a `Conv1D` (GPT-2): the checkpoint stores the weight as `[in, out]`.
    """

    module: str
    shape: tuple[int, int]
    transposed: bool


@dataclass(frozen=True)
class Architecture:
    """A checkpoint seen through the model transformers builds for it.

    Attributes:
        name: the model class, e.g. `LlamaForCausalLM`, `BertModel`.
        auto_class: the Auto class that builds it (`AutoModelForCausalLM`, `AutoModel`, ...).
        task_type: PEFT's task type for an adapter on it, or None.
        linears: checkpoint module name (its weight is `<name>.weight`) -> the layer.
        output: checkpoint module name of the output layer (`lm_head`), never a target, or None.
        kept: reason -> checkpoint tensor names of matrices that stay unquantized whatever the targets, and
            of tensors of any shape the model does not load.
        renamed: `{checkpoint name: model name}` of every stored tensor that transformers renames or
            merges at load.
        modules: every module path of the model.
        quantizable: model module path of every layer bitsandbytes' loading replaces by `Linear4bit`
            unless told to skip it, stored or not (a tied `lm_head` is not stored).
    """

    name: str
    auto_class: str
    task_type: str | None
    linears: dict[str, LinearLayer]
    output: str | None
    kept: dict[str, list[str]]
    renamed: dict[str, str]
    modules: tuple[str, ...]
    quantizable: tuple[str, ...]

    @property
    def causal_lm(self) -> bool:
        return self.auto_class == CAUSAL_LM

    def model_names(self) -> dict[str, str]:
        """`{checkpoint module name: model module name}` of every layer in `linears`."""
        return {name: layer.module for name, layer in self.linears.items()}

    def stored_names(self) -> dict[str, str]:
        """`{model module name: checkpoint module name}`: where an adapter's module is stored."""
        return {layer.module: name for name, layer in self.linears.items()}

    def swap_layout(self, module: str, W: torch.Tensor) -> torch.Tensor:
        """A weight of checkpoint module `module` between `[out, in]` and the stored layout: a `Conv1D`'s
        is `[in, out]`, so it is transposed (either way); any other is returned as is."""
        layer = self.linears.get(module)
        return W.T.contiguous() if layer is not None and layer.transposed else W


def read_architecture(reader: CheckpointReader) -> Architecture:
    """Build the checkpoint's model on the meta device and map its stored matrices onto it.

    Raises:
        UserError: a config transformers cannot build, an architecture transformers does not ship, or a
            checkpoint that disagrees with its config (a shape, a parameter no tensor fills).
    """
    import transformers

    config = auto_config(reader.model_dir)
    auto_class, name = model_class(config, reader.model_dir)
    with torch.device("meta"):
        model = getattr(transformers, name)._from_config(config)
    held = model.state_dict()  # every parameter and persistent buffer, under the model's names
    rename = _renamer(model, held)
    modules = dict(model.named_modules())
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    linears: dict[str, LinearLayer] = {}
    kept: dict[str, list[str]] = {}
    renamed: dict[str, str] = {}
    output_name = None
    loaded: set[str] = set()
    filled: set[str] = set()  # model names of the parameters a stored tensor fills, merged ones too
    quantized = reader.stores_quantized()  # packed 4-bit codes have shapes of their own
    for tensor in reader.names():
        key, merged = rename(tensor)
        if key != tensor:
            renamed[tensor] = key
        if key not in held and not merged:  # an extra tensor, or an unsaved buffer (BERT's position_ids)
            kept.setdefault(KEPT_UNUSED, []).append(tensor)  # of any shape: old `rotary_emb.inv_freq`s
            continue
        filled.add(key)
        if not merged:
            if not quantized:
                _check_shape(reader, tensor, tuple(held[key].shape), name)
            loaded.add(key)
        if len(reader.shape(tensor)) < 2:  # norms and biases the model loads: 16-bit in every quantizer
            continue
        module_path, _, leaf = key.rpartition(".")
        module = modules.get(module_path)
        reason = _kept_reason(module, leaf, merged, keep_fp32, module_path)
        if reason is not None:
            kept.setdefault(reason, []).append(tensor)
            continue
        if leaf != "weight" or not _is_linear(module):
            continue
        checkpoint_module = tensor.removesuffix(".weight")
        if module is output:
            output_name = checkpoint_module
        transposed = not isinstance(module, torch.nn.Linear)  # Conv1D: weight [in, out]
        shape = tuple(module.weight.shape[::-1] if transposed else module.weight.shape)
        linears[checkpoint_module] = LinearLayer(module=module_path, shape=shape, transposed=transposed)
    _check_complete(reader, modules, output, loaded, name)
    if not quantized:  # refused as such by `convert`; and a QPiSSA directory holds what it was given
        _check_filled(reader, model, filled, name)
    _, task_type = _AUTO_CLASSES[auto_class]
    quantizable = tuple(path for path, module in modules.items() if _is_linear(module))
    return Architecture(
        name, auto_class, task_type, linears, output_name, kept, renamed, tuple(modules), quantizable
    )


def _check_shape(reader: CheckpointReader, tensor: str, expected: tuple[int, ...], model: str) -> None:
    """transformers would refuse the mismatch only at load, after a whole conversion was written."""
    shape = reader.shape(tensor)
    if shape != expected:
        raise UserError(
            f"{reader.model_dir}: {tensor} has shape {list(shape)}, but config.json's {model} expects "
            f"{list(expected)}; the checkpoint and its config.json disagree: restore the original files"
        )


def _check_complete(
    reader: CheckpointReader,
    modules: dict[str, torch.nn.Module],
    output: torch.nn.Module | None,
    loaded: set[str],
    model: str,
) -> None:
    """Every Linear layer the config builds has its weight stored (the output layer may be tied): a
    missing one would be randomly initialized at load, with no more than a warning from transformers."""
    missing = [
        f"{path}.weight" for path, module in modules.items()
        if _is_linear(module) and module is not output and f"{path}.weight" not in loaded
    ]  # fmt: skip
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(
            f"{reader.model_dir} lacks {missing[0]}{more}, which config.json's {model} builds; the "
            "checkpoint and its config.json disagree (num_hidden_layers? a missing shard?): restore the "
            "original files"
        )


def _check_filled(reader: CheckpointReader, model: torch.nn.Module, filled: set[str], name: str) -> None:
    """Every parameter the config builds is filled by a stored tensor, or tied to one that is (a tied
    `lm_head`), or one transformers expects to miss (`_keys_to_ignore_on_load_missing`): a missing one
    (an untied `lm_head`, the embeddings, a norm) would be initialized at random at load, with no more
    than a warning. Buffers are not asked for: the model computes them when it is built."""
    tied: dict[int, list[str]] = {}  # parameters that share one tensor
    for key, parameter in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(key)
    ignored = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    missing = [
        key for keys in tied.values() if not filled.intersection(keys)
        for key in keys if not any(re.search(pattern, key) for pattern in ignored)
    ]  # fmt: skip
    if missing:
        shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        raise UserError(
            f"{reader.model_dir} lacks {shown}, which config.json's {name} builds and transformers would "
            "fill with random values; the checkpoint and its config.json disagree (tie_word_embeddings? a "
            "missing shard, or an index pointing a tensor at the wrong one?): restore the original files"
        )


def model_class(config, model_dir: Path) -> tuple[str, str]:
    """The Auto class and model class transformers builds for `config` (its `architectures[0]`).

    Without `architectures` the causal LM of its `model_type` is chosen, else its bare model.

    Raises:
        UserError: the architecture is not a class transformers ships for this model type.
    """
    import transformers
    from transformers.models.auto import modeling_auto

    wanted = (getattr(config, "architectures", None) or [None])[0]
    for auto_class, (mapping, _) in _AUTO_CLASSES.items():
        names = getattr(modeling_auto, mapping, {}).get(config.model_type)
        names = (names,) if isinstance(names, str) else tuple(names or ())
        if names and (wanted is None or wanted in names) and hasattr(transformers, wanted or names[0]):
            return auto_class, wanted or names[0]
    custom = (
        " (custom code in auto_map, which qpissa never runs)" if getattr(config, "auto_map", None) else ""
    )
    mappings = [getattr(modeling_auto, mapping) for mapping, _ in _AUTO_CLASSES.values()]
    built = {name for mapping in mappings for names in mapping.values()
             for name in ((names,) if isinstance(names, str) else names)}  # fmt: skip
    if wanted and hasattr(transformers, wanted) and wanted not in built and not custom:  # another kind
        raise UserError(
            f"{model_dir}: {wanted} (model_type {config.model_type!r}) is not a kind of model qpissa "
            f"converts: it builds {', '.join(_AUTO_CLASSES)} models; convert a language model's checkpoint"
        )
    raise UserError(
        f"{model_dir}: transformers {transformers.__version__} has no model class {wanted} for model_type "
        f"{config.model_type!r}{custom} among those qpissa builds ({', '.join(_AUTO_CLASSES)}); convert a "
        "checkpoint of an architecture transformers ships"
    )


def _is_linear(module: torch.nn.Module) -> bool:
    """A layer transformers' bitsandbytes loading turns into `Linear4bit`: exactly nn.Linear, or Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return type(module) is torch.nn.Linear or isinstance(module, Conv1D)


def _kept_reason(
    module: torch.nn.Module, leaf: str, merged: bool, keep_fp32: list[str], module_path: str
) -> str | None:
    """Why a stored matrix of `module` stays unquantized whatever the targets; None for a Linear layer's
    weight (a candidate target) and for embeddings (16-bit by design, like every quantizer keeps them)."""
    if merged or "experts" in type(module).__name__.lower():
        return KEPT_EXPERTS
    if isinstance(module, torch.nn.Embedding) or (_is_linear(module) and leaf != "weight"):
        return None
    if _is_linear(module):
        return KEPT_FLOAT32 if _matches_any(module_path, keep_fp32) else None
    return KEPT_SUBCLASS if isinstance(module, torch.nn.Linear) else KEPT_NOT_LINEAR


def _matches_any(name: str, patterns: list[str]) -> bool:
    """transformers' rule for which modules a quantizer leaves alone (`should_convert_module`): a pattern
    matches from the start up to a module boundary, as a regex with that boundary, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)


def _renamer(model: torch.nn.Module, meta: dict) -> Callable[[str], tuple[str, bool]]:
    """checkpoint tensor name -> (the model's name for it, whether transformers merges it with others at
    load), as `from_pretrained` renames keys (`meta`: the model's state dict): transformers' conversion
    mapping, then the base-model prefix."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers 5.x without the conversion mapping: the base-model prefix only
        return lambda name: (_with_prefix(name, prefix, meta), False)
    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]

    def rename(name: str) -> tuple[str, bool]:
        key, pattern = rename_source_key(name, renamings, converters, prefix or None, meta)
        if key not in meta and name in meta:  # as `from_pretrained`: not renamed after all
            key, pattern = rename_source_key(name, [], [], prefix or None, meta)
        return key, pattern is not None

    return rename


def _with_prefix(name: str, prefix: str, meta: dict) -> str:
    if not prefix or name in meta:
        return name
    if name.startswith(prefix + ".") and name.removeprefix(prefix + ".") in meta:
        return name.removeprefix(prefix + ".")
    return f"{prefix}.{name}" if f"{prefix}.{name}" in meta else name
