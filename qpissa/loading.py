"""Load what a command points at (a `ModelSource`: QPiSSA directory, run, checkpoint, merged model).

Loading uses plain transformers + PEFT, exactly as a user without qpissa would (REFERENCE.md §4).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from qpissa import UserError
from qpissa.architecture import CAUSAL_LM, model_class
from qpissa.artifacts import (
    ADAPTER_DIR,
    TOKENIZER_MARKERS,
    ModelSource,
    is_qpissa_dir,
    read_json,
    read_report,
)
from qpissa.chat_template import saved_chat_template
from qpissa.checkpoint import CheckpointReader, auto_config
from qpissa.model_source import resolve_source
from qpissa.stored import Adapter, Residual, read_adapter

# the tokenizer files that are JSON: the one a tokenizer fails to load on is named
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json")  # fmt: skip


def checked_source(path: Path, *, adapter: bool = True) -> ModelSource:
    """What `eval` and `chat` load for MODEL_OR_RUN, checked before anything is loaded.

    Args:
        path: a QPiSSA directory, run, checkpoint-N or plain model.
        adapter: apply the adapter; False (`--no-adapter`) loads the base weights alone, deliberately.

    Raises:
        UserError: a QPiSSA directory without its adapter (its residual alone is not the converted
            model), or anything `check_source` refuses.
    """
    source = resolve_source(path)
    if not adapter:
        source = dataclasses.replace(source, adapter_dir=None)
    elif source.adapter_dir is None and is_qpissa_dir(source.base_dir):
        raise UserError(
            f"{path} is a QPiSSA directory without its adapter ({ADAPTER_DIR}/ is missing or incomplete): "
            "its NF4 residual alone lacks the principal part, so results would not be the converted model's; "
            "convert again into a new directory, or pass --no-adapter to use the residual alone on purpose"
        )
    check_source(source)
    check_causal_lm(source.base_dir)
    return source


def check_causal_lm(model_dir: Path) -> None:
    """Train, eval, chat and compare run causal language models; refuse any other model in one line.

    Raises:
        UserError: the model in `model_dir` is not built by `AutoModelForCausalLM` (a bare encoder, say).
    """
    auto_class, name = model_class(auto_config(model_dir), model_dir)
    if auto_class != CAUSAL_LM:
        raise UserError(
            f"{model_dir} holds a {name}, not a causal language model; qpissa's train, eval, chat and "
            f"compare run causal LMs only: load it with transformers' {auto_class} and PEFT (README, "
            "Known limitations)"
        )


def model_context(model_dir: Path) -> int | None:
    """The positions the model was built for (`max_position_embeddings`; GPT-2's `n_positions`)."""
    return getattr(auto_config(model_dir).get_text_config(), "max_position_embeddings", None)


def check_context(model_dir: Path, max_seq_len: int, setting: str) -> None:
    """Samples longer than the model's positions fail in a learned position table (an index error) and
    run unchecked past a rotary model's training length: refuse them in one line.

    Raises:
        UserError: `max_seq_len` (the user's `setting`) exceeds the model's context.
    """
    context = model_context(model_dir)
    if context is not None and max_seq_len > context:
        raise UserError(
            f"{setting} {max_seq_len} is longer than the model's context ({context} tokens, "
            f"max_position_embeddings); use at most {context}"
        )


def auto_model_class(model_dir: Path):
    """transformers' Auto class that builds the model in `model_dir` (`AutoModel` for a bare encoder)."""
    import transformers

    auto_class, _ = model_class(auto_config(model_dir), model_dir)
    return getattr(transformers, auto_class)


def check_source(source: ModelSource) -> None:
    """Check what `load_model` will read, file by file, so that damage is named before loading starts.

    Raises:
        UserError: config.json transformers cannot use, a damaged weight file or adapter, or an adapter
            that does not fit the QPiSSA directory's own (another rank or other layers).
    """
    config = auto_config(source.base_dir)
    reader = CheckpointReader(source.base_dir)  # every shard's header against its size
    if reader.stores_quantized() and getattr(config, "quantization_config", None) is None:
        raise UserError(
            f"{source.base_dir} holds 4-bit weights, but its config.json has no quantization_config, so "
            "transformers would read the codes as 16-bit weights; restore config.json from the conversion "
            "(or convert again)"
        )
    if source.adapter_dir is None:
        return
    adapter = read_adapter(source.adapter_dir)
    initial_dir = source.base_dir / ADAPTER_DIR
    if is_qpissa_dir(source.base_dir) and initial_dir.is_dir():
        initial = adapter if initial_dir == source.adapter_dir else read_adapter(initial_dir)
        _check_conversion_adapter(source.base_dir, initial)
        if (initial.rank, initial.shapes) != (adapter.rank, adapter.shapes):
            raise UserError(
                f"adapter {source.adapter_dir} (rank {adapter.rank}, {len(adapter.shapes)} layers) does not "
                f"fit {source.base_dir}, whose adapter has rank {initial.rank} and {len(initial.shapes)} "
                "layers; it was trained on another QPiSSA directory"
            )
        if not math.isclose(adapter.scale, initial.scale):  # training never changes lora_alpha
            raise UserError(
                f"adapter {source.adapter_dir} scales by {adapter.scale:g} (lora_alpha / r), "
                f"{source.base_dir}'s by {initial.scale:g}: training keeps the conversion's lora_alpha, so "
                f"set it back to {initial.config['lora_alpha']:g} in its adapter_config.json"
            )


def _check_conversion_adapter(qpissa_dir: Path, adapter: Adapter) -> None:
    """The QPiSSA directory's adapter/ is the one its conversion wrote: the rank, alpha and number of
    layers its qpissa_report.json records. Another conversion's adapter loads without complaint in PEFT
    and gives a model far from the original."""
    settings = read_report(qpissa_dir)["settings"]
    recorded = (settings["rank"], settings["alpha"] / settings["rank"], len(settings["targets"]))
    found = (adapter.rank, adapter.scale, len(adapter.shapes))  # layer names differ from the checkpoint's
    if found[0] != recorded[0] or not math.isclose(found[1], recorded[1]) or found[2] != recorded[2]:
        raise UserError(
            f"{adapter.path} (rank {found[0]}, lora_alpha {adapter.config['lora_alpha']:g}, "
            f"{found[2]} layers) is not the adapter {qpissa_dir} was converted with (rank {recorded[0]}, "
            f"lora_alpha {settings['alpha']:g}, {recorded[2]} layers): its residual needs that adapter; "
            "restore adapter/ from the conversion, or convert again"
        )


def load_model(
    source: ModelSource,
    *,
    trainable: bool = False,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype | None = None,
):
    """Load the base model (4-bit residual or plain) and, if any, the adapter on top of it.

    Args:
        source: from `model_source.resolve_source`.
        trainable: load the adapter with `is_trainable=True`.
        device: where to put the model.
        compute_dtype: dtype of activations and of the 16-bit weights; None keeps the checkpoint's
            setting (float32 is the fast choice on a CPU).

    Returns:
        A `PeftModel` (with an adapter) or a transformers model, of the class its config names.
    """
    from peft import PeftModel

    check_source(source)
    if torch.device(device).type == "cpu":
        refuse_cpu_misdecoded(source.base_dir, "run it on a GPU")
    kwargs = {"dtype": compute_dtype} if compute_dtype is not None else {}
    auto_class = auto_model_class(source.base_dir)
    model = auto_class.from_pretrained(source.base_dir, device_map={"": str(device)}, **kwargs)
    if compute_dtype is not None:
        set_compute_dtype(model, compute_dtype)
    if source.adapter_dir is None:
        return model
    return PeftModel.from_pretrained(model, source.adapter_dir, is_trainable=trainable)


def refuse_cpu_misdecoded(model_dir: Path, fix: str) -> None:
    """NF4 weights that bitsandbytes' CPU kernel decodes with the wrong block scales make every result on
    a CPU wrong (a loss, an answer, a merged weight), without an error: refuse them in one line.

    Raises:
        UserError: `model_dir` holds such weights (converted on a GPU, or by an earlier qpissa); `fix` is
            what the command can do instead, besides converting again.
    """
    wrong = Residual(model_dir).cpu_misdecoded()
    if not wrong:
        return
    widths = ", ".join(f"{width} wide in blocks of {size}" for width, size in wrong)
    raise UserError(
        f"bitsandbytes' CPU kernel decodes the NF4 weights of {model_dir} ({widths}) with the wrong block "
        f"scales, so every result on this CPU would be wrong; {fix}, or convert again with a --blocksize "
        "that divides every layer's width"
    )


def set_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make every `Linear4bit` compute in `dtype` (its stored codes are unchanged), and cast the 16-bit
    weights (embeddings, norms, lm_head), which transformers leaves in the checkpoint's dtype for a
    4-bit model even when asked for another: bf16 norms would otherwise turn the activations bf16."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype
            # on CPUs with AVX512-BF16, bitsandbytes' inference kernel would compute in bf16 with bf16
            # absmax: other numbers than training's forward, and than the quantization qpissa fitted
            module.support_avx512bf16_for_cpu = False
    for param in model.parameters():  # tied weights are one Parameter: they stay tied
        if param.is_floating_point() and param.dtype != dtype and not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.to(dtype)


def load_tokenizer(source: ModelSource):
    """The tokenizer saved beside the base model (QPiSSA dirs and exports carry it), with the chat
    template a training run saved, if it set one."""
    from transformers import AutoTokenizer

    config = auto_config(source.base_dir)  # a damaged config.json is named as such, not as a tokenizer's
    if not any((source.base_dir / name).is_file() for name in TOKENIZER_MARKERS):
        raise UserError(
            f"{source.base_dir} holds no tokenizer (no {', '.join(TOKENIZER_MARKERS)}); copy the original "
            "model's tokenizer files there"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.base_dir)
    except Exception as error:  # tokenizers raises a plain Exception for a damaged tokenizer.json
        for name in TOKENIZER_JSON:  # a damaged file is named, with its line: the library's error names none
            if (source.base_dir / name).is_file():
                read_json(source.base_dir / name, "copy the original model's tokenizer files there")
        reason = next(
            (line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__
        )
        raise UserError(
            f"{source.base_dir} has no usable tokenizer ({reason}); "
            "copy the original model's tokenizer files there"
        ) from None
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:  # its later ids would index past the embeddings
        raise UserError(
            f"{source.base_dir}: the tokenizer has {len(tokenizer)} tokens, the model's embeddings {vocab} "
            "(config.json's vocab_size); copy the model's own tokenizer files there"
        )
    template = saved_chat_template(source.adapter_dir, source.run_dir)  # the run's own, if it set one
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer
