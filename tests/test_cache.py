"""cache.cached_folder / write_table: an output appears whole under its key, or not at all."""

from __future__ import annotations

import pandas as pd
import pytest

from defectflow.tasks.cache import Ref, cached_folder, write_table


def test_a_folder_is_renamed_into_place_when_complete(tmp_path):
    with cached_folder(tmp_path, "models", "k1") as out:
        assert out.missing and out.partial.is_dir() and not out.path.exists()
        (out.partial / "a.txt").write_text("a")
    assert out.ref == Ref(str(tmp_path / "models" / "k1"), "k1")
    assert (tmp_path / "models" / "k1" / "a.txt").read_text() == "a"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["k1"]

    with cached_folder(tmp_path, "models", "k1") as again:  # found: nothing to write
        assert not again.missing and not again.partial.exists()
    assert again.ref == out.ref


def test_a_failed_write_leaves_nothing_and_a_finished_twin_is_kept(tmp_path):
    with pytest.raises(RuntimeError):
        with cached_folder(tmp_path, "scores", "k2") as out:
            (out.partial / "half.npy").write_text("x")
            raise RuntimeError("interrupted")
    assert list((tmp_path / "scores").iterdir()) == []

    with cached_folder(tmp_path, "scores", "k3") as out:
        (out.partial / "ours.txt").write_text("ours")
        out.path.mkdir()  # another process finished the same key meanwhile
        (out.path / "theirs.txt").write_text("theirs")
    assert [p.name for p in (tmp_path / "scores").iterdir()] == ["k3"]
    assert [p.name for p in out.path.iterdir()] == ["theirs.txt"]


def test_write_table_replaces_the_file_whole(tmp_path):
    path = tmp_path / "t.parquet"
    write_table(pd.DataFrame({"a": [1, 2]}), path)
    write_table(pd.DataFrame({"a": [3]}), path)
    assert pd.read_parquet(path)["a"].tolist() == [3]
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]
