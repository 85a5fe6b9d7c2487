"""qpissa: SVD-initialized adapters over an NF4 residual (QPiSSA), end to end.

Module map: one concern per module, no import circles (tests/test_structure.py checks both, and that
`qpissa --help` never imports torch). Modules marked * import no torch, transformers, peft,
bitsandbytes or datasets at module level.

    __init__*          UserError, __version__, the Python API (loaded on first use), hiding library notes
    cli*               the `qpissa` command: argparse and one short handler per subcommand
    __main__*          `python -m qpissa` (and `accelerate launch -m qpissa`): the same command
    settings*          eval, export, chat, report and fidelity settings; shared choices; the demo models
    convert_settings*  convert's and compare's settings and their closed choices (method, SVD, ...)
    options*           settings dataclasses <-> argparse flags, YAML data and key=value overrides
    recipe*            the training recipe: TrainConfig, DataConfig, DataSource
    recipe_file*       a recipe file read: YAML, key=value overrides, trainer options gathered; load_config
    artifacts*         every file name qpissa writes or reads; JSON, text and report readers; run finders
    run_marker*        a run's qpissa_run.json: its model, its data settings, the conversion it trained
    model_source*      MODEL_OR_RUN resolved: QPiSSA dir, run, checkpoint-N, LoRA export or HF model
    outputs*           outputs kept apart from inputs, checked before they are replaced, built in OUT.partial
    output_lock*       one writer per output: the OS lock OUT.lock, not inherited by forked workers
    console*           the text the CLI prints for a result: error table, export summary
    demo_task*         the demo task's word problems and their `#### answer` convention
    memory*            peak RSS, available memory, the training memory estimate
    runtime            device, compute dtype (float32 on a CPU), hardware probes
    worker*            a step in a fresh process (its own peak memory), ended and interrupted with its parent
    safetensors_file*  dtype widths; a safetensors header read and checked against its file
    checkpoint         HF checkpoints: lazy reading, streamed and sharded writing, config.json
    stored             reading back what qpissa stored (adapter, NF4 residual); the LoRA adapter config
    nf4                NF4 quantize / dequantize of one tensor, in bitsandbytes' own format
    nf4_codes          NF4 codes on chosen block scales: scale search, error-compensated rounding (GPTQ)
    svd                exact and randomized rank-r SVD (seeded, oversampled, warm-startable)
    methods            qpissa / loftq / qlora: one weight in, (Q, A, B) out, data-free or under H
    architecture       the model transformers builds for a checkpoint; where its matrices land in it
    targets            which Linear layers of a checkpoint get decomposed; what stays unquantized, and why
    weight_error       per-matrix weight-space error against QLoRA and its per-type means (the paper's)
    roles*             the report row of each target: one role each (GPT-2's attn.c_proj, mlp.c_proj)
    convert            `qpissa convert`: the streaming conversion and its worker pipeline
    convert_matrix     one target decomposed and measured (weight-, output-space errors); settings resolved
    convert_calibrated `convert --calib`'s first phase: windows, layer by layer, H, decompositions, spools
    calibration        `--calib` data (and shipped general prose) drawn into seeded windows; overlap check
    layer_stream       a checkpoint run one decoder layer at a time; input statistics H per Linear
    convert_output     the QPiSSA directory being written: shard plan, resume record, config, adapter
    conversion_report  qpissa_report.json: settings as resolved, per-matrix errors, summary
    models             the demo model, tiny random models, synthetic Llama-shaped checkpoints
    loading            loading a QPiSSA directory, run or export with plain transformers + PEFT
    hub*               Hub names told from local paths; a Hub model id resolved to its local snapshot
    chat_template*     a run's own chat template: from a file or inline, saved with the run and adapter
    chat_tools*        tool use in chat data: schemas, calls, ShareGPT's form; checks that templates show them
    chat_turns*        a chat record's turns: messages, ShareGPT's, TRL's; text content parts, per-turn weight
    chat_render*       a conversation rendered one assistant turn at a time into exactly masked segments
    data_formats*      record formats, their detection, rendering records into (text, trained) segments
    data_read*         a file, folder, save_to_disk dir or Hub dataset read, every split; errors in one line
    data_sources*      training and held-out records: one split checked, its format picked, samples drawn
    data_files*        local data files checked before datasets reads them; JSON records as written
    data               tokenization with datasets.map and exact loss masks, mixing, the collators (packing)
    trainer_options    every TrainingArguments option in a recipe, checked, and the Trainer's arguments
    recipe_keys*       what an unknown recipe key may mean: a recipe key, another fine-tuner's name, an option
    trainer_eval       the Trainer whose evaluation loss weighs every token alike, as training does
    distributed*       several processes (torchrun, accelerate launch): ranks, main-only work, barriers
    trainlog           the per-step JSONL log and a quieter progress bar
    resume_checks      a checkpoint-N is whole and fits the model before train resumes from it
    trainer_resume     the Trainer resumed from a checkpoint-N (the last step's only finishes the run)
    train_checks       train's refusals before anything is loaded or written (model, data, resume, output_dir)
    train              `qpissa train`: transformers' Trainer over the frozen NF4 residual
    task_eval          `qpissa eval`: task loss, perplexity, exact-match accuracy
    original_kl        KL, top-1 agreement and perplexity against the original model
    export             `qpissa export`: the merged 16-bit model, and the export's flow
    export_lora        `qpissa export --to lora`: the rank-2r LoRA for the original model
    export_verify      the export's logits against the trained model's
    chat               `qpissa chat`: terminal chat and one-shot answers
    compare            `qpissa compare`: convert, measure and train each method, then report
    compare_train      `compare --train`: the recipe checked first; each method's run trained or reused
    report_inputs      a report's inputs found, grouped by the conversion they came from, and labelled
    report_checks      what a report reads, checked: damaged records, one base model, a changed original
    report_runs        a report's runs in words: recipes, the keys that set them apart, unfinished runs
    report_sizes       a report's sizes: the original's, each conversion's and export's files and params
    report             `qpissa report`: the JSON artifacts collected into summary.json and a verdict
    report_render      report.md and a self-contained report.html from the summary
    plots              the report's PNG plots
    spectrum           singular value spectra of one layer, for the report
"""

import functools
import importlib
import logging
import os
import sys
import types
import warnings
from typing import Any

__version__ = "0.1.0"

# the Python API: name -> module that defines it; `from qpissa import convert, train, export, evaluate`
API = {
    "convert": "qpissa.convert",
    "ConvertSettings": "qpissa.convert_settings",
    "train": "qpissa.train",
    "TrainConfig": "qpissa.recipe",
    "DataConfig": "qpissa.recipe",
    "DataSource": "qpissa.recipe",
    "load_config": "qpissa.recipe_file",
    "export": "qpissa.export",
    "ExportSettings": "qpissa.settings",
    "evaluate": "qpissa.task_eval",
    "EvalSettings": "qpissa.settings",
}
__all__ = ["UserError", "__version__", *API]


def __getattr__(name: str) -> Any:
    """Load an API name on first use, so that `import qpissa` (and `qpissa --help`) stays torch-free; the
    API's users are spared the library notes the CLI's are."""
    if name not in API:
        raise AttributeError(f"module 'qpissa' has no attribute {name!r}")
    hide_library_deprecation_notes()
    return getattr(importlib.import_module(API[name]), name)


class _Package(types.ModuleType):
    """`qpissa.convert`, `qpissa.train` and `qpissa.export` name the API functions although submodules of
    those names exist: the import system sets a package attribute for every submodule it loads, which
    would hide the function; the submodules stay in `sys.modules` (`from qpissa.convert import ...`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


class UserError(Exception):
    """A mistake the user can fix: the CLI prints the message on one line and exits with status 2."""


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the CLI's, and its fresh processes' (runtime)


@functools.cache  # once per process: each call would add the same filters again
def hide_library_deprecation_notes() -> None:
    """Silence library notes users can do nothing about, in the CLI's processes and the API's.

    - transformers' notes that gradient checkpointing was renamed (5.2x): the range we support (>= 5.0)
      still needs the old name and PEFT reads the old attribute;
    - bitsandbytes' note, on CPUs with AVX512-BF16, that its bf16 CPU kernel could not be fetched from
      the Hugging Face hub (and the `kernels` package's, offline, that it skipped that kernel's trust
      check): qpissa computes in float32 on the CPU and never uses that kernel;
    - transformers' note that `loss_type=None` "was set in the config" of models whose class name
      names no loss (GPT-2): nobody set it, and the causal LM loss it falls back to is the right one;
    - transformers' note that "mtime may not be reliable" when checkpoints are saved within a second:
      it then orders them by step, as qpissa does.
    """
    warnings.filterwarnings("ignore", r".*gradient_checkpointing.* is deprecated", FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward" not in record.getMessage()
    )
    logging.getLogger("kernels._internals.hf_hub").addFilter(
        lambda record: "kernels-community/quantization-bitsandbytes" not in record.getMessage()
    )
    logging.getLogger("transformers.modeling_utils").addFilter(
        lambda record: not record.getMessage().startswith("`loss_type=None`")
    )
    logging.getLogger("transformers.trainer_utils").addFilter(
        lambda record: "mtime may not be reliable" not in record.getMessage()
    )


def hide_library_progress_bars() -> None:
    """`--quiet`: hide the libraries' own bars too (transformers' "Loading weights", datasets' file
    reading), in this process and in the fresh processes it starts (`worker.in_fresh_process`)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by transformers at import
    # tqdm's own default, read when tqdm is imported (hence not before this): also hides the bars of a
    # library that has no switch of its own (transformers' GGUF reader in fetch-model)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read by datasets at import
    if "transformers" in sys.modules:  # imported already: its switch is read at each bar
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


sys.modules[__name__].__class__ = _Package
