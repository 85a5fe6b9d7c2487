"""`qpissa train` with any TrainingArguments option, `--key value` overrides, packing, chat data mixed."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import httpx
from test_train import _config, _evals, _losses

from qpissa import cli
from qpissa.loading import load_tokenizer
from qpissa.model_source import resolve_source


def test_options_qpissa_sets_are_accepted_at_the_values_it_sets() -> None:
    """Recipes from other tools often write `logging_strategy: steps` and `label_names: [labels]`: what
    qpissa sets anyway, so no reason to refuse them."""
    from qpissa.trainer_options import checked_options

    written = {"logging_strategy": "steps", "label_names": ["labels"]}
    assert checked_options(written) == written


def test_any_trainer_option_and_flag_overrides_reach_the_trainer(
    qpissa_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, qpissa_dir, data_dir, eval_steps=None, adam_beta2=0.99)
    flags = ["--max_steps", "2", "--report_to", "tensorboard", "--lr-scheduler-type=cosine_with_restarts",
             "--save_strategy", "no", "data.eval_generate_samples=0"]  # fmt: skip
    assert cli.main(["--quiet", "train", str(config), *flags]) == 0
    run = tmp_path / "run"
    assert sorted(_losses(run)) == [0, 1, 2]
    assert list(run.glob("**/events.out.tfevents.*")), "report_to tensorboard wrote no event file"
    assert not list(run.glob("checkpoint-*"))  # save_strategy: no
    args = json.loads((run / "qpissa_run.json").read_text())["config"]
    assert args["trainer"]["adam_beta2"] == 0.99 and args["trainer"]["report_to"] == "tensorboard"
    assert args["lr_scheduler_type"] == "cosine_with_restarts"


def test_report_to_null_reports_to_nothing(qpissa_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """YAML's null for report_to reached the Trainer as None, which it could not look up (a traceback)."""
    config = _config(tmp_path, qpissa_dir, data_dir, eval_steps=None, max_steps=1, report_to=None)
    assert cli.main(["--quiet", "train", str(config), "save_strategy=no"]) == 0
    assert sorted(_losses(tmp_path / "run")) == [0, 1]
    assert not list((tmp_path / "run").glob("**/events.out.tfevents.*"))


def test_a_number_with_an_exponent_inside_a_trainer_mapping_is_a_number(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """YAML 1.1 reads `1e-5` as text at any depth; inside lr_scheduler_kwargs it made the Trainer fail."""
    config = _config(tmp_path, qpissa_dir, data_dir, eval_steps=None)
    flags = ["max_steps=2", "save_strategy=no", "data.eval_generate_samples=0",
             "lr_scheduler_type=cosine_with_min_lr", 'lr_scheduler_kwargs={"min_lr": 1e-5}']  # fmt: skip
    assert cli.main(["--quiet", "train", str(config), *flags]) == 0  # was: a TypeError of the scheduler
    assert sorted(_losses(tmp_path / "run")) == [0, 1, 2]


def test_a_mistyped_key_is_told_before_a_missing_data_path(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A wrong key may be why the rest looks wrong (a path relative to another directory): it comes first."""
    config = _config(tmp_path, qpissa_dir, data_dir, data={"path": "no-such-task/train.jsonl"})
    assert cli.main(["--quiet", "train", str(config), "max_step=4"]) == 2
    assert "unknown setting `max_step`" in capsys.readouterr().err
    assert cli.main(["--quiet", "train", str(config), "max_steps=4"]) == 2
    assert (
        "no-such-task/train.jsonl does not exist; check data.path (a relative path is "
        "relative to the working directory" in capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()
    sources = {
        "path": None,
        "sources": [{"path": str(data_dir / "train.jsonl")}, {"path": "no-such/chat.jsonl"}],
    }
    config = _config(tmp_path, qpissa_dir, data_dir, data=sources)  # the key the recipe set is named
    assert cli.main(["--quiet", "train", str(config)]) == 2
    assert "no-such/chat.jsonl does not exist; check data.sources.1.path (a" in capsys.readouterr().err


def test_checkpointing_reaches_the_trainer_by_its_new_name_without_a_warning(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """transformers 5 deprecates gradient_checkpointing for activation_checkpointing: the recipe keeps its
    key, and the Trainer gets the new name (no FutureWarning in a user's own Python)."""
    import warnings

    from qpissa.recipe_file import load_config
    from qpissa.runtime import resolve_runtime
    from qpissa.trainer_options import training_arguments

    config = load_config(_config(tmp_path, qpissa_dir, data_dir, gradient_checkpointing=False), [])
    config.trainer["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    runtime = resolve_runtime(config.device, config.bf16, config.optim)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        arguments = training_arguments(config, runtime, tmp_path / "run", show_progress=False)
    assert arguments.activation_checkpointing is False
    assert arguments.activation_checkpointing_kwargs == {"use_reentrant": True}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--adam_beta2", "high"], "`adam_beta2` must be float"),
        (["--lr_scheduler_type", "sideways"], "a Trainer option is invalid"),
        (
            ["--optim", "sgdd"],
            "optim=sgdd is not an optimizer transformers knows; did you mean sgd? Otherwise use auto",
        ),
        (["optim=adamw"], "did you mean adamw_torch"),
        (["use_cpu=true"], "`use_cpu` is set by qpissa: set device: cpu instead"),
        (
            ["activation_checkpointing=false"],
            "`activation_checkpointing` is set by qpissa: set the recipe key",
        ),
        (["--learning_rat", "1e-4"], "unknown setting `learning_rat`"),
        (["--max_stepz", "2"], "did you mean `max_steps`?"),
        (
            ["--resume"],  # convert's flag: train's key is longer than difflib's ratio forgives
            "unknown setting `resume`: neither a recipe key nor an option of this transformers version's "
            "TrainingArguments; did you mean `resume_from_checkpoint=true` (resume after a kill",
        ),
        (["--epochs", "2"], "did you mean `num_train_epochs`?"),
        (["optim=galore_adamw"], "optim=galore_adamw cannot be used: You need to install `galore_torch`"),
        (["optim=apollo_adamw"], "optim=apollo_adamw cannot be used: You need to install `apollo_torch`"),
        (["optim=adalomo"], "optim=adalomo cannot be used: You need to install `lomo_optim`"),
        (["optim=adamw_torch_4bit"], "optim=adamw_torch_4bit cannot be used: You need to have `torchao"),
        (["optim=grokadamw"], "optim=grokadamw cannot be used: Please install grokadamw"),
        (["optim=adamw_anyprecision"], "optim=adamw_anyprecision cannot be used: Please install"),
        (
            ["dataloader_persistent_workers=true"],
            "dataloader_persistent_workers needs worker processes, but dataloader_num_workers is 0; set "
            "dataloader_num_workers=2 (or more)",
        ),
        (
            ["dataloader_prefetch_factor=4", "dataloader_multiprocessing_context=spawn"],
            "dataloader_prefetch_factor, dataloader_multiprocessing_context need worker processes",
        ),
        (
            ["dataloader_num_workers=-1"],
            "dataloader_num_workers=-1: use 0 (load in the main process) or more",
        ),
        (
            ["torch_compile_backend=foo"],
            "torch_compile_backend=foo is not a backend accelerate knows; use one of eager, aot_eager",
        ),
        (
            ["torch_compile_mode=fastest"],
            "torch_compile_mode=fastest is not a mode of torch.compile's inductor backend; use one of",
        ),
        (["--report_to", "wandb"], "wandb package is not installed"),
        (["--report_to", "tensorboard,wandb"], "wandb package is not installed"),
        (["--max_steps"], "`max_steps` must be int, got true (a flag without its value?"),
        (["--report_to"], "`report_to` must be list or str, got true (a flag without its value?"),
        (["--report_to", "tensorboardx"], "report_to tensorboardx: not an integration transformers knows"),
        (
            ["report_to=[tensorboard, none]"],
            "report_to tensorboard,none: none stands alone; write report_to=none, or list only the",
        ),
        (
            ["logging_strategy=epoch"],
            "`logging_strategy` is set by qpissa: qpissa logs each step to trainer_log.jsonl; recipe key "
            "logging_steps paces printing",
        ),
        (["logging_strategy=no"], "`logging_strategy` is set by qpissa: qpissa logs each step"),
        (["label_names=[foo]"], "`label_names` is set by qpissa: qpissa's collator gives the Trainer the"),
        (
            ["lr_scheduler_type=cosine_with_min_lr", "lr_scheduler_kwargs=min_lr_rate=0.1"],
            "lr_scheduler_kwargs=min_lr_rate=0.1 is not a mapping; write "
            "lr_scheduler_kwargs={min_lr_rate: 0.1}",
        ),
        (
            ["optim_args=betas=(0.9,0.95)"],
            "a Trainer option is invalid: optim_args=betas=(0.9,0.95) is not of the form key=value,key=value",
        ),
        (["deepspeed=ds.json"], "deepspeed: qpissa does not train with DeepSpeed; leave it out, and where"),
        (
            ["load_best_model_at_end=true", "eval_steps=null"],
            "load_best_model_at_end loads the checkpoint of the lowest held-out loss among the Trainer's "
            "evaluations, but the run evaluates nothing; set eval_steps (with data.eval_path",
        ),
        (
            ["max_seq_length=64"],
            "unknown setting `max_seq_length`: neither a recipe key nor an option of this transformers "
            "version's TrainingArguments; qpissa takes it as `data.max_seq_len`",
        ),
        (["packing=true"], "qpissa takes it as `data.packing`"),
        (["group_by_length=true"], "qpissa takes it as `train_sampling_strategy=group_by_length`"),
        (["lora_r=16", "r=16"], "qpissa takes it as `qpissa convert --rank R` (the conversion's rank)"),
        (
            ["lora_alpha=32"],
            "qpissa takes it as `qpissa convert --alpha A` (the conversion's scale, alpha/r)",
        ),
        (
            ["metric_for_best_model=accuracy", "load_best_model_at_end=true"],
            "metric_for_best_model=accuracy: the Trainer's evaluations measure only the held-out loss",
        ),
        (["--use_liger_kernel"], "use_liger_kernel needs liger-kernel"),
        (
            ["trainer={learning_rate: 0.5}"],
            "`trainer.learning_rate`: recipe keys go at the top level of the recipe (`learning_rate: ...`)",
        ),
        (
            ["trainer={logging_steps: 2, per_device_train_batch_size: 8, seed: 7}"],
            "`trainer.logging_steps`, `trainer.per_device_train_batch_size`, `trainer.seed`: recipe keys go",
        ),
        (["trainer=5"], "`trainer` must be a mapping of TrainingArguments options ({report_to: ...}), got 5"),
        (["save_strategy=best"], "save_strategy=best needs metric_for_best_model=loss"),
        (
            ["save_strategy=best", "metric_for_best_model=loss", "eval_steps=null"],
            "save_strategy=best saves the checkpoint of the lowest held-out loss among the Trainer's "
            "evaluations, but the run evaluates nothing; set eval_steps (with data.eval_path: held-out "
            "data), or leave save_strategy=best out",
        ),
    ],
)
def test_bad_trainer_options_are_one_line_errors(
    overrides: list[str],
    message: str,
    qpissa_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    capsys,
) -> None:
    pytest.importorskip("tensorboard")
    assert cli.main(["--quiet", "train", str(_config(tmp_path, qpissa_dir, data_dir)), *overrides]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("qpissa: error:") and message in error
    assert not (tmp_path / "run").exists()


def test_a_wrong_compile_mode_is_told_the_modes_once_each() -> None:
    """torch lists `default` among its modes too: the message read `use one of default, default, ...`."""
    from qpissa import UserError
    from qpissa.trainer_options import _check_compile

    with pytest.raises(UserError) as refused:
        _check_compile(None, "fast")
    modes = str(refused.value).split("use one of ")[1].removesuffix(", or leave it out").split(", ")
    assert "default" in modes and "max-autotune" in modes and len(modes) == len(set(modes)), modes


@pytest.mark.parametrize(
    ("overrides", "refusal"),
    [
        (["optim=galore_adamw", "optim_target_modules=all-linear"], None),
        (
            ["optim=galore_adamw"],
            "a Trainer option is invalid: You need to define `optim_target_modules`",
        ),
        (["optim=lomo"], None),
    ],
)
def test_optimizers_built_from_the_model_are_checked_up_to_the_model(
    overrides: list[str],
    refusal: str | None,
    qpissa_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With their package installed, GaLore's and LOMO's options are checked as far as transformers can
    without the model, and nothing that needs it is asked (their packages stand in here)."""
    from transformers import trainer_optimizer

    from qpissa import UserError
    from qpissa.recipe_file import load_config
    from qpissa.runtime import resolve_runtime
    from qpissa.trainer_options import training_arguments

    galore = types.SimpleNamespace(GaLoreAdamW=object, GaLoreAdamW8bit=object, GaLoreAdafactor=object)
    monkeypatch.setitem(sys.modules, "galore_torch", galore)
    monkeypatch.setitem(sys.modules, "lomo_optim", types.SimpleNamespace(Lomo=object, AdaLomo=object))
    monkeypatch.setattr(trainer_optimizer, "is_galore_torch_available", lambda: True)
    monkeypatch.setattr(trainer_optimizer, "is_lomo_available", lambda: True)
    config = load_config(_config(tmp_path, qpissa_dir, data_dir), overrides)
    runtime = resolve_runtime(config.device, config.bf16, config.optim)
    if refusal is None:
        arguments = training_arguments(config, runtime, tmp_path / "run", show_progress=False)
        assert arguments.optim.value == overrides[0].removeprefix("optim=")
    else:
        with pytest.raises(UserError, match=re.escape(refusal)):
            training_arguments(config, runtime, tmp_path / "run", show_progress=False)


def test_a_trainer_mapping_cannot_send_the_run_into_the_input_model(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    """`trainer: {output_dir: MODEL}` would pass every check made on the top-level output_dir, and the
    Trainer would write its checkpoints into the model directory."""
    model = tmp_path / "model"
    shutil.copytree(qpissa_dir, model)
    before = sorted(model.rglob("*"))
    config = _config(tmp_path, model, data_dir, max_steps=1, trainer={"output_dir": str(model)})
    assert cli.main(["--quiet", "train", str(config)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("qpissa: error: `trainer.output_dir`: recipe keys go at the top level")
    assert sorted(model.rglob("*")) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("failure", "status", "message"),
    [
        (httpx.ConnectError("[Errno -2] Name or service not known"), 2, "Name or service not known"),
        (OfflineModeIsEnabled("offline mode is enabled"), 2, "offline mode is enabled"),
        (RuntimeError("boom"), 1, "this is a bug in qpissa"),  # no Hub error: not a user's mistake
    ],
    ids=["no network", "HF_HUB_OFFLINE", "another error"],
)
def test_push_to_hub_without_the_hub_is_one_line_and_a_failing_trainer_writes_nothing(
    failure: Exception,
    status: int,
    message: str,
    qpissa_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    """The Trainer creates push_to_hub's repository as it is built; whatever fails while it is built, the
    run directory is not written yet."""
    import transformers.trainer

    def create_repo(*args: object, **kwargs: object) -> None:
        raise failure

    hub = types.SimpleNamespace(create_repo=create_repo)
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    config = _config(tmp_path, qpissa_dir, data_dir, max_steps=1)
    assert cli.main(["--quiet", "train", str(config), "push_to_hub=true"]) == status
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error
    if status == 2:
        assert error.startswith("qpissa: error: push_to_hub: the Hugging Face Hub repository run cannot be")
        assert error.endswith("or hub_token), or drop push_to_hub")
    assert not (tmp_path / "run").exists()


def test_eval_strategy_steps_without_eval_steps_evaluates_every_logging_steps(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """As transformers does: its default eval_steps is the logging_steps the user set, not the 1 that qpissa
    hands the Trainer so that trainer_log.jsonl gets every step."""
    changes = {"max_steps": 4, "eval_steps": None, "logging_steps": 2, "eval_strategy": "steps",
               "save_strategy": "no", "data": {"eval_generate_samples": 0}}  # fmt: skip
    assert cli.main(["--quiet", "train", str(_config(tmp_path, qpissa_dir, data_dir, **changes))]) == 0
    assert [row["step"] for row in _evals(tmp_path / "run")] == [2, 4]
    best = {
        **changes,
        "save_strategy": "steps",
        "save_steps": 3,
        "max_steps": 3,
        "load_best_model_at_end": True,
    }
    shutil.rmtree(tmp_path / "run")
    assert cli.main(["--quiet", "train", str(_config(tmp_path, qpissa_dir, data_dir, **best))]) == 0
    assert [row["step"] for row in _evals(tmp_path / "run")] == [3], "best checkpoints: every save_steps"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.samples=2"], "the config sets `data.samples` beside `data.sources`, where only `data.path`"),
        (["data.split=validation"], "`data.split` beside `data.sources`, where only `data.path` takes it"),
        (["data.subset=foo", "data.samples=2"], "`data.subset`, `data.samples` beside `data.sources`"),
        (
            ["data.eval_path=null", "eval_steps=null", "data.eval_split=test"],
            "`data.eval_split` is set but `data.eval_path` is not; add held-out data or drop eval_split",
        ),
    ],
)
def test_data_keys_that_would_be_ignored_are_refused(
    overrides: list[str], message: str, qpissa_dir: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    """`data.subset`, `split` and `samples` choose from `data.path` only, and `eval_split` from eval_path."""
    data = {"path": None, "sources": [{"path": str(data_dir / "train.jsonl")}]}
    config = _config(tmp_path, qpissa_dir, data_dir, max_steps=1, data=data)
    assert cli.main(["--quiet", "train", str(config), *overrides]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("qpissa: error:") and message in error
    assert not (tmp_path / "run").exists()


def test_packing_trains_exactly_as_padding_does(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Same samples per step, same targets: the packed run's first losses equal the padded run's; and
    its tokens are counted without transformers warning at every step that it finds no padding."""
    losses = {}
    transformers_log = logging.getLogger("transformers")  # which does not propagate to the root
    transformers_log.addHandler(caplog.handler)
    try:
        for packing in (False, True):
            out = tmp_path / f"packing-{packing}"
            config = _config(out.parent, qpissa_dir, data_dir, eval_steps=None, output_dir=str(out))
            overrides = [
                "max_steps=2",
                f"data.packing={str(packing).lower()}",
                "data.eval_generate_samples=0",
            ]
            assert cli.main(["--quiet", "train", str(config), *overrides]) == 0
            losses[packing] = _losses(out)
    finally:
        transformers_log.removeHandler(caplog.handler)
    assert "count non-padding tokens" not in caplog.text
    assert losses[True][1] == pytest.approx(losses[False][1], abs=1e-5)
    assert losses[True][2] == pytest.approx(losses[False][2], abs=1e-4)


def test_chat_sources_mixed_detected_and_template_kept_by_chat_eval_export(
    qpissa_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    caplog,
) -> None:
    from transformers import AutoTokenizer

    sharegpt = tmp_path / "sharegpt.jsonl"
    turns = [{"from": "human", "value": "1+1"}, {"from": "gpt", "value": "2"}]
    sharegpt.write_text("".join(json.dumps({"conversations": turns}) + "\n" for _ in range(6)))
    trl = tmp_path / "trl.jsonl"
    record = {
        "prompt": [{"role": "user", "content": "2+2"}],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    trl.write_text("".join(json.dumps(record) + "\n" for _ in range(6)))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}:{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}"
    )
    data = {"path": None, "format": None, "eval_path": None,
            "sources": [{"path": str(sharegpt)}, {"path": str(trl), "samples": 0.5}]}  # fmt: skip
    config = _config(
        tmp_path, qpissa_dir, data_dir, data=data, eval_steps=None, max_steps=1, chat_template=template
    )
    with caplog.at_level("INFO"):
        assert cli.main(["--quiet", "train", str(config)]) == 0
    detected = [r.getMessage() for r in caplog.records if "detected" in r.getMessage()]
    assert any("format sharegpt" in m for m in detected) and any(
        "chat_prompt_completion" in m for m in detected
    )
    run = tmp_path / "run"
    for where in (run, run / "adapter"):
        assert (where / "chat_template.jinja").read_text() == template
    assert load_tokenizer(resolve_source(run)).chat_template == template  # what chat and eval load
    assert cli.main(["--quiet", "export", str(run), str(tmp_path / "merged"), "--no-verify"]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == template


@pytest.mark.integration
def test_memory_estimate_within_15_percent_on_the_demo_recipe(demo_model: Path, tmp_path: Path) -> None:
    """In a fresh process (a test process's high-water mark holds earlier tests' memory)."""
    import re
    import subprocess
    import sys

    qpissa_dir = tmp_path / "qpissa-r64"
    assert (
        cli.main(["--quiet", "convert", str(demo_model), str(qpissa_dir), "--rank", "64", "--iters", "1"])
        == 0
    )
    tool = Path(__file__).parents[1] / "tools" / "make_task_data.py"
    subprocess.run(
        [sys.executable, str(tool), str(tmp_path / "task"), "--train", "64", "--eval", "8"], check=True
    )
    recipe = Path(__file__).parents[1] / "configs" / "demo.yaml"
    train_file = tmp_path / "task" / "train.jsonl"
    overrides = [f"model={qpissa_dir}", f"output_dir={tmp_path / 'run'}", f"data.path={train_file}",
                 "data.eval_path=null", "eval_steps=null", "--max_steps", "6",
                 "--save_strategy", "no"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "qpissa.cli", "train", str(recipe), *overrides],
                          capture_output=True, text=True, check=True)  # fmt: skip
    estimate = float(re.search(r"estimated peak memory (\d+) MB", done.stderr).group(1))
    rows = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()]
    peak = max(row["peak_memory_mb"] for row in rows)
    assert abs(estimate / peak - 1) <= 0.15, (estimate, peak)


def test_training_bar_is_tqdm_auto_and_shown_in_notebooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """disable=None: tqdm hides it on a redirected stderr, tqdm.notebook (picked by tqdm.auto) shows it."""
    import tqdm.auto

    from qpissa import trainlog

    assert trainlog.tqdm is tqdm.auto.tqdm
    made = {}
    monkeypatch.setattr(trainlog, "tqdm", lambda **options: made.update(options))
    state = types.SimpleNamespace(is_world_process_zero=True, max_steps=5)
    trainlog.QuietProgressCallback().on_train_begin(None, state, None)
    assert made["disable"] is None and made["total"] == 5
    assert made["desc"] == "train" and made["unit"] == "step"  # "train: 40%| 2/5 [.., 3.1s/step]"


class _Clock:
    """A clock the test moves: a step takes 1 s, an evaluation 20 s (and its generation 10 s more)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _train_with_one_evaluation(callback: object, state: object, clock: _Clock) -> None:
    """Five 1 s steps, a 30 s evaluation after step 5, then step 6 (the Trainer's callback order)."""
    args = types.SimpleNamespace(eval_on_start=False)
    callback.on_train_begin(args, state, None)
    for step in range(1, 7):
        clock.now += 1
        state.global_step, state.num_input_tokens_seen = step, 100 * step
        callback.on_step_end(args, state, None)
        callback.on_log(args, state, None, logs={"loss": 1.0})
        if step == 5:
            clock.now += 20
            callback.on_evaluate(args, state, None, metrics={"eval_loss": 1.0}, model=torch.nn.Linear(1, 1))


def test_training_bar_eta_leaves_out_the_evaluations_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """14 steps left at 1 s/step after a 20 s evaluation: the bar says about 14 s, not several times it."""
    import io

    import tqdm.std

    from qpissa import trainlog

    clock = _Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)
    bars = []

    def shown(**options: object) -> tqdm.std.tqdm:  # shown, as in a terminal
        bars.append(tqdm.std.tqdm(**{**options, "disable": False, "file": io.StringIO()}))
        return bars[-1]

    monkeypatch.setattr(trainlog, "tqdm", shown)
    state = types.SimpleNamespace(is_world_process_zero=True, max_steps=20, global_step=0)
    _train_with_one_evaluation(trainlog.QuietProgressCallback(), state, clock)
    shown_bar = bars[0].format_dict
    eta = (shown_bar["total"] - shown_bar["n"]) / shown_bar["rate"]
    assert shown_bar["n"] == 6 and eta == pytest.approx(14, rel=0.05), eta


def test_logged_eta_leaves_out_the_evaluations_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """trainer_log.jsonl's eta after the evaluation is 14 steps at the training rate of 1 s/step."""
    from qpissa import trainlog

    clock = _Clock()
    monkeypatch.setattr(trainlog, "time", types.SimpleNamespace(perf_counter=clock))
    log_file = tmp_path / "trainer_log.jsonl"

    def generate(model: torch.nn.Module) -> dict[str, float]:
        clock.now += 10
        return {"exact_match": 0.5}

    callback = trainlog.JsonlLogCallback(log_file, tmp_path / "eval_log.jsonl", torch.device("cpu"), generate)
    state = types.SimpleNamespace(
        is_world_process_zero=True, max_steps=20, global_step=0, num_input_tokens_seen=0
    )
    _train_with_one_evaluation(callback, state, clock)
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["eta"] == pytest.approx(14), rows[-1]
    assert rows[-1]["elapsed"] == pytest.approx(36)  # elapsed stays the wall time


def _arguments(config_path: Path, overrides: list[str], run: Path):
    """The Trainer's arguments `qpissa train CONFIG OVERRIDES` would build."""
    from qpissa.recipe_file import load_config
    from qpissa.runtime import resolve_runtime
    from qpissa.trainer_options import training_arguments

    config = load_config(config_path, overrides)
    runtime = resolve_runtime(config.device, config.bf16, config.optim)
    return training_arguments(config, runtime, run, show_progress=False)


def test_drop_last_with_fewer_samples_than_one_batch_is_refused_in_one_line(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """16 samples in batches of 64 with dataloader_drop_last trained 0 steps and exited 0 (max_steps > 0),
    or failed with a ValueError traceback (max_steps=-1)."""
    from qpissa import UserError
    from qpissa.train_checks import check_batches

    config = _config(tmp_path, qpissa_dir, data_dir, eval_steps=None)
    arguments = _arguments(config, ["per_device_train_batch_size=64", "dataloader_drop_last=true"], tmp_path)
    with pytest.raises(UserError) as error:
        check_batches(arguments, 16)
    assert str(error.value) == (
        "the data holds 16 training samples (as tokenized), fewer than one batch (per_device_train_batch_size"
        "=64), and dataloader_drop_last=true drops an incomplete batch, so nothing would be trained; set "
        "per_device_train_batch_size=16 or less (gradient_accumulation_steps keeps the batch), add training "
        "data, or drop dataloader_drop_last"
    )
    check_batches(arguments, 64)  # one whole batch
    check_batches(_arguments(config, ["per_device_train_batch_size=64"], tmp_path), 16)  # a partial one


def test_drop_last_with_fewer_samples_than_one_batch_writes_nothing(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = _config(tmp_path, qpissa_dir, data_dir, eval_steps=None, max_steps=2)
    overrides = ["per_device_train_batch_size=64", "dataloader_drop_last=true"]
    assert cli.main(["--quiet", "train", str(config), *overrides]) == 2  # was 0: "trained 0 steps"
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [error[-1]] and error[-1].startswith("qpissa: error: the data holds 16 training samples")
    assert not (tmp_path / "run").exists()
