"""Upload semantics on real files (no SSH): what the final file holds after each pattern."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ingest_core.folders import AccountFolder
from ingest_core.settings import LimitSettings
from ingest_server.atomic_upload import UnflushedBytes, Upload
from ingest_server.limits import LimitHit, UploadLimits

NO_LIMITS = LimitSettings(
    max_file_bytes=0, account_quota_bytes=0, free_disk_reserve_bytes=0, max_read_ahead_bytes=0
)


def start(
    folder: AccountFolder,
    name: str,
    truncate: bool,
    limits: LimitSettings = NO_LIMITS,
    buffer: UnflushedBytes | None = None,
) -> Upload:
    final = folder.root / name
    return Upload(
        folder,
        final,
        truncate=truncate,
        append=False,
        limits=UploadLimits.for_upload(limits, folder.root),
        buffer=buffer or UnflushedBytes(0),
    )


@pytest.fixture
def folder(tmp_path: Path) -> AccountFolder:
    return AccountFolder("acct", tmp_path)


def hidden(folder: AccountFolder) -> list[str]:
    return [p.name for p in folder.root.iterdir() if p.name.startswith(".ingest-upload-")]


def test_final_name_appears_only_at_commit(folder: AccountFolder) -> None:
    (folder.root / "f.csv").write_bytes(b"old")
    upload = start(folder, "f.csv", truncate=True)
    upload.write(0, b"new content")
    assert (folder.root / "f.csv").read_bytes() == b"old"
    received = upload.commit()
    assert (folder.root / "f.csv").read_bytes() == b"new content"
    assert received.sha256 == hashlib.sha256(b"new content").hexdigest()
    assert hidden(folder) == []


def test_discard_keeps_the_earlier_file(folder: AccountFolder) -> None:
    (folder.root / "f.csv").write_bytes(b"old")
    upload = start(folder, "f.csv", truncate=True)
    upload.write(0, b"partial")
    upload.discard()
    assert (folder.root / "f.csv").read_bytes() == b"old"
    with pytest.raises(OSError):  # a write after the discard must never look stored
        upload.write(7, b" more")
    assert hidden(folder) == []


def test_overwrite_without_trunc_then_truncate(folder: AccountFolder) -> None:
    """OpenSSH scp in SFTP mode: WRITE|CREAT, write from 0, then fsetstat(size)."""
    (folder.root / "f.csv").write_bytes(b"0123456789" * 10)
    upload = start(folder, "f.csv", truncate=False)
    upload.write(0, b"abc")
    upload.truncate(3)
    received = upload.commit()
    assert (folder.root / "f.csv").read_bytes() == b"abc"
    assert received.sha256 == hashlib.sha256(b"abc").hexdigest()


def test_write_over_the_start_keeps_the_old_tail(folder: AccountFolder) -> None:
    (folder.root / "f.csv").write_bytes(b"0123456789")
    upload = start(folder, "f.csv", truncate=False)
    upload.write(0, b"ab")
    upload.commit()
    assert (folder.root / "f.csv").read_bytes() == b"ab23456789"


def test_resume_at_an_offset(folder: AccountFolder) -> None:
    (folder.root / "f.csv").write_bytes(b"01234")
    upload = start(folder, "f.csv", truncate=False)
    assert upload.needs_base_copy(5)  # the caller copies the old content in a thread first
    upload.copy_base()
    assert not upload.base_pending
    upload.write(5, b"56789")
    received = upload.commit()
    assert (folder.root / "f.csv").read_bytes() == b"0123456789"
    assert received.sha256 == hashlib.sha256(b"0123456789").hexdigest()
    assert received.bytes == 10


def test_existing_file_replaced_meanwhile_does_not_leak_in(folder: AccountFolder) -> None:
    (folder.root / "f.csv").write_bytes(b"01234")
    upload = start(folder, "f.csv", truncate=False)
    (folder.root / "other").write_bytes(b"XXXXXXXX")
    (folder.root / "other").replace(folder.root / "f.csv")
    upload.write(5, b"5")
    upload.commit()
    assert (folder.root / "f.csv").read_bytes() == b"012345"  # the file as it was at open


def test_limit_hit_fails_the_upload(folder: AccountFolder) -> None:
    limits = LimitSettings(max_file_bytes=10, account_quota_bytes=0, free_disk_reserve_bytes=0)
    upload = start(folder, "f.csv", truncate=True, limits=limits)
    upload.write(0, b"12345")
    with pytest.raises(LimitHit) as info:
        upload.write(5, b"678901")
    assert info.value.kind == "max_file_bytes"
    with pytest.raises(LimitHit):
        upload.commit()
    upload.discard()
    assert not (folder.root / "f.csv").exists()
    assert hidden(folder) == []


def test_append_mode_writes_at_the_end(folder: AccountFolder) -> None:
    (folder.root / "f.csv").write_bytes(b"head,")
    upload = Upload(
        folder,
        folder.root / "f.csv",
        truncate=False,
        append=True,
        limits=UploadLimits.for_upload(NO_LIMITS, folder.root),
        buffer=UnflushedBytes(0),
    )
    upload.write(0, b"tail")  # the offset is ignored in append mode
    upload.commit()
    assert (folder.root / "f.csv").read_bytes() == b"head,tail"


def test_empty_upload(folder: AccountFolder) -> None:
    received = start(folder, "empty.txt", truncate=True).commit()
    assert (folder.root / "empty.txt").read_bytes() == b""
    assert received.sha256 == hashlib.sha256(b"").hexdigest()


def test_big_sequential_upload_is_hashed_on_the_way(folder: AccountFolder) -> None:
    upload = start(folder, "big.bin", truncate=True)
    chunks = [bytes([i]) * 32768 for i in range(64)]  # 2 MiB: several batches
    for i, chunk in enumerate(chunks):
        upload.write(i * 32768, chunk)
    received = upload.commit()
    assert received.sha256 == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert (folder.root / "big.bin").read_bytes() == b"".join(chunks)


def test_many_tiny_writes_in_one_batch(folder: AccountFolder) -> None:
    """More pieces in one batch than one pwritev call takes (IOV_MAX, 1024 on Linux)."""
    upload = start(folder, "tiny.bin", truncate=True)
    data = bytes(range(256)) * 20  # 5,120 bytes in 1,707 writes of 3 bytes
    for offset in range(0, len(data), 3):
        upload.write(offset, data[offset : offset + 3])
    received = upload.commit()
    assert (folder.root / "tiny.bin").read_bytes() == data
    assert received.sha256 == hashlib.sha256(data).hexdigest()


def test_out_of_order_writes_land_in_place(folder: AccountFolder) -> None:
    """Writes a client pipelines out of order (a gap filled later) still make the file."""
    upload = start(folder, "gaps.bin", truncate=True)
    a, b, c = b"A" * 40000, b"B" * 40000, b"C" * 40000
    upload.write(0, a)
    upload.write(80000, c)
    upload.write(40000, b)
    received = upload.commit()
    assert (folder.root / "gaps.bin").read_bytes() == a + b + c
    assert received.sha256 == hashlib.sha256(a + b + c).hexdigest()


def test_one_session_holds_at_most_its_budget_across_many_files(folder: AccountFolder) -> None:
    """Many open uploads each below the batch size: the session's unflushed bytes stay
    within its budget (the rest is written), and a discard gives its share back."""
    budget = UnflushedBytes(256 * 1024)
    uploads = [start(folder, f"f{i}.bin", truncate=True, buffer=budget) for i in range(40)]
    for i, upload in enumerate(uploads):
        for offset in range(0, 96 * 1024, 32 * 1024):
            upload.write(offset, bytes([i]) * 32 * 1024)
            assert budget.pending <= budget.limit  # 96 KiB per file: below BATCH_BYTES
    for upload in uploads[:20]:
        upload.commit()
    for upload in uploads[20:]:
        upload.discard()
    assert budget.pending == 0
    assert not budget.uploads
    for i in range(20):
        assert (folder.root / f"f{i}.bin").read_bytes() == bytes([i]) * 96 * 1024


def test_a_write_far_past_the_end_is_refused(folder: AccountFolder) -> None:
    limits = LimitSettings(
        max_file_bytes=0, account_quota_bytes=0, free_disk_reserve_bytes=0, max_hole_bytes=1024
    )
    upload = start(folder, "holes.bin", truncate=True, limits=limits)
    upload.write(0, b"x" * 10)
    upload.write(10 + 1024, b"y")  # a gap of max_hole_bytes is allowed
    with pytest.raises(LimitHit) as info:
        upload.write(2**31 - 1, b"z")
    assert info.value.kind == "max_hole_bytes"
    upload.discard()
    assert hidden(folder) == []
