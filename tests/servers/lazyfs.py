"""Test-only FUSE filesystem that simulates power loss ("LazyFS-lite", docs/reliability.md D3).

    python lazyfs.py BACKING_DIR MOUNTPOINT     (root, /dev/fuse, libfuse3, PyPI mfusepy)

A passthrough to BACKING_DIR that keeps every write() in memory, per file, until that file is
fsync'd (or fdatasync'd): only then are the writes applied to the backing file and the backing
file fsync'd. SIGUSR1 drops every unsynced write (a power cut: the page cache is gone) and prints
"dropped N writes" to stderr. Unmounting keeps the backing files as they are, so a remount sees
only what was synced. Reads, sizes and truncates see the unsynced writes while mounted, as a page
cache would.

Simplification (documented in docs/reliability.md): create, unlink, rename, mkdir and truncate
reach the backing dir at once, as if every directory operation were synchronous; only unsynced
data writes are lost. So a missing directory fsync is not caught here.

No real server does this on demand, hence a test-written filesystem.
"""
import errno
import os
import signal
import sys
import threading

from mfusepy import FUSE, FuseOSError, Operations


class Lazy(Operations):
    use_ns = True  # times in nanoseconds (getattr, utimens)

    def __init__(self, root):
        self.root = os.path.abspath(root)  # FUSE chdirs to /: never resolve relative paths
        self.pending = {}  # path -> [(offset, bytes)], in write order
        self.fh_path = {}  # fh -> path, for calls made with a null path
        self.mtx = threading.RLock()  # named mtx: `lock` is a FUSE operation
        self.synced_writes = 0

    def _full(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def _path(self, path, fh):
        return path if path is not None else self.fh_path.get(fh)

    def _size(self, path):
        size = os.lstat(self._full(path)).st_size
        for off, data in self.pending.get(path, ()):
            size = max(size, off + len(data))
        return size

    # --- power cut -------------------------------------------------------------------------
    def drop(self, *_):
        with self.mtx:
            n = sum(len(v) for v in self.pending.values())
            self.pending.clear()
        print("dropped %d writes (%d synced so far)" % (n, self.synced_writes), file=sys.stderr, flush=True)

    # --- metadata ------------------------------------------------------------------------
    def getattr(self, path, fh=None):
        with self.mtx:
            path = self._path(path, fh)
            try:
                st = os.lstat(self._full(path))
            except FileNotFoundError:
                raise FuseOSError(errno.ENOENT)
            attrs = {k: getattr(st, k) for k in (
                "st_mode", "st_nlink", "st_uid", "st_gid", "st_size")}
            for k in ("st_atime", "st_mtime", "st_ctime"):
                attrs[k] = getattr(st, k + "_ns")
            attrs["st_size"] = self._size(path)
            return attrs

    def access(self, path, amode):
        if not os.access(self._full(path), amode):
            raise FuseOSError(errno.EACCES)
        return 0

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._full(path))

    def statfs(self, path):
        st = os.statvfs(self._full(path))
        return {k: getattr(st, k) for k in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
            "f_files", "f_flag", "f_frsize", "f_namemax")}

    def chmod(self, path, mode):
        os.chmod(self._full(path), mode)
        return 0

    def chown(self, path, uid, gid):
        os.chown(self._full(path), uid, gid)
        return 0

    def utimens(self, path, times=None):
        os.utime(self._full(path), ns=times) if times else os.utime(self._full(path))
        return 0

    def mkdir(self, path, mode):
        os.mkdir(self._full(path), mode)
        return 0

    def rmdir(self, path):
        os.rmdir(self._full(path))
        return 0

    def unlink(self, path):
        with self.mtx:
            os.unlink(self._full(path))
            self.pending.pop(path, None)
        return 0

    def rename(self, old, new):
        with self.mtx:
            os.rename(self._full(old), self._full(new))
            if old in self.pending:
                self.pending[new] = self.pending.pop(old)
            else:
                self.pending.pop(new, None)
        return 0

    # --- files ---------------------------------------------------------------------------
    def open(self, path, flags):
        # Always read-write: the kernel may read through a handle opened write-only.
        fd = os.open(self._full(path), os.O_RDWR)
        with self.mtx:
            self.fh_path[fd] = path
            if flags & os.O_TRUNC:
                self._truncate(path, 0)
        return fd

    def create(self, path, mode, fi=None):
        fd = os.open(self._full(path), os.O_RDWR | os.O_CREAT, mode)
        with self.mtx:
            self.fh_path[fd] = path
        return fd

    def release(self, path, fh):
        with self.mtx:
            self.fh_path.pop(fh, None)
        os.close(fh)
        return 0

    def flush(self, path, fh):
        return 0  # close() is not a sync

    def read(self, path, size, offset, fh):
        with self.mtx:
            path = self._path(path, fh)
            buf = bytearray(os.pread(fh, size, offset))
            end = min(offset + size, self._size(path))
            if len(buf) < end - offset:
                buf.extend(b"\0" * (end - offset - len(buf)))
            for off, data in self.pending.get(path, ()):
                lo, hi = max(off, offset), min(off + len(data), offset + size)
                if lo < hi:
                    buf[lo - offset:hi - offset] = data[lo - off:hi - off]
            return bytes(buf[:max(0, end - offset)])

    def write(self, path, data, offset, fh):
        with self.mtx:
            path = self._path(path, fh)
            self.pending.setdefault(path, []).append((offset, bytes(data)))
        return len(data)

    def _truncate(self, path, length):
        os.truncate(self._full(path), length)
        kept = []
        for off, data in self.pending.get(path, ()):
            if off < length:
                kept.append((off, data[:length - off]))
        self.pending[path] = kept

    def truncate(self, path, length, fh=None):
        with self.mtx:
            self._truncate(self._path(path, fh), length)
        return 0

    def fsync(self, path, datasync, fh):
        with self.mtx:
            path = self._path(path, fh)
            writes = self.pending.pop(path, [])
            fd = os.open(self._full(path), os.O_WRONLY)
            try:
                for off, data in writes:
                    os.pwrite(fd, data, off)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.synced_writes += len(writes)
        return 0

    def fsyncdir(self, path, datasync, fh):
        return 0


if __name__ == "__main__":
    backing, mountpoint = sys.argv[1], sys.argv[2]
    fs = Lazy(backing)
    # The main thread sits in libfuse's C loop, where a Python signal handler would never run:
    # block SIGUSR1 everywhere (libfuse's threads inherit the mask) and take it in a thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    def power_cuts():
        while True:
            signal.sigwait({signal.SIGUSR1})
            fs.drop()

    threading.Thread(target=power_cuts, daemon=True).start()
    print("lazyfs mounting %s on %s" % (backing, mountpoint), file=sys.stderr, flush=True)
    FUSE(fs, mountpoint, foreground=True, nothreads=False, allow_other=True)
