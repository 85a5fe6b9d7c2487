"""The text the CLI prints for a result: convert's error table and summary line, export's summary.

Plain functions of the JSON reports, torch-free; the LoRA export's README quotes `lora_summary` too.
"""

from __future__ import annotations

import select
import sys
from pathlib import Path

from qpissa.settings import ExportKind


def counted(count: int, noun: str) -> str:
    """`1 step`, `2 steps`: a count with its noun in the number it takes."""
    return f"{count} {noun}{'s' * (count != 1)}"


def summary_table(report: dict) -> str:
    """A per-module-type table of the QLoRA baseline error, the method's error and the reduction.

    A calibrated conversion gets a column more, the reduction of the layers' output error on the
    calibration data, and a line saying which is which.
    """
    method = report["settings"]["method"]
    rows = {}
    for layer in report["layers"]:
        row = rows.setdefault(layer["module_type"], {"base": [], "err": []})
        row["base"].append(layer["err_fro_base"])
        row["err"].append(layer["err_fro"])
    summary = report["summary"]
    columns = [("reduction % (fro)", "by_type_fro", "avg_fro")]
    columns += [("reduction % (nuc)", "by_type", "avg")] if summary["avg"] is not None else []
    columns += (
        [("output err reduction %", "by_type_out", "avg_out")] if summary.get("avg_out") is not None else []
    )
    width = max([12, *map(len, rows)])  # GPT-2's `attn.c_proj`, T5's `decoder.SelfAttention.q`
    header = f"{'module':<{width}} {'QLoRA err':>10} {method + ' err':>12}"
    header += "".join(f" {title:>{max(18, len(title))}}" for title, _, _ in columns)
    lines = [header, "-" * len(header)]
    for kind, row in rows.items():
        line = f"{kind:<{width}} {_mean(row['base']):>10.4f} {_mean(row['err']):>12.4f}"
        line += "".join(f" {summary[key][kind]:>{max(18, len(title))}.2f}" for title, key, _ in columns)
        lines.append(line)
    lines.append("-" * len(header))
    last = f"{'AVG':<{width}} {'':>10} {'':>12}"
    lines.append(last + "".join(f" {summary[key]:>{max(18, len(title))}.2f}" for title, _, key in columns))
    lines.append("err: the weight error ‖W − Ŵ‖ (Frobenius), mean of each type's matrices")
    lines.append("reduction %: each matrix's 1 − err/QLoRA err, averaged (not the ratio of the two columns)")
    if summary.get("avg_out") is not None:
        lines.append(
            "weight errors: ‖W − Ŵ‖ against plain NF4's; output errors: ‖(W − Ŵ)X‖ on the calibration "
            "inputs X, what the model feels (calibration trades weight error for output error)"
        )
    return "\n".join(lines)


def convert_summary(report: dict, out_dir: Path) -> str:
    """The error table, a line per reason matrices stayed unquantized, then one line: matrices, time, device,
    workers, metric time, peak memory."""
    settings, summary = report["settings"], report["summary"]
    kept = [
        f"kept unquantized, not adapted: {len(entry['tensors'])} tensors ({entry['params']:,} parameters, "
        f"e.g. {entry['tensors'][0]}): {entry['reason']}"
        for entry in report.get("kept_unquantized", [])
    ]
    return (
        "\n".join([summary_table(report), *kept])
        + "\n"
        + (
            f"{settings['method']}: {len(report['layers'])} matrices in {summary['total_seconds']:.1f} s "
            f"on {settings['device']} with {settings['workers']} worker(s) "
            f"(errors measured in {summary['metrics_seconds']:.1f} s of worker time), "
            f"peak RSS {summary['peak_rss_mb']:.0f} MB "
            f"-> {out_dir}"
        )
    )


def export_summary(report: dict, out_dir: Path) -> str:
    """What was written and how close it is to the model it was exported from, for the terminal."""
    verify = report["verify"]
    check = f"not verified ({report.get('verify_skipped') or '--no-verify'})"
    if verify is not None:
        what = "Δlogit" if verify["kl_mean"] is not None else "Δhidden state"
        against = f"vs {verify.get('reference', 'trained model')}, in {verify.get('export_dtype', 'float32')}"
        check = (f"{against}, on {verify['tokens']} tokens: max |{what}| {verify['max_abs_diff']:.3g}, "
                 f"mean {verify['mean_abs_diff']:.3g}")  # fmt: skip
        check += f", KL {verify['kl_mean']:.3g}" if verify["kl_mean"] is not None else ""
    if report["kind"] == ExportKind.MERGED.value:
        return f"merged {report['matrices']} matrices into a {report['dtype']} model -> {out_dir}; {check}"
    details = report["details"]
    head = f"rank-{details['rank']} LoRA for {details['base_model']} -> {out_dir}; {check}"
    return f"{head}\n\n{lora_summary(report)}"


def train_summary(summary: dict) -> str:
    """The line `qpissa train` ends with: steps, mean loss, the final evaluation, the run's directory."""
    evaluation = summary.get("eval", {})
    extra = f", eval loss {evaluation['loss']:.4f}" if "loss" in evaluation else ""
    if evaluation.get("total"):  # of the answers generated, often fewer than the samples the loss is on
        extra += f", exact match {evaluation['correct']}/{evaluation['total']}"
    if summary["loss_steps"]:  # the whole run's logged steps, a resumed one's included
        first, last = summary["loss_steps"]
        steps = f"step {first}" if first == last else f"steps {first}-{last}"
        loss = f"mean loss {summary['train_loss']:.4f} ({steps})"
    else:
        loss = "no step logged"
    return f"trained {counted(summary['steps'], 'step')}, {loss}{extra} -> {summary['output_dir']}"


def lora_summary(report: dict) -> str:
    """Why the adapter has the rank written (2r, r from a zero initial adapter, or --rank's) and how far
    the adapter on the original is from the trained model, in words."""
    d = report["details"]
    r, zero = d["trained_rank"], d["zero_initial"]
    exact = r if zero else 2 * r
    ranks = f"r = {r}" if zero else f"r = {r} -> 2r = {exact}"
    if d["truncation"] is not None:  # what was written is --rank's, not the exact rank
        k = d["rank"]
        why = f"Why rank {k} ({ranks}, re-truncated to {k} by --rank)"
        rank = f"it is re-truncated to rank {k} below, with lora_alpha = s·{k}"
    elif zero:
        why, rank = f"Why rank {r}, as trained", "r and lora_alpha are the trained adapter's"
    else:
        why, rank = f"Why the rank doubled ({ranks})", "r and lora_alpha are both doubled"
    conversion = f"the conversion (--method {d['method']})"
    if zero:
        change = (
            f"{conversion} started from a zero adapter (B·A = 0), so training fitted B', A' on top of the "
            "residual W_res = W itself. On the original weights W the trained model is W + s·B'A', the "
            "trained adapter alone, a LoRA of rank r"
        )
    else:
        change = (
            f"{conversion} split W into the residual W_res = W − s·B·A and the initial adapter B, A, and "
            "training fitted B', A' on top of W_res. On the original weights W the trained model is "
            "W + s·(B'A' − BA) = W + s·[B', −B]·[A'; A], a LoRA of rank 2r"
        )
    distance = d["distance"]
    lines = [
        f"{why}: {change}; {rank}, so the scale s = {d['scale']:g} is unchanged.",
        "How far it is from the trained model: the trained model used the NF4-quantized residual deq(Q), "
        f"this adapter on W uses W_res{' = W' if zero else ''} itself. Their difference, the residual's NF4 "
        f"error W_res − deq(Q), measures {d['residual_nf4_error']['relative_fro']:.3%} of ‖W‖ (Frobenius, "
        "all adapted matrices); the exported weights differ from the trained ones by "
        f"{distance['relative_fro']:.3%} in all (worst matrix {distance['max_matrix_relative_fro']:.3%}).",
    ]
    if d["truncation"] is not None:
        t = d["truncation"]
        lines.append(
            f"Re-truncated from rank {exact} to {t['rank']} with an SVD (--rank): that drops "
            f"{t['relative_to_delta_fro']:.3%} of ‖ΔW‖ (Frobenius {t['abs_fro']:.4g}), included in the "
            "distance above."
        )
    if report["verify"] is not None:
        v = report["verify"]
        what = "Δlogit" if v["kl_mean"] is not None else "Δhidden state"
        line = (
            f"Measured on {v['prompts']} prompts ({v['tokens']} tokens), original model + this adapter vs "
            f"the trained model: max |{what}| {v['max_abs_diff']:.4g}, mean {v['mean_abs_diff']:.4g}"
        )
        if v["kl_mean"] is not None:
            line += f", KL {v['kl_mean']:.4g} nats/token, top-1 agreement {v['top1_agreement']:.1%}"
        lines.append(line + ".")
    lines.append("For exactly the trained model, export it merged: `qpissa export RUN OUT --to merged`.")
    return "\n\n".join(lines)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def stdout_reader_left() -> bool:
    """stdout is a pipe whose reader has closed it (`| head` read enough), which poll reports as an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll on this system, or stdout is no file
        return False
