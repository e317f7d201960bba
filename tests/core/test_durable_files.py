"""Files replaced whole or not at all: the old file and no leftovers on a full disk, and the
system calls in the order a power cut needs (data fsync'ed, then the rename, then the folder).

A power cut cannot be staged in a test: strace shows the order of the calls instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, fill_disk

from ingest_core.durable_files import replace_file


def test_a_full_disk_leaves_the_old_file_and_no_temporary_one(small_disk: Path) -> None:
    final = small_disk / "pool.txt"
    replace_file(final, [b"old\r\n"], small_disk / ".tmp-1")
    filler = fill_disk(small_disk)
    with pytest.raises(OSError):
        replace_file(final, [b"x" * 65536] * 4, small_disk / ".tmp-2")
    assert final.read_bytes() == b"old\r\n"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler.bin", "pool.txt"]
    filler.unlink()
    replace_file(final, [b"new\r\n"], small_disk / ".tmp-3", mode=0o600)
    assert final.read_bytes() == b"new\r\n"
    assert final.stat().st_mode & 0o777 == 0o600


SCRIPT = """
import sys
from pathlib import Path
from ingest_core.durable_files import rename_into_place, replace_file
root = Path(sys.argv[1])
replace_file(root / "replaced.txt", [b"a", b"b"], root / ".temp-replaced", mode=0o600)
(root / ".temp-renamed").write_bytes(b"downloaded")
rename_into_place(root / ".temp-renamed", root / "renamed.txt")
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace: install-system-deps.sh")
def test_data_is_synced_before_the_rename_and_the_folder_after(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    root.mkdir()
    out = tmp_path / "trace"
    subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=openat,fsync,fdatasync,rename,renameat,renameat2",
         "-o", str(out), sys.executable, "-c", SCRIPT, str(root)],
        check=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert (root / "replaced.txt").read_bytes() == b"ab"
    assert (root / "renamed.txt").read_bytes() == b"downloaded"
    for name in ("replaced", "renamed"):
        assert _calls(out.read_text().splitlines(), root, name) == [
            "fsync temp",
            "rename",
            "fsync folder",
        ], name


def _calls(lines: list[str], root: Path, name: str) -> list[str]:
    """The calls on one file's temp name, its rename and its folder, in order."""
    role: dict[str, str] = {}
    calls = []
    for line in lines:
        opened = re.search(r'openat\(AT_FDCWD, "([^"]+)", ([^)]*)\) = (\d+)', line)
        if opened:
            path, flags, fd = opened.groups()
            role[fd] = (
                "temp" if path == f"{root}/.temp-{name}"
                else "folder" if path == str(root) and "O_DIRECTORY" in flags
                else "other"
            )  # fmt: skip
            continue
        synced = re.search(r"\bf(?:data)?sync\((\d+)\)", line)
        if synced and role.get(synced.group(1)) in ("temp", "folder"):
            what = f"fsync {role[synced.group(1)]}"
            # Only the folder fsync that follows this file's rename counts for it.
            if what == "fsync temp" or (calls and calls[-1] == "rename"):
                calls.append(what)
        elif re.search(rf'rename\w*\(.*"{re.escape(str(root))}/\.temp-{name}"', line):
            calls.append("rename")
    return calls
