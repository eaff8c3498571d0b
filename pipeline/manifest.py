"""The shard-set contract (DESIGN 3): manifest schema, loading from a directory or URL, atomic writes."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shlex
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

FORMAT = "cubstream-shards"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")
FORBIDDEN_EXTENSIONS = (".pyd", ".pth", ".pickle", ".pkl")
URL_TIMEOUT_S = 30


class ManifestError(UserError):
    """The manifest is missing, unreadable or not a cubstream shard set this code understands."""


PIPE_EXAMPLE = "pipe:aws s3 cp s3://BUCKET/PREFIX/{} -"


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def is_pipe(location: str) -> bool:
    """A `pipe:COMMAND` location: COMMAND with `{}` where the file name goes prints that file to stdout."""
    return location.startswith("pipe:")


def join(location: str, name: str) -> str:
    """Path, URL or pipe: command of `name` inside a shard-set location (a directory, an http(s) base URL,
    or a `pipe:` command template such as 'pipe:aws s3 cp s3://BUCKET/PREFIX/{} -')."""
    if is_pipe(location):
        if "{}" not in location:
            raise UserError(f"{location}: a pipe: location needs {{}} where the file name goes, e.g. "
                            f"'{PIPE_EXAMPLE}'")
        return location.replace("{}", shlex.quote(name))
    if is_url(location):
        return location.rstrip("/") + "/" + name
    return str(Path(location) / name)


def read_bytes(location: str, name: str) -> bytes:
    """Read one file of a shard set, local or remote; a failure is one line naming the file or URL."""
    target = join(location, name)
    if is_pipe(location):
        return _read_pipe(target)
    if is_url(location):
        try:
            with urllib.request.urlopen(target, timeout=URL_TIMEOUT_S) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            raise UserError(f"{target}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"{target}: unreachable ({reason})") from None
        except http.client.HTTPException as e:  # IncompleteRead: the connection closed mid-body
            raise UserError(f"{target}: transfer cut short ({type(e).__name__}: {e})") from None
    try:
        return Path(target).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{target}: no such file") from None
    except OSError as e:
        raise UserError(f"{target}: {e.strerror}") from None


def _read_pipe(target: str) -> bytes:
    """stdout of a pipe: command (run by the shell, as webdataset does for shards); exit status 0 or an error."""
    result = subprocess.run(target[len("pipe:"):], shell=True, capture_output=True)
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise UserError(f"{target}: exit status {result.returncode}" + (f" ({detail[-1]})" if detail else ""))
    return result.stdout


def load_manifest(location: str) -> dict[str, Any]:
    """Load and validate `manifest.json` of a shard set; raises ManifestError with one line."""
    try:
        raw = read_bytes(location, MANIFEST)
    except UserError as e:
        raise ManifestError(f"no shard set at {location}: {e}") from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ManifestError(f"{join(location, MANIFEST)}: not valid JSON ({e})") from None
    validate(manifest, join(location, MANIFEST))
    return manifest


def validate(manifest: Any, where: str) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{where}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ManifestError(
            f"{where}: format version {manifest.get('version')!r} is not supported (this code reads {VERSION})"
        )
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes:
        raise ManifestError(f"{where}: 'classes' must be a non-empty list")
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise ManifestError(f"{where}: 'splits' missing")
    for split in SPLITS:
        info = splits.get(split)
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise ManifestError(f"{where}: split {split!r} missing or has no shard list")
        total = 0
        for shard in info["shards"]:
            if not isinstance(shard, dict) or not {"name", "num_samples", "bytes", "sha256"} <= shard.keys():
                raise ManifestError(f"{where}: split {split!r} has a malformed shard entry")
            if "/" in shard["name"] or shard["name"].startswith("."):
                raise ManifestError(f"{where}: shard name {shard['name']!r} is not a plain file name")
            total += shard["num_samples"]
        if total != info.get("num_samples"):
            raise ManifestError(f"{where}: split {split!r} num_samples {info.get('num_samples')} != sum of shards {total}")


def shard_locations(location: str, manifest: dict[str, Any], split: str) -> list[str]:
    """Paths or URLs of every shard of `split`, in manifest order."""
    return [join(location, shard["name"]) for shard in manifest["splits"][split]["shards"]]


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to a temporary name in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(src: Path, final: Path) -> None:
    """Rename the finished directory `src` to `final`; an old `final` is moved aside first, then deleted,
    so `final` is always either the old or the new whole directory."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(src, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())
