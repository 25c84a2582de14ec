"""An NFSv4 client in user space: Debian's libnfs (``libnfs.so.13``, 4.0) called through
``ctypes``, implementing ``fs.Tree`` and ``fs.File``.

Why ctypes rather than a binding: the only PyPI binding (``libnfs``, SWIG, 2016) ignores
write errors, has no statvfs and cannot set the NFS version, the port or a timeout; a
compiled extension would need a compiler in the image. The synchronous libnfs API is
C-shaped, so declaring the few functions used here is enough.

What libnfs 4.0 gets wrong over NFSv4, and what this module does instead:

- ``nfs_chmod``/``nfs_lchown``/``nfs_lutimes`` OPEN the object to SETATTR it: they fail on
  a directory (``NFS4ERR_ISDIR``), and the ``l`` variants follow a final symbolic link.
  ``chmod``, ``lchown`` and ``lutimes`` send their own compound instead (PUTROOTFH, LOOKUP
  each component, SETATTR with the anonymous stateid) through ``rpc_nfs4_compound_async``:
  they act on the path itself, and times keep their nanoseconds. ``chmod`` puts an NVERIFY
  (not a link) before the SETATTR and leaves a link to ``nfs_chmod``, which follows it.
- ``nfs_open2``/``nfs_create`` ignore the mode: a file is always created 0600. ``open``
  creates with ``O_EXCL`` to know whether it created the file, then ``nfs_fchmod``s it to
  exactly ``mode`` (no umask, as for ``mkdir``).
- A WRITE is encoded in a 4 KiB buffer whatever ``nfs_get_writemax`` says, and a larger one
  fails before it is sent: ``pwrite`` shrinks its chunks until one fits (about 3.5 KiB), and
  remembers. Such failures return -1 whatever the cause: raised as ``EMSGSIZE``/``EIO``.
- There is no setter for the port: it goes in through ``nfs_parse_url_dir``
  (``?nfsport=``), which only sets context arguments.
- A broken connection is never re-established (no NFSv4 auto-reconnect): the client drops
  the context and mounts again on its next call (or first, if the server closed the idle
  connection); files opened before then fail with ``ESTALE``. Timeouts (whole seconds,
  ``nfs_set_timeout``) come back as ``EINTR`` and are raised as ``ETIMEDOUT``.
- Every context calls itself "Libnfs pid:PID TIME", so two made in one second would be one
  NFSv4 client to the server: each ``Client`` names itself uniquely.

A libnfs context is not thread-safe: every call on a ``Client`` and its files runs under
the client's lock (ctypes releases the GIL during the foreign call).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import math
import os
import select
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from csi.backends.nfs.fs import File, FsStat, Stat

_P, _S, _I = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
_U, _U32, _U64 = ctypes.c_uint, ctypes.c_uint32, ctypes.c_uint64
_PP = ctypes.POINTER(_P)


_LOST_STATE = (
    "NFS4ERR_EXPIRED",
    "NFS4ERR_STALE_CLIENTID",
    "NFS4ERR_BADSESSION",
    "NFS4ERR_DEADSESSION",
    "NFS4ERR_BAD_SEQID",
    "NFS4ERR_OLD_STATEID",
    "NFS4ERR_BAD_STATEID",
)
"""What the server answers once it forgot a client (a lease not renewed in time), or once
the client's open-state bookkeeping went wrong: a new client starts clean."""


class _Stat64(ctypes.Structure):  # struct nfs_stat_64
    _fields_ = [
        (name, _U64)
        for name in (
            *("dev", "ino", "mode", "nlink", "uid", "gid", "rdev", "size", "blksize", "blocks"),
            *("atime", "mtime", "ctime", "atime_nsec", "mtime_nsec", "ctime_nsec", "used"),
        )
    ]


class _StatVfs64(ctypes.Structure):  # struct nfs_statvfs_64
    _fields_ = [
        (name, _U64)
        for name in (
            *("bsize", "frsize", "blocks", "bfree", "bavail"),
            *("files", "ffree", "favail", "fsid", "flag", "namemax"),
        )
    ]


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Dirent(ctypes.Structure):  # struct nfsdirent; only next and name are read
    pass


_Dirent._fields_ = [
    ("next", ctypes.POINTER(_Dirent)),
    ("name", _S),
    ("inode", _U64),
    *((name, _U32) for name in ("type", "mode")),
    ("size", _U64),
    *((name, _Timeval) for name in ("atime", "mtime", "ctime")),
    *((name, _U32) for name in ("uid", "gid", "nlink")),
    *((name, _U64) for name in ("dev", "rdev", "blksize", "blocks", "used")),
    *((name, _U32) for name in ("atime_nsec", "mtime_nsec", "ctime_nsec")),
]


class _Buf(ctypes.Structure):  # utf8string, bitmap4, attrlist4, an XDR array: {u_int len; T *val}
    _fields_ = [("len", _U), ("val", _P)]


class _Fattr4(ctypes.Structure):  # fattr4: bitmap4, attrlist4 (NVERIFY4args too)
    _fields_ = [("mask", _Buf), ("values", _Buf)]


class _SetAttr4(ctypes.Structure):  # SETATTR4args: stateid4, fattr4
    _fields_ = [("seqid", _U32), ("other", ctypes.c_char * 12), ("attrs", _Fattr4)]


class _Args4(ctypes.Union):  # the union of nfs_argop4; its largest member, OPEN4args, is 128 bytes (LP64)
    _fields_ = [("lookup", _Buf), ("nverify", _Fattr4), ("setattr", _SetAttr4), ("size", _U64 * 16)]


class _ArgOp4(ctypes.Structure):  # nfs_argop4
    _fields_ = [("op", _I), ("args", _Args4)]


class _Compound4(ctypes.Structure):  # COMPOUND4args: tag, minorversion, argarray
    _fields_ = [("tag", _Buf), ("minorversion", _U32), ("ops", _Buf)]


_RPC_CB = ctypes.CFUNCTYPE(None, _P, _I, _P, _P)  # rpc_cb
_OP_LOOKUP, _OP_NVERIFY, _OP_PUTROOTFH, _OP_SETATTR = 15, 17, 24, 34
_NFS4ERR_SAME = 10009
_RPC_STATUS_TIMEOUT = 3

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "nfs_init_context": (_P, []),
    "nfs_destroy_context": (None, [_P]),
    "nfs_get_error": (_S, [_P]),
    "nfs_get_fd": (_I, [_P]),
    "nfs_service": (_I, [_P, _I]),
    "nfs_set_version": (_I, [_P, _I]),
    "nfs_set_uid": (None, [_P, _I]),
    "nfs_set_gid": (None, [_P, _I]),
    "nfs_set_timeout": (None, [_P, _I]),
    "nfs4_set_client_name": (None, [_P, _S]),
    "nfs4_set_verifier": (None, [_P, _S]),
    "nfs_parse_url_dir": (_P, [_P, _S]),
    "nfs_destroy_url": (None, [_P]),
    "nfs_mount": (_I, [_P, _S, _S]),
    "nfs_get_readmax": (_U64, [_P]),
    "nfs_get_writemax": (_U64, [_P]),
    "nfs_stat64": (_I, [_P, _S, ctypes.POINTER(_Stat64)]),
    "nfs_lstat64": (_I, [_P, _S, ctypes.POINTER(_Stat64)]),
    "nfs_statvfs64": (_I, [_P, _S, ctypes.POINTER(_StatVfs64)]),
    "nfs_opendir": (_I, [_P, _S, _PP]),
    "nfs_readdir": (ctypes.POINTER(_Dirent), [_P, _P]),
    "nfs_closedir": (None, [_P, _P]),
    "nfs_mkdir2": (_I, [_P, _S, _I]),
    "nfs_rmdir": (_I, [_P, _S]),
    "nfs_unlink": (_I, [_P, _S]),
    "nfs_rename": (_I, [_P, _S, _S]),
    "nfs_link": (_I, [_P, _S, _S]),
    "nfs_symlink": (_I, [_P, _S, _S]),
    "nfs_readlink2": (_I, [_P, _S, _PP]),
    "nfs_truncate": (_I, [_P, _S, _U64]),
    "nfs_open2": (_I, [_P, _S, _I, _I, _PP]),
    "nfs_close": (_I, [_P, _P]),
    "nfs_pread": (_I, [_P, _P, _U64, _U64, _P]),
    "nfs_pwrite": (_I, [_P, _P, _U64, _U64, _P]),
    "nfs_ftruncate": (_I, [_P, _P, _U64]),
    "nfs_fsync": (_I, [_P, _P]),
    "nfs_fstat64": (_I, [_P, _P, ctypes.POINTER(_Stat64)]),
    "nfs_fchmod": (_I, [_P, _P, _I]),
    "nfs_chmod": (_I, [_P, _S, _I]),
    "nfs_get_rpc_context": (_P, [_P]),
    "rpc_get_fd": (_I, [_P]),
    "rpc_which_events": (_I, [_P]),
    "rpc_service": (_I, [_P, _I]),
    "rpc_get_error": (_S, [_P]),
    "rpc_nfs4_compound_async": (_I, [_P, _RPC_CB, ctypes.POINTER(_Compound4), _P]),
    "nfsstat4_to_errno": (_I, [_I]),
    "nfsstat4_to_str": (_S, [_I]),
}

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _library() -> ctypes.CDLL:
    """libnfs, loaded and declared on first use: the driver runs without it unless an nfs
    backend is configured."""
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("nfs") or "libnfs.so.13", use_errno=True)
                for name, (restype, argtypes) in _SIGNATURES.items():
                    function = getattr(lib, name)
                    function.restype, function.argtypes = restype, argtypes
            except (OSError, AttributeError) as exc:
                raise OSError(errno.ENOSYS, "libnfs is not installed (Debian: libnfs13)") from exc
            _lib = lib
        return _lib


_free = ctypes.CDLL(None).free  # for the buffer nfs_readlink2 allocates
_free.argtypes, _free.restype = [_P], None


def _to_stat(st: _Stat64) -> Stat:
    return Stat(
        mode=st.mode,
        ino=st.ino,
        nlink=st.nlink,
        uid=st.uid,
        gid=st.gid,
        size=st.size,
        used=st.used,
        atime_ns=st.atime * 10**9 + st.atime_nsec,
        mtime_ns=st.mtime * 10**9 + st.mtime_nsec,
        ctime_ns=st.ctime * 10**9 + st.ctime_nsec,
    )


def _xdr_string(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">I", len(data)) + data + b"\0" * (-len(data) % 4)


def _xdr_settime(ns: int) -> bytes:  # settime4 set to client time: nfstime4 {int64 seconds; uint32 nseconds}
    seconds, nanoseconds = divmod(ns, 10**9)
    return struct.pack(">IqI", 1, seconds, nanoseconds)


class Client:
    """One NFSv4 mount of ``server:export`` in user space, safe to share between threads."""

    def __init__(
        self, server: str, export: str, *, port: int = 2049, timeout: float = 30.0, uid: int = 0, gid: int = 0
    ) -> None:
        self.server, self.export, self.port = server, export, port
        self._timeout_s, self._uid, self._gid = max(1, math.ceil(timeout)), uid, gid
        self._name = f"cairn-csi {os.uname().nodename} {uuid.uuid4()}".encode()
        self._lib = _library()
        self._lock = threading.Lock()
        self._path_closed = threading.Condition(self._lock)
        self._open_paths: dict[str, int] = {}  # path -> generation of the file open on it
        self._ctx: int | None = None
        self._closed = False
        self._generation = 0  # of the context; a file belongs to the one it was opened in
        self._files: set[_NfsFile] = set()
        self._readmax = self._writemax = 1 << 20
        self._replies: dict[int, tuple[int, int, str]] = {}
        self._keys = itertools.count(1)
        self._on_reply = _RPC_CB(self._reply)  # one per client, alive as long as any context
        with self._lock:
            self._connect()

    def describe(self) -> str:
        return f"nfs://{self.server}:{self.port}{self.export}"

    # Connection, under the lock.

    def _connect(self) -> None:
        ctx: int | None = self._lib.nfs_init_context()
        if not ctx:
            raise OSError(errno.ENOMEM, "cannot create an nfs context", self.describe())
        try:
            self._check(ctx, self._lib.nfs_set_version(ctx, 4), self.describe())
            self._lib.nfs_set_uid(ctx, self._uid)
            self._lib.nfs_set_gid(ctx, self._gid)
            self._lib.nfs_set_timeout(ctx, self._timeout_s * 1000)
            self._lib.nfs4_set_client_name(ctx, self._name)
            self._lib.nfs4_set_verifier(ctx, os.urandom(8))  # a new instance of the same client
            url = self._lib.nfs_parse_url_dir(ctx, f"nfs://{self.server}{self.export}?nfsport={self.port}".encode())
            if not url:
                raise OSError(errno.EINVAL, f"bad nfs address: {self._message(ctx)}", self.describe())
            self._lib.nfs_destroy_url(url)
            self._check(ctx, self._lib.nfs_mount(ctx, self.server.encode(), self.export.encode()), self.describe())
        except BaseException:
            self._lib.nfs_destroy_context(ctx)
            raise
        self._ctx, self._generation = ctx, self._generation + 1
        self._readmax = self._lib.nfs_get_readmax(ctx) or self._readmax
        self._writemax = min(self._lib.nfs_get_writemax(ctx) or self._writemax, self._writemax)  # as learnt

    def _drop(self) -> None:
        """Forgets a broken context; its files go stale."""
        if self._ctx:
            self._lib.nfs_destroy_context(self._ctx)
        self._ctx, self._files = None, set()
        self._replies.clear()

    def _ready(self, path: str) -> int:
        """The context, mounted again if the server closed the connection since the last
        call (nothing is pending, so anything to read is a late reply or the end)."""
        if self._closed:
            raise OSError(errno.EBADF, f"{self.describe()} is closed", path)
        if self._ctx:
            poller = select.poll()
            poller.register(self._lib.nfs_get_fd(self._ctx), select.POLLIN)
            events = poller.poll(0)
            if events and self._lib.nfs_service(self._ctx, events[0][1]) < 0:
                self._drop()
        if not self._ctx:
            self._connect()
        assert self._ctx is not None
        return self._ctx

    def _message(self, ctx: int) -> str:
        text: bytes | None = self._lib.nfs_get_error(ctx)
        return text.decode(errors="replace") if text else ""

    def _check(self, ctx: int, ret: int, path: str, path2: str | None = None) -> int:
        if ret >= 0:
            return ret
        code, message = -ret, self._message(ctx)
        if "_async failed" in message:  # not sent: -1, whatever went wrong
            code = errno.EMSGSIZE if "Failed to encode" in message else errno.EIO
        elif code == errno.EINTR and "timed out" in message:
            code = errno.ETIMEDOUT
        elif code == errno.EIO and "nfs_service failed" in message and ctx == self._ctx:
            self._drop()  # the connection is gone
        elif any(status in message for status in _LOST_STATE) and ctx == self._ctx:
            self._drop()  # the server forgot this client: its open files are gone with it
        raise OSError(code, f"{os.strerror(code)}: {message}", path, None, path2)

    def _call(
        self, function: str, *args: Any, path: str, path2: str | None = None, file: _NfsFile | None = None
    ) -> int:
        """``function(ctx, [file handle,] *args)`` under the lock; failures raise ``OSError``."""
        with self._lock:
            for attempt in (1, 2):
                ctx = self._ready(path)
                call_args = args
                if file is not None:
                    if not file.handle:
                        raise OSError(errno.EBADF, "the file is closed", path)
                    if file.generation != self._generation:
                        raise OSError(errno.ESTALE, f"opened before the connection to {self.describe()} was lost", path)
                    call_args = (file.handle, *args)
                ret = getattr(self._lib, function)(ctx, *call_args)
                if ret < 0 and attempt == 1 and file is None and self._lost_state(ctx):
                    # The server forgot this client (its lease ran out while it was idle or
                    # busy elsewhere) and refused the call: a new client may make it again.
                    self._drop()
                    continue
                return self._check(ctx, ret, path, path2)
            raise AssertionError("unreachable")

    def _lost_state(self, ctx: int) -> bool:
        message = self._message(ctx)
        return any(status in message for status in _LOST_STATE)

    # SETATTR by a compound of our own (see the module's docstring).

    def _reply(self, rpc: int | None, status: int, data: int | None, key: int | None) -> None:
        nfsstat = ctypes.c_int.from_address(data).value if status == 0 and data else 0
        text = ctypes.string_at(data).decode(errors="replace") if status == 1 and data else ""
        self._replies[key or 0] = (status, nfsstat, text)

    def _setattr(self, path: str, bits: int, values: bytes, *, unless_link: bool = False) -> bool:
        """SETATTR of ``path`` itself: PUTROOTFH, LOOKUP each component, [NVERIFY that it is
        no symbolic link,] SETATTR with the anonymous stateid. False if NVERIFY found a link."""
        keep: list[Any] = []  # what the ops point to

        def buf(data: bytes) -> _Buf:
            keep.append(ctypes.create_string_buffer(data, len(data)))
            return _Buf(len(data), ctypes.addressof(keep[-1]))

        def fattr(word0: int, word1: int, data: bytes) -> _Fattr4:
            keep.append(mask := (_U32 * 2)(word0, word1))
            return _Fattr4(_Buf(2, ctypes.addressof(mask)), buf(data))

        names = [os.fsencode(name) for name in f"{self.export}/{path}".split("/") if name]
        ops = [_ArgOp4(_OP_PUTROOTFH), *(_ArgOp4(_OP_LOOKUP, _Args4(lookup=buf(name))) for name in names)]
        if unless_link:  # FATTR4_TYPE is not NF4LNK
            ops.append(_ArgOp4(_OP_NVERIFY, _Args4(nverify=fattr(1 << 1, 0, struct.pack(">I", 5)))))
        ops.append(_ArgOp4(_OP_SETATTR, _Args4(setattr=_SetAttr4(0, b"", fattr(0, bits, values)))))
        array = (_ArgOp4 * len(ops))(*ops)
        compound = _Compound4(_Buf(0, None), 0, _Buf(len(ops), ctypes.addressof(array)))
        with self._lock:
            rpc = self._lib.nfs_get_rpc_context(self._ready(path))
            key = next(self._keys)
            if self._lib.rpc_nfs4_compound_async(rpc, self._on_reply, ctypes.byref(compound), key) < 0:
                reason = (self._lib.rpc_get_error(rpc) or b"cannot queue SETATTR").decode(errors="replace")
                raise OSError(errno.EIO, f"{os.strerror(errno.EIO)}: {reason}", path)
            deadline = time.monotonic() + 2 * self._timeout_s + 5  # libnfs times the call out before
            while key not in self._replies:
                poller = select.poll()
                poller.register(self._lib.rpc_get_fd(rpc), self._lib.rpc_which_events(rpc))
                events = poller.poll(100)  # rpc_service also scans for timeouts
                if self._lib.rpc_service(rpc, events[0][1] if events else 0) < 0 or time.monotonic() > deadline:
                    self._drop()
                    raise OSError(errno.EIO, f"{os.strerror(errno.EIO)}: connection to {self.describe()} lost", path)
            status, nfsstat, text = self._replies.pop(key)
        if status == 0 and nfsstat in (0, _NFS4ERR_SAME):
            return nfsstat == 0
        if status == 0:
            code = abs(self._lib.nfsstat4_to_errno(nfsstat)) or errno.EIO
            text = f"SETATTR failed with {(self._lib.nfsstat4_to_str(nfsstat) or b'?').decode()}"
        else:
            code = errno.ETIMEDOUT if status == _RPC_STATUS_TIMEOUT else errno.EIO
        raise OSError(code, f"{os.strerror(code)}: {text or 'SETATTR failed or timed out'}", path)

    # The tree.

    @staticmethod
    def _abs(path: str) -> bytes:
        return os.fsencode("/" + path)

    def stat(self, path: str) -> Stat:
        st = _Stat64()
        self._call("nfs_stat64", self._abs(path), ctypes.byref(st), path=path)
        return _to_stat(st)

    def lstat(self, path: str) -> Stat:
        st = _Stat64()
        self._call("nfs_lstat64", self._abs(path), ctypes.byref(st), path=path)
        return _to_stat(st)

    def fsstat(self, path: str) -> FsStat:
        st = _StatVfs64()
        self._call("nfs_statvfs64", self._abs(path), ctypes.byref(st), path=path)
        return FsStat(st.blocks * st.frsize, st.bavail * st.frsize)

    def listdir(self, path: str) -> list[str]:
        names: list[str] = []
        with self._lock:  # readdir walks what opendir fetched: no I/O
            ctx, handle = self._ready(path), _P()
            self._check(ctx, self._lib.nfs_opendir(ctx, self._abs(path), ctypes.byref(handle)), path)
            try:
                entry = self._lib.nfs_readdir(ctx, handle)
                while entry:
                    if (name := os.fsdecode(entry.contents.name)) not in (".", ".."):
                        names.append(name)
                    entry = self._lib.nfs_readdir(ctx, handle)
            finally:
                self._lib.nfs_closedir(ctx, handle)
        return names

    def mkdir(self, path: str, mode: int) -> None:
        self._call("nfs_mkdir2", self._abs(path), mode, path=path)
        self.chmod(path, mode)  # the server's mkdir narrows it (umask, setgid)

    def rmdir(self, path: str) -> None:
        self._call("nfs_rmdir", self._abs(path), path=path)

    def unlink(self, path: str) -> None:
        self._call("nfs_unlink", self._abs(path), path=path)

    def rename(self, old: str, new: str) -> None:
        self._call("nfs_rename", self._abs(old), self._abs(new), path=old, path2=new)

    def link(self, existing: str, new: str) -> None:
        self._call("nfs_link", self._abs(existing), self._abs(new), path=existing, path2=new)

    def symlink(self, target: str, path: str) -> None:
        self._call("nfs_symlink", os.fsencode(target), self._abs(path), path=target, path2=path)

    def readlink(self, path: str) -> str:
        buffer = _P()
        self._call("nfs_readlink2", self._abs(path), ctypes.byref(buffer), path=path)
        try:
            return os.fsdecode(ctypes.string_at(buffer.value)) if buffer.value else ""
        finally:
            _free(buffer)

    def chmod(self, path: str, mode: int) -> None:
        if not self._setattr(path, 1 << (33 - 32), struct.pack(">I", mode & 0o7777), unless_link=True):  # FATTR4_MODE
            self._call("nfs_chmod", self._abs(path), mode & 0o7777, path=path)  # libnfs follows the link (to a file)

    def lchown(self, path: str, uid: int, gid: int) -> None:
        self._setattr(path, 1 << (36 - 32) | 1 << (37 - 32), _xdr_string(str(uid)) + _xdr_string(str(gid)))

    def lutimes(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        """Nanosecond precision (libnfs's own ``nfs_lutimes`` takes microseconds)."""
        bits = 1 << (48 - 32) | 1 << (54 - 32)  # FATTR4_TIME_ACCESS_SET, FATTR4_TIME_MODIFY_SET
        self._setattr(path, bits, _xdr_settime(atime_ns) + _xdr_settime(mtime_ns))

    def truncate(self, path: str, size: int) -> None:
        self._call("nfs_truncate", self._abs(path), size, path=path)

    def clone_file(self, source: str, target: str) -> bool:
        """Never: a clone is NFSv4.2 (CLONE), which libnfs 4.0 does not speak."""
        return False

    def data_ranges(self, path: str, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The whole span, without a call to the server. Finding holes takes SEEK (NFSv4.2,
        in a session), and libnfs 4.0 speaks NFSv4.0: its XDR ends at RELEASE_LOCKOWNER.
        Its ``nfs_lseek`` must not be asked either: it takes SEEK_DATA and SEEK_HOLE for
        SEEK_END (the file's size plus the offset), without an error."""
        if start < end:
            yield max(start, 0), end

    def xattrs(self, path: str) -> dict[str, bytes]:
        """None: NFSv4.0 and 4.1 carry no extended attributes (nor POSIX ACLs), and
        libnfs 4.0 speaks no 4.2; copies through this client keep none (README)."""
        return {}

    def set_xattr(self, path: str, name: str, value: bytes) -> None:
        raise OSError(errno.ENOTSUP, f"{os.strerror(errno.ENOTSUP)}: NFSv4.1 carries no extended attributes", path)

    def _open(self, path: str, flags: int) -> _NfsFile:
        with self._lock:
            # libnfs 4.0 keeps one open-owner per context and gets its sequence wrong when
            # the same file is opened twice at once: the second CLOSE breaks every later
            # open (NFS4ERR_BAD_SEQID). So a file is open once per client at a time; a
            # second opener waits for the first to close it.
            deadline = time.monotonic() + 4 * self._timeout_s
            while self._open_paths.get(path) == self._generation and self._ctx:
                if not self._path_closed.wait(max(0.0, deadline - time.monotonic())):
                    raise OSError(errno.ETIMEDOUT, f"{path} stayed open elsewhere on this client", path)
            for attempt in (1, 2):
                ctx, handle = self._ready(path), _P()
                ret = self._lib.nfs_open2(ctx, self._abs(path), flags | os.O_NOFOLLOW, 0o600, ctypes.byref(handle))
                if ret < 0 and attempt == 1 and self._lost_state(ctx):
                    self._drop()  # forgotten by the server (see _call): a new client may open it
                    continue
                self._check(ctx, ret, path)
                break
            opened = _NfsFile(self, handle, path, self._generation)
            self._open_paths[path] = self._generation
            self._files.add(opened)
            return opened

    def open(self, path: str, flags: int, mode: int = 0o600) -> File:
        """``mode`` is set exactly, not narrowed by a umask, when this call creates the file."""
        if not flags & os.O_CREAT:
            return self._open(path, flags)
        while True:  # find out whether this call creates the file: libnfs creates it 0600
            try:
                created = self._open(path, flags | os.O_EXCL)
                break
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
            try:
                return self._open(path, flags & ~os.O_CREAT)
            except FileNotFoundError:
                continue  # removed in between: create it
        try:
            created.chmod(mode)
        except BaseException:
            created.close()
            raise
        return created

    def close(self) -> None:
        """Closes the files still open, then the context; idempotent."""
        with self._lock:
            files, self._files = list(self._files), set()
        for leftover in files:
            with contextlib.suppress(OSError):
                leftover.close()
        with self._lock:
            self._drop()
            self._closed = True


class _NfsFile:
    def __init__(self, client: Client, handle: ctypes.c_void_p, path: str, generation: int) -> None:
        self.client, self.handle, self.path, self.generation = client, handle, path, generation

    def _call(self, function: str, *args: Any) -> int:
        return self.client._call(function, *args, path=self.path, file=self)

    def pread(self, size: int, offset: int) -> bytes:
        chunks: list[bytes] = []
        buffer = ctypes.create_string_buffer(max(0, min(size, self.client._readmax)))
        while size > 0:
            got = self._call("nfs_pread", offset, min(size, len(buffer)), buffer)
            if got == 0:
                break
            chunks.append(buffer.raw[:got])
            size, offset = size - got, offset + got
        return b"".join(chunks)

    def pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            chunk = bytes(view[: self.client._writemax])
            try:
                written = self._call("nfs_pwrite", offset, len(chunk), chunk)
            except OSError as exc:  # libnfs 4.0 encodes a WRITE in 4 KiB, whatever the server takes
                if exc.errno != errno.EMSGSIZE or len(chunk) <= 512:
                    raise
                self.client._writemax = max(512, len(chunk) * 3 // 4 // 512 * 512)
                continue
            if written <= 0:
                raise OSError(errno.EIO, f"nothing written at {offset} of {len(chunk)} bytes", self.path)
            view, offset = view[written:], offset + written

    def truncate(self, size: int) -> None:
        self._call("nfs_ftruncate", size)

    def fsync(self) -> None:
        self._call("nfs_fsync")

    def fstat(self) -> Stat:
        st = _Stat64()
        self._call("nfs_fstat64", ctypes.byref(st))
        return _to_stat(st)

    def chmod(self, mode: int) -> None:
        self._call("nfs_fchmod", mode & 0o7777)

    def close(self) -> None:
        """Idempotent; a file of a lost connection just forgets its handle."""
        client = self.client
        with client._lock:
            handle, self.handle = self.handle, _P()
            client._files.discard(self)
            if handle and client._open_paths.get(self.path) == self.generation:
                del client._open_paths[self.path]
                client._path_closed.notify_all()
            if handle and client._ctx and self.generation == client._generation:
                ctx = client._ctx
                ret = client._lib.nfs_close(ctx, handle)
                if ret < 0 and client._lost_state(ctx):
                    client._drop()  # the server keeps no state of ours to close any more
                    return
                client._check(ctx, ret, self.path)
