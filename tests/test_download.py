"""pipeline.download against a loopback HTTP server started and stopped here (no other network)."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.archive import pack_tgz
from pipeline.download import download
from pipeline.errors import UserError
from pipeline.synth import synth

TGZ_PATH = "/records/x/files/CUB_200_2011.tgz"


class _Server(ThreadingHTTPServer):
    """Serves `files` (path -> bytes); records every request as (path, Range header, status)."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.files = files
        self.honour_range = True
        self.cut_after: int | None = None  # send only this many body bytes once, then hang up
        self.log: list[tuple[str, str | None, int]] = []

    def url(self, path: str = TGZ_PATH) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}?download=1"


class _RangeHandler(BaseHTTPRequestHandler):
    """GET with `Range: bytes=N-` support (http.server's SimpleHTTPRequestHandler has none in 3.11)."""

    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        body = self.server.files.get(self.path.split("?")[0])
        range_header = self.headers.get("Range")
        if body is None:
            self._log(range_header, 404)
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and self.server.honour_range:
            start = int(match.group(1))
            if start >= len(body):
                self._log(range_header, 416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        status = 206 if start else 200
        self._log(range_header, status)
        self.send_response(status)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut, self.server.cut_after = self.server.cut_after, None
        self.wfile.write(body[start:] if cut is None else body[start:start + cut])
        self.close_connection = cut is not None

    def _log(self, range_header: str | None, status: int) -> None:
        self.server.log.append((self.path.split("?")[0], range_header, status))

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        """Keep pytest output clean."""


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("src")
    synth(out, classes=2, per_class=2, tgz=True, progress=False)
    return (out / "CUB_200_2011.tgz").read_bytes()


@pytest.fixture()
def server(archive: bytes) -> Iterator[_Server]:
    srv = _Server({TGZ_PATH: archive})
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _assert_complete(out: Path, archive: bytes) -> None:
    assert (out / "CUB_200_2011.tgz").read_bytes() == archive
    assert (out / "CUB_200_2011" / "images.txt").read_text().count("\n") == 4
    assert len(list((out / "CUB_200_2011" / "images").rglob("*.jpg"))) == 4
    assert sorted(p.name for p in out.iterdir()) == ["CUB_200_2011", "CUB_200_2011.tgz"]


def test_full_download_checks_md5_and_unpacks(server: _Server, archive: bytes, tmp_path: Path) -> None:
    root = download(tmp_path, url=server.url(), md5=_md5(archive).upper(), progress=False)
    assert root == tmp_path / "CUB_200_2011"
    _assert_complete(tmp_path, archive)
    assert server.log == [(TGZ_PATH, None, 200)]


def test_partial_download_is_resumed_with_a_range_request(server: _Server, archive: bytes,
                                                          tmp_path: Path) -> None:
    half = len(archive) // 2
    (tmp_path / "CUB_200_2011.tgz.part").write_bytes(archive[:half])
    download(tmp_path, url=server.url(), md5=_md5(archive), progress=False)
    assert server.log == [(TGZ_PATH, f"bytes={half}-", 206)]
    _assert_complete(tmp_path, archive)


def test_interrupted_transfer_keeps_the_part_and_a_rerun_resumes(server: _Server, archive: bytes,
                                                                 tmp_path: Path) -> None:
    server.cut_after = 1000
    with pytest.raises(UserError, match="rerun to resume"):
        download(tmp_path, url=server.url(), md5=_md5(archive), progress=False)
    assert (tmp_path / "CUB_200_2011.tgz.part").stat().st_size == 1000
    download(tmp_path, url=server.url(), md5=_md5(archive), progress=False)
    assert server.log[-1] == (TGZ_PATH, "bytes=1000-", 206)
    _assert_complete(tmp_path, archive)


def test_server_ignoring_range_makes_it_start_over(server: _Server, archive: bytes, tmp_path: Path) -> None:
    server.honour_range = False
    stale = b"stale bytes that must not be kept" * 10
    (tmp_path / "CUB_200_2011.tgz.part").write_bytes(stale)
    download(tmp_path, url=server.url(), md5=_md5(archive), progress=False)
    assert server.log == [(TGZ_PATH, f"bytes={len(stale)}-", 200)]
    _assert_complete(tmp_path, archive)


def test_complete_part_is_finished_without_fetching_again(server: _Server, archive: bytes,
                                                          tmp_path: Path) -> None:
    (tmp_path / "CUB_200_2011.tgz.part").write_bytes(archive)
    download(tmp_path, url=server.url(), md5=_md5(archive), progress=False)
    assert server.log == [(TGZ_PATH, f"bytes={len(archive)}-", 416)]
    _assert_complete(tmp_path, archive)


def test_md5_mismatch_deletes_the_download(server: _Server, archive: bytes, tmp_path: Path) -> None:
    wrong = "0" * 32
    with pytest.raises(UserError) as caught:
        download(tmp_path, url=server.url(), md5=wrong, progress=False)
    message = str(caught.value)
    assert f"expected {wrong}" in message and f"got {_md5(archive)}" in message
    assert list(tmp_path.iterdir()) == []


def test_verified_archive_already_there_is_not_fetched(server: _Server, archive: bytes, tmp_path: Path) -> None:
    (tmp_path / "CUB_200_2011.tgz").write_bytes(archive)
    download(tmp_path, url=server.url(), md5=_md5(archive), progress=False)
    (tmp_path / "CUB_200_2011" / "marker").write_text("kept")
    download(tmp_path, url=server.url(), md5=_md5(archive), progress=False)
    assert server.log == []
    assert (tmp_path / "CUB_200_2011" / "marker").read_text() == "kept"


def test_archive_without_top_level_directory_lands_in_cub_dir(server: _Server, tmp_path: Path) -> None:
    src = synth(tmp_path / "src", classes=1, per_class=2, progress=False)
    flat = tmp_path / "flat.tgz"
    pack_tgz(src, flat, arcname=".")
    server.files["/flat.tgz"] = flat.read_bytes()
    out = tmp_path / "out"
    root = download(out, url=server.url("/flat.tgz"), md5=_md5(flat.read_bytes()), progress=False)
    assert (root / "images.txt").read_bytes() == (src / "images.txt").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["CUB_200_2011", "CUB_200_2011.tgz"]


def test_http_404_is_one_line_naming_the_url(server: _Server, tmp_path: Path) -> None:
    url = server.url("/missing.tgz")
    with pytest.raises(UserError) as caught:
        download(tmp_path, url=url, progress=False)
    assert url in str(caught.value) and "404" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "CUB_200_2011.tgz").exists()


def test_unreachable_server_names_the_url(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/CUB_200_2011.tgz"
    with pytest.raises(UserError, match="unreachable") as caught:
        download(tmp_path, url=url, progress=False)
    assert url in str(caught.value)


def test_malformed_md5_argument_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="32 hex"):
        download(tmp_path, url="http://127.0.0.1:9/x", md5="abc", progress=False)
