"""pipeline.download against a loopback HTTP server started and stopped here (no other network)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import LoopbackServer, free_port, serve

from pipeline.archive import pack_tgz
from pipeline.download import download
from pipeline.errors import UserError
from pipeline.synth import synth

TGZ_PATH = "/records/x/files/CUB_200_2011.tgz"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("src")
    synth(out, classes=2, per_class=2, tgz=True, progress=False)
    return (out / "CUB_200_2011.tgz").read_bytes()


@pytest.fixture()
def server(archive: bytes) -> Iterator[LoopbackServer]:
    with serve(files={TGZ_PATH: archive}) as srv:
        yield srv


def url_of(server: LoopbackServer, path: str = TGZ_PATH) -> str:
    """A URL shaped like the official one (a query string after the file name)."""
    return f"{server.url}{path}?download=1"


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _assert_complete(out: Path, archive: bytes) -> None:
    assert (out / "CUB_200_2011.tgz").read_bytes() == archive
    assert (out / "CUB_200_2011" / "images.txt").read_text().count("\n") == 4
    assert len(list((out / "CUB_200_2011" / "images").rglob("*.jpg"))) == 4
    assert sorted(p.name for p in out.iterdir()) == ["CUB_200_2011", "CUB_200_2011.tgz"]


def test_full_download_checks_md5_and_unpacks(server: LoopbackServer, archive: bytes, tmp_path: Path) -> None:
    root = download(tmp_path, url=url_of(server), md5=_md5(archive).upper(), progress=False)
    assert root == tmp_path / "CUB_200_2011"
    _assert_complete(tmp_path, archive)
    assert server.log == [(TGZ_PATH, None, 200)]


def test_partial_download_is_resumed_with_a_range_request(server: LoopbackServer, archive: bytes,
                                                          tmp_path: Path) -> None:
    half = len(archive) // 2
    (tmp_path / "CUB_200_2011.tgz.part").write_bytes(archive[:half])
    download(tmp_path, url=url_of(server), md5=_md5(archive), progress=False)
    assert server.log == [(TGZ_PATH, f"bytes={half}-", 206)]
    _assert_complete(tmp_path, archive)


def test_interrupted_transfer_keeps_the_part_and_a_rerun_resumes(server: LoopbackServer, archive: bytes,
                                                                 tmp_path: Path) -> None:
    server.cut_after = 1000
    with pytest.raises(UserError, match="rerun to resume"):
        download(tmp_path, url=url_of(server), md5=_md5(archive), progress=False)
    assert (tmp_path / "CUB_200_2011.tgz.part").stat().st_size == 1000
    download(tmp_path, url=url_of(server), md5=_md5(archive), progress=False)
    assert server.log[-1] == (TGZ_PATH, "bytes=1000-", 206)
    _assert_complete(tmp_path, archive)


def test_server_ignoring_range_makes_it_start_over(server: LoopbackServer, archive: bytes, tmp_path: Path) -> None:
    server.honour_range = False
    stale = b"stale bytes that must not be kept" * 10
    (tmp_path / "CUB_200_2011.tgz.part").write_bytes(stale)
    download(tmp_path, url=url_of(server), md5=_md5(archive), progress=False)
    assert server.log == [(TGZ_PATH, f"bytes={len(stale)}-", 200)]
    _assert_complete(tmp_path, archive)


def test_complete_part_is_finished_without_fetching_again(server: LoopbackServer, archive: bytes,
                                                          tmp_path: Path) -> None:
    (tmp_path / "CUB_200_2011.tgz.part").write_bytes(archive)
    download(tmp_path, url=url_of(server), md5=_md5(archive), progress=False)
    assert server.log == [(TGZ_PATH, f"bytes={len(archive)}-", 416)]
    _assert_complete(tmp_path, archive)


def test_md5_mismatch_deletes_the_download(server: LoopbackServer, archive: bytes, tmp_path: Path) -> None:
    wrong = "0" * 32
    with pytest.raises(UserError) as caught:
        download(tmp_path, url=url_of(server), md5=wrong, progress=False)
    message = str(caught.value)
    assert f"expected {wrong}" in message and f"got {_md5(archive)}" in message
    assert list(tmp_path.iterdir()) == []


def test_verified_archive_already_there_is_not_fetched(server: LoopbackServer, archive: bytes, tmp_path: Path) -> None:
    (tmp_path / "CUB_200_2011.tgz").write_bytes(archive)
    download(tmp_path, url=url_of(server), md5=_md5(archive), progress=False)
    (tmp_path / "CUB_200_2011" / "marker").write_text("kept")
    download(tmp_path, url=url_of(server), md5=_md5(archive), progress=False)
    assert server.log == []
    assert (tmp_path / "CUB_200_2011" / "marker").read_text() == "kept"


def test_archive_without_top_level_directory_lands_in_cub_dir(server: LoopbackServer, tmp_path: Path) -> None:
    src = synth(tmp_path / "src", classes=1, per_class=2, progress=False)
    flat = tmp_path / "flat.tgz"
    pack_tgz(src, flat, arcname=".")
    server.files["/flat.tgz"] = flat.read_bytes()
    out = tmp_path / "out"
    root = download(out, url=url_of(server, "/flat.tgz"), md5=_md5(flat.read_bytes()), progress=False)
    assert (root / "images.txt").read_bytes() == (src / "images.txt").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["CUB_200_2011", "CUB_200_2011.tgz"]


def test_http_404_is_one_line_naming_the_url(server: LoopbackServer, tmp_path: Path) -> None:
    url = url_of(server, "/missing.tgz")
    with pytest.raises(UserError) as caught:
        download(tmp_path, url=url, progress=False)
    assert url in str(caught.value) and "404" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "CUB_200_2011.tgz").exists()


def test_unreachable_server_names_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/CUB_200_2011.tgz"  # nothing listens there
    with pytest.raises(UserError, match="unreachable") as caught:
        download(tmp_path, url=url, progress=False)
    assert url in str(caught.value)


def test_malformed_md5_argument_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="32 hex"):
        download(tmp_path, url="http://127.0.0.1:9/x", md5="abc", progress=False)
