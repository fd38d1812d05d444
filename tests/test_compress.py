"""zstd compression of sealed spool files (`captured.delivery.compress`): one frame holding exactly
the plain bytes, readable by zstd itself and by DuckDB; failures leave no half-written file; and
the ratio estimate that lets a plain file outgrow `max_file_bytes`."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from captured.delivery.compress import (
    CHUNK,
    ZST,
    CompressResult,
    FrameError,
    RatioEstimate,
    check_file,
    compress_file,
)

LINE = (
    '{"captureData":{"endpointInput":{"observedContentType":"text/csv","mode":"INPUT",'
    '"data":"%d,%d,%d","encoding":"CSV"},"endpointOutput":{"observedContentType":"text/csv; charset=utf-8",'
    '"mode":"OUTPUT","data":"%.6f","encoding":"CSV"}},"eventMetadata":{"eventId":"%s",'
    '"inferenceTime":"2026-12-03T10:%02d:%02d.%03dZ"},"eventVersion":"0"}\n'
)


def capture_lines(target_bytes: int, seed: int = 7) -> bytes:
    """SageMaker Data Capture lines (distinct ids, varying numbers), about `target_bytes` long."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    size = 0
    i = 0
    while size < target_bytes:
        line = LINE % (
            rng.randrange(10**6),
            rng.randrange(1000),
            rng.randrange(100),
            rng.random(),
            uuid.UUID(int=rng.getrandbits(128), version=4),
            i // 60_000 % 60,
            i // 1000 % 60,
            i % 1000,
        )
        lines.append(line.encode())
        size += len(lines[-1])
        i += 1
    return b"".join(lines)


@pytest.fixture(scope="module")
def plain() -> bytes:
    return capture_lines(5_000_000)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def decompress_one_frame(frame: bytes) -> bytes:
    """The content of `frame`, asserting it is exactly one whole zstd frame."""
    obj = zstandard.ZstdDecompressor().decompressobj()
    content = obj.decompress(frame)
    assert obj.eof
    assert obj.unused_data == b""
    return content


# --- compress_file ---------------------------------------------------------------------------


def test_round_trip_of_capture_lines_is_one_exact_frame(tmp_path: Path, plain: bytes) -> None:
    src = write(tmp_path / "x.jsonl", plain)
    dst = src + ZST

    result = compress_file(src, dst)

    frame = Path(dst).read_bytes()
    params = zstandard.get_frame_parameters(frame)
    assert params.content_size == len(plain)
    assert params.has_checksum
    assert decompress_one_frame(frame) == plain
    assert result.plain_bytes == len(plain)
    assert result.compressed_bytes == len(frame)
    assert result.ratio == len(plain) / len(frame)
    assert result.ratio > 1
    assert result.cpu_s >= 0
    assert check_file(dst) == len(plain)
    assert Path(src).read_bytes() == plain  # the source of truth is left alone
    assert stat.S_IMODE(os.stat(dst).st_mode) & ~0o640 == 0


def test_empty_file(tmp_path: Path) -> None:
    src = write(tmp_path / "empty.jsonl", b"")
    dst = src + ZST

    result = compress_file(src, dst)

    frame = Path(dst).read_bytes()
    assert zstandard.get_frame_parameters(frame).content_size == 0
    assert decompress_one_frame(frame) == b""
    assert result.plain_bytes == 0
    assert result.compressed_bytes == len(frame) > 0
    assert result.ratio == 1.0
    assert check_file(dst) == 0


def test_file_larger_than_a_chunk_on_both_sides(tmp_path: Path) -> None:
    # Incompressible bytes: the compressed output spans several chunks too.
    data = random.Random(1).randbytes(3 * CHUNK + 12_345)
    src = write(tmp_path / "big.jsonl", data)
    dst = src + ZST

    result = compress_file(src, dst, level=1)

    frame = Path(dst).read_bytes()
    assert len(frame) > 3 * CHUNK
    assert zstandard.get_frame_parameters(frame).content_size == len(data)
    assert decompress_one_frame(frame) == data
    assert result.plain_bytes == len(data)
    assert check_file(dst) == len(data)


@pytest.mark.parametrize("level", [1, 19])
def test_level_bounds_accepted(tmp_path: Path, level: int) -> None:
    data = capture_lines(100_000)
    src = write(tmp_path / "x.jsonl", data)

    compress_file(src, src + ZST, level=level)

    assert decompress_one_frame(Path(src + ZST).read_bytes()) == data


@pytest.mark.parametrize("level", [0, -1, 20, 22])
def test_level_out_of_range_is_refused_before_anything_is_created(tmp_path: Path, level: int) -> None:
    src = write(tmp_path / "x.jsonl", b"{}\n")

    with pytest.raises(ValueError, match="level"):
        compress_file(src, src + ZST, level=level)

    assert not os.path.lexists(src + ZST)


def test_symlink_source_is_not_followed(tmp_path: Path, plain: bytes) -> None:
    target = write(tmp_path / "elsewhere.jsonl", plain)
    link = tmp_path / "x.jsonl"
    link.symlink_to(target)
    dst = str(link) + ZST

    with pytest.raises(OSError) as raised:
        compress_file(str(link), dst)

    assert raised.value.errno == errno.ELOOP
    assert not os.path.lexists(dst)


def test_existing_destination_is_an_error_and_untouched(tmp_path: Path) -> None:
    src = write(tmp_path / "x.jsonl", b'{"a":1}\n')
    dst = write(tmp_path / ("x.jsonl" + ZST), b"leftover")

    with pytest.raises(FileExistsError):
        compress_file(src, dst)

    assert Path(dst).read_bytes() == b"leftover"


def test_symlink_destination_is_an_error_and_not_followed(tmp_path: Path) -> None:
    src = write(tmp_path / "x.jsonl", b'{"a":1}\n')
    victim = write(tmp_path / "victim", b"keep")
    dst = tmp_path / ("x.jsonl" + ZST)
    dst.symlink_to(victim)

    with pytest.raises(FileExistsError):
        compress_file(src, str(dst))

    assert Path(victim).read_bytes() == b"keep"
    assert dst.is_symlink()


def test_directory_as_source_leaves_no_destination(tmp_path: Path) -> None:
    src = tmp_path / "adir"
    src.mkdir()
    dst = str(tmp_path / "adir.zst")

    with pytest.raises(OSError):
        compress_file(str(src), dst)

    assert not os.path.lexists(dst)


def test_source_whose_size_is_not_its_content_fails_mid_stream_and_leaves_no_destination(
    tmp_path: Path,
) -> None:
    # A file of /proc says it is 0 bytes long but reads as more: like a sealed file that changed
    # after it was opened. zstd refuses to end a frame whose content size would be wrong.
    src = "/proc/self/status"
    if not os.path.isfile(src) or os.stat(src).st_size != 0:
        pytest.skip("needs Linux /proc (a regular file whose st_size is 0 but has content)")
    dst = str(tmp_path / "status.zst")

    with pytest.raises(zstandard.ZstdError, match="Src size is incorrect"):
        compress_file(src, dst)

    assert not os.path.lexists(dst)


def test_failure_after_the_frame_is_written_removes_the_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write(tmp_path / "x.jsonl", capture_lines(200_000))
    dst = src + ZST

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "injected fsync failure")

    monkeypatch.setattr(os, "fsync", failing_fsync)

    with pytest.raises(OSError, match="injected fsync failure"):
        compress_file(src, dst)

    assert not os.path.lexists(dst)


# --- check_file ------------------------------------------------------------------------------


@pytest.fixture
def whole(tmp_path: Path, plain: bytes) -> bytes:
    src = write(tmp_path / "whole.jsonl", plain)
    compress_file(src, src + ZST)
    return Path(src + ZST).read_bytes()


def test_check_file_accepts_a_whole_frame(tmp_path: Path, whole: bytes, plain: bytes) -> None:
    assert check_file(write(tmp_path / "ok.zst", whole)) == len(plain)


def flip_middle_byte(frame: bytes) -> bytes:
    damaged = bytearray(frame)
    damaged[len(frame) // 2] ^= 0x55
    return bytes(damaged)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda f: f[: len(f) // 2], id="cut_in_half"),
        pytest.param(lambda f: f[:-1], id="last_byte_missing"),
        pytest.param(lambda f: f[:-4], id="checksum_missing"),
        pytest.param(lambda f: f[:10], id="header_only"),
        pytest.param(lambda f: b"", id="empty"),
        pytest.param(flip_middle_byte, id="corrupt_byte"),
        pytest.param(lambda f: f + b"\n", id="trailing_byte"),
        pytest.param(lambda f: f + f, id="two_frames"),
        pytest.param(lambda f: b"not zstd at all\n" * 100, id="not_zstd"),
    ],
)
def test_check_file_refuses_damaged_files(
    tmp_path: Path, whole: bytes, damage: Callable[[bytes], bytes]
) -> None:
    path = write(tmp_path / "bad.zst", damage(whole))

    with pytest.raises(zstandard.ZstdError):
        check_file(path)


def test_check_file_names_a_truncated_frame(tmp_path: Path, whole: bytes) -> None:
    with pytest.raises(FrameError, match="truncated"):
        check_file(write(tmp_path / "cut.zst", whole[: len(whole) // 2]))


def test_check_file_does_not_follow_a_symlink(tmp_path: Path, whole: bytes) -> None:
    target = write(tmp_path / "ok.zst", whole)
    link = tmp_path / "link.zst"
    link.symlink_to(target)

    with pytest.raises(OSError):
        check_file(str(link))


# --- readers of the format -------------------------------------------------------------------


def test_duckdb_reads_the_compressed_file(tmp_path: Path, plain: bytes) -> None:
    duckdb = pytest.importorskip("duckdb")
    src = write(tmp_path / "capture.jsonl", plain)
    dst = src + ZST
    compress_file(src, dst)
    lines = plain.splitlines()

    con = duckdb.connect()
    try:
        rows, ids = con.execute(
            "SELECT count(*), count(DISTINCT eventMetadata.eventId) FROM read_json(?, format='newline_delimited')",
            [dst],
        ).fetchone()
        (auto_rows,) = con.execute("SELECT count(*) FROM read_json_auto(?)", [dst]).fetchone()
    finally:
        con.close()

    assert rows == auto_rows == ids == len(lines)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd command line tool is not installed")
def test_zstd_cli_reproduces_the_plain_bytes(tmp_path: Path, plain: bytes) -> None:
    src = write(tmp_path / "capture.jsonl", plain)
    dst = src + ZST
    compress_file(src, dst)

    done = subprocess.run(["zstd", "-d", "-c", dst], capture_output=True, check=True)

    assert done.stdout == plain


# --- RatioEstimate ---------------------------------------------------------------------------

MAX = 1_000_000
BIG = 1_000_000  # plain bytes of an observation that counts


def seen(ratio: float, plain_bytes: int = BIG) -> CompressResult:
    return CompressResult(plain_bytes=plain_bytes, compressed_bytes=round(plain_bytes / ratio), cpu_s=0.0)


def test_compress_result_ratio() -> None:
    assert CompressResult(plain_bytes=1000, compressed_bytes=100, cpu_s=0.1).ratio == 10.0
    assert CompressResult(plain_bytes=0, compressed_bytes=13, cpu_s=0.0).ratio == 1.0


def test_no_observation_means_no_growth() -> None:
    estimate = RatioEstimate()
    assert estimate.ratio == 1.0
    assert estimate.plain_limit(MAX) == MAX


def test_margin_applies_to_the_observed_ratio() -> None:
    estimate = RatioEstimate(margin=0.8)
    for _ in range(3):
        estimate.observe(seen(10.0))

    assert estimate.ratio == pytest.approx(8.0)
    assert estimate.plain_limit(MAX) == 8 * MAX


def test_a_less_compressible_file_lowers_the_estimate_at_once() -> None:
    estimate = RatioEstimate(margin=0.8)
    for _ in range(10):
        estimate.observe(seen(10.0))

    estimate.observe(seen(5.0))

    assert estimate.plain_limit(MAX) == 4 * MAX
    estimate.observe(seen(10.0))  # a good file after it does not raise it again: the minimum rules
    assert estimate.plain_limit(MAX) == 4 * MAX


def test_small_files_are_ignored() -> None:
    estimate = RatioEstimate(margin=0.8)
    estimate.observe(seen(10.0))
    small = RatioEstimate.MIN_OBSERVED_BYTES - 1

    estimate.observe(seen(2.0, plain_bytes=small))
    estimate.observe(CompressResult(plain_bytes=0, compressed_bytes=13, cpu_s=0.0))

    assert estimate.plain_limit(MAX) == 8 * MAX


def test_clamped_to_max_ratio_and_to_one() -> None:
    high = RatioEstimate(margin=0.8, max_ratio=20.0)
    high.observe(seen(100.0))
    assert high.ratio == 20.0
    assert high.plain_limit(MAX) == 20 * MAX

    incompressible = RatioEstimate(margin=0.8)
    incompressible.observe(seen(0.99))
    assert incompressible.ratio == 1.0
    assert incompressible.plain_limit(MAX) == MAX


def test_old_observations_leave_the_window() -> None:
    estimate = RatioEstimate(margin=0.8, window=4)
    estimate.observe(seen(5.0))
    for _ in range(3):
        estimate.observe(seen(10.0))
    assert estimate.plain_limit(MAX) == 4 * MAX  # the bad file is still in the window

    estimate.observe(seen(10.0))

    assert estimate.plain_limit(MAX) == 8 * MAX


@pytest.mark.parametrize(
    "kwargs",
    [{"margin": 0.0}, {"margin": 1.5}, {"window": 0}, {"max_ratio": 0.5}],
)
def test_bad_parameters_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RatioEstimate(**kwargs)


def test_learns_from_a_real_compression(tmp_path: Path, plain: bytes) -> None:
    src = write(tmp_path / "x.jsonl", plain)
    result = compress_file(src, src + ZST)
    estimate = RatioEstimate(margin=0.8)

    estimate.observe(result)

    assert estimate.ratio == pytest.approx(min(result.ratio * 0.8, 20.0))
    assert estimate.plain_limit(MAX) > MAX
