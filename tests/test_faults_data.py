"""Fault injection on the data side: a deleted cache heals, a killed run's partial outputs go,
a decompression bomb or any decoder error is a counted skip (scan) or a quarantine (inbox),
a full disk is one line, masks that are not 0/255 are warned about, an image sent twice is
counted, and an empty training folder is named."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import make_folder_dataset, prepared_product, textured_image
from defectflow.cli import main
from defectflow.tasks.errors import DefectflowError
from test_flow import write_params
from test_score_inbox import MODEL, registered  # noqa: F401 - registered: a fixture


def step_status(out: str) -> dict[str, str]:
    """Step label -> ran/cached, from the step lines a verbose run prints."""
    # "  <label>   ran|cached   <seconds> s[  (waited <seconds> s)]"
    found = (re.match(r"\s+(.+?)\s+(ran|cached)\s+[\d.]+ s(\s+\(waited [\d.]+ s\))?$", line)
             for line in out.splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def before_this_process(*paths: Path) -> None:
    """Date files back an hour: written by a run that ended before this one started."""
    old = time.time() - 3600
    for path in paths:
        os.utime(path, (old, old))


def png_bomb(path: Path, side: int = 33000) -> Path:
    """A valid grayscale PNG of side x side zero pixels: about 1 MB on disk, 1 GB decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


# -- 1. a cache that heals ------------------------------------------------------------------
def test_deleted_cache_recomputes_and_a_killed_runs_partial_is_removed(registered, capsys):
    tmp, _ = registered
    params, cache = tmp / "params.yaml", tmp / "cache"
    capsys.readouterr()

    # The whole cache folder deleted: Prefect still remembers every step's result.
    shutil.rmtree(cache)
    assert main(["run", str(params)]) == 0
    status = step_status(capsys.readouterr().out)
    assert status["features [product]"] == "ran" and status["train [product / patchcore]"] == "ran"
    assert len(list((cache / "features").iterdir())) == 1

    # Only the feature store deleted: features are computed again, the rest is reused.
    store = next((cache / "features").iterdir())
    shutil.rmtree(store)
    # A killed run's half-written output beside it (pid 2**22 + 1 is above Linux's pid_max).
    dead = cache / "features" / f"{store.name}.partial-{2**22 + 1}"
    dead.mkdir()
    (dead / "blocks.2.npy").write_bytes(b"half")
    before_this_process(dead / "blocks.2.npy", dead)
    assert main(["run", str(params)]) == 0
    status = step_status(capsys.readouterr().out)
    assert status["features [product]"] == "ran"
    assert status["train [product / patchcore]"] == "cached"
    assert store.is_dir() and sorted(p.name for p in store.iterdir()) == [
        "blocks.2.npy", "blocks.4.npy", "meta.json", "patches.parquet"]
    assert not dead.exists()

    # One file of the store deleted: the store says it is gone, and is made again whole.
    (store / "blocks.4.npy").unlink()
    assert main(["run", str(params)]) == 0
    assert step_status(capsys.readouterr().out)["features [product]"] == "ran"
    assert (store / "blocks.4.npy").is_file()


def test_every_reference_a_step_returns_tells_whether_its_files_exist(tmp_path):
    from defectflow.tasks.cache import Ref
    from defectflow.tasks.features import FeatureStoreRef
    from defectflow.tasks.steps import ScanRefs

    (tmp_path / "features" / "k").mkdir(parents=True)
    store = FeatureStoreRef("k", str(tmp_path / "features" / "k"), ("blocks.2",), 3)
    for name in ("meta.json", "patches.parquet", "blocks.2.npy"):
        (tmp_path / "features" / "k" / name).write_text("x")
    assert store.exists()
    (tmp_path / "features" / "k" / "blocks.2.npy").unlink()
    assert not store.exists()

    # A scan's manifest pointing at images the scan wrote into the cache (elpv's PNGs).
    image = tmp_path / "datasets" / "elpv" / "mono" / "0.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"png")
    (tmp_path / "manifests").mkdir()
    pd.DataFrame({"path": [str(image), "/elsewhere/a.png"], "mask_path": [None, None]}
                 ).to_parquet(tmp_path / "manifests" / "m.parquet")
    (tmp_path / "tables").mkdir()
    pd.DataFrame({"n": [1]}).to_parquet(tmp_path / "tables" / "c.parquet")
    scan = ScanRefs(Ref(str(tmp_path / "manifests" / "m.parquet"), "m"),
                    Ref(str(tmp_path / "tables" / "c.parquet"), "m"))
    assert scan.exists()
    image.unlink()
    assert not scan.exists()


def test_a_step_whose_input_files_are_gone_has_its_input_made_again(tmp_path):
    """Files deleted between two steps: the step that made them runs again first."""
    from prefect import flow, task
    from prefect.cache_policies import INPUTS, TASK_SOURCE

    from defectflow.flows.steplog import StepLog
    from defectflow.tasks.cache import Ref

    calls = []

    @task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
    def make(folder: str) -> Ref:
        calls.append("make")
        path = Path(folder) / "made.txt"
        path.write_text("made")
        return Ref(str(path), "made")

    @task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
    def use(ref: Ref) -> str:
        return Path(ref.path).read_text()

    @flow
    def two_steps(folder: str) -> str:
        log = StepLog(verbose=False)
        made = log.run("make", make, folder)
        Path(made.path).unlink()  # gone before the next step is submitted
        return log.run("use", use, made)

    assert two_steps(str(tmp_path)) == "made"
    assert calls == ["make", "make"]


def _sleeper_making_partial(folder: Path) -> subprocess.Popen:
    """A process that writes ``folder/out.partial-<its pid>`` and keeps running."""
    code = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        partial = Path({str(folder)!r}) / f"out.partial-{{os.getpid()}}"
        partial.mkdir()
        (partial / "half.npy").write_bytes(b"half")
        print("ready", flush=True)
        time.sleep(120)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_partials_of_killed_processes_go_those_of_running_ones_stay(tmp_path):
    from defectflow.tasks.cache import remove_stale_partials

    cache = tmp_path / "cache"
    folder = cache / "models"
    folder.mkdir(parents=True)
    killed = _sleeper_making_partial(folder)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    dead = folder / f"out.partial-{killed.pid}"
    png = cache / "datasets" / f".0.png.{killed.pid}.partial"
    png.parent.mkdir()
    png.write_bytes(b"half a png")
    running = _sleeper_making_partial(folder)
    try:
        alive = folder / f"out.partial-{running.pid}"
        # A file partial whose pid now belongs to a process started after it was written.
        reused = folder / f"t.parquet.partial-{running.pid}"
        reused.write_bytes(b"old")
        before_this_process(reused)
        ours = folder / f"out.partial-{os.getpid()}"
        ours.mkdir()
        before_this_process(ours)
        # Start times are good to a second: the next run starts well after the kill.
        time.sleep(2.5)
        # Written since this process started (say by a writer on another machine sharing
        # the cache, whose pid means nothing here): kept, and so is this process's own.
        assert remove_stale_partials(cache) == [reused]
        assert dead.is_dir() and png.is_file() and ours.is_dir()

        # The next run, started after the kill: the killed writer's partials go.
        code = ("import sys; from defectflow.tasks.cache import remove_stale_partials; "
                "print('\\n'.join(map(str, remove_stale_partials(sys.argv[1]))))")
        cleaned = subprocess.run([sys.executable, "-c", code, str(cache)], capture_output=True,
                                 text=True, timeout=120, check=True)
        assert sorted(cleaned.stdout.split()) == sorted([str(dead), str(png), str(ours)])
        assert sorted(p.name for p in folder.iterdir()) == [alive.name]
    finally:
        running.kill()
        running.wait()


# -- 2. images bounded before they are decoded ------------------------------------------------
def test_a_decompression_bomb_and_any_decoder_error_are_counted_skips(tmp_path, bomb,
                                                                       monkeypatch):
    from defectflow.tasks import datasets

    data = make_folder_dataset(tmp_path / "product", n_good=6, n_bad=2)
    shutil.copy(bomb, data / "good" / "g100.png")
    odd = data / "good" / "g101.png"
    cv2.imwrite(str(odd), textured_image(np.random.default_rng(1)))
    odd_size = odd.stat().st_size
    decode = cv2.imdecode

    def exploding(buffer, flags):  # a decoder that fails with an unexpected exception type
        if buffer.size == odd_size:
            raise MemoryError("decoder ran out of memory")
        return decode(buffer, flags)

    monkeypatch.setattr(cv2, "imdecode", exploding)
    with pytest.warns(UserWarning, match="g100.png") as warned:
        result = datasets.scan_dataset("folder", data)
    assert len(result.manifest) == 8
    reasons = dict(result.skipped)
    assert "33000x33000 pixels is over the limit" in reasons[str(data / "good" / "g100.png")]
    assert "MemoryError" in reasons[str(odd)]
    assert any("g101.png" in str(w.message) for w in warned)

    # The limit is a setting: 64x64 images pass a limit of 4096 pixels, a 65x64 one does not.
    cv2.imwrite(str(data / "good" / "g102.png"), np.zeros((64, 65, 3), np.uint8))
    with pytest.warns(UserWarning, match="g102.png"):
        small = datasets.scan_dataset("folder", data, max_image_pixels=64 * 64)
    assert "65x64 pixels is over the limit of 4096" in dict(small.skipped)[
        str(data / "good" / "g102.png")]
    assert len(small.manifest) == 8


def test_max_image_pixels_is_a_checked_setting(tmp_path, capsys):
    from defectflow.tasks.params import load_params

    data = make_folder_dataset(tmp_path / "product", n_good=4, n_bad=1)
    params = write_params(tmp_path, data)
    assert load_params(params).dataset.max_image_pixels == 2**28
    assert main(["run", str(params), "--set", "dataset.max_image_pixels=2147483648"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset.max_image_pixels" in err[0]


def test_a_bomb_in_the_inbox_is_quarantined_and_the_images_beside_it_are_scored(
        registered, bomb, tmp_path, capsys):
    _, uri = registered
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    rng = np.random.default_rng(5)
    for name in ("a.png", "c.png"):
        cv2.imwrite(str(inbox / name), textured_image(rng))
    shutil.copy(bomb, inbox / "b.png")
    argv = ["score", "--model", f"{MODEL}@champion", "--inbox", str(inbox), "--out", str(out),
            "--tracking-uri", uri]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "scored 2" in printed and "quarantined 1" in printed
    assert sorted(pd.read_csv(out / "results.csv")["image"]) == ["a.png", "c.png"]
    reason = (inbox / "quarantine" / "b.png.reason.txt").read_text()
    assert "33000x33000 pixels is over the limit" in reason

    # The next batch goes on.
    cv2.imwrite(str(inbox / "d.png"), textured_image(rng))
    assert main(argv) == 0
    assert "scored 1" in capsys.readouterr().out
    assert sorted(pd.read_csv(out / "results.csv")["image"]) == ["a.png", "c.png", "d.png"]

    # The same image sent again (same name and content): counted, moved, no second row.
    shutil.copy(inbox / "done" / "a.png", inbox / "a.png")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 sent again" in printed
    assert len(pd.read_csv(out / "results.csv")) == 3
    assert (inbox / "done" / "a-1.png").is_file() and not (inbox / "a.png").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("defectflow-scoring").experiment_id],
                              order_by=["attributes.start_time DESC"])
    assert runs[0].data.metrics["n_duplicates"] == 1
    assert "duplicates.csv" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}


def test_an_image_the_scorer_refuses_is_quarantined_alone(tmp_path):
    """A chunk that fails on one image's input: the others are scored, that one quarantined."""
    from defectflow.tasks.serving.inbox import score_inbox

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a.png", "b.png", "c.png"):
        cv2.imwrite(str(inbox / name), textured_image(rng))

    def scorer(paths):
        for path in paths:
            if path.endswith("b.png"):
                raise DefectflowError("no patch left after filtering", path)
        return pd.DataFrame({"score": [0.5] * len(paths), "threshold": 1.0,
                             "verdict": "good", "anomaly_map": [np.zeros((64, 64))] * len(paths)})

    batch = score_inbox(inbox, tmp_path / "out", scorer, "m", "1")
    assert sorted(r["image"] for r in batch.rows) == ["a.png", "c.png"]
    assert [q["image"] for q in batch.quarantined] == ["b.png"]
    assert "no patch left" in (inbox / "quarantine" / "b.png.reason.txt").read_text()


# -- 3. a full disk ---------------------------------------------------------------------------
def test_no_space_while_extracting_features_is_one_error_and_leaves_nothing(tmp_path,
                                                                           monkeypatch):
    from defectflow.tasks.feature_settings import FeatureSettings
    from defectflow.tasks.features import extract_features

    manifest, patches, _, stats = prepared_product(tmp_path / "product", n_good=4, n_bad=1)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    cache = tmp_path / "cache"
    with pytest.raises(DefectflowError, match="no space left on device") as raised:
        extract_features(patches, manifest, FeatureSettings(input_size=32), mean=stats["mean"],
                         std=stats["std"], cache_dir=cache, progress=False)
    assert str(cache / "features") in str(raised.value)
    assert list((cache / "features").iterdir()) == []  # neither a store nor a partial


def test_no_space_writing_a_table_leaves_nothing(tmp_path, monkeypatch):
    from defectflow.tasks.cache import write_table

    def full(self, path, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError("IOError: No space left on device")  # as pyarrow words it

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    with pytest.raises(DefectflowError, match="no space left on device"):
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []


def test_a_full_tmpfs_is_an_error_not_a_sigbus(tmp_path):
    """On a real 1 MiB file system, a 4 MiB feature array: one error, the process lives."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        code = textwrap.dedent(f"""
            import numpy as np
            from defectflow.tasks.cache import allocated_memmap, cached_folder
            from defectflow.tasks.errors import DefectflowError
            try:
                with cached_folder({str(mount)!r}, "features", "k") as out:
                    array = allocated_memmap(out.partial / "blocks.2.npy", np.float16,
                                             (2048, 1024))
                    array[:] = 1
                    array.flush()
            except DefectflowError as error:
                print("error:", error)
        """)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr  # -7 (SIGBUS) before the reservation
        assert "no space left on device" in result.stdout
        assert list((mount / "features").iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# -- 4. smaller faults ------------------------------------------------------------------------
def test_a_mask_of_other_values_than_0_and_255_is_warned_about_and_binarized(tmp_path):
    from defectflow.tasks import datasets
    from defectflow.tasks.images import read_mask

    data = make_folder_dataset(tmp_path / "product", n_good=4, n_bad=2)
    mask_path = data / "masks" / "blob" / "b001.png"
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(mask_path), (mask > 0).astype(np.uint8))  # a 0/1 mask
    with pytest.warns(UserWarning, match=r"b001.png: mask has values other than 0 and 255 \(1\)"):
        manifest = datasets.scan_dataset("folder", data).manifest
    assert manifest.set_index("image_id").loc["product/blob/b001", "label"] == 1
    assert (read_mask(mask_path) == (mask > 0)).all()


def test_an_empty_training_folder_names_the_category_and_the_folder(tmp_path, capsys):
    data = make_folder_dataset(tmp_path / "product", n_good=4, n_bad=3)
    for image in (data / "good").iterdir():
        image.unlink()
    params = write_params(tmp_path, data)
    assert main(["run", str(params), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'product'" in err[0] and str(data) in err[0]
    assert "no good image to train on" in err[0]
