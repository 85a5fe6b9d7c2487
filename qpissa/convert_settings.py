"""`qpissa convert`'s settings and closed choices (and `compare`'s, which converts), torch-free.

Each field is a flag (`options.add_arguments`); `__post_init__` checks the values and combinations and
names the flag to change. The other commands' settings are in `settings.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path

from qpissa import UserError
from qpissa.options import coerce_fields, to_dict
from qpissa.settings import MIN_SEQ_LEN, SEED_LIMIT, Device

ALL_LINEAR = "all-linear"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the NF4 blocksizes bitsandbytes supports
# 32 windows of 256 tokens (8192): on the demo model as good on held-out KL as 16k tokens, at half the
# forward passes, which dominate a calibrated conversion on a CPU
CALIB_SAMPLES = 32
CALIB_SEQ_LEN = 256
CALIB_DAMPING = 0.1  # measured on the demo model: 0.01-1.0 within 10 % of each other on held-out KL
CALIB_CODES_DAMPING = 0.01
# a quarter of the windows from the shipped general prose: calibrated on the demo task's data alone, the
# held-out prose KL is 0.0442; with 0.25 / 0.5 of general windows 0.0364 / 0.0337, while the KL on the
# task's own held-out problems rises only from 0.0193 to 0.0206 / 0.0236 (BENCHMARKS.md)
CALIB_GENERAL = 0.25
MAX_DAMPING = 1e6  # λ·mean(diag H) must stay finite in float32; λ = 1e6 already weighs inputs alike
# what only an SVD reads: QLoRA quantizes W once (in --svd-dtype), so its log line leaves them out, and
# those only the randomized SVD reads, left out beside --svd exact
_RANDOMIZED_KEYS = ("oversample", "power_iters", "warm_power_iters", "sketch_dtype")
_DECOMPOSITION_KEYS = ("iters", "svd", *_RANDOMIZED_KEYS)
MAX_SCALE = 1e3  # s = alpha/r: factors shrink by √s; LoRA recipes use s ≤ 16, and a huge s overflows float32


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


class Precision(str, Enum):
    FLOAT32 = "float32"
    FLOAT64 = "float64"


class SketchDtype(str, Enum):
    AUTO = "auto"  # the SVD's dtype
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    FLOAT64 = "float64"


class Propagation(str, Enum):
    """Where a calibrated conversion takes layer i+1's inputs from."""

    ORIGINAL = "original"  # the original layer i: one pass per layer
    CONVERTED = "converted"  # the converted layer i: later layers see (and absorb) the upstream error


_CALIB_DEFAULTS = {
    "samples": CALIB_SAMPLES, "seq_len": CALIB_SEQ_LEN, "damping": CALIB_DAMPING, "scale_search": True,
    "compensate": None, "codes_damping": CALIB_CODES_DAMPING, "propagate": Propagation.ORIGINAL,
    "general": CALIB_GENERAL,
}  # fmt: skip


class ComputeDtype(str, Enum):
    AUTO = "auto"  # bfloat16 on a CUDA GPU that supports it, else float32
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class QuantStorage(str, Enum):
    UINT8 = "uint8"  # bitsandbytes' default
    BFLOAT16 = "bfloat16"  # FSDP-QLoRA with bf16 compute: FSDP shards float tensors only
    FLOAT16 = "float16"
    FLOAT32 = "float32"


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
    power_iters: int | None = field(
        default=None,
        metadata={
            "help": "randomized SVD: power (subspace) iterations of the first fit (default 4; 2 with "
            "--calib, where each also passes through the whitening factor: 2 and 4 gave the same held-out KL)"
        },
    )
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
            "help": "randomized SVD: precision of the range finder's products (auto: --svd-dtype); the "
            "factors are projected from the matrix in --svd-dtype. bfloat16 can be faster on CPUs with AMX "
            "and on bf16 GPUs, but on the demo model it saved no time and cost 6 %% of the held-out KL"
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
    quant_storage: QuantStorage = field(
        default=QuantStorage.UINT8,
        metadata={
            "help": "dtype the NF4 codes are stored as (bnb_4bit_quant_storage; same bytes): bfloat16 for "
            "FSDP-QLoRA (README, More than one GPU)"
        },
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
    calib: Path | None = field(
        default=None,
        metadata={
            "help": "calibration data: a .txt file, or any data file or directory `qpissa train` reads (the "
            "data you will train on is a good choice); adapter and codes are then chosen by the error of "
            "each layer's output on it, not of its weights"
        },
    )
    calib_samples: int | None = field(
        default=None, metadata={"help": f"--calib: windows drawn from the data (default {CALIB_SAMPLES})"}
    )
    calib_seq_len: int | None = field(
        default=None, metadata={"help": f"--calib: tokens per window (default {CALIB_SEQ_LEN})"}
    )
    calib_general: float | None = field(
        default=None,
        metadata={
            "help": "--calib: share of the windows drawn from general English prose shipped with qpissa, so "
            "that the conversion is not fitted to narrow data (one task) alone; 0 calibrates on DATA alone "
            f"(default {CALIB_GENERAL})"
        },
    )
    calib_damping: float | None = field(
        default=None,
        metadata={
            "help": "--calib: λ in H + λ·mean(diag H)·I for the adapter fit; larger trusts the calibration "
            f"data less, λ → ∞ is the data-free fit (default {CALIB_DAMPING})"
        },
    )
    calib_scale_search: bool | None = field(
        default=None,
        metadata={
            "help": "--calib: search each NF4 block's scale (0.75–1× its absmax) under H "
            "for the codes written (default: on)"
        },
    )
    calib_compensate: bool | None = field(
        default=None,
        metadata={"help": "--calib: one error-compensated (GPTQ) rounding pass before the last adapter fit "
                  "(default: on for qlora, whose codes are all it calibrates; off for qpissa and loftq, "
                  "where it raised the held-out KL when calibrating on narrow task data)"},
    )  # fmt: skip
    calib_codes_damping: float | None = field(
        default=None,
        metadata={"help": f"--calib: λ of the compensated rounding (default {CALIB_CODES_DAMPING})"},
    )
    calib_propagate: Propagation | None = field(
        default=None,
        metadata={
            "help": "--calib: the inputs of layer i+1 come from the original layer i or from the converted "
            f"one (default {Propagation.ORIGINAL.value})"
        },
    )

    def __post_init__(self) -> None:
        coerce_fields(self)
        problems = []
        if self.rank < 1:
            problems.append(f"--rank must be at least 1, got {self.rank}; try --rank 16")
        if self.iters is not None and self.iters < 1:
            problems.append(f"--iters must be at least 1, got {self.iters}")
        if self.iters is not None and self.iters != 1 and self.method is Method.QLORA:
            problems.append("--iters has no meaning for --method qlora (it quantizes W once); drop --iters")
        if self.alpha is not None and not 0 < self.alpha <= MAX_SCALE * self.rank:
            problems.append(
                f"--alpha must be positive and at most {MAX_SCALE:g}·r (the scale s = alpha/r; PiSSA uses "
                f"1), got {self.alpha}"
            )
        if self.blocksize not in BLOCKSIZES:
            problems.append(
                f"--blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {self.blocksize}"
            )
        if min(self.oversample, self.power_iters or 0, self.warm_power_iters or 0) < 0:
            problems.append("--oversample, --power-iters and --warm-power-iters must be 0 or more")
        if not 0 < self.shard_size_mb < math.inf:
            problems.append(f"--shard-size-mb must be positive, got {self.shard_size_mb}")
        if not 0 <= self.seed < SEED_LIMIT:
            problems.append(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.workers is not None and self.workers < 1:
            problems.append(f"--workers must be at least 1, got {self.workers}")
        problems += self._calibration_problems()
        if problems:
            raise UserError("; ".join(problems))

    @property
    def resolved_iters(self) -> int:
        return 1 if self.method is Method.QLORA else (self.iters or 5)

    @property
    def resolved_power_iters(self) -> int:
        if self.power_iters is not None:
            return self.power_iters
        return 4 if self.calib is None else 2

    @property
    def resolved_warm_power_iters(self) -> int:
        if self.warm_power_iters is not None:
            return self.warm_power_iters
        return 1 if self.method is Method.LOFTQ else 0

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def calibration(self) -> dict | None:
        """The calibration settings with their defaults filled in, or None for a data-free conversion."""
        if self.calib is None:
            return None
        chosen = {name: getattr(self, f"calib_{name}") for name in _CALIB_DEFAULTS}
        defaults = _CALIB_DEFAULTS | {"compensate": self.method is Method.QLORA}
        return {name: defaults[name] if value is None else value for name, value in chosen.items()}

    def as_dict(self) -> dict:
        """Plain data of the settings; a data-free conversion's has no calibration keys (as before them)."""
        values = to_dict(self) | {"power_iters": self.resolved_power_iters}  # as before it had two defaults
        return {k: v for k, v in values.items() if self.calib is not None or not k.startswith("calib")}

    def resolved_dict(self) -> dict:
        """`as_dict` with every default resolved: what this conversion runs with (log, report)."""
        values = self.as_dict() | {
            "iters": self.resolved_iters, "warm_power_iters": self.resolved_warm_power_iters,
            "alpha": self.resolved_alpha,
        }  # fmt: skip
        if self.calibration is not None:
            values |= {f"calib_{k}": getattr(v, "value", v) for k, v in self.calibration.items()}
        return values

    def description(self) -> str:
        """`key=value, ...` of what this conversion runs with, for the log; automatic (None) ones omitted."""
        unused = _DECOMPOSITION_KEYS if self.method is Method.QLORA else ()
        unused += _RANDOMIZED_KEYS if self.svd is SvdKind.EXACT else ()
        chosen = {k: v for k, v in self.resolved_dict().items() if v is not None and k not in unused}
        return ", ".join(f"{key}={getattr(value, 'value', value)}" for key, value in chosen.items())

    def output_settings(self) -> dict:
        """The settings the output depends on: all but `workers`, which only sets the speed."""
        return {key: value for key, value in self.as_dict().items() if key != "workers"}

    def _calibration_problems(self) -> list[str]:
        given = [f"--{f.name.replace('_', '-')}" for f in fields(self)
                 if f.name.startswith("calib_") and getattr(self, f.name) is not None]  # fmt: skip
        if self.calib is None:
            return (
                [f"{', '.join(given)} only apply with --calib; add --calib DATA or drop them"]
                if given
                else []
            )
        problems = []
        if self.calib_samples is not None and self.calib_samples < 1:
            problems.append(f"--calib-samples must be at least 1, got {self.calib_samples}")
        if self.calib_general is not None and not 0 <= self.calib_general < 1:
            problems.append(
                "--calib-general must be at least 0 and below 1 (a share of the windows), got "
                f"{self.calib_general}"
            )
        if self.calib_seq_len is not None and self.calib_seq_len < MIN_SEQ_LEN:
            problems.append(
                f"--calib-seq-len must be at least {MIN_SEQ_LEN}, got {self.calib_seq_len} (a shorter "
                "window is mostly its first token, whose activations are unlike the rest)"
            )
        for name in ("calib_damping", "calib_codes_damping"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= MAX_DAMPING:
                problems.append(
                    f"--{name.replace('_', '-')} must be positive and at most {MAX_DAMPING:g} (beyond it the "
                    f"fit is the data-free one in float32), got {value}"
                )
        return problems


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
        coerce_fields(self)
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
