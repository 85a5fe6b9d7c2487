"""The `qpissa` command: argument parsing and one short handler per subcommand, nothing else.

The parser needs only the torch-free settings; each handler imports the modules that do the work, so
that `qpissa --help` stays instant (tests/test_structure.py checks that it never imports torch).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

from qpissa import (
    LOG_FORMAT,
    UserError,
    __version__,
    hide_library_deprecation_notes,
    hide_library_progress_bars,
)
from qpissa.artifacts import (
    COMPARE_NAME,
    PROGRESS_NAME,
    REPORT_HTML,
    REPORT_MARKDOWN,
    RUN_MARKER,
    SUMMARY_NAME,
    latest_checkpoint,
    partial_dir,
    read_json,
)
from qpissa.console import convert_summary, export_summary, stdout_reader_left, train_summary
from qpissa.convert_settings import CompareSettings, ConvertSettings
from qpissa.distributed import is_main_process, one_process_refusal
from qpissa.memory import out_of_memory_line, out_of_space_line
from qpissa.options import add_arguments, from_namespace, path_argument
from qpissa.recipe import recipe_keys_help
from qpissa.settings import (
    DEMO_MODELS,
    ChatSettings,
    EvalSettings,
    ExportSettings,
    FidelitySettings,
    ReportOptions,
)

EXIT_USER_ERROR = 2  # argparse's own status for a usage mistake
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a tool whose reader left (`| head`) ends with
QUIET_HELP = "only warnings and the result; no progress bars"
# errors of the file system and of its space, which the user fixes; any other OSError is a bug
_FILE_ERRORS = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    errno.EISDIR: "it is a directory where a file is expected: check the path",
    errno.EEXIST: "it is in the way: move it or choose another path",
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "the path has a loop of symbolic links: check it",
}
_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)  # named without a file: the message says what to do anyway
# torchrun and accelerate launch stop every process once one has ended with an error: a process other
# than the main one waits this long before it leaves, so that the main one prints what went wrong first
NON_MAIN_GRACE_S = 10.0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status: 0, 2 for a user mistake (as argparse), 130 when interrupted.

    Every anticipated failure ends in one `qpissa: error:` line that names the file and the fix. An
    unanticipated exception is a bug: it keeps its traceback, plus a line asking to report it.
    """
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "handler", None) is not _cmd_train:
        return _fail(f"unrecognized arguments: {' '.join(extra)}; see `qpissa {args.command} --help`")
    if extra:  # `--max_steps 2`: transformers' and LLaMA-Factory's flag style, as overrides
        args.overrides = [*args.overrides, *extra]
    if args.handler is not _cmd_train and (refusal := one_process_refusal(args.command)):
        return _fail(refusal)
    hide_library_deprecation_notes()
    # one bar per launch (the main process's), and none in a log: qpissa's own bars are terminal-only too
    bars = not args.quiet and is_main_process() and sys.stderr.isatty()
    if not bars:
        hide_library_progress_bars()
    level = logging.WARNING if args.quiet else logging.INFO
    if not is_main_process():  # another process of a launcher: its notes and warnings are the main one's
        level = logging.ERROR
    logging.basicConfig(level=level, format=LOG_FORMAT)
    from tqdm.contrib.logging import logging_redirect_tqdm  # after hide_library_progress_bars: see there

    try:
        # a log line printed above the progress bars, not appended to one's line
        with logging_redirect_tqdm() if bars else contextlib.nullcontext():
            args.handler(args)
    except UserError as error:
        return _fail(str(error))
    except KeyboardInterrupt:  # under a launcher every process is interrupted; the main one says so
        if not is_main_process():
            return _after_the_main_process(EXIT_INTERRUPTED)
        print(f"qpissa: interrupted{_continue_hint(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if not stdout_reader_left():  # another pipe, a socket: not the user's doing
            return _bug()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flushes stdout
        return EXIT_BROKEN_PIPE  # stopped quietly, as other tools do when `| head` has read enough
    except OSError as error:  # the last resort: modules that know the file raise UserError themselves
        fix = _FILE_ERRORS.get(error.errno)
        if fix is None or (error.filename is None and error.errno not in _SPACE_ERRORS):
            return _bug()
        where = f"{error.filename}: " if error.filename is not None else ""
        if error.errno in _SPACE_ERRORS:  # then continue where this command can, else start it again
            fix += _continue_hint(args) or "; then rerun the same command"
        return _fail(f"{where}{error.strerror}; {fix}")
    except Exception as error:
        exhausted = out_of_memory_line(error) or out_of_space_line(error)  # what this machine holds: no bug
        if exhausted is None:
            return _bug()
        return _fail(exhausted + (_continue_hint(args) or "; then rerun the same command"))
    return 0


def main_entry() -> None:
    """Console-script entry point."""
    sys.unraisablehook = _interrupt_again  # in the command's own process only: tests call `main`
    sys.exit(main())


def _interrupt_again(unraisable: Any) -> None:
    """Python drops a Ctrl-C that lands in a finalizer (a `__del__` as a tokenizer loads): send it again, a
    moment later, to the main thread (raised now, it would land in this hook and be dropped again)."""
    if not issubclass(unraisable.exc_type, KeyboardInterrupt) or sys.is_finalizing():  # no thread starts then
        sys.__unraisablehook__(unraisable)
        return
    again = threading.Timer(0.05, signal.pthread_kill, args=(threading.main_thread().ident, signal.SIGINT))
    again.daemon = True  # an exit meanwhile does not wait for it
    again.start()


def _fail(message: str) -> int:
    """Print a user mistake on one line (library messages may quote several); under a launcher only the
    main process prints it, as every process meets the same mistake (`distributed.on_main`)."""
    if not is_main_process():
        return _after_the_main_process(EXIT_USER_ERROR)
    line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"qpissa: error: {line}", file=sys.stderr)
    return EXIT_USER_ERROR


def _after_the_main_process(status: int) -> int:
    """`status`, returned once the main process has had the time to print the same mistake's line."""
    time.sleep(NON_MAIN_GRACE_S)
    return status


def _bug() -> int:
    traceback.print_exc()
    print(
        f"qpissa: this is a bug in qpissa {__version__}; please report it with the traceback above",
        file=sys.stderr,
    )
    return 1


def _continue_hint(args: argparse.Namespace) -> str:
    """How to continue an interrupted command, where it can be continued."""
    if args.handler is _cmd_convert and (partial_dir(args.out) / PROGRESS_NAME).is_file():
        return "; rerun the same command with --resume to continue"
    if args.handler is _cmd_compare and (args.out / COMPARE_NAME).is_file():
        return "; rerun the same command to continue (finished steps are reused)"
    output_dir = getattr(args, "output_dir", None)  # set by _cmd_train once the config is read
    if args.handler is not _cmd_train or output_dir is None:
        return ""
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        return f"; add resume_from_checkpoint={checkpoint} to the same command to continue"
    if (output_dir / RUN_MARKER).is_file():
        return (
            "; no checkpoint was complete: add overwrite_output_dir=true to the same command to start again"
        )
    return ""


def _cmd_fetch_model(args: argparse.Namespace) -> None:
    from qpissa.models import fetch_demo_model

    out_dir = fetch_demo_model(args.name, args.out)
    print(f"{args.name}: Hugging Face checkpoint in {out_dir}")


def _cmd_convert(args: argparse.Namespace) -> None:
    settings = from_namespace(ConvertSettings, args)  # a mistyped setting is told before torch loads
    from qpissa.convert import convert
    from qpissa.hub import resolve_model

    model = resolve_model(args.model, "MODEL")  # a Hub model id becomes its local snapshot
    report = convert(model, args.out, settings, resume=args.resume, overwrite=args.overwrite,
                     show_progress=not args.quiet)  # fmt: skip
    print(convert_summary(report, args.out))


def _cmd_train(args: argparse.Namespace) -> None:
    from qpissa.recipe_file import load_config

    config = load_config(args.config, args.overrides)  # a missing recipe is told before torch loads
    from qpissa.train import train

    args.output_dir = config.output_dir  # where a Ctrl-C can be continued from
    summary = train(config, show_progress=not args.quiet)
    if is_main_process():
        print(train_summary(summary))


def _cmd_eval(args: argparse.Namespace) -> None:
    from qpissa.task_eval import evaluate

    result = evaluate(args.model_or_run, args.data, from_namespace(EvalSettings, args), not args.quiet)
    print(json.dumps(result, indent=2, sort_keys=True))


def _cmd_export(args: argparse.Namespace) -> None:
    from qpissa.export import export

    settings = from_namespace(ExportSettings, args)
    report = export(args.run, args.out, settings, overwrite=args.overwrite, show_progress=not args.quiet)
    print(export_summary(report, args.out))


def _cmd_chat(args: argparse.Namespace) -> None:
    from qpissa.chat import answer, run_chat

    settings = from_namespace(ChatSettings, args)
    write = functools.partial(print, end="", flush=True)  # the answer, streamed as it is generated
    if settings.prompt is not None:
        hide_library_progress_bars()  # one answer and nothing else, not transformers' "Loading weights"
        try:
            answer(args.model_or_run, settings, write)
        except KeyboardInterrupt:
            print()  # the answer's line ends before Ctrl-C's
            raise
        print()
    else:
        run_chat(args.model_or_run, settings, input if sys.stdin.isatty() else _echoed_input, write)


def _echoed_input(prompt: str) -> str:
    """`input` that echoes the line, as a terminal does: piped, the transcript reads `you> hi` and the
    answer on the next line, not the answer right after `you> `."""
    line = input(prompt)
    print(line, flush=True)
    return line


def _cmd_compare(args: argparse.Namespace) -> None:
    settings = from_namespace(CompareSettings, args)  # a mistyped setting is told before torch loads
    convert_settings = from_namespace(ConvertSettings, args, exclude=("method",))
    fidelity, options = from_namespace(FidelitySettings, args), from_namespace(ReportOptions, args)
    from qpissa.compare import compare
    from qpissa.hub import resolve_model

    model = resolve_model(args.model, "MODEL")
    record = compare(model, args.out, settings, convert_settings, fidelity, report_options=options,
                     show_progress=not args.quiet)  # fmt: skip
    steps = record["history"][-1]["steps"]
    done = sum(step["status"] == "done" for step in steps)
    outputs = f"{REPORT_HTML}, {REPORT_MARKDOWN}, {SUMMARY_NAME}"
    print("\n".join(read_json(args.out / SUMMARY_NAME, "run the comparison again")["verdict"]))
    kinds = "conversions, fidelity measurements, training runs"
    print(f"compare's steps ({kinds}): {done} done now, {len(steps) - done} reused -> {args.out}/{outputs}")


def _cmd_report(args: argparse.Namespace) -> None:
    from qpissa.report import create_report

    summary = create_report(args.inputs, args.out, from_namespace(ReportOptions, args))
    print("\n".join(summary["verdict"]))
    compared = f"{len(summary['methods'])} compared ({', '.join(summary['methods'])})"
    print(f"{compared}, {len(summary['plots'])} plots -> {args.out}/{REPORT_HTML}")


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error every other user mistake gets (not the whole usage), status 2."""

    def error(self, message: str) -> NoReturn:
        if not is_main_process():  # under a launcher every process parses the same command line
            sys.exit(_after_the_main_process(EXIT_USER_ERROR))
        print(f"qpissa: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qpissa", description="QPiSSA: 4-bit fine-tuning that loses less.")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    parser.add_argument("--version", action="version", version=f"qpissa {__version__}")
    # subcommands' parsers are _Parser too (argparse makes them of the parent's class)
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND", dest="command")

    fetch = commands.add_parser(
        "fetch-model", help="write an embedded demo model as a standard HF checkpoint"
    )
    fetch.add_argument("name", choices=sorted(DEMO_MODELS), help="demo model")
    fetch.add_argument("out", type=Path, metavar="DIR", help="directory to write (a second call is instant)")
    fetch.set_defaults(handler=_cmd_fetch_model)

    convert = commands.add_parser(
        "convert", help="decompose a checkpoint: NF4 residual + adapter + error report"
    )
    convert.add_argument(
        "model", type=Path, help="Hugging Face checkpoint directory (safetensors) or Hub model id"
    )
    convert.add_argument("out", type=Path, help="output QPiSSA directory")
    add_arguments(convert, ConvertSettings)
    convert.add_argument("--resume", action="store_true", help="continue an interrupted conversion of OUT")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    convert.set_defaults(handler=_cmd_convert)

    train = commands.add_parser(
        "train",
        help="fine-tune the adapter of a QPiSSA directory from a YAML recipe",
        epilog=recipe_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", type=Path, help="YAML recipe (see configs/)")
    train.add_argument(
        "overrides",
        nargs="*",
        default=[],  # else Python 3.11's argparse lists it as required when CONFIG is missing
        help="overrides of any recipe key or TrainingArguments option: key=value or --key value, "
        "dotted for groups: data.max_seq_len=512 --report_to tensorboard",
    )
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser(
        "eval", help="loss, perplexity and exact-match accuracy on a data file (JSON)"
    )
    evaluate.add_argument(
        "model_or_run", type=Path, help="QPiSSA directory, training run, checkpoint or model"
    )
    evaluate.add_argument(
        "--data", type=Path, required=True,
        help="data file, folder of data files, save_to_disk directory or Hub dataset (owner/name)",
    )  # fmt: skip
    add_arguments(evaluate, EvalSettings)
    evaluate.set_defaults(handler=_cmd_eval)

    export = commands.add_parser("export", help="trained adapter -> merged 16-bit model or rank-2r LoRA")
    export.add_argument("run", type=Path, help="training run, checkpoint-N directory or QPiSSA directory")
    export.add_argument("out", type=Path, help="output directory (new, or empty)")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    add_arguments(export, ExportSettings)
    export.set_defaults(handler=_cmd_export)

    chat = commands.add_parser("chat", help="chat in the terminal, or answer one --prompt")
    chat.add_argument("model_or_run", type=Path, help="QPiSSA directory, run, checkpoint or merged export")
    add_arguments(chat, ChatSettings)
    chat.set_defaults(handler=_cmd_chat)

    _add_compare_and_report(commands)
    for command in commands.choices.values():  # --quiet is accepted after the command name too
        command.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
        command.register("type", Path, path_argument)  # every `type=Path` argument: "" is refused, not "."
    return parser


def _add_compare_and_report(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser("compare", help="convert with each method, measure fidelity, train; report")
    compare.add_argument(
        "model", type=Path, help="Hugging Face checkpoint directory (full precision) or Hub model id"
    )
    compare.add_argument("out", type=Path, help="comparison directory (a re-run reuses finished steps)")
    add_arguments(compare, CompareSettings)
    add_arguments(compare, ConvertSettings, exclude=("method",))
    add_arguments(compare, FidelitySettings)
    add_arguments(compare, ReportOptions)
    compare.set_defaults(handler=_cmd_compare)

    report = commands.add_parser("report", help="Markdown/HTML/PNG report from conversions, runs, exports")
    report.add_argument("inputs", type=Path, nargs="+", help="QPiSSA, run, export and compare directories")
    report.add_argument("--out", type=Path, required=True, help="report directory")
    add_arguments(report, ReportOptions)
    report.set_defaults(handler=_cmd_report)


if __name__ == "__main__":
    main_entry()
