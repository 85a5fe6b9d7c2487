"""Hub model ids: resolved to the local snapshot a previous download left in the cache (offline here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qpissa import UserError, cli
from qpissa.hub import is_hub_name, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The hub cache as `snapshot_download("someone/tiny")` leaves it, with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(tiny_model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / COMMIT


def test_names_and_paths_are_told_apart() -> None:
    assert is_hub_name(Path("owner/name")) and is_hub_name(Path("alpaca"))
    assert not any(is_hub_name(Path(p)) for p in ("/abs/dir", "../dir", "a/b/c", "data.jsonl"))


def test_convert_takes_a_hub_model_id_offline(offline_cache: Path, tmp_path: Path, capsys) -> None:
    assert resolve_model(Path("someone/tiny"), "MODEL") == offline_cache
    out = tmp_path / "out"
    assert cli.main(["--quiet", "convert", "someone/tiny", str(out), "--rank", "4", "--iters", "1"]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert cli.main(["--quiet", "convert", "someone/missing", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        error.startswith("qpissa: error: MODEL someone/missing is not a local directory")
        and "HF_HUB_OFFLINE" in error
    )
    with pytest.raises(UserError, match="model someone/missing"):
        resolve_model(Path("someone/missing"), "model")


def test_a_typo_in_a_local_path_is_told_as_one(
    offline_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`demo/smolm2-135m` reads as a Hub id too; when `demo/` is a local folder, the path is the mistake."""
    (tmp_path / "demo" / "smollm2-135m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        UserError, match=r"MODEL demo/smolm2-135m does not exist \(did you mean demo/smollm2-135m"
    ):
        resolve_model(Path("demo/smolm2-135m"), "MODEL")
