"""train/data/ on tiny hand-written shard sets: exact batch counts, eval coverage, determinism, resume,
corrupt samples, unreadable shards, http, and two real processes under torchrun."""

from __future__ import annotations

import io
import json
import pickle
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import procs
import pytest
import simplejpeg
import torch
from PIL import Image
from support import ROOT, LoopbackServer, free_port, launch_env, serve

from pipeline.errors import UserError
from pipeline.files import sha256_file
from pipeline.manifest import load_manifest
from train import data
from train.augment import sample_seed as derive_seed
from train.data import ShardError, eval_loader, train_batches_per_epoch, train_loader
from train.data.shards import read_shard, split_shards

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40)]  # class -> solid colour
TRAIN_SIZES = [7, 3, 11, 5, 9]  # 35 samples, uneven
VALID_SIZES = [5, 4, 2, 4]  # 15 samples: odd
TEST_SIZES = [3]

Members = list[tuple[str, bytes]]


# ---------------------------------------------------------------- shard sets written by hand


def jpeg(label: int) -> bytes:
    return simplejpeg.encode_jpeg(np.full((40, 40, 3), COLOURS[label], np.uint8), quality=95)


def sample(key: str, label: int, image: bytes | None = None) -> Members:
    meta = json.dumps({"image_id": int(key), "label": label}).encode()
    return [(f"{key}.jpg", jpeg(label) if image is None else image), (f"{key}.cls", str(label).encode()),
            (f"{key}.json", meta)]


def split_members(sizes: list[int], first_id: int, replace: dict[str, Members] | None = None) -> list[Members]:
    """Shards of consecutive keys from `first_id`, class = id % 4; `replace` swaps in other members by key."""
    shards, next_id = [], first_id
    for size in sizes:
        members: Members = []
        for i in range(next_id, next_id + size):
            key = f"{i:05d}"
            members += (replace or {}).get(key) or sample(key, i % len(COLOURS))
        shards.append(members)
        next_id += size
    return shards


def standard_members() -> dict[str, list[Members]]:
    return {"train": split_members(TRAIN_SIZES, 1), "valid": split_members(VALID_SIZES, 101),
            "test": split_members(TEST_SIZES, 201)}


def write_tar(path: Path, members: Members) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o444
            tar.addfile(info, io.BytesIO(payload))


def write_set(root: Path, splits: dict[str, list[Members]]) -> Path:
    """Tars + a manifest.json that pipeline.manifest.load_manifest accepts."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "cubstream-shards", "version": 1, "classes": [f"{i:03d}.Bird" for i in range(4)],
                "options": {}, "source": {}, "splits": {}, "skipped": []}
    for split, shards in splits.items():
        entries = []
        for index, members in enumerate(shards):
            name = f"{split}-{index:06d}.tar"
            write_tar(root / name, members)
            keys = {member.split(".", 1)[0] for member, _ in members}
            entries.append({"name": name, "num_samples": len(keys), "bytes": (root / name).stat().st_size,
                            "sha256": sha256_file(root / name)})  # the loader checks streamed bytes
        manifest["splits"][split] = {"num_samples": sum(e["num_samples"] for e in entries),
                                     "class_counts": [], "shards": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_set(tmp_path_factory.mktemp("data") / "set", standard_members())


def tiny_transform(image: np.ndarray, seed: int) -> np.ndarray:
    """8x8 HWC uint8; seed-dependent flip, and the seed's low 3 bytes written into pixel (0, 0)."""
    out = cv2.resize(image, (8, 8), interpolation=cv2.INTER_AREA)
    if seed & 1:
        out = np.ascontiguousarray(out[:, ::-1])
    out[0, 0, :] = list(seed.to_bytes(4, "little")[:3])
    return out


def seed_in(image: torch.Tensor) -> int:
    return int.from_bytes(bytes(image[:, 0, 0].tolist()), "little")


def colour_class(image: torch.Tensor) -> int:
    centre = image[:, 4, 4].numpy().astype(int)
    return int(np.argmin([np.abs(centre - np.array(c)).sum() for c in COLOURS]))


def train(root: Path | str, **overrides: object) -> list[dict]:
    location = str(root)
    args = {"transform": tiny_transform, "batch_size": 4, "workers": 0, "seed": 0, "epoch": 0, "rank": 0,
            "world_size": 1, "shuffle_buffer": 8, **overrides}
    return list(train_loader(location, load_manifest(location), **args))


def evaluate(root: Path | str, split: str = "valid", **overrides: object) -> list[dict]:
    location = str(root)
    args = {"transform": tiny_transform, "batch_size": 4, "workers": 0, "rank": 0, "world_size": 1, **overrides}
    return list(eval_loader(location, load_manifest(location), split, **args))


def flat(batches: list[dict]) -> list[tuple[str, bytes, int]]:
    return [(key, image.numpy().tobytes(), int(label))
            for batch in batches for key, image, label in zip(batch["key"], batch["image"], batch["label"], strict=True)]


def check_batch(batch: dict, batch_size: int | None = None) -> None:
    """Types and shapes of the batch contract, labels agreeing with the decoded colours."""
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 8, 8)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["label"].dtype == torch.int64 and len(batch["key"]) == len(batch["label"]) == len(batch["image"])
    assert isinstance(batch["bad"], int)
    if batch_size is not None:
        assert len(batch["key"]) == batch_size
    assert [colour_class(image) for image in batch["image"]] == batch["label"].tolist()


# ---------------------------------------------------------------- train: counts, determinism, resume


def test_batches_per_epoch() -> None:
    assert train_batches_per_epoch(35, 4, 1) == 8
    assert train_batches_per_epoch(35, 4, 3) == 2
    assert train_batches_per_epoch(35, 5, 7) == 1
    with pytest.raises(UserError, match="fewer than one global batch"):
        train_batches_per_epoch(35, 4, 9)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize(("world_size", "workers"), [(1, 0), (2, 2), (3, 0), (4, 3)])
def test_every_rank_yields_exactly_the_epoch(shards: Path, world_size: int, workers: int) -> None:
    expected = train_batches_per_epoch(35, 4, world_size)
    for rank in range(world_size):
        if world_size * max(workers, 1) > len(TRAIN_SIZES):
            with pytest.warns(UserWarning, match="wrap around the shard list"):
                batches = train(shards, world_size=world_size, rank=rank, workers=workers)
        else:
            batches = train(shards, world_size=world_size, rank=rank, workers=workers)
        assert len(batches) == expected
        for batch in batches:
            check_batch(batch, 4)
            assert batch["bad"] == 0


def test_len_and_resume_bounds(shards: Path) -> None:
    manifest = load_manifest(str(shards))
    loader = train_loader(str(shards), manifest, transform=tiny_transform, batch_size=4, workers=2, seed=0,
                          epoch=0, rank=0, world_size=1, start_batch=3)
    assert len(loader) == 5
    assert len(list(loader)) == 5
    evaluation = eval_loader(str(shards), manifest, "valid", transform=tiny_transform, batch_size=2, workers=2,
                             rank=0, world_size=2)
    assert len(list(evaluation)) == len(evaluation) == 3 + 1  # its shards hold 5 and 2 samples
    with pytest.raises(UserError, match="cannot resume at batch 9"):
        train_loader(str(shards), manifest, transform=tiny_transform, batch_size=4, workers=0, seed=0,
                     epoch=0, rank=0, world_size=1, start_batch=9)


def test_same_seed_same_batches_other_epoch_other_order(shards: Path) -> None:
    first = flat(train(shards, seed=1, epoch=2))
    assert flat(train(shards, seed=1, epoch=2)) == first
    assert [k for k, _, _ in flat(train(shards, seed=1, epoch=3))] != [k for k, _, _ in first]
    assert [k for k, _, _ in flat(train(shards, seed=2, epoch=2))] != [k for k, _, _ in first]


def test_shard_order_depends_on_seed_and_epoch_only(shards: Path) -> None:
    all_shards = split_shards(str(shards), load_manifest(str(shards)), "train")
    streams = data.stream_shards(all_shards, seed=1, epoch=2, num_streams=2)
    assert sorted(s.url for stream in streams for s in stream) == sorted(s.url for s in all_shards)
    assert streams == data.stream_shards(all_shards, seed=1, epoch=2, num_streams=2)  # every rank agrees
    orders = {tuple(s.url for s in data.stream_shards(all_shards, seed=1, epoch=e, num_streams=1)[0])
              for e in range(4)}
    assert len(orders) > 1
    unshuffled = [[k for k, _, _ in flat(train(shards, seed=1, epoch=e, shuffle_buffer=1))] for e in (2, 3)]
    assert unshuffled[0] != unshuffled[1]  # the shard order alone changes with the epoch


def test_augmentation_depends_on_key_not_on_worker_or_rank(shards: Path) -> None:
    single = {key: image for key, image, _ in flat(train(shards, seed=5, epoch=1, workers=0, shuffle_buffer=1000))}
    spread = {key: image for rank in (0, 1)
              for key, image, _ in flat(train(shards, seed=5, epoch=1, workers=2, rank=rank, world_size=2))}
    common = single.keys() & spread.keys()
    assert len(common) >= 10
    assert all(single[key] == spread[key] for key in common)
    for batch in train(shards, seed=5, epoch=1, batch_size=35):
        assert [seed_in(image) & 0xFFFFFF for image in batch["image"]] == \
            [derive_seed(5, 1, key) & 0xFFFFFF for key in batch["key"]]


@pytest.mark.parametrize(("world_size", "rank", "start"), [(1, 0, 3), (1, 0, 4), (2, 1, 1)])
def test_resume_continues_the_uninterrupted_epoch(shards: Path, world_size: int, rank: int, start: int) -> None:
    args = {"workers": 2, "batch_size": 3, "world_size": world_size, "rank": rank, "seed": 3, "epoch": 1}
    full = train(shards, **args)
    resumed = train(shards, start_batch=start, **args)
    assert len(full) == train_batches_per_epoch(35, 3, world_size)
    assert [b["key"] for b in resumed] == [b["key"] for b in full[start:]]
    assert flat(resumed) == flat(full[start:])


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize(("workers", "start"), [(0, 0), (3, 0), (3, 5), (2, 7)])
def test_one_loader_over_epochs_equals_one_loader_per_epoch(shards: Path, workers: int, start: int) -> None:
    """35 samples in batches of 4: 8 batches an epoch, which 3 workers do not divide (their roles rotate)."""
    args = {"workers": workers, "seed": 3}
    per_epoch = train(shards, epoch=2, start_batch=start, **args) + train(shards, epoch=3, **args) + \
        train(shards, epoch=4, **args)
    together = train(shards, epoch=2, start_batch=start, epochs=3, **args)
    assert len(together) == 3 * 8 - start
    assert flat(together) == flat(per_epoch)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train(shards, epochs=0)


# ---------------------------------------------------------------- eval coverage


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_reads_every_sample_exactly_once(shards: Path, workers: int) -> None:
    expected = [f"{i:05d}" for i in range(101, 116)]
    for world_size in (1, 2, 3):
        keys = []
        for rank in range(world_size):
            batches = evaluate(shards, rank=rank, world_size=world_size, workers=workers)
            for batch in batches:
                check_batch(batch)
                assert batch["bad"] == 0
                assert [seed_in(image) for image in batch["image"]] == \
                    [derive_seed(0, 0, key) & 0xFFFFFF for key in batch["key"]]
            keys += [key for batch in batches for key in batch["key"]]
        assert sorted(keys) == expected, (world_size, workers)


def test_ring_buffers_are_reused_but_never_overwrite_what_the_consumer_keeps(shards: Path) -> None:
    """Workers stack batches into RING_SLOTS reusable shared buffers; a slot is reused only once nothing in
    the main process refers to its memory (kept batches and views of them included)."""
    expected = flat(train(shards, batch_size=2))  # no workers: no shared buffers
    loader = train_loader(str(shards), load_manifest(str(shards)), transform=tiny_transform, batch_size=2,
                          workers=1, seed=0, epoch=0, rank=0, world_size=1, shuffle_buffer=8)
    assert len(loader) > 2 * data.RING_SLOTS

    streamed = [row for batch in loader for row in flat([batch])]  # each batch dropped after use
    assert streamed == expected and loader.ring_misses == 0

    kept = list(loader)  # every batch kept: the ring fills, later batches come in fresh shared memory
    assert flat(kept) == expected and loader.ring_misses == len(loader) - data.RING_SLOTS

    views = [batch["image"][0] for batch in loader]  # a view keeps its slot just as the batch does
    assert [v.numpy().tobytes() for v in views] == [row[1] for row in expected[::2]]
    assert loader.ring_misses == 2 * (len(loader) - data.RING_SLOTS)


@pytest.mark.parametrize("shape", [(3, 8, 8), (8, 8)])
def test_transform_must_return_hwc_rgb(shards: Path, shape: tuple[int, ...]) -> None:
    with pytest.raises(TypeError, match="HWC uint8 images"):
        train(shards, transform=lambda image, seed: np.zeros(shape, np.uint8))


# ---------------------------------------------------------------- corrupt samples


GARBAGE = b"\xff\xd8 not a jpeg at all" * 20


@pytest.fixture(scope="module")
def corrupt_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """In train and valid: 3 corrupt samples, each the first of its shard (garbage jpg, cls "seven", a
    pickle member that would create `marker` if anything unpickled it); valid also has odd-but-valid
    images (grayscale JPEG, PNG, CMYK JPEG)."""
    tmp = tmp_path_factory.mktemp("corrupt")
    marker = tmp / "unpickled"

    class Trap:
        def __reduce__(self):
            return open, (str(marker), "w")

    def damage(garbage: str, bad_cls: str, pickled: str) -> dict[str, Members]:
        return {garbage: sample(garbage, 1, GARBAGE),
                bad_cls: [(f"{bad_cls}.jpg", jpeg(0)), (f"{bad_cls}.cls", b"seven")],
                pickled: sample(pickled, 3) + [(f"{pickled}.pth", pickle.dumps(Trap()))]}

    gray = encode(Image.new("L", (40, 40), 128), "JPEG")
    png = encode(Image.new("RGB", (30, 20), COLOURS[0]), "PNG")
    cmyk = encode(Image.new("RGB", (40, 40), COLOURS[1]).convert("CMYK"), "JPEG")
    odd = {"00111": sample("00111", 3, gray), "00112": sample("00112", 0, png), "00113": sample("00113", 1, cmyk)}
    splits = {"train": split_members(TRAIN_SIZES, 1, damage("00001", "00008", "00011")),
              "valid": split_members(VALID_SIZES, 101, {**damage("00101", "00106", "00110"), **odd}),
              "test": split_members(TEST_SIZES, 201)}
    return write_set(tmp / "set", splits), marker


def encode(image: Image.Image, kind: str) -> bytes:
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


def test_corrupt_samples_are_dropped_counted_and_named(corrupt_set: tuple[Path, Path], caplog) -> None:
    root, marker = corrupt_set
    batches = train(root, shuffle_buffer=1)
    assert len(batches) == 8 and all(len(b["key"]) == 4 for b in batches)
    assert sum(b["bad"] for b in batches) == 3  # 32 good samples: exactly one pass over the shards
    warned = [r.getMessage() for r in caplog.records if "dropped corrupt sample" in r.getMessage()]
    assert any("00001" in line and "train-000000.tar" in line for line in warned)
    assert any("00008" in line and "train-000001.tar" in line and "seven" in line for line in warned)
    assert any("00011" in line and "pickle" in line for line in warned)
    assert not marker.exists()


def test_eval_drops_corrupt_and_decodes_png_gray_cmyk(corrupt_set: tuple[Path, Path]) -> None:
    root, _ = corrupt_set
    batches = evaluate(root, workers=2, world_size=1)
    keys = sorted(key for batch in batches for key in batch["key"])
    assert keys == sorted({f"{i:05d}" for i in range(101, 116)} - {"00101", "00106", "00110"})
    assert sum(b["bad"] for b in batches) == 3
    by_key = {key: image for batch in batches for key, image in zip(batch["key"], batch["image"], strict=True)}
    assert colour_class(by_key["00112"]) == 0  # PNG
    assert colour_class(by_key["00113"]) == 1  # CMYK JPEG
    gray = by_key["00111"][:, 4, 4].tolist()  # grayscale JPEG -> RGB
    assert gray[0] == gray[1] == gray[2] and abs(gray[0] - 128) <= 2


def test_resume_is_exact_across_corrupt_samples(corrupt_set: tuple[Path, Path]) -> None:
    root, _ = corrupt_set
    full = train(root, workers=2, batch_size=3, shuffle_buffer=4)
    # 11 batches of 3 need 33 samples of the 32 good ones: after meeting all 3 corrupt samples, a stream wraps
    # around its shards and (in this seeded order) meets one of them again
    assert sum(b["bad"] for b in full) == 4
    resumed = train(root, workers=2, batch_size=3, shuffle_buffer=4, start_batch=5)
    assert flat(resumed) == flat(full[5:])
    assert [b["bad"] for b in resumed] == [b["bad"] for b in full[5:]]


def test_all_corrupt_stream_stops_instead_of_looping(tmp_path: Path) -> None:
    garbage = {f"{i:05d}": sample(f"{i:05d}", 0, GARBAGE) for i in range(1, 36)}
    root = write_set(tmp_path / "set", {"train": split_members(TRAIN_SIZES, 1, garbage),
                                        "valid": split_members([1], 101), "test": split_members([1], 201)})
    with pytest.raises(ShardError, match="corrupt samples in a row"):
        train(root, shuffle_buffer=1)


# ---------------------------------------------------------------- unreadable shards


@pytest.fixture
def copy_of(shards: Path, tmp_path: Path):
    def make() -> Path:
        target = tmp_path / "copy"
        target.mkdir()
        for path in shards.iterdir():
            (target / path.name).write_bytes(path.read_bytes())
        return target
    return make


def test_missing_shard_stops_with_one_line(copy_of) -> None:
    root = copy_of()
    (root / "train-000003.tar").unlink()
    for workers in (0, 2):
        with pytest.raises(ShardError) as caught:
            train(root, workers=workers)
        message = str(caught.value)
        assert "\n" not in message and "Traceback" not in message
        assert str(root / "train-000003.tar") in message and "not retried" in message


def test_truncated_tar_stops(copy_of) -> None:
    root = copy_of()
    tar = root / "valid-000000.tar"
    tar.write_bytes(tar.read_bytes()[:member_end(tar, 1) - 300])  # inside the first jpg
    with pytest.raises(ShardError, match="valid-000000.tar.*ReadError"):
        evaluate(root)
    tar2 = root / "valid-000001.tar"
    tar2.write_bytes(tar2.read_bytes()[:member_end(tar2, 9)])  # 3 whole samples of 4, no end-of-archive
    with pytest.raises(ShardError, match="valid-000001.tar.*3 samples, the manifest says 4"):
        evaluate(root, split="valid", rank=1, world_size=2)


def member_end(path: Path, members: int) -> int:
    """Byte offset where the first `members` members (headers + padded data) end."""
    with tarfile.open(path) as tar:
        last = tar.getmembers()[members - 1]
    return last.offset_data + -(-last.size // 512) * 512


def test_shard_error_message_from_a_worker_traceback() -> None:
    wrapped = ShardError("Caught ShardError in DataLoader worker process 1.\nOriginal Traceback (most recent "
                         "call last):\n  File \"x.py\", line 1\ntrain.data.shards.ShardError: cannot read shard "
                         "/x.tar: gone; shards are not retried")
    assert data.shard_error_message(wrapped) == "cannot read shard /x.tar: gone; shards are not retried"
    assert data.shard_error_message(ShardError("one line")) == "one line"
    assert data.shard_error_message(ValueError("x")) is None


def test_pipe_urls_pass_through(shards: Path) -> None:
    shard = data.Shard(f"pipe:cat {shards / 'valid-000001.tar'}", 4)
    assert [s["__key__"] for s in read_shard(shard)] == ["00106", "00107", "00108", "00109"]


# ---------------------------------------------------------------- http


@pytest.fixture
def served(shards: Path) -> Iterator[LoopbackServer]:
    with serve(shards) as server:
        yield server


def test_http_matches_local(shards: Path, served: LoopbackServer) -> None:
    assert flat(train(served.url, workers=2)) == flat(train(shards, workers=2))
    keys = sorted(key for rank in (0, 1) for batch in evaluate(served.url, rank=rank, world_size=2)
                  for key in batch["key"])
    assert keys == [f"{i:05d}" for i in range(101, 116)]


@pytest.mark.parametrize(("fault", "reason"), [("missing", "curl exit 22"), ("cut", "curl exit 18")])
def test_http_unreadable_shard_names_the_url(served: LoopbackServer, fault: str, reason: str) -> None:
    manifest = load_manifest(served.url)
    victim = manifest["splits"]["valid"]["shards"][0]["name"]
    getattr(served, fault).add(victim)
    with pytest.raises(ShardError) as caught:
        list(eval_loader(served.url, manifest, "valid", transform=tiny_transform, batch_size=4, workers=0,
                         rank=0, world_size=1))
    message = str(caught.value)
    assert f"{served.url}/{victim}" in message and reason in message and "not retried" in message


# ---------------------------------------------------------------- two real processes


@pytest.mark.multiprocess
def test_two_processes_under_torchrun(shards: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(ROOT / "tests" / "data_ranks.py"),
               "--shards", str(shards), "--out", str(tmp_path), "--batch-size", "4", "--workers", "2"]
    with procs.group(tmp_path / "logs") as group:
        group.start("torchrun", command, launch_env(tmp_path))
        assert group.finish(timeout=120) == [0], group.output("torchrun")[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in results] == [2, 2]
    assert [r["train_batches"] for r in results] == [train_batches_per_epoch(35, 4, 2)] * 2
    assert all(r["full_batches"] for r in results)
    eval_keys = results[0]["eval_keys"] + results[1]["eval_keys"]
    assert sorted(eval_keys) == [f"{i:05d}" for i in range(101, 116)]
