"""`compare.json`: what a comparison was made with, matched on a rerun as `convert --resume` matches a
conversion, and the methods it holds.

A rerun continues the comparison when its settings are those of the first run however they are spelled:
defaults resolved (`--alpha 4` at rank 4 is the default's), and the `--calib` data told by the tokens drawn
from it, not by its path (the same file by another path is the same data; another file at the same relative
path from another working directory is not). A method is held once its conversion is finished: one whose
conversion was interrupted may be dropped from `--methods`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from qpissa import UserError
from qpissa.artifacts import (
    CALIBRATED_DIR_SUFFIX,
    COMPARE_NAME,
    CONVERSIONS_DIR,
    REPORT_NAME,
    RUNS_DIR,
    read_json,
)
from qpissa.checkpoint import write_json
from qpissa.convert_settings import ConvertSettings, Method
from qpissa.options import from_dict

log = logging.getLogger(__name__)

OWN_DIRS = (CONVERSIONS_DIR, RUNS_DIR)
CALIB_HASH = "calib_sha256"  # the hash of the --calib token windows, as convert records it


def variants(methods: list[Method], base: ConvertSettings) -> dict[str, ConvertSettings]:
    """The conversions to compare, by directory name: each method data-free, and with `--calib` also
    calibrated (`<method>-calib`); everything else shared."""
    data_free = {f.name: None for f in dataclasses.fields(base) if f.name.startswith("calib")}
    found = {}
    for method in methods:
        settings = dataclasses.replace(
            base, method=method, iters=None if method is Method.QLORA else base.iters
        )
        found[method.value] = dataclasses.replace(settings, **data_free)
        if base.calib is not None:
            found[method.value + CALIBRATED_DIR_SUFFIX] = settings
    return found


def fingerprint(model_dir: Path, settings: ConvertSettings, calib_sha256: str | None) -> dict:
    """What an existing OUT must match to be continued: the model, the shared conversion settings (methods
    may be added; fidelity and training steps check their own inputs) with `--calib` as an absolute path,
    and the hash of the tokens drawn from it."""
    shared = {k: v for k, v in settings.output_settings().items() if k != "method"}
    if settings.calib is not None:
        shared["calib"] = str(settings.calib.resolve())
    found = {"model": str(model_dir.resolve()), "convert": shared}
    return found | ({CALIB_HASH: calib_sha256} if calib_sha256 is not None else {})


def prepare_output(out_dir: Path, now: dict) -> dict:
    """Load the record of an earlier comparison with the same settings (`now`: its `fingerprint`), or start
    a new one.

    Raises:
        UserError: OUT holds something else, a damaged record, or a comparison made with other settings.
    """
    record_path = out_dir / COMPARE_NAME
    if record_path.is_file():
        fix = (
            f"to continue, keep {CONVERSIONS_DIR}/ and {RUNS_DIR}/ in {out_dir} and delete the rest (each "
            "conversion and run is checked and reused), or choose a new OUT"
        )
        record = read_json(record_path, fix, required=("fingerprint", "history", "methods"))
        if _comparable(record["fingerprint"], now) != _comparable(now, record["fingerprint"]):
            raise UserError(_mismatch(out_dir, record["fingerprint"], now))
        return record
    # a directory holding only conversions/ and runs/ is a comparison begun elsewhere (or before compare.json
    # was written): continue it; each conversion and run is still checked against the settings
    if out_dir.exists() and (not out_dir.is_dir() or any(p.name not in OWN_DIRS for p in out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not a comparison directory; choose a new or empty OUT")
    out_dir.mkdir(parents=True, exist_ok=True)
    return {"fingerprint": now, "history": [], "methods": []}


def compared_methods(out_dir: Path, record: dict, asked: list[Method]) -> list[Method]:
    """The methods an earlier run of OUT finished converting, then the new ones asked now: the report shows
    every method OUT holds, so each is measured (and trained) with this run's settings, not left with older
    ones. A method whose conversion never finished is no part of the comparison unless asked again.

    Raises:
        UserError: compare.json names a method qpissa does not know (it was edited or damaged).
    """
    known = {method.value for method in Method}
    earlier = [str(name).removesuffix(CALIBRATED_DIR_SUFFIX) for name in record["methods"]]
    unknown = [name for name in earlier if name not in known]
    if unknown:
        raise UserError(
            f"{out_dir / COMPARE_NAME} names unknown methods ({', '.join(unknown)}); it is written by "
            "`qpissa compare`: choose a new OUT"
        )
    finished = finished_methods(out_dir, record)
    held = [Method(name.removesuffix(CALIBRATED_DIR_SUFFIX)) for name in finished]
    unfinished = [name for name in dict.fromkeys(earlier) if Method(name) not in [*held, *asked]]
    if unfinished:
        log.info(
            "%s holds no finished conversion of %s (an earlier run stopped before): left out; add it to "
            "--methods to continue it", out_dir, ", ".join(unfinished),
        )  # fmt: skip
    methods = list(dict.fromkeys([*held, *asked]))
    kept = [method.value for method in methods if method not in asked]
    if kept:
        log.info(
            "%s holds %s from an earlier run as well: compared too, with this run's fidelity settings "
            "(and --train)", out_dir, ", ".join(kept),
        )  # fmt: skip
    return methods


def finished_methods(out_dir: Path, record: dict) -> list[str]:
    """The conversions (by directory name) of the record whose conversion is finished in OUT."""
    names = [str(name) for name in record["methods"]]
    return [name for name in names if (out_dir / CONVERSIONS_DIR / name / REPORT_NAME).is_file()]


def record_steps(out_dir: Path, record: dict, steps: list[dict]) -> None:
    """Log finished steps in compare.json at once, so the record is true even if a later step fails."""
    record["history"][-1]["steps"] += steps
    write_json(out_dir / COMPARE_NAME, record)


def _comparable(fingerprint: dict, other: dict) -> dict:
    """A fingerprint as every spelling of one comparison shares it: each variant's settings with their
    defaults resolved, and the `--calib` data as the hash of its tokens where `other` records one too (else
    as its absolute path). Settings these cannot read (another version's) stay as written."""
    hashed = CALIB_HASH in fingerprint and CALIB_HASH in other
    try:
        base = from_dict(ConvertSettings, fingerprint["convert"])
        resolved = {name: s.resolved_dict() for name, s in variants(list(Method), base).items()}
    except (UserError, KeyError, TypeError, AttributeError):
        return fingerprint
    for settings in resolved.values():
        settings.pop("workers")
        if settings.get("calib") is not None:  # recorded as given before it was recorded resolved
            settings["calib"] = None if hashed else str(Path(settings["calib"]).resolve())
    return {
        "model": fingerprint.get("model"),
        "variants": resolved,
        "calib": hashed and fingerprint[CALIB_HASH],
    }


def _mismatch(out_dir: Path, before: dict, now: dict) -> str:
    """Why OUT's comparison cannot be continued, in the options the user gives (`--rank 4`, `no --calib`,
    `the default --iters`), and how to go on."""
    if before.get("model") != now["model"]:
        return (
            f"{out_dir} holds a comparison of another model ({before.get('model')}); rerun with that MODEL "
            "to continue it, or choose another OUT"
        )
    earlier, asked = _as_given(before.get("convert", {})), _as_given(now["convert"])
    calibrated = earlier.get("calib") is not None and asked.get("calib") is not None
    keys = [key for key in dict.fromkeys([*asked, *earlier]) if calibrated or not key.startswith("calib_")]
    changed = [key for key in keys if earlier.get(key) != asked.get(key)]  # calib_*: only beside --calib
    resolved = [_comparable(fingerprint, {}).get("variants") for fingerprint in (before, now)]
    named = [key for key in changed if _differs(key, *resolved)] or changed  # not a default written out
    if not named and calibrated:
        return (
            f"{out_dir} holds a comparison calibrated on other --calib data: the tokens drawn from "
            f"{now['convert']['calib']} differ from those drawn then from {before['convert']['calib']} (the "
            "file changed since, or names another one); rerun with the earlier data to continue it, or "
            "choose another OUT for this"
        )
    if not named:
        return f"{out_dir} holds a comparison made with other settings; choose another OUT"
    made = ", ".join(_option(key, earlier.get(key)) for key in named)
    wanted = ", ".join(_option(key, asked.get(key)) for key in named)
    return (
        f"{out_dir} holds a comparison made with {made}, where this run asks for {wanted}; rerun with the "
        "earlier options to continue it, or choose another OUT for these"
    )


def _differs(key: str, before: Any, now: Any) -> bool:
    """Whether a setting differs once resolved, in any variant (settings that cannot be read: always)."""
    if not isinstance(before, dict) or not isinstance(now, dict):
        return True
    return any(before.get(name, {}).get(key) != now.get(name, {}).get(key) for name in {*before, *now})


def _as_given(convert_settings: dict) -> dict:
    """Recorded conversion settings as a user gives them: the recorded --power-iters is resolved, and is
    None here where it is the default of its --calib (4 without, 2 with), which nobody passed."""
    default = ConvertSettings(calib=convert_settings.get("calib")).resolved_power_iters
    if convert_settings.get("power_iters") == default:
        return convert_settings | {"power_iters": None}
    return convert_settings


def _option(key: str, value: object) -> str:
    """One setting as its flag reads: `--rank 4`, `--no-double-quant`, `no --calib`, `the default --iters`."""
    flag = "--" + key.replace("_", "-")
    if value is None:
        return f"no {flag}" if key == "calib" else f"the default {flag}"
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {value}"
