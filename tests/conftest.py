"""Shared fixtures: tiny random models for unit tests, the real demo model for integration tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpissa.models import make_tiny_model
from qpissa.nf4 import cpu_decodes_by_rows


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--integration", action="store_true", help="also run tests on the real demo model")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("misdecoding_cpu" in item.keywords for item in items) and not cpu_decodes_by_rows(64, 128):
        skip = pytest.mark.skip(reason="bitsandbytes decodes 64-wide NF4 blocks of 128 right on this CPU")
        for item in items:
            if "misdecoding_cpu" in item.keywords:
                item.add_marker(skip)
    if config.getoption("--integration"):
        return
    skip = pytest.mark.skip(reason="uses the demo model; run with --integration")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


def save_char_tokenizer(out_dir: Path) -> None:
    """A real character-level tokenizer with a ChatML chat template (vocab 256: pad 0, bos 1, eos 2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<pad>",
        "<s>",
        "<|im_end|>",
        "<|im_start|>",
        "<unk>",
    ]  # ids 0, 1, 2 match the model's pad/bos/eos
    characters = ["\n"] + [chr(code) for code in range(32, 127)]
    vocab = {token: index for index, token in enumerate(specials + characters)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=["<|im_start|>"], chat_template=template,
    )  # fmt: skip
    tokenizer.save_pretrained(out_dir)


@pytest.fixture(scope="session")
def char_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only `save_char_tokenizer`'s files, to copy beside any tiny model."""
    out_dir = tmp_path_factory.mktemp("char_tokenizer")
    save_char_tokenizer(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random Llama checkpoint (bf16 safetensors, tied embeddings)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a HF checkpoint, fetched once per session (or from QPISSA_DEMO_MODEL)."""
    import os

    from qpissa.models import fetch_demo_model

    cached = os.environ.get("QPISSA_DEMO_MODEL")
    target = Path(cached) if cached else tmp_path_factory.mktemp("demo") / "smollm2-135m"
    return fetch_demo_model("smollm2-135m", target)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama plus a real character-level tokenizer with a ChatML chat template (vocab 256)."""
    out_dir = make_tiny_model(tmp_path_factory.mktemp("tiny_chat") / "model")
    save_char_tokenizer(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def qpissa_dir(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_chat_model` converted with QPiSSA (r=4, T=1); tests only read it."""
    from qpissa.cli import main

    out = tmp_path_factory.mktemp("converted") / "qpissa"
    assert main(["--quiet", "convert", str(tiny_chat_model), str(out), "--rank", "4", "--iters", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.jsonl and eval.jsonl of a tiny prompt_completion task (16 records each)."""
    out = tmp_path_factory.mktemp("data")
    for name, offset in (("train", 0), ("eval", 100)):
        records = [{"completion": f" {(i + offset) % 10}", "prompt": f"{i + offset}%10="} for i in range(16)]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


@pytest.fixture
def load_eval():
    """What train does with its eval_path: `load_eval(path, data_config, tokenizer)` -> the held-out
    records' rendered samples and their tokenized rows."""
    from qpissa.data import tokenize_split  # transformers and datasets: only for the tests that use it
    from qpissa.data_sources import load_heldout

    def load(path: Path, config, tokenizer) -> tuple:
        records, data_format, _ = load_heldout(path, None, config.eval_format(), "data.eval_split")
        return tokenize_split(records, data_format, config, tokenizer)

    return load


@pytest.fixture(scope="session")
def moved_run():
    """Make a run of a QPiSSA directory whose adapter moved away from the converted one (B shifted by
    0.05·noise): what an export takes from training, without training."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from qpissa.artifacts import RUN_MARKER

    def make(qpissa_dir: Path, run: Path) -> Path:
        shutil.copytree(qpissa_dir / "adapter", run / "adapter")
        (run / RUN_MARKER).write_text(json.dumps({"model": str(qpissa_dir)}))
        weights = run / "adapter" / "adapter_model.safetensors"
        generator = torch.Generator().manual_seed(0)
        tensors = {
            name: t + 0.05 * torch.randn(t.shape, generator=generator) if "lora_B" in name else t
            for name, t in load_file(weights).items()
        }
        save_file(tensors, weights)
        return run

    return make
