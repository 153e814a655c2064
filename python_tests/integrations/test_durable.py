"""Crash-safe folder writes (zofo_kernels.integrations.durable): at every instant of a save,
the old or the new folder is complete; damage is detected; temporaries are never read."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from zofo_kernels.integrations import durable


def _write(folder, content: str, extra_bytes: int = 0):
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "a.txt").write_text(content)
    (folder / "sub" / "b.bin").write_bytes(content.encode() * 3 + b"\0" * extra_bytes)


def _content(folder):
    return (folder / "a.txt").read_text()


def test_a_sealed_folder_checks_complete_and_lists_its_files(tmp_path):
    target = tmp_path / "ckpt"
    with durable.replace_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith("ckpt" + durable.TMP_TAG)
        _write(tmp, "one")
    durable.check_complete(target)
    files = durable.recorded_files(target)
    assert sorted(files) == ["a.txt", "sub/b.bin"]
    assert files["a.txt"]["bytes"] == 3
    assert files["a.txt"]["sha256"] == durable.sha256_of(target / "a.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_replacing_swaps_in_the_new_content_whole(tmp_path):
    target = tmp_path / "ckpt"
    with durable.replace_folder(target) as tmp:
        _write(tmp, "old")
        (tmp / "only_old.txt").write_text("x")
    with durable.replace_folder(target) as tmp:
        _write(tmp, "new")
    durable.check_complete(target)
    assert _content(target) == "new"
    assert not (target / "only_old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   KeyboardInterrupt(), RuntimeError("forward failed")])
def test_an_error_while_writing_leaves_the_old_folder_untouched(tmp_path, error):
    target = tmp_path / "ckpt"
    with durable.replace_folder(target) as tmp:
        _write(tmp, "old")
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with pytest.raises(type(error)):
        with durable.replace_folder(target) as tmp:
            _write(tmp, "new")
            raise error
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    durable.check_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_recover_puts_the_old_folder_back_after_a_crash_between_the_renames(tmp_path):
    target = tmp_path / "ckpt"
    with durable.replace_folder(target) as tmp:
        _write(tmp, "old")
    # the state a kill between "old -> .zofo-old" and "tmp -> ckpt" leaves
    os.rename(target, target.with_name("ckpt" + durable.OLD_TAG))
    half = tmp_path / ("ckpt" + durable.TMP_TAG + "999-0")
    half.mkdir()
    (half / "a.txt").write_text("half")
    durable.recover(target)
    assert _content(target) == "old"
    durable.check_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_recover_after_the_swap_removes_the_leftover_old_folder(tmp_path):
    target = tmp_path / "ckpt"
    with durable.replace_folder(target) as tmp:
        _write(tmp, "new")
    leftover = target.with_name("ckpt" + durable.OLD_TAG)
    leftover.mkdir()
    (leftover / "a.txt").write_text("old")
    durable.recover(target)
    assert _content(target) == "new" and not leftover.exists()


@pytest.mark.parametrize("damage, message", [
    ("no_record", "has no zofo_complete.json"),
    ("truncated", "bytes"),
    ("flipped", "sha256"),
    ("missing", "missing"),
    ("outside", "outside the folder"),
    ("garbage_record", "unreadable"),
])
def test_damage_is_detected(tmp_path, damage, message):
    target = tmp_path / "ckpt"
    with durable.replace_folder(target) as tmp:
        _write(tmp, "content", extra_bytes=100)
    record = target / durable.COMPLETE
    blob = target / "sub" / "b.bin"
    if damage == "no_record":
        record.unlink()
    elif damage == "truncated":
        blob.write_bytes(blob.read_bytes()[:-1])
    elif damage == "flipped":
        data = bytearray(blob.read_bytes())
        data[5] ^= 1
        blob.write_bytes(bytes(data))
    elif damage == "missing":
        blob.unlink()
    elif damage == "outside":
        rec = json.loads(record.read_text())
        rec["files"]["../elsewhere.txt"] = {"bytes": 0, "sha256": ""}
        record.write_text(json.dumps(rec))
    elif damage == "garbage_record":
        record.write_text("{not json")
    with pytest.raises(durable.IncompleteFolderError, match=message):
        durable.check_complete(target)


# the writer loads durable.py by path (it needs the standard library only), so that a
# process starts in milliseconds instead of importing torch with the package
_WRITER = r"""
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("durable", sys.argv[3])
durable = importlib.util.module_from_spec(spec)
spec.loader.exec_module(durable)
target, label = Path(sys.argv[1]), sys.argv[2]
print("ready", flush=True)
with durable.replace_folder(target) as tmp:
    for i in range(40):   # many small files, slowly: a kill lands in the middle of writing
        (tmp / f"part{i:02d}.txt").write_text(label * 1000)
        time.sleep(0.01)
print("sealed", flush=True)
"""


def test_sigkill_at_any_moment_leaves_a_complete_folder(tmp_path):
    target = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-c", _WRITER, str(target), "o", durable.__file__], check=True, timeout=120)
    seen = []
    for delay in (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), "n", durable.__file__],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)  # a moment into the write (about 0.4 s of files, then the seal)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        durable.recover(target)
        durable.check_complete(target)
        labels = {p.read_text()[0] for p in target.glob("part*.txt")}
        assert len(labels) == 1 and len(list(target.glob("part*.txt"))) == 40, labels
        seen.append(labels.pop())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert seen[0] == "o", seen  # killed at once: the old folder is what is left
    subprocess.run([sys.executable, "-c", _WRITER, str(target), "n", durable.__file__], check=True, timeout=120,
                   capture_output=True)
    durable.check_complete(target)
    assert {p.read_text()[0] for p in target.glob("part*.txt")} == {"n"}
