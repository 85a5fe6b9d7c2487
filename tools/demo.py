"""The demo: QPiSSA vs QLoRA on SmolLM2-135M-Instruct, end to end on a CPU in a few minutes.

1. fetch the embedded demo model as a standard HF checkpoint (cached after the first run);
2. convert it with QPiSSA (r=64, T=5) and with plain QLoRA, through the same converter;
3. load the QPiSSA result with plain transformers + PEFT (no qpissa import needed) and chat;
4. print the per-module-type quantization error, QLoRA vs QPiSSA.

    python tools/demo.py --workdir demo
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from qpissa import UserError, hide_library_deprecation_notes, hide_library_progress_bars

PROMPT = "In one sentence: why does quantizing a neural network lose accuracy?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo"), help="where models and outputs go")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    hide_library_deprecation_notes()  # as the CLI does: notes users can do nothing about
    if not sys.stderr.isatty():  # as the CLI does: a log gets no bars; tqdm reads this at its import
        hide_library_progress_bars()
    import transformers

    from qpissa.console import summary_table
    from qpissa.convert import convert
    from qpissa.convert_settings import ConvertSettings, Method
    from qpissa.models import fetch_demo_model

    model_dir = fetch_demo_model("smollm2-135m", args.workdir / "smollm2-135m")
    print(f"original model: {model_dir}")
    # from here on the output is ours: no loading bars or library deprecation notices
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    reports = {}
    for method in (Method.QLORA, Method.QPISSA):
        iters = None if method is Method.QLORA else args.iters
        settings = ConvertSettings(method=method, rank=args.rank, iters=iters)
        out = args.workdir / f"{method.value}-r{args.rank}"
        reports[method] = convert(model_dir, out, settings, resume=True)
        print(f"{method.value}: {out} ({reports[method]['summary']['total_seconds']:.0f} s)")

    print(f"\nQPiSSA model (4-bit residual + adapter) answering: {PROMPT!r}")
    print(chat_once(args.workdir / f"qpissa-r{args.rank}", PROMPT))
    # the QLoRA column is ‖W − deq(nf4(W))‖: the error of the QLoRA conversion above
    print("\nQuantization error per module type (Frobenius, mean over layers), QLoRA vs QPiSSA")
    print(summary_table(reports[Method.QPISSA]))
    print(
        "\nNext, fine-tune it (README, Commands), after `. .venv/bin/activate`:\n"
        "    python tools/make_task_data.py demo/task\n"
        f"    qpissa train configs/demo.yaml model={args.workdir / f'qpissa-r{args.rank}'}"
    )


def chat_once(qpissa_dir: Path, prompt: str) -> str:
    """Greedy answer from the converted model, loaded the way any transformers + PEFT user would."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qpissa_dir)
    base = AutoModelForCausalLM.from_pretrained(qpissa_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, qpissa_dir / "adapter")
    messages = [{"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=60, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # one line, as the CLI says a user's mistake (a full disk, a damaged model)
        print(f"qpissa: error: {error}", file=sys.stderr)
        sys.exit(2)
