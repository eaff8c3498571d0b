"""Plan shards, encode samples in parallel, write byte-identical tars atomically, per job; merge parts."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import PIL
from tqdm import tqdm

from pipeline import lock
from pipeline import manifest as mf
from pipeline.cub import Cub, Record, fingerprint, image_sizes, open_source, read_cub
from pipeline.encode import BadImage, EncodeOptions, encode_image
from pipeline.errors import UserError
from pipeline.outputs import output_dir_problem
from pipeline.splits import assign_splits

STATE_DIR = ".build"  # build state: options + plan, one record per finished shard, one marker per job
LOCK = "lock"  # in STATE_DIR: held by every build job and merge for their whole run (see pipeline.lock)
DEFAULT_SHARD_SAMPLES = 160  # CUB's train split (~5,400 images) gets at least 32 shards
MAX_LISTED_BAD = 20
TAR_MTIME = 0


@dataclass(frozen=True)
class BuildOptions:
    """Every option that changes shard bytes; recorded in the manifest and compared on re-runs."""

    valid_fraction: float = 0.1
    seed: int = 0
    resize_short: int = 256
    crop_bbox: bool = False
    quality: int = 95
    shard_samples: int = DEFAULT_SHARD_SAMPLES

    def __post_init__(self) -> None:
        if not 0 <= self.valid_fraction < 1:
            raise UserError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if self.resize_short < 0:
            raise UserError(f"--resize-short must be >= 0, got {self.resize_short}")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality must be in 1..100, got {self.quality}")
        if self.shard_samples < 1:
            raise UserError(f"--shard-samples must be >= 1, got {self.shard_samples}")

    @property
    def encode(self) -> EncodeOptions:
        return EncodeOptions(self.resize_short, self.crop_bbox, self.quality)


@dataclass(frozen=True)
class ShardPlan:
    split: str
    name: str
    records: tuple[Record, ...]


@dataclass(frozen=True)
class SampleTask:
    record: Record
    image_path: str
    class_name: str
    split: str
    options: EncodeOptions


def plan_shards(splits: dict[str, list[Record]], shard_samples: int) -> list[ShardPlan]:
    plan = []
    for split in mf.SPLITS:
        records = splits[split]
        for index, start in enumerate(range(0, len(records), shard_samples)):
            plan.append(ShardPlan(split, f"{split}-{index:06d}.tar", tuple(records[start:start + shard_samples])))
    return plan


def job_shards(plan: list[ShardPlan], num_jobs: int, job_index: int) -> list[ShardPlan]:
    """Round-robin over the whole plan, so every job gets a similar amount of work."""
    return plan[job_index::num_jobs]


def build(source: Path, out: Path, options: BuildOptions, *, workers: int = 0, num_jobs: int = 1,
          job_index: int = 0, skip_bad: bool = False, overwrite: bool = False,
          progress: bool = True) -> dict[str, Any] | None:
    """Write this job's shards; with one job also merge and return the manifest.

    The whole build holds the lock on `out`: jobs of one `num_jobs` build with the same options and source
    share it (they may run at once, on several hosts); any other build or a merge is refused meanwhile."""
    check_job_args(num_jobs, job_index, workers)
    check_out(out)
    workers = workers or os.cpu_count() or 1
    with open_source(source) as root:
        cub = read_cub(root)
        sizes = image_sizes(cub)
        missing = [r for r, size in zip(cub.records, sizes, strict=True) if size < 0]
        if missing and not skip_bad:
            raise UserError(_bad_files_line([(r, "missing") for r in missing], cub))
        plan = plan_shards(assign_splits(cub.records, options.valid_fraction, options.seed), options.shard_samples)
        state = _state(cub, sizes, options, plan)
        identity = {"options": state["options"], "source": state["source"]["fingerprint"], "num_jobs": num_jobs}
        with lock.acquire(out / STATE_DIR / LOCK, "shared" if num_jobs > 1 else "exclusive", identity,
                          what=str(out), when_alone=lambda: _prepare_out(out, state, overwrite, num_jobs)):
            mine = job_shards(plan, num_jobs, job_index)
            bad = _write_shards(out, cub, [s for s in mine if not _complete(out, s.name)], options, workers,
                                skip_bad, progress)
            if bad and not skip_bad:
                raise UserError(_bad_files_line(bad, cub) + " (no manifest written; --skip-bad leaves them out)")
            mf.write_json_atomic(out / STATE_DIR / _marker_name(job_index, num_jobs), {"shards": [s.name for s in mine]})
            # This run hashed every shard it wrote, and every one it kept: merge need not read them again.
            return _merge_locked(out, rehash=False) if num_jobs == 1 else None


def check_job_args(num_jobs: int, job_index: int, workers: int) -> None:
    """Range checks of the options that are not BuildOptions (those check themselves)."""
    if num_jobs < 1:
        raise UserError(f"--num-jobs must be >= 1, got {num_jobs}")
    if not 0 <= job_index < num_jobs:
        raise UserError(f"--job-index must be in 0..{num_jobs - 1} (--num-jobs {num_jobs}), got {job_index}")
    if workers < 0:
        raise UserError(f"--workers must be >= 0 (0 = all cores), got {workers}")


def check_out(out: Path) -> None:
    """Refuse an --out that can never hold a shard set (a file, a path through a file, a place this user
    cannot write) before any work. Nothing is created here."""
    problem = output_dir_problem(out, "--out")
    if problem:
        raise UserError(problem)


def _marker_name(job_index: int, num_jobs: int) -> str:
    return f"job-{job_index:03d}-of-{num_jobs:03d}.json"


def _bad_files_line(bad: list[tuple[Record, str]], cub: Cub) -> str:
    listed = "; ".join(f"images/{r.path} ({reason})" for r, reason in bad[:MAX_LISTED_BAD])
    more = f"; and {len(bad) - MAX_LISTED_BAD} more" if len(bad) > MAX_LISTED_BAD else ""
    return f"{len(bad)} bad image(s) in {cub.root}: {listed}{more}"


def _state(cub: Cub, sizes: list[int], options: BuildOptions, plan: list[ShardPlan]) -> dict[str, Any]:
    return {
        "options": asdict(options),
        "source": {"fingerprint": fingerprint(cub, sizes), "num_images": len(cub.records), "num_classes": len(cub.classes)},
        "classes": cub.classes,
        "plan": {split: [s.name for s in plan if s.split == split] for split in mf.SPLITS},
    }


def _prepare_out(out: Path, state: dict[str, Any], overwrite: bool, num_jobs: int) -> None:
    """Runs with the lock held by this process alone. Refuse an --out holding another shard set (other
    options or source) unless told to overwrite it; remove what dead builds left (their temporaries, and
    part markers of a build with another --num-jobs: the shards are the same whatever the number of jobs,
    and each is checked by sha256 before it is kept); record this build's state."""
    previous = _previous_state(out, overwrite)
    other = previous is not None and (previous["options"], previous["source"]["fingerprint"]) != (
        state["options"], state["source"]["fingerprint"])
    if other and not overwrite:
        raise UserError(f"{out} holds a shard set built with {_difference(previous, state)}; "
                        "pass --overwrite to replace it or choose another --out")
    remove_temporaries(out)
    if other:
        _remove_shard_set(out)
    for marker in _markers(out):
        if marker.total != num_jobs:
            marker.path.unlink()
    mf.write_json_atomic(out / STATE_DIR / "build.json", state)


def remove_temporaries(out: Path) -> list[str]:
    """Delete the temporaries in `out` and its build state (only safe while holding the lock alone: then
    no live build is writing any); returns their names."""
    found = temporaries(out)
    for name in found:
        (out / name).unlink(missing_ok=True)
    return found


def temporaries(out: Path) -> list[str]:
    """Names (relative to `out`) of temporaries a killed or failed build left in `out` and its build state."""
    names = []
    for directory in (out, out / STATE_DIR):
        if directory.is_dir():
            names += [str(p.relative_to(out)) for p in sorted(directory.iterdir()) if mf.is_temporary(p.name)]
    return names


def _previous_state(out: Path, overwrite: bool) -> dict[str, Any] | None:
    """The options and source of what `out` holds: its build state, or the manifest of a set copied without
    one. An unreadable one is an error unless it is to be overwritten anyway."""
    for path in (out / STATE_DIR / "build.json", out / mf.MANIFEST):
        if path.is_file():
            state = _parse_state(path)
            if state is not None:
                return state
            if overwrite:
                return {"options": None, "source": {"fingerprint": None}}
            raise UserError(f"{path}: not a readable build record ({path.stat().st_size} bytes); remove it or "
                            "pass --overwrite")
    return None


def _parse_state(path: Path) -> dict[str, Any] | None:
    """A build state or manifest with options and a source fingerprint; None if it is anything else."""
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    readable = (isinstance(state, dict) and isinstance(state.get("options"), dict)
                and isinstance(state.get("source"), dict) and isinstance(state["source"].get("fingerprint"), str))
    return state if readable else None


def _difference(previous: dict[str, Any], state: dict[str, Any]) -> str:
    changed = [f"{k}={previous['options'].get(k)!r} (now {v!r})"
               for k, v in state["options"].items() if previous["options"].get(k) != v]
    if previous["source"]["fingerprint"] != state["source"]["fingerprint"]:
        changed.append("another source")
    return ", ".join(changed) or "other settings"


def _remove_shard_set(out: Path) -> None:
    """Delete only what a build writes (manifest first, so the set stops looking complete)."""
    (out / mf.MANIFEST).unlink(missing_ok=True)
    for path in sorted(out.glob("*.tar")) + sorted((out / STATE_DIR).glob("*.json")):
        path.unlink()


def _complete(out: Path, name: str) -> bool:
    """A shard from an earlier (killed) run is kept only if its record and sha256 match the file."""
    record = _read_shard_record(out, name)
    return record is not None and _matches(out / name, record, rehash=True)


def _matches(path: Path, record: dict[str, Any], rehash: bool) -> bool:
    return (path.is_file() and path.stat().st_size == record["bytes"]
            and (not rehash or mf.sha256_file(path) == record["sha256"]))


def _read_shard_record(out: Path, name: str) -> dict[str, Any] | None:
    """The record a build wrote for shard `name`; None if there is none or it is unreadable or malformed
    (a build then rewrites the shard)."""
    try:
        return _load_shard_record(out, name)
    except UserError:
        return None


def _load_shard_record(out: Path, name: str) -> dict[str, Any] | None:
    """None if absent; UserError naming the file if unreadable or malformed."""
    path = out / STATE_DIR / f"{name}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable shard record ({e}); re-run its build job") from None
    problem = _record_problem(record, name)
    if problem:
        raise UserError(f"{path}: malformed shard record ({problem}); re-run its build job")
    return record


def _record_problem(record: Any, name: str) -> str:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    missing = [k for k in ("name", "num_samples", "bytes", "sha256", "class_counts", "skipped") if k not in record]
    if missing:
        return f"missing {', '.join(missing)}"
    if record["name"] != name:
        return f"it names {record['name']!r}"
    if not (mf.is_count(record["num_samples"]) and mf.is_count(record["bytes"])
            and isinstance(record["sha256"], str) and mf.SHA256_HEX.fullmatch(record["sha256"])):
        return "num_samples, bytes or sha256 of the wrong type"
    if not (isinstance(record["class_counts"], list) and all(map(mf.is_count, record["class_counts"]))
            and isinstance(record["skipped"], list)):
        return "class_counts or skipped of the wrong type"
    return ""


@dataclass(frozen=True)
class ShardJob:
    """One shard to encode and write, whole, in one worker process."""

    out: Path
    shard: ShardPlan
    tasks: tuple[SampleTask, ...]
    num_classes: int
    skip_bad: bool


def _write_shards(out: Path, cub: Cub, shards: list[ShardPlan], options: BuildOptions, workers: int,
                  skip_bad: bool, progress: bool) -> list[tuple[Record, str]]:
    """Each shard encoded and written by one of `workers` processes; returns the bad images (plan order)."""
    images = os.path.join(cub.root, "images")
    jobs = [ShardJob(out, s, tuple(SampleTask(r, os.path.join(images, r.path), cub.classes[r.label], s.split,
                                              options.encode) for r in s.records), len(cub.classes), skip_bad)
            for s in shards]
    # Largest shards first: the short last shard of each split then fills the gaps at the end instead of
    # leaving workers idle behind a full one. The order of work never changes what is written.
    jobs.sort(key=lambda job: len(job.tasks), reverse=True)
    bad: dict[str, list[tuple[Record, str]]] = {}
    total = sum(len(job.tasks) for job in jobs)
    with tqdm(total=total, unit="img", desc=f"build {out.name}", disable=not progress) as bar, \
            _mapped(write_shard, jobs, workers, after=lambda pids: _remove_temporaries_of(out, pids)) as results:
        for job, shard_bad in zip(jobs, results, strict=True):
            bar.update(len(job.tasks))
            bad[job.shard.name] = shard_bad
    return [b for s in shards for b in bad[s.name]]


def write_shard(job: ShardJob) -> list[tuple[Record, str]]:
    """Encode a shard's samples and write its tar, unless one is bad and bad ones may not be skipped
    (then the shard is never written: the build goes on only to list every bad file)."""
    samples = [encode_sample(task) for task in job.tasks]
    bad = [(s.task.record, s.error) for s in samples if s.error]
    if not bad or job.skip_bad:
        _write_tar(job.out, job.shard, [s for s in samples if not s.error], bad, job.num_classes)
    return bad


@dataclass(frozen=True)
class SampleResult:
    task: SampleTask
    members: tuple[tuple[str, bytes], ...] = ()
    error: str = ""


def encode_sample(task: SampleTask) -> SampleResult:
    """Runs in a worker process: read the file, encode it, build the tar members of one sample."""
    try:
        with open(task.image_path, "rb", buffering=0) as f:
            data = f.read()
    except FileNotFoundError:
        return SampleResult(task, error="missing")
    except OSError as e:
        return SampleResult(task, error=f"unreadable: {e.strerror}")
    try:
        encoded = encode_image(data, task.record.bbox, task.options)
    except BadImage as e:
        return SampleResult(task, error=str(e))
    record = task.record
    meta = {
        "image_id": record.image_id,
        "class_index": record.label,
        "class_name": task.class_name,
        "split": task.split,
        "path": f"images/{record.path}",
        "original_size": list(encoded.original_size),
        "size": list(encoded.size),
        "bbox": [round(v, 2) for v in encoded.bbox],
    }
    members = (
        (f"{record.key}.cls", str(record.label).encode()),
        (f"{record.key}.jpg", encoded.jpeg),
        (f"{record.key}.json", json.dumps(meta, sort_keys=True, allow_nan=False).encode()),  # strict JSON
    )
    return SampleResult(task, members)


class _mapped:
    """Context manager yielding fn(job) for each job in order, from a process pool or in-process. On leaving,
    `after(pids)` gets the pids of the pool's workers, which are then gone (terminated if still busy)."""

    def __init__(self, fn: Any, jobs: list[Any], workers: int, after: Callable[[list[int]], None] | None = None) -> None:
        self.fn, self.jobs, self.workers, self.after, self.pool = fn, jobs, workers, after, None

    def __enter__(self) -> Iterator[Any]:
        if self.workers <= 1 or len(self.jobs) < 2:
            return map(self.fn, self.jobs)
        # fork: workers start in milliseconds (spawn re-imports for ~0.5 s each, a third of a 1,000-image
        # build); they only read files, run PIL and write tars, so they need no thread pool of the parent.
        self.pool = multiprocessing.get_context("fork").Pool(min(self.workers, len(self.jobs)))
        return self.pool.imap(self.fn, self.jobs, chunksize=1)

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            pids = [worker.pid for worker in self.pool._pool]  # noqa: SLF001 - the only way to name them
            self.pool.terminate()
            self.pool.join()
            if self.after is not None:
                self.after(pids)


def _remove_temporaries_of(out: Path, pids: list[int]) -> None:
    """A failed build stops its workers mid-write (terminate is SIGTERM): their temporaries go with them."""
    for pid in pids:
        for path in out.glob(f".*{mf.TEMPORARY_MARK}{pid}"):
            mf.remove_quietly(path)


def _write_tar(out: Path, shard: ShardPlan, samples: Iterable[SampleResult], skipped: list[tuple[Record, str]],
               num_classes: int) -> None:
    """Temp file -> shard record -> rename: a tar under its final name is always complete."""
    class_counts = [0] * num_classes
    members = []
    for sample in samples:
        members += sample.members
        class_counts[sample.task.record.label] += 1
    data = tar_bytes(members)
    record = {
        "name": shard.name,
        "num_samples": sum(class_counts),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "class_counts": class_counts,
        "skipped": [{"image_id": r.image_id, "path": f"images/{r.path}", "reason": reason} for r, reason in skipped],
    }
    final = out / shard.name
    tmp = mf.temporary_name(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        mf.write_json_atomic(out / STATE_DIR / f"{shard.name}.json", record)
        os.replace(tmp, final)
    except OSError as e:  # a full disk, a quota: one line naming the shard
        raise UserError(f"{final}: cannot write ({e.strerror or e})") from None
    finally:  # gone after the rename; otherwise whatever stopped the write (an error, Ctrl-C) leaves none
        mf.remove_quietly(tmp)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """The bytes `tarfile` writes for these members in ustar format with fixed metadata, assembled directly:
    `TarFile.addfile` copies every TarInfo and streams through file objects, which doubled the cost of
    writing a shard of small members."""
    chunks = []
    for name, payload in members:
        chunks += [_ustar_header(name, len(payload)), payload, tarfile.NUL * (-len(payload) % tarfile.BLOCKSIZE)]
    chunks.append(tarfile.NUL * 2 * tarfile.BLOCKSIZE)  # end-of-archive marker
    size = sum(map(len, chunks))
    chunks.append(tarfile.NUL * (-size % tarfile.RECORDSIZE))  # tarfile pads to whole records
    return b"".join(chunks)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


_NAME, _SIZE, _CHECKSUM = slice(0, 100), slice(124, 136), slice(148, 156)  # ustar header fields
_TEMPLATE = bytearray(_tarinfo("", 0).tobuf(tarfile.USTAR_FORMAT))
_TEMPLATE[_CHECKSUM] = b" " * 8  # the checksum is a byte sum taken with its own field as spaces
_TEMPLATE_SUM = sum(_TEMPLATE) - sum(_TEMPLATE[_SIZE])  # the empty name adds nothing


def _ustar_header(name: str, size: int) -> bytes:
    """`_tarinfo(name, size).tobuf(USTAR_FORMAT)` in a tenth of the time: only name, size and checksum vary."""
    encoded = name.encode("ascii")
    if len(encoded) > 100:  # ustar's prefix field is never needed: names are a key and an extension
        raise ValueError(f"tar member name too long: {name!r}")
    size_field = b"%011o\0" % size
    header = bytearray(_TEMPLATE)
    header[_NAME] = encoded.ljust(100, tarfile.NUL)
    header[_SIZE] = size_field
    header[_CHECKSUM] = b"%06o\0 " % (_TEMPLATE_SUM + sum(encoded) + sum(size_field))
    return bytes(header)


def merge(out: Path, rehash: bool = True) -> dict[str, Any]:
    """Check every job's part and every shard's size and sha256 (size only without `rehash`), then write
    manifest.json (last). Takes the lock on `out` alone: refused while any build job is writing there."""
    if not (out / STATE_DIR / "build.json").is_file():  # checked before the lock, which would create .build
        raise UserError(f"{out}: no build state ({out / STATE_DIR / 'build.json'} missing); run `pipeline build` first")
    with lock.acquire(out / STATE_DIR / LOCK, "exclusive", {"command": "merge"}, what=str(out),
                      when_alone=lambda: remove_temporaries(out)):
        return _merge_locked(out, rehash)


def _merge_locked(out: Path, rehash: bool) -> dict[str, Any]:
    state = _load_state(out / STATE_DIR / "build.json")
    _check_jobs(out)
    num_classes = len(state["classes"])
    splits: dict[str, Any] = {}
    skipped: list[dict[str, Any]] = []
    for split in mf.SPLITS:
        shards = [_checked_shard(out, name, rehash, num_classes) for name in state["plan"][split]]
        skipped += [s for shard in shards for s in shard["skipped"]]
        splits[split] = {
            "num_samples": sum(s["num_samples"] for s in shards),
            "class_counts": [sum(s["class_counts"][c] for s in shards) for c in range(num_classes)],
            "shards": [{k: s[k] for k in ("name", "num_samples", "bytes", "sha256")} for s in shards],
        }
    manifest = {
        "format": mf.FORMAT,
        "version": mf.VERSION,
        "classes": state["classes"],
        "options": state["options"],
        "source": state["source"],
        "tool": {"cubstream": "0.1.0", "pillow": PIL.__version__},
        "splits": splits,
        "skipped": sorted(skipped, key=lambda s: s["image_id"]),
    }
    mf.validate(manifest, str(out / mf.MANIFEST))
    mf.write_json_atomic(out / mf.MANIFEST, manifest)
    return manifest


def _load_state(path: Path) -> dict[str, Any]:
    """build.json, with every field merge uses checked; one line naming the file otherwise."""
    state = _parse_state(path)
    problem = "not JSON with options and a source fingerprint" if state is None else _state_problem(state)
    if problem:
        raise UserError(f"{path}: not a readable build state ({problem}); rebuild with --overwrite")
    return state


def _state_problem(state: dict[str, Any]) -> str:
    classes, plan = state.get("classes"), state.get("plan")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "'classes' is not a list of names"
    if not isinstance(plan, dict) or sorted(plan) != sorted(mf.SPLITS):
        return f"'plan' is not an object with the splits {', '.join(mf.SPLITS)}"
    for split, names in plan.items():
        if not isinstance(names, list) or not all(isinstance(n, str) and mf.PLAIN_NAME.fullmatch(n) for n in names):
            return f"plan of {split!r} is not a list of shard file names"
    return ""


@dataclass(frozen=True)
class Marker:
    """A finished job's part file, `job-III-of-JJJ.json`."""

    path: Path
    index: int
    total: int


MARKER = re.compile(r"job-(\d+)-of-(\d+)\.json")


def _markers(out: Path) -> list[Marker]:
    """Every part marker; a file named like one but not parseable is an error naming it."""
    found = []
    for path in sorted((out / STATE_DIR).glob("job-*")):
        match = MARKER.fullmatch(path.name)
        index, total = (int(match[1]), int(match[2])) if match else (-1, 0)
        if not 0 <= index < total:
            raise UserError(f"{path}: not a part marker of this tool (expected job-III-of-JJJ.json with "
                            "III < JJJ); remove it and re-run the build job that should have written it")
        found.append(Marker(path, index, total))
    return found


def _check_jobs(out: Path) -> None:
    markers = _markers(out)
    if not markers:
        raise UserError(f"{out}: no finished build job found in {out / STATE_DIR}")
    totals = {m.total for m in markers}
    if len(totals) != 1:
        raise UserError(f"{out}: parts from builds with different --num-jobs ({sorted(totals)}); rebuild one way")
    (total,) = totals
    missing = sorted(set(range(total)) - {m.index for m in markers})
    if missing:
        raise UserError(f"{out}: job(s) {', '.join(map(str, missing))} of {total} have not finished (no part file)")


def _checked_shard(out: Path, name: str, rehash: bool, num_classes: int) -> dict[str, Any]:
    record = _load_shard_record(out, name)
    if record is None or not (out / name).is_file():
        raise UserError(f"{out / name}: shard missing; re-run its build job")
    if len(record["class_counts"]) != num_classes or not all(_skip_entry(s) for s in record["skipped"]):
        raise UserError(f"{out / STATE_DIR / (name + '.json')}: malformed shard record (class_counts or skipped do "
                        f"not fit {num_classes} classes); re-run its build job")
    if not _matches(out / name, record, rehash):
        raise UserError(f"{out / name}: size or sha256 does not match its build record; re-run its build job")
    return record


def _skip_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and mf.is_count(entry.get("image_id")) and isinstance(entry.get("path"), str)
            and isinstance(entry.get("reason"), str))
