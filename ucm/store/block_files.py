"""What the file store may treat as a block file, and whether it may write its root.

Why a module of its own: a shared directory holds whatever anyone put there. A FIFO
at a block's path made a plain ``open()`` block until a writer came (minutes of a
stuck engine); a directory or device there is no block either. And a read-only share
(a published, precomputed corpus) is a real deployment, not a permission error. Both
are questions about the file system, asked the same way by lookup, load, the start-up
scan and the writability probe.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
import uuid
from typing import BinaryIO, List, Tuple

from ucm.store.base import StoreError

#: errnos meaning "this root can be read but not written" (a read-only mount, a share
#: exported read-only, or permissions that allow no new files).
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})

BLOCK_SUFFIX = ".ucmkv"
TEMP_SUFFIX = ".tmp"  # a writer's temp file; a probe left by a crash is swept as one too

logger = logging.getLogger(__name__)


def describe_oserror(exc: OSError) -> str:
    """'ENOSPC: No space left on device' -- the errno name is what people search for."""
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    text = exc.strerror or os.strerror(exc.errno or 0)
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{name}: {text}{where}"


class NotABlockFile(OSError):
    """Something that is not a regular file (FIFO, directory, socket, device) is at a block path."""


def root_is_writable(root: str) -> bool:
    """Whether a file can be created (and removed) in ``root``.

    A probe write, not ``os.access``: ``access`` answers for the permission bits only,
    so it says yes to root on a 0o555 directory and knows nothing of an NFS export's
    options. False for EROFS/EACCES/EPERM; any other error (the root is missing, an
    I/O error) is raised, since it is not "read-only" but broken.
    """
    probe = os.path.join(root, f".ucm-probe.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in READ_ONLY_ERRNOS:
            return False
        raise
    os.close(fd)
    try:
        os.remove(probe)
    except OSError as exc:
        if exc.errno not in READ_ONLY_ERRNOS:
            raise
        return False  # could create but not remove (e.g. a sticky directory): do not write here
    return True


def open_root(root: str) -> bool:
    """Create ``root`` if missing; whether blocks may be written there.

    A root that cannot be created is a :class:`StoreError` at start naming the config
    key, so a typo or a missing mount is fixed where it was made; a root that exists
    but refuses writes is not an error (see :func:`root_is_writable`).
    """
    try:
        os.makedirs(root, exist_ok=True)
        return root_is_writable(root)
    except OSError as exc:
        raise StoreError(f"storage_backends: cannot create storage root {root}: {describe_oserror(exc)}") from exc


def is_block_file(path: str) -> bool:
    """Whether a regular file is at ``path`` (one stat; a lookup's "present")."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def open_block(path: str) -> BinaryIO:
    """Open ``path`` for reading, unbuffered, only if it is a regular file.

    Raises FileNotFoundError when nothing is there and :class:`NotABlockFile` when
    something else is. A stat before the open keeps devices from being opened at all
    (opening one can have effects); the open itself is non-blocking, so a FIFO swapped
    in between cannot hang the caller, and fstat checks what was really opened.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise NotABlockFile(errno.EINVAL, "not a regular file", path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotABlockFile(errno.EINVAL, "not a regular file", path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)  # plain reads from here
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def scan_root(root: str, stale_temp_seconds: float) -> Tuple[List[Tuple[float, bytes, int]], List[str]]:
    """The block files under ``root`` as ``(mtime, key, size)``, oldest first, and the
    temp files older than ``stale_temp_seconds`` (a crashed writer's; younger ones may
    still be being written).

    Only regular files count: a FIFO or directory named like a block is not ours to
    index, and so never evicted or removed.
    """
    found: List[Tuple[float, bytes, int]] = []
    stale: List[str] = []
    now = time.time()
    try:
        shards = [e for e in os.scandir(root) if e.is_dir() and len(e.name) == 2]
    except OSError as exc:
        raise StoreError(f"cannot scan storage root {root}: {describe_oserror(exc)}") from exc
    for shard in shards:
        try:
            entries = list(os.scandir(shard.path))
        except OSError as exc:
            logger.warning("skipping unreadable shard %s: %s", shard.path, describe_oserror(exc))
            continue
        for entry in entries:
            try:
                st = entry.stat()
            except OSError:
                continue  # removed meanwhile by another process
            if entry.name.endswith(TEMP_SUFFIX):
                if now - st.st_mtime > stale_temp_seconds:
                    stale.append(entry.path)
            elif entry.name.endswith(BLOCK_SUFFIX) and stat.S_ISREG(st.st_mode):
                try:
                    found.append((st.st_mtime, bytes.fromhex(entry.name[: -len(BLOCK_SUFFIX)]), st.st_size))
                except ValueError:
                    continue
    found.sort()
    return found, stale
