"""The output directory: what fittune owns, one run at a time, and writes that survive a crash or a full disk.

Rules (README "What fittune writes, and what it never touches"):
  * fittune deletes or replaces only what it created: every directory it creates holds a `.fittune` marker,
    and a non-empty directory without one is never written into;
  * one run per directory: the global main process holds an OS lock (`flock` on the directory itself) for the
    run's life; the kernel drops it when the process dies, even by `kill -9`;
  * every file is written to a temporary name, fsynced, renamed into place and the directory fsynced; a
    directory (`final/`, `eval/`, a checkpoint) is published by an atomic exchange with the old one, so there
    is never a moment with neither.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Literal, NamedTuple

from fittune.errors import FittuneError, first_line

DirKind = Literal["train", "eval", "checkpoint", "final", "export"]
"""What fittune made a directory for (its marker says it): a run, an evaluation, a training checkpoint, a run's
final/ while it is built, an export while it is built."""
MARKER = ".fittune"
LOCK_INFO = ".fittune.lock"
REPLACED = ".fittune.replaced"  # the runs --overwrite moved aside, removed when the run replacing them finishes
# what a run leaves in its directory: any of these means the directory holds a run
HELDOUT_IDS = "heldout_ids.json"  # the run's held-out rows (ids + content hash)
OWN_CONFIG = "fittune_config.yaml"  # the run's config in a model directory (final/, an export)
OWN_HELDOUT_IDS = "fittune_heldout_ids.json"  # the run's held-out ids in a model directory
RUN_FILES = ("config.yaml", "train_log.jsonl", HELDOUT_IDS, "final", "checkpoints", "eval")
# every name a run writes at its top level (with MARKER, LOCK_INFO, REPLACED, fittune's hidden temporary
# names and evaluate.py's marked eval-* directories): anything else there is the user's
STEP_NAME = re.compile(r"step-\d+")  # a checkpoint's directory in RUN/checkpoints/ (step-N.tmp while written)
RUN_NAMES = frozenset(RUN_FILES) | {"eval_untrained", "ranks.json", "loss_curve.png", "tensorboard", "final.tmp",
                                    "eval.tmp", "eval_untrained.tmp"}


@dataclass(frozen=True)
class RunLayout:
    """Where a run keeps each of its files: the one place that names them."""

    root: Path

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunLayout:
        """The run whose `checkpoints/step-N` is `checkpoint`, by its place (whether it is a run: `owned`)."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def config(self) -> Path:
        """The resolved recipe with the run's facts (`run:`), as train.py and evaluate.py read it back."""
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        """One JSON line per logged step (loss, learning rate, tokens/s ...)."""
        return self.root / "train_log.jsonl"

    @property
    def heldout_ids(self) -> Path:
        """The held-out rows' ids and content hash: what evaluate.py scores."""
        return self.root / HELDOUT_IDS

    @property
    def final(self) -> Path:
        """The trained model (or adapter), written whole at the end."""
        return self.root / "final"

    @property
    def checkpoints(self) -> Path:
        """The resumable training checkpoints (step-N/)."""
        return self.root / "checkpoints"

    @property
    def eval(self) -> Path:
        """The held-out evaluation that training wrote."""
        return self.root / "eval"

    @property
    def eval_untrained(self) -> Path:
        """The untrained model's evaluation (train.eval.before_training)."""
        return self.root / "eval_untrained"

    @property
    def loss_curve(self) -> Path:
        return self.root / "loss_curve.png"

    @property
    def ranks(self) -> Path:
        """Which host and device each rank ran on."""
        return self.root / "ranks.json"


# ---- durable writes ---------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `path` whole or not at all: temporary file, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync it, so a crash can tear at most the last line (dropped on resume)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below `root` (before it is renamed into place)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _umask() -> int:
    try:  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def readable_like_umask(root: Path) -> None:
    """Give every file below `root` the permissions a new file gets (0o666, 0o777 for an executable one,
    minus the umask): safetensors writes its files owner-only (0600), which would leave a model directory
    others cannot read beside config files that they can."""
    umask = _umask()
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o111  # e.g. DeepSpeed's zero_to_fp32.py stays runnable
            os.chmod(path, (0o777 if executable else 0o666) & ~umask)


_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_NOREPLACE = 1


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2(a, b, flags); False where the system cannot (not Linux, no renameat2, a filesystem
    without the flag); an OSError for any other failure (FileExistsError: `b` exists, RENAME_NOREPLACE)."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform.startswith("linux") else None
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` only if `dst` does not exist, atomically (Linux renameat2 RENAME_NOREPLACE: a plain
    rename would replace an empty directory that appeared meanwhile); FileExistsError if it does; False where
    the system cannot (the caller checks, then renames)."""
    return _renameat2(src, dst, _RENAME_NOREPLACE)


def keep_access(old: os.stat_result, new: Path) -> None:
    """Give the directory `new`, which replaces one whose stat was `old`, the old one's permissions and group: a
    user's `chmod 750` (or a setgid group) on a directory is kept when fittune replaces it with its results.
    The owner keeps rwx: fittune writes into it, and replaces or removes it later."""
    os.chmod(new, stat.S_IMODE(old.st_mode) | stat.S_IRWXU)
    if new.stat().st_gid == old.st_gid:
        return
    # the files built in it too: they were made beside it, where a setgid directory's group did not reach them
    for path in [new, *new.rglob("*")]:
        try:
            if not path.is_symlink():
                os.chown(path, -1, old.st_gid)
        except OSError:  # a group this account is not in, or a filesystem without groups: the mode alone is kept
            return


def publish_dir(tmp: Path, final: Path) -> None:
    """Put a finished directory `tmp` in place of `final` (created by fittune) with no moment where neither
    exists: an atomic exchange, then the old one is removed. Where exchange is not supported, the old one is
    renamed aside first and removed after."""
    if final.is_symlink():  # exchanging it would put a link to someone's directory where fittune removes
        raise FittuneError(f"{final} is a symbolic link, which fittune never creates: remove the link (what it "
                           f"points to is not fittune's to replace)")
    readable_like_umask(tmp)
    if final.is_dir():
        keep_access(final.stat(), tmp)
    fsync_tree(tmp)
    if final.exists():
        kind = marker_kind(tmp)
        if kind is not None and not (final / MARKER).is_file():
            claim_dir(final, kind)  # marked before the swap: a kill right after it leaves a <name>.tmp of ours
        if _exchange(tmp, final):
            remove_tree(tmp)  # tmp now holds the old directory (marked above)
        else:
            # a name nobody else uses (never a user's `<name>.old`): fittune's own copy, removed right after
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            final.rename(old)
            tmp.rename(final)
            remove_tree(old)
    else:
        tmp.rename(final)
    fsync_dir(final.parent)


def _is_write_failure(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return True
    if type(e).__name__ == "SafetensorError":  # safetensors' own type for an I/O failure (e.g. ENOSPC)
        return True
    # torch.save reports a failed write as a RuntimeError: "failed writing file", or on a full disk
    # "[enforce fail at inline_container.cc] unexpected pos" with an iostream error as its context
    markers = ("writing", "No space", "inline_container", "PytorchStreamWriter", "iostream error")
    return isinstance(e, RuntimeError) and any(m in f"{e} {e.__context__}" for m in markers)


@contextmanager
def write_guard(what: str, intact: str):
    """Turn a failed write (full disk, permissions) into one clear error saying what is still intact."""
    try:
        yield
    except FittuneError:
        raise
    except Exception as e:
        if not _is_write_failure(e):
            raise
        reason = first_line(e)
        if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:  # not a disk or permission problem
            raise FittuneError(f"could not write {what} ({reason}): choose a shorter name; {intact}") from None
        raise FittuneError(f"could not write {what} ({reason}): free disk space or fix permissions; "
                           f"{intact}") from None


def check_free_space(directory: Path, need_bytes: int, what: str) -> None:
    """Refuse a save whose size is known before starting it when the disk cannot hold it."""
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise FittuneError(f"not enough free disk space for {what}: needs {need_bytes / 2**20:.1f} MiB, "
                           f"{free / 2**20:.1f} MiB free in {directory}; free some space")


# ---- ownership --------------------------------------------------------------------------------------------


def owned(path: Path, kind: DirKind | None = None) -> bool:
    """Whether fittune created `path` (its marker; never a symbolic link, which fittune does not create); with
    `kind`, for that purpose (`train`, `eval`, `checkpoint`): fittune replaces or removes a directory only as
    what it made it for, never e.g. a run someone placed where a checkpoint goes."""
    if path.is_symlink() or not (path / MARKER).is_file():
        return False
    return kind is None or marker_kind(path) == kind


def marker_kind(path: Path) -> DirKind | None:
    """What fittune created `path` for (`train`, `eval`, `checkpoint`...), from its marker; None without one."""
    try:
        return json.loads((path / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def resolved(path: Path) -> Path:
    """`path` with its links and `..` resolved (the place it names), or one error naming a link loop."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:  # a symbolic link loop
        raise FittuneError(f"{path} cannot be resolved ({e}): fix or remove the symbolic link") from None


def fittune_ancestor(path: Path) -> Path | None:
    """The nearest directory above `path` that fittune created (None: none): what is inside fittune's own
    directories (checkpoints, final/, eval/) is replaced and removed by fittune, so nothing else belongs there."""
    return next((parent for parent in resolved(path).parents if owned(parent)), None)


def owning_run(path: Path) -> Path | None:
    """The training run that `path` is or lies in (its final/, a checkpoint), None outside any."""
    real = resolved(path)
    return next((d for d in (real, *real.parents) if owned(d, "train")), None)


def check_not_inside_fittune_dir(path: Path, flag: str, evaluation: bool = False) -> None:
    """Refuse `path` inside a directory fittune created, except, for an evaluation, an `eval*` directory
    directly inside a training run, beside the run's own eval/ (the run's other names are its own)."""
    real = resolved(path)
    above = fittune_ancestor(real)
    if above is None:
        return
    if evaluation and above == real.parent and owned(above, "train"):
        if real.name.startswith("eval") and not real.name.endswith(".tmp"):
            return
        raise FittuneError(f"{flag} {path} is inside the run {above}, whose other names (final/, checkpoints/, "
                           f"...) are the run's own: name it eval-SOMETHING there, or choose a directory outside")
    raise FittuneError(f"{flag} {path} is inside {above}, a fittune {marker_kind(above) or 'train'} directory: "
                       f"fittune replaces and removes what is inside its own directories (checkpoints, final/, "
                       f"eval/), so nothing of yours belongs there; choose a directory outside it")


def check_writable_dir(path: Path, flag: str) -> None:
    """Refuse an existing non-empty directory that fittune did not create (read-only check)."""
    if path.exists() and not path.is_dir():
        raise FittuneError(f"{flag} {path} is a file, not a directory: choose another path")
    if path.is_symlink():  # fittune never writes through a link: the user names the directory itself
        raise FittuneError(f"{flag} {path} is a symbolic link (to {path.resolve()}): give that directory's own "
                           f"path, or a new one")
    if path.is_dir() and not owned(path) and not interrupted_claim(path):  # empty, or a claim cut short: adopted
        raise FittuneError(f"{flag} {path} is not empty and was not created by fittune (no {MARKER} marker): "
                           f"choose a new or empty directory; fittune never writes into or deletes files it "
                           f"did not create")


# the most fittune adds to a directory's name for the directories it builds or sets aside beside it (a replaced
# run's `<name>.replaced-YYYYmmdd-HHMMSS-<pid>-<hex>`, an evaluation's `.<name>.tmp-<pid>-<hex>` ...)
NAME_ROOM = 48


def check_not_cwd(path: Path, flag: str) -> None:
    """Refuse the current directory as an output directory: fittune builds and replaces an output directory
    beside itself (and the shell's directory would be the one replaced)."""
    if resolved(Path(path)) == resolved(Path.cwd()):
        raise FittuneError(f"{flag} {path} is the current directory, which this would replace (fittune builds "
                           f"and replaces an output directory beside itself): run from the directory above and "
                           f"name it, or name a new directory inside this one (e.g. {flag} ./run)")


def check_name_room(path: Path, flag: str) -> None:
    """Refuse a directory name too long to build or replace beside itself (NAME_ROOM more bytes), at the start,
    not when the run, evaluation or export is written or replaced."""
    above = next((p for p in Path(path).absolute().parents if p.is_dir()), Path("/"))
    try:
        limit = os.pathconf(above, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(Path(path).name))
    if size + NAME_ROOM > limit:
        raise FittuneError(f"{flag} {path}: its name is {size} bytes long; fittune builds and replaces it beside "
                           f"itself under names up to {NAME_ROOM} bytes longer, and this filesystem allows {limit}: "
                           f"choose a name of at most {limit - NAME_ROOM} bytes")


def missing_parents(path: Path) -> list[Path]:
    """The directories above `path` that do not exist yet (nearest first): what creating it would make, for
    `remove_if_empty` to take back if the command then fails."""
    return [p for p in Path(path).absolute().parents if not p.exists()]


def remove_if_empty(made: list[Path]) -> None:
    """Remove the directories a failed command created (`missing_parents`, nearest first) while they are
    empty: a refused command leaves no trace, and never removes anything that is in them now."""
    for directory in made:
        try:
            directory.rmdir()
        except OSError:  # not empty (someone else's now), or gone: leave it and everything above it
            return


def claim_dir(path: Path, kind: DirKind) -> Path:
    """Create `path` (parents too) or adopt an empty one, and mark it as fittune's (sealed: `sealed`)."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        for stale in path.glob(f".{MARKER}.tmp-*"):  # a marker write killed part-way (`interrupted_claim`)
            stale.unlink()
        # its identity: a copy of the directory (cp -r, an unpacked archive) carries the marker, not the identity
        marker = {"created_by": "fittune", "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "nonce": os.urandom(16).hex(), "identity": _identity(path)}
        key = _trust_key(create=True)
        if key is not None:  # no key (an unwritable config directory): unsealed, so never trusted to unpickle
            marker["seal"] = _seal(key, marker, path)
        atomic_write_text(path / MARKER, json.dumps(marker) + "\n")
    return path


# ---- the seal: "created here by fittune under this account" --------------------------------------------------


def trust_key_path() -> Path:
    """This account's secret key for sealing markers ($XDG_CONFIG_HOME/fittune/trust.key, owner-only)."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "fittune" / "trust.key"


def _trust_key(create: bool) -> bytes | None:
    """The key (made once, atomically: concurrent first runs agree on one); None when absent and not
    `create`, or when it cannot be made."""
    path = trust_key_path()
    try:
        return _read_key(path)
    except ValueError:
        return None  # damaged, or readable by others: nothing verifies, so nothing is trusted (README)
    except OSError:
        if not create:
            return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".trust.key.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # the first creator wins; a second keeps the first's key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return _read_key(path)
    except (OSError, ValueError):
        return None


def _read_key(path: Path) -> bytes | None:
    """The key, only from a regular file of this account's that nobody else can read (else ValueError: anyone
    who can read it could forge seals)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ValueError(f"{path} is not owner-only")
        return bytes.fromhex(f.read().strip()) or None


def _seal(key: bytes, marker: dict, path: Path) -> str:
    """HMAC of the marker's fields and the directory's identity (inode and, where the filesystem records it,
    birth time): a marker copied into another directory, a directory copied or unpacked from elsewhere (a new
    inode, another account's key), or a new directory that reuses a deleted one's inode does not verify."""
    fields = {k: marker.get(k) for k in ("kind", "created", "nonce")} | _identity(path)
    return hmac.new(key, json.dumps(fields, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def _identity(path: Path) -> dict:
    """The directory's own identity: its inode and birth time, which a rename keeps and a copy does not have."""
    return {"inode": path.stat().st_ino, "born": _birth_time(path)}


_STATX_BTIME = 0x800  # linux/stat.h


def _birth_time(path: Path) -> list[int] | None:
    """[seconds, nanoseconds] of `path`'s creation (Linux statx; nobody can set it, unlike mtime: tar restores
    that), or None where the system or filesystem does not record it (then the inode alone identifies it)."""
    if not sys.platform.startswith("linux"):
        return None
    fn = getattr(ctypes.CDLL(None, use_errno=True), "statx", None)
    buf = ctypes.create_string_buffer(256)  # struct statx
    at_fdcwd = -100
    if fn is None or fn(at_fdcwd, os.fsencode(path), 0, _STATX_BTIME, buf) != 0:
        return None
    mask = int.from_bytes(buf.raw[0:4], sys.byteorder)
    if not mask & _STATX_BTIME:
        return None
    # stx_btime: struct statx_timestamp at offset 80 (s64 tv_sec, u32 tv_nsec)
    return [int.from_bytes(buf.raw[80:88], sys.byteorder, signed=True), int.from_bytes(buf.raw[88:92], sys.byteorder)]


def sealed(path: Path) -> bool:
    """Whether `path` is a directory fittune created right here under this account: its marker's seal
    verifies with this account's key. Renaming it on the same filesystem keeps the seal; a copy does not."""
    return seal_problem(path) is None


def _marker(path: Path) -> dict | None:
    """`path`'s marker (None: none, a damaged one, or a symbolic link, which fittune never creates)."""
    if path.is_symlink():
        return None
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def made_here(path: Path) -> bool:
    """Whether `path` is the very directory fittune marked (renamed since, perhaps), not a copy of one: `cp -r`
    or an unpacked archive carries the marker, not the directory's identity. It needs no key: it decides only
    what fittune may delete as its own (what it may unpickle asks `sealed`)."""
    marker = _marker(path)
    if marker is None:
        return False
    if isinstance(marker.get("identity"), dict):
        saved, now = marker["identity"], _identity(path)
        if saved.get("inode") != now["inode"]:
            return False
        # birth times only where both have one: NFSv3 reports none, NFSv4.2 does, for the same directory
        return None in (saved.get("born"), now["born"]) or saved.get("born") == now["born"]
    if "seal" in marker:  # an earlier fittune's marker: its seal covers the identity
        return sealed(path)
    return True  # an earlier fittune's unsealed marker: nothing tells a copy from the original


def fittunes_own(entry: Path, kind: DirKind | None) -> bool:
    """Whether `entry` is a directory fittune made as `kind` (None: as anything) and may replace or remove as its own: the very
    directory it marked; or, in a run copied or moved whole (the run has a new identity, and so has every
    directory in it), one whose marker no other directory of the run shares (a `cp -r` of one inside the run
    duplicates its marker). Never a user's copy made beside it, though the copy carries the marker."""
    if not owned(entry, kind):
        return False
    if made_here(entry):
        return True
    run = owning_run(entry.parent)
    nonce = (_marker(entry) or {}).get("nonce")
    if run is None or made_here(run) or nonce is None:
        return False
    saves = RunLayout(run).checkpoints
    inside = [*run.iterdir(), *(saves.iterdir() if saves.is_dir() and not saves.is_symlink() else [])]
    return sum((_marker(d) or {}).get("nonce") == nonce for d in inside if d.is_dir()) == 1


def seal_problem(path: Path) -> str | None:
    """Why `path`'s seal does not verify, in words for an error message (None: it verifies)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return f"{path} has no {MARKER} marker: fittune did not create it"
    if path.is_symlink() or not isinstance(marker, dict):
        return f"{path} is a symbolic link or has a damaged marker"
    if not isinstance(marker.get("seal"), str):
        return (f"{path}'s marker carries no seal (written by an earlier fittune, or when {trust_key_path()} "
                f"could not be created)")
    key = _trust_key(create=False)
    if key is None:
        return f"this account has no usable trust key on this machine ({trust_key_path()})"
    if not hmac.compare_digest(marker["seal"], _seal(key, marker, path)):
        return (f"{path}'s seal does not verify: it was copied, unpacked or received from elsewhere, or sealed "
                f"under another account's key")
    return None


def remove_tree(path: Path) -> None:
    """Remove a directory of fittune's with its marker last, so a kill part-way leaves a directory still
    marked as fittune's (which the next run removes) rather than an unmarked one it must refuse to touch, and
    a checkpoint's state file first, so a checkpoint half removed is not complete (`complete_checkpoints`).
    A symbolic link is refused: removing through it would empty a directory somewhere else."""
    if path.is_symlink():
        raise _link_refused(path)
    # a checkpoint's state file first: one whose removal is cut short is incomplete, never resumed from
    for child in sorted(path.iterdir(), key=lambda c: c.name != STATE_FILE):
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (path / MARKER).unlink(missing_ok=True)
    path.rmdir()


def _link_refused(path: Path) -> FittuneError:
    return FittuneError(f"refusing to delete {path}: it is a symbolic link, which fittune never creates; remove "
                        f"or move it yourself")


def interrupted_claim(path: Path) -> bool:
    """Whether `path` is a directory `claim_dir` may adopt although it has no marker: empty, or holding only
    the marker's temporary file (a claim killed between `mkdir` and the marker's rename). Adopted, never
    deleted: refusing it would block every later save of the same name."""
    if not path.is_dir() or path.is_symlink():
        return False
    return all(c.is_file() and c.name.startswith(f".{MARKER}.tmp-") for c in path.iterdir())


def claim_build_dir(tmp: Path, kind: DirKind, refusal: str) -> Path:
    """An empty, marked `tmp` to build a directory in before it is published: fittune's leftover of a crashed
    attempt (the same kind) is removed, a claim cut short is adopted, anything else there is refused with
    `refusal`."""
    if tmp.is_dir() and fittunes_own(tmp, kind):  # not a user's copy
        remove_tree(tmp)
    elif (tmp.exists() or tmp.is_symlink()) and not interrupted_claim(tmp):
        raise FittuneError(refusal)
    return claim_dir(tmp, kind)


def _builds_beside(out: Path, infix: str, kind: DirKind) -> list[Path]:
    """The build directories fittune made here for `out` (`.<name><infix><pid>-<hex>`, marked `kind`): live ones,
    or a killed command's leftovers."""
    if not out.parent.is_dir():
        return []
    found = out.parent.glob(f".{glob_escape(out.name)}{infix}*")
    return [d for d in found if d.is_dir() and fittunes_own(d, kind)]


class Build(NamedTuple):
    """A build directory reserved beside its output, and the lock its writer holds on it."""

    path: Path
    lock: DirLock


def reserve_build(out: Path, infix: str, kind: DirKind, program: str, busy: Callable[[str], str]) -> Build:
    """A new build directory for `out` beside it (`.<name><infix><pid>-<hex>`), locked then marked. A killed
    command's build for `out` is removed (also one killed before it was marked); a live one's refuses this one
    with `busy(holder)`, also when both started at the same instant (each looks again once its own is locked,
    so they never both write)."""
    def others(mine: Path | None = None) -> None:
        _clear_killed_builds(_builds_beside(out, infix, kind), kind, program, busy, mine)
        _clear_cut_claims(out, infix, program)

    others()  # refused here, before anything is created, in the common case
    path = out.with_name(f".{out.name}{infix}{os.getpid()}-{os.urandom(4).hex()}")
    try:
        lock = _claim_locked_build(path, kind, program)
    except BaseException:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)  # ours (the unique name above), marked or not yet
        raise
    try:
        others(mine=path)
    except BaseException:
        remove_owned(path, kind)
        lock.release()
        raise
    return Build(path, lock)


# a build is locked and marked within a moment of its mkdir: an unmarked one this old was killed in between
CUT_CLAIM_AGE_S = 60


def _cut_claims(out: Path, infix: str) -> list[Path]:
    """Build directories for `out` whose claim was cut short (a command killed between their lock and their
    marker): fittune's exact build name, this account's, unmarked, holding the lock file and at most the
    marker's temporary file besides, last changed over CUT_CLAIM_AGE_S ago. Anything else of a similar name is
    not fittune's to remove."""
    if not out.parent.is_dir():
        return []
    name = re.compile(re.escape(f".{out.name}{infix}") + r"[0-9]+-[0-9a-f]{8}")
    cut = []
    for d in out.parent.glob(f".{glob_escape(out.name)}{infix}*"):
        try:  # a directory may go meanwhile (another command clearing it too): not ours to look at then
            if not name.fullmatch(d.name) or d.is_symlink() or not d.is_dir() or owned(d):
                continue
            info = d.stat()
            children = [c for c in d.iterdir() if c.is_file() and not c.is_symlink()]
            if (info.st_uid == os.geteuid() and info.st_mtime < time.time() - CUT_CLAIM_AGE_S
                    and (d / LOCK_INFO) in children and len(children) == len(list(d.iterdir()))
                    and all(c.name == LOCK_INFO or c.name.startswith(f".{MARKER}.tmp-") for c in children)):
                cut.append(d)
        except OSError:
            continue
    return cut


def _clear_cut_claims(out: Path, infix: str, program: str) -> None:
    """Remove the cut-short build claims for `out` (`_cut_claims`) whose lock is free; they hold nothing. Best
    effort: one held, gone meanwhile or not removable is left as it is (it never stops this command)."""
    for d in _cut_claims(out, infix):
        try:
            lock = DirLock(d).acquire(program, record=False, create=False)
        except (DirInUse, FittuneError):
            continue  # held (not a killed command's, whatever its age), or not ours to open
        if lock is None:
            continue  # its lock file went meanwhile: another command is clearing it
        try:
            for child in d.iterdir():
                if child.name == LOCK_INFO or child.name.startswith(f".{MARKER}.tmp-"):
                    child.unlink(missing_ok=True)
            d.rmdir()
        except OSError:
            pass  # something new in it, or gone: left as it is
        finally:
            lock.release()


def _claim_locked_build(path: Path, kind: DirKind, program: str) -> DirLock:
    """A new build directory at `path` (a name of its own), locked before it is marked: a marked build is
    always locked by the process writing it, or was by one that was killed (whose free lock lets the next
    command remove it: `_clear_killed_builds`), never free while it is being written."""
    path.mkdir(parents=True)
    lock = DirLock(path).acquire(program)
    try:
        claim_dir(path, kind)
    except BaseException:
        lock.release()
        raise
    return lock


def _clear_killed_builds(builds: list[Path], kind: DirKind, program: str, busy: Callable[[str], str],
                        mine: Path | None = None) -> None:
    """Remove the build directories in `builds` whose lock is free (a killed command's); one locked is another
    command's, writing now: refused with `busy(holder)`. One with no lock file yet is starting now: left alone
    (it looks again once locked, and then sees ours)."""
    for other in builds:
        if other == mine:
            continue
        try:
            left = DirLock(other).acquire(program, record=False, create=False)
        except DirInUse as e:
            raise FittuneError(busy(e.holder)) from None
        if left is not None:
            try:
                remove_owned(other, kind)
            finally:
                left.release()


def remove_owned(path: Path, kind: DirKind) -> None:
    """Remove a directory fittune created as `kind` (refuses anything else: a guard against deleting user files
    or another of fittune's directories that ended up where this one was expected)."""
    if path.is_symlink():
        raise _link_refused(path)
    if not path.exists():
        return
    if not owned(path, kind):
        what = f"a fittune {marker_kind(path)} directory" if owned(path) else f"not created by fittune (no {MARKER} marker)"
        raise FittuneError(f"refusing to delete {path}: it is {what}, not the {kind} directory fittune expected "
                           f"there; move it away")
    remove_tree(path)


class MarkerBusy(Exception):
    """The other kind of `lock_marker` lock is held on that directory now."""


def lock_marker(path: Path, exclusive: bool) -> int | None:
    """An `flock` on the marker of fittune's directory `path`, taken at once: the open descriptor that holds
    it (close it to let go); None where there is nothing to lock (no marker) or the filesystem has no locks.
    Raises MarkerBusy where the other kind is held: shared ones (readers of the directory) exclude an
    exclusive one (its removal) and the other way round. The marker is only opened, never written."""
    fd = None
    # on NFS flock is emulated with POSIX locks, whose exclusive kind needs a descriptor open for writing
    for flags in (os.O_RDWR, os.O_RDONLY) if exclusive else (os.O_RDONLY,):
        try:
            fd = os.open(path / MARKER, flags | os.O_NOFOLLOW)
            break
        except PermissionError:  # (a reader of another account's run) unheld, as without locks
            continue
        except OSError:  # gone, or a link (which no fittune directory holds): nothing of fittune's to lock
            return None
    if fd is None:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MarkerBusy(str(path)) from None
    except OSError:  # e.g. ENOLCK: no lock service, so no reader can hold one either
        os.close(fd)
        return None
    return fd


def remove_checkpoint(path: Path) -> bool:
    """Remove the checkpoint `path` (fittune's: `remove_owned`) unless a resume is loading it now (its shared
    `lock_marker` lock: a branch from this run, `checkpoints.hold_checkpoint`). False: kept, for now."""
    try:
        fd = lock_marker(path, exclusive=True)
    except MarkerBusy:
        return False
    try:
        remove_owned(path, "checkpoint")
    finally:
        if fd is not None:  # held until the marker, removed last, is gone: a later reader finds nothing to load
            os.close(fd)
    return True


# ---- one run per directory ----------------------------------------------------------------------------------


class DirInUse(FittuneError):
    """A directory whose lock another process holds; `holder` says who (each caller says what to do)."""

    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is in use by {holder}: wait for it to finish, or use another directory")


class DirLock:
    """A lock on a run directory, held until `release` or the process ends (a kill -9 too): exclusive for a
    run that writes there (train.py), shared for one that only reads it (evaluate.py, export), so several
    evaluations of one run go on at once while none of them sees the run resumed or replaced meanwhile.

    The lock is `flock` on the directory's `.fittune.lock` file, opened for writing: on shared storage (NFS)
    Linux emulates flock with POSIX locks, which the server arbitrates across nodes and which need a file
    open for writing. The file is created once (by the run that claims the directory) and never replaced
    or removed, so every process locks the same inode; the exclusive holder writes who it is into it (shared
    holders cannot: there may be several). Only the global main process takes it, so a multi-node run holds
    one lock."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._noted = False  # this holder wrote its note (else release leaves the file as it found it)
        self.shared = False  # a reader's lock (`acquire(shared=True)`)

    def acquire(self, program: str, record: bool = True, create: bool = True, shared: bool = False) -> DirLock | None:
        """Take the lock at once or raise `DirInUse` naming the holder. `record`: write who holds it (a run's
        checks take the lock without writing anything, so a refused run leaves the directory untouched; a
        shared holder never writes); `create`: make the lock file if missing (else return None: nothing to
        lock yet); `shared`: a reader's lock, which only an exclusive holder conflicts with."""
        lock_file = self.path / LOCK_INFO
        # O_NOFOLLOW: the holder's note is written into this file, never through a link into someone's file
        flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
        try:
            fd = os.open(lock_file, flags, 0o644)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise FittuneError(f"{lock_file} is a symbolic link, which fittune never creates (it writes into "
                                   f"its lock file): remove the link") from None
            raise FittuneError(f"cannot open the lock file {lock_file} ({e.strerror}): fix the permissions of "
                               f"{self.path}") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_of(fd)
            os.close(fd)
            raise DirInUse(self.path, holder) from None
        except OSError as e:  # e.g. ENOLCK: a network filesystem without a lock service
            os.close(fd)
            raise FittuneError(f"cannot lock {lock_file} ({e.strerror}): this filesystem offers no file locks; "
                               f"use an output_dir on a filesystem that does") from None
        self._fd, self.shared = fd, shared
        if record and not shared:
            self.record(program)
        return self

    def record(self, program: str) -> None:
        """Say who holds the lock (read by a process that is refused), through the locked file itself."""
        info = {"program": program, "pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)
        self._noted = True

    def release(self) -> None:
        """Let go of the lock (idempotent); the lock file stays, emptied if this process wrote its holder."""
        if self._fd is not None:
            if self._noted:  # nobody holds it now; the file itself stays (one inode for everyone)
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def hold_for_reading(run: Path, program: str, doing: str) -> DirLock | None:
    """The shared lock of the training run `run`, for a program that only reads it (an evaluation, an export):
    several go on at once, the run is not resumed or replaced meanwhile, and a run being trained is refused
    with one line (`doing`: what cannot be done now, e.g. "evaluate"). None: the run has no lock file."""
    try:
        return DirLock(run).acquire(program, create=False, shared=True)
    except DirInUse as e:
        raise FittuneError(f"cannot {doing} now: {e.path} is in use by {e.holder}: wait for it to finish") from None


def _holder_of(fd: int) -> str:
    """Who holds the lock that `fd` could not take: readers (a shared lock; they leave no note), or the
    exclusive holder its note names (checked second: a holder killed by kill -9 leaves its note behind)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        pass
    else:  # only readers hold it (an exclusive holder would have refused this shared lock too)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "another fittune process that reads it (an evaluate.py or an export)"
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"{info['program']} (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (OSError, ValueError, KeyError):
        return "another fittune process"


# ---- the training output directory ----------------------------------------------------------------------------


# fittune's temporary names: an atomic write's `.NAME.tmp-PID`, a build's `.NAME.tmp-PID-HEX`, publish_dir's
# `.NAME.old-PID-HEX`
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(tmp|old)-\d+(-[0-9a-f]{8})?")


def _temporary(entry: Path, ours: frozenset[str] | set[str]) -> bool:
    """`entry` is one of fittune's temporary files or directories: an atomic write of one of `ours` (a file),
    or a directory fittune made here (marked, or a claim cut short); never a user's `.notes.tmp-old/`."""
    found = _TEMPORARY.fullmatch(entry.name)
    if found is None or entry.is_symlink():
        return False
    return fittunes_own(entry, None) or interrupted_claim(entry) if entry.is_dir() else found["name"] in ours


def foreign_names(path: Path, ours: frozenset[str] | set[str],
                  also_ours: Callable[[Path], bool] = lambda entry: False) -> list[str]:
    """What in the directory `path` fittune did not write: names not in `ours` (nor the temporary names of its
    atomic writes and builds, `_temporary`, nor what `also_ours` accepts), and every symbolic link (never
    fittune's); a directory's name ends in `/`, a link's in `@`."""
    foreign = []
    for entry in sorted(path.iterdir()):
        name = entry.name
        if entry.is_symlink() or not (name in ours or _temporary(entry, ours) or also_ours(entry)):
            foreign.append(name + ("@" if entry.is_symlink() else "/" if entry.is_dir() else ""))
    return foreign


def foreign_entries(run: Path) -> list[str]:
    """What in the run directory `run` fittune did not write: names it never uses, and symbolic links (never
    fittune's), which --overwrite would delete with the run, or through which fittune would write."""
    def evaluation(entry: Path) -> bool:  # evaluate.py's RUN/eval-NAME (or its build, also one killed unmarked),
        # not a user's copy of one (cp -r eval-heldout eval-mine: the marker, not the directory, is fittune's)
        return entry.name.startswith("eval") and (fittunes_own(entry, "eval") or interrupted_claim(entry))

    foreign = foreign_names(run, RUN_NAMES | {MARKER, LOCK_INFO, REPLACED}, evaluation)
    saves = RunLayout(run).checkpoints
    if saves.is_dir() and not saves.is_symlink():  # e.g. a step-best/ copied aside there is the user's
        foreign += [f"checkpoints/{c.name}" for c in sorted(saves.iterdir()) if not (
            (STEP_NAME.fullmatch(c.name.removesuffix(".tmp")) or c.name.startswith(".step-"))  # publish_dir's too
            and (fittunes_own(c, "checkpoint") or interrupted_claim(c)))]  # a copy is the user's
    return foreign


# ---- a run's state, from its files: checkpoints, final/, eval/ ----------------------------------------------

STATE_FILE = "trainer_state.json"  # the last file a checkpoint save writes: a step-N/ with it is complete


def checkpoint_root(output_dir: str | Path) -> Path:
    """Where a run keeps its training checkpoints (step-N/ directories)."""
    return RunLayout(Path(output_dir)).checkpoints


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. A directory is complete once renamed from .tmp, state file inside."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    # only fittune's own names (step-<digits>): a step-best/ or step-N.bak copied aside there is the user's
    found = [d for d in root.iterdir() if STEP_NAME.fullmatch(d.name) and d.is_dir() and not d.is_symlink()
             and (d / STATE_FILE).is_file()]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def own_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints fittune saved in this run (`fittunes_own`), oldest first: what --resume auto
    continues from and what rotation keeps and removes; a user's copy under a step-N name is neither."""
    return [c for c in complete_checkpoints(output_dir) if fittunes_own(c, "checkpoint")]


def partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Directories left by a save that never finished (a crash mid-save: step-N.tmp), or by a removal that
    never finished (a step-N without its state file, which a removal takes first: `remove_tree`)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    cut = [d for d in root.iterdir() if STEP_NAME.fullmatch(d.name) and not (d / STATE_FILE).exists()]
    return sorted(d for d in [*root.glob("step-*.tmp"), *cut] if d.is_dir() and not d.is_symlink())


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Remove the partial checkpoints fittune wrote (its marker inside); returns them. Anything else that
    merely looks like one is left alone."""
    removed = [d for d in partial_checkpoints(output_dir) if fittunes_own(d, "checkpoint")]
    for d in removed:
        remove_owned(d, "checkpoint")
    return removed


def run_finished(output_dir: str | Path) -> bool:
    """Whether the run in `output_dir` has finished: its final/ and its held-out evaluation are written (only
    the end of the training writes them), after its newest checkpoint (a run resumed from an earlier
    checkpoint into its own directory and stopped again saved newer ones: not finished). A --resume auto of
    a finished run has nothing to train (it only retries removing the runs an --overwrite replaced); one of a
    run that has not finished does what is left."""
    out = Path(output_dir)
    metrics = RunLayout(out).eval / "metrics.json"
    if not (RunLayout(out).final.is_dir() and metrics.is_file()):
        return False
    saves = own_checkpoints(out)
    return not saves or metrics.stat().st_mtime_ns >= (saves[-1] / STATE_FILE).stat().st_mtime_ns



@dataclass
class OutputDirCheck:
    """What a training run found in its output_dir (decided before anything is written)."""

    path: Path
    exists: bool
    holds_run: bool
    finished: bool
    """Its final/ is written (the run reached its end; its evaluation may not have)."""
    complete: bool
    """It has finished, its held-out evaluation included (`run_finished`): a --resume auto has nothing to do."""


def inspect_output_dir(path: Path, resume: str | None, overwrite: bool) -> OutputDirCheck:
    """What a run finds in its output_dir (the state of the run there, from its files), refusing an output_dir
    it must not touch and a --resume that cannot go on; read-only (the refused run changes nothing)."""
    check_not_inside_fittune_dir(path, "output_dir")
    if overwrite:  # the run there is moved aside and a new directory made in its place (`RunDir.claim`)
        check_not_cwd(path, "output_dir")
    if overwrite or not (path / MARKER).is_file():  # a run resumed in place is never built beside itself
        check_name_room(path, "output_dir")
    check_writable_dir(path, "output_dir")
    if path.is_dir() and owned(path) and not owned(path, "train"):
        raise FittuneError(f"output_dir {path} is a fittune {marker_kind(path)} directory, not a training run: "
                           f"choose another output_dir")
    exists = path.is_dir()
    holds_run = exists and any((path / f).exists() for f in RUN_FILES)
    finished = exists and RunLayout(path).final.is_dir()
    complete, resumable = exists and run_finished(path), exists and bool(own_checkpoints(path))
    if overwrite and resume:
        raise FittuneError("--overwrite and --resume contradict each other: --resume continues the run in "
                           "output_dir, --overwrite replaces it; pass one")
    if holds_run and not resume and not overwrite:
        ways = ("continue it with --resume auto, replace it with --overwrite" if resumable or not finished else
                "it has no checkpoint to continue from (train.save_steps was 0): replace it with --overwrite")
        if complete:
            ways = f"evaluate it with evaluate.py --checkpoint {path}, replace it with --overwrite"
        aside = _replaced(path)  # an --overwrite that was stopped: the run it replaces is kept until it ends
        kept = (f" (the run it is replacing is kept aside in {', '.join(str(a) for a in aside)} until it "
                f"finishes)" if aside else "")
        raise FittuneError(f"{path} already holds a {'finished' if finished else 'started'} run{kept}: {ways}, or "
                           f"choose another output_dir")
    if resume == "auto" and finished and not complete and not resumable:
        raise FittuneError(f"--resume auto: {path} holds a run that stopped while finishing, without checkpoints "
                           f"(train.save_steps was 0): its held-out evaluation did not finish (no eval/): python "
                           f"evaluate.py --checkpoint {path} writes it; --overwrite trains it anew")
    # also where no run is yet (a run emptied but for its marker): a tensorboard@ there is written through
    foreign = foreign_entries(path) if exists else []
    links = [f for f in foreign if f.endswith("@")]
    if links:  # e.g. final@ or eval@ pointing at a folder of yours: fittune would replace what it points to
        raise FittuneError(f"{path} holds symbolic links ({', '.join(links)}), which fittune never creates and "
                           f"would write through: remove them (what they point to stays yours)")
    if overwrite and holds_run and foreign:
        raise FittuneError(f"--overwrite replaces the whole run {path}, and it also holds {', '.join(foreign)}, "
                           f"which fittune did not write: move them out first, or choose another output_dir")
    return OutputDirCheck(path, exists, holds_run, finished, complete)


@dataclass
class ReplacedCleanup:
    """What `RunDir.finish` did with the runs --overwrite had moved aside."""

    removed: list[Path]
    kept: list[str]
    """Why each run that is still there was kept (another process holds it)."""


class RunDir:
    """A training run's claimed output directory: created/marked, locked, the replaced run moved aside."""

    def __init__(self, path: Path, lock: DirLock, aside: Path | None):
        self.path, self.lock, self.aside = path, lock, aside

    @classmethod
    def lock_existing(cls, path: Path, program: str) -> DirLock | None:
        """Lock an existing run directory before anything is read from it for the run (None: nothing there to
        lock; a link is left to inspect_output_dir to refuse)."""
        if not path.is_dir() or path.is_symlink():
            return None
        return DirLock(path).acquire(program, record=False, create=False)

    @classmethod
    def claim(cls, check: OutputDirCheck, lock: DirLock | None, overwrite: bool, program: str) -> RunDir:
        """Create or adopt the directory; with --overwrite move the old run aside (kept until `finish`)."""
        path, aside = check.path, None
        if overwrite and check.holds_run:
            aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-"
                                   f"{os.urandom(2).hex()}")
            path.rename(aside)  # still locked: the lock file moves with the directory
            try:
                path.mkdir()
                keep_access(aside.stat(), path)
                claim_dir(path, "train")
                # kept on disk: a later --resume auto of this run finishes and removes them
                atomic_write_text(path / REPLACED, json.dumps([aside.name] + [p.name for p in _replaced(aside, path.name)]))
            except BaseException:  # the old run goes back where it was (still locked): never aside unrecorded
                if path.is_dir():
                    remove_tree(path)  # only what was just made here
                aside.rename(path)
                raise
            if lock is not None:
                lock.release()
            lock = None
        else:
            claim_dir(path, "train")
        if lock is None:
            lock = DirLock(path).acquire(program)
            if not check.holds_run and aside is None and any((path / f).exists() for f in RUN_FILES):
                lock.release()  # it held no run when checked: another run started in it meanwhile
                raise FittuneError(f"{path} was taken by another run while this one was starting: choose "
                                   f"another output_dir")
        else:
            lock.record(program)
        return cls(path, lock, aside)

    def replaced(self) -> list[Path]:
        """The runs this one replaced (--overwrite), still on disk until it finishes (also after a stop and a
        --resume auto, and those an earlier replacement left, which the replaced run carried)."""
        return _replaced(self.path)

    def finish(self) -> ReplacedCleanup:
        """The new run has its results: remove the runs it replaced (fittune's own, moved aside), except one
        that another process holds (e.g. an evaluate.py of it): that one is kept, and said."""
        cleanup = ReplacedCleanup([], [])
        for run in self.replaced():
            foreign = foreign_entries(run)
            if foreign:  # put there since it was moved aside: never deleted with it
                cleanup.kept.append(f"{run} was kept: it holds {', '.join(foreign)}, which fittune did not write; "
                                    f"move those out and remove it yourself")
                continue
            try:
                lock = DirLock(run).acquire("train.py", record=False, create=False)
            except FittuneError as e:  # held by another process (e.g. an evaluation of it), or no lock to take
                why = f"it is in use by {e.holder}" if isinstance(e, DirInUse) else str(e)
                cleanup.kept.append(f"{run} was kept: {why}; remove it yourself once that has finished")
                continue
            try:
                remove_owned(run, "train")
            finally:
                if lock is not None:
                    lock.release()
            cleanup.removed.append(run)
        if not cleanup.kept:
            (self.path / REPLACED).unlink(missing_ok=True)
        self.aside = None
        return cleanup

    def release(self) -> None:
        """Let go of the directory's lock."""
        self.lock.release()


def _replaced(run: Path, name: str | None = None) -> list[Path]:
    """The replaced runs recorded in `run` that are still there: only `<name>.replaced-*` siblings that are
    fittune runs (the record lives in a directory that may have come from elsewhere: it names nothing else).
    `name`: the run's own name, when `run` is itself now a replaced run moved aside."""
    try:
        names = json.loads((run / REPLACED).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(names, list):
        return []
    prefix = f"{name or run.name}.replaced-"
    paths = [run.parent / n for n in names if isinstance(n, str) and n.startswith(prefix) and "/" not in n]
    return [p for p in paths if p.is_dir() and not p.is_symlink() and owned(p, "train")]
