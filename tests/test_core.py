"""The pieces under `convert`: streaming safetensors writer, truncated SVD, methods, settings parsing."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qpissa import UserError
from qpissa.checkpoint import SafetensorsWriter, ShardedWriter
from qpissa.convert_settings import Method, SvdKind
from qpissa.methods import DecomposeSettings, decompose
from qpissa.options import apply_overrides, from_dict
from qpissa.recipe_file import load_config
from qpissa.settings import DataFormat
from qpissa.svd import truncated_svd


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "buffered"])
def test_streamed_safetensors_load_with_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool
) -> None:
    if not kernel_copy:  # a kernel or file system without copy_file_range: the buffered copy does it all

        def unsupported(*args: object) -> int:
            raise OSError("copy_file_range not supported")

        monkeypatch.setattr("os.copy_file_range", unsupported, raising=False)
    tensors = {
        "odd_bytes": torch.arange(7, dtype=torch.uint8),
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32": torch.randn(4, 2),
        "i64": torch.arange(3),
        "scalar": torch.tensor(1.5),
    }
    writer = SafetensorsWriter(tmp_path / "x.safetensors")
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.close(metadata={"note": "test"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "test"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"], "spools and temp file removed"


def test_sharded_writer_splits_and_indexes(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, limit=1000)
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each: two per shard
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    names = writer.close()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "t0": names[0],
        "t1": names[0],
        "t2": names[1],
        "t3": names[1],
        "t4": names[2],
    }
    for name, tensor in tensors.items():
        assert torch.equal(load_file(tmp_path / index["weight_map"][name])[name], tensor)


@pytest.mark.parametrize("sketch_dtype", [torch.float32, torch.bfloat16])
def test_randomized_svd_finds_the_top_subspace_and_is_seeded(sketch_dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(200, 200, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(120, 120, generator=generator))
    S = torch.logspace(1, -3, 120)
    M = U[:, :120] @ torch.diag(S) @ V.T  # [200, 120] with a known spectrum

    def run(seed: int):
        generator = torch.Generator().manual_seed(seed)
        return truncated_svd(M, 10, SvdKind.RANDOMIZED, generator=generator, sketch_dtype=sketch_dtype)

    first, again = run(1), run(1)
    assert torch.equal(first.S, again.S) and torch.equal(first.Vh, again.Vh)
    assert first.U.dtype == first.S.dtype == first.Vh.dtype == torch.float32
    assert torch.allclose(first.S, S[:10], rtol=1e-4)
    exact = truncated_svd(M, 10, SvdKind.EXACT)
    approximation = first.U @ torch.diag(first.S) @ first.Vh
    best = exact.U @ torch.diag(exact.S) @ exact.Vh
    # as close to the best rank-10 approximation as the exact SVD, whatever the sketch's precision
    assert (M - approximation).norm() <= (M - best).norm() * (1 + 1e-4)
    if sketch_dtype == torch.float32:
        assert ((approximation - best).norm() / best.norm()).item() < 1e-3
    assert first.basis.shape == (120, 26)


def test_warm_start_from_a_nearby_matrix_needs_no_power_iterations() -> None:
    generator = torch.Generator().manual_seed(0)
    M = torch.randn(300, 100, generator=generator) @ torch.diag(torch.logspace(0, -2, 100))
    previous = truncated_svd(M, 8, SvdKind.RANDOMIZED, power_iters=4, generator=generator)
    nearby = M + 1e-4 * torch.randn(300, 100, generator=generator)
    warm = truncated_svd(nearby, 8, SvdKind.RANDOMIZED, power_iters=0, start=previous.basis)
    exact = truncated_svd(nearby, 8, SvdKind.EXACT)
    assert torch.allclose(warm.S, exact.S, rtol=1e-3)


@pytest.mark.parametrize("true_rank", [0, 3])
def test_randomized_svd_of_a_rank_deficient_matrix_is_exact_and_finite(true_rank: int) -> None:
    """Zero or low-rank weights (e.g. zero-initialized layers) must not produce NaN adapters."""
    generator = torch.Generator().manual_seed(0)
    M = torch.randn(64, true_rank, generator=generator) @ torch.randn(true_rank, 48, generator=generator)
    svd = truncated_svd(M, 8, SvdKind.RANDOMIZED, generator=generator)
    assert all(torch.isfinite(t).all() for t in (svd.U, svd.S, svd.Vh, svd.basis))
    assert torch.allclose(svd.U @ torch.diag(svd.S) @ svd.Vh, M, atol=1e-4)
    assert (svd.S[true_rank:] < 1e-4).all()


@pytest.mark.parametrize("method", list(Method))
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_principal_part_plus_residual_is_the_weight(method: Method, scale: float) -> None:
    """deq(Q) + s·B·A approximates W; QPiSSA's adapter carries the principal part at any scale s.

    QPiSSA and LoftQ promise a starting point closer to W than plain NF4 of W, thanks to the adapter:
    the residual alone (a missing or zero adapter) must not pass. QLoRA starts exactly at plain NF4."""
    from qpissa.nf4 import quantize_nf4

    W = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    settings = DecomposeSettings(
        method=method, rank=8, scale=scale, iters=2, svd=SvdKind.EXACT, oversample=8, power_iters=2,
        warm_power_iters=1, svd_dtype=torch.float32, sketch_dtype=torch.float32, blocksize=64,
        double_quant=False,
    )  # fmt: skip
    result = decompose(W, settings, torch.Generator().manual_seed(0))
    assert result.A.shape == (8, 64) and result.B.shape == (96, 8)
    approximation = result.q.dequantize() + scale * result.B @ result.A
    relative_error = ((W - approximation).norm() / W.norm()).item()
    residual_alone = ((W - result.q.dequantize()).norm() / W.norm()).item()
    plain_nf4 = ((W - quantize_nf4(W, 64, False).dequantize()).norm() / W.norm()).item()
    if method is Method.QLORA:  # B = 0: the model starts as plain NF4 of W, whatever A is
        assert torch.count_nonzero(result.B) == 0 and torch.count_nonzero(result.A) > 0
        assert relative_error == residual_alone == plain_nf4
    else:  # measured: 0.72 (QPiSSA) and 0.76 (LoftQ) of plain NF4's error; the residual alone is worse
        assert relative_error < 0.85 * plain_nf4, (relative_error, plain_nf4)
        assert relative_error < 0.85 * residual_alone, (relative_error, residual_alone)
    if method is Method.QPISSA:
        principal = truncated_svd(W, 8, SvdKind.EXACT)
        top = principal.U @ torch.diag(principal.S) @ principal.Vh
        assert ((scale * result.B @ result.A - top).norm() / top.norm()).item() < 0.2


@dataclass
class _Inner:
    size: int = field(default=4, metadata={"help": "inner size"})


@dataclass
class _Outer:
    name: str = field(default="a", metadata={"help": "name"})
    ratio: float = field(default=0.5, metadata={"help": "ratio"})
    method: Method = field(default=Method.QPISSA, metadata={"help": "method"})
    inner: _Inner = field(default_factory=_Inner, metadata={"help": "group"})


def test_settings_from_data_with_overrides() -> None:
    values = apply_overrides({"name": "x", "inner": {"size": 2}}, ["inner.size=8", "ratio=1", "method=loftq"])
    settings = from_dict(_Outer, values)
    assert settings == _Outer(name="x", ratio=1.0, method=Method.LOFTQ, inner=_Inner(size=8))


def test_overrides_reach_an_entry_of_a_recipe_list(tmp_path: Path) -> None:
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        "model: m\noutput_dir: run\n"
        "data:\n  sources:\n    - {path: a.jsonl}\n    - {path: b.jsonl, samples: 10}\n"
    )
    config = load_config(recipe, ["data.sources.1.samples=500", "--data.sources.0.format", "alpaca"])
    assert [(s.path, s.format, s.samples) for s in config.data.sources] == [
        (Path("a.jsonl"), DataFormat.ALPACA, None),
        (Path("b.jsonl"), None, 500),
    ]
    for wrong in ("data.sources.2.samples=1", "data.sources.last.samples=1"):
        with pytest.raises(
            UserError, match=r"`data.sources` is a list of 2; name an entry by its index, 0 to 1"
        ):
            load_config(recipe, [wrong])
    single = tmp_path / "single.yaml"
    single.write_text("model: m\noutput_dir: run\ndata:\n  path: a.jsonl\n")
    with pytest.raises(UserError, match=r"the recipe has no list `data\.sources`; add its entries"):
        load_config(single, ["data.sources.1.samples=5"])


def test_settings_errors_name_every_bad_key() -> None:
    with pytest.raises(UserError) as error:
        from_dict(_Outer, {"nmae": "x", "ratio": "high", "method": "pissa", "inner": {"size": "big"}})
    message = str(error.value)
    for expected in ("`nmae`", "`ratio`", "`method`", "`inner.size`"):
        assert expected in message


@pytest.mark.parametrize("chunk_values", [1 << 22, 4096])  # one chunk, or many (as for large matrices)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_fast_nf4_codes_are_byte_identical_to_bitsandbytes(
    double_quant: bool, blocksize: int, chunk_values: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bitsandbytes.functional as bnbf

    from qpissa import nf4
    from qpissa.nf4 import quantize_nf4

    monkeypatch.setattr(nf4, "_CHUNK_VALUES", chunk_values)

    generator = torch.Generator().manual_seed(blocksize)
    levels = bnbf.get_4bit_type("nf4", device="cpu")
    midpoints = (levels[:-1] + levels[1:]) / 2
    edge_block = torch.cat(
        [midpoints, -midpoints, levels, torch.nextafter(midpoints, torch.ones(15)), levels[:3]]
    )
    W = torch.cat([
        torch.randn(96, 256, generator=generator) * 0.02,
        torch.randn(32, 256, generator=generator).pow(3),  # heavy tails
        torch.zeros(2, 256),  # all-zero blocks
        edge_block.repeat(8, 1).reshape(2, 256),  # values exactly on the decision boundaries
    ])  # fmt: skip
    ours = quantize_nf4(W, blocksize, double_quant)
    packed, state = bnbf.quantize_4bit(
        W, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
    )
    assert torch.equal(ours.packed, packed)
    for key, value in state.as_dict(packed=True).items():
        assert torch.equal(ours.state.as_dict(packed=True)[key], value), key
    assert torch.equal(ours.dequantize(), bnbf.dequantize_4bit(packed, state))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_rss_is_the_process_own_not_its_parents() -> None:
    """Reported memory must be the program's own: Linux's ru_maxrss starts a child at its parent's peak."""
    ballast = bytearray(512 << 20)
    ballast[:: 1 << 12] = b"\x01" * (len(ballast) >> 12)  # touch every page: this process is now > 512 MB
    code = "from qpissa.memory import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(child.stdout) < 200
