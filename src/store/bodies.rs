//! The bodies file: raw IMAP message bytes appended once, beside the SQLite database.
//!
//! An IMAP sync writes the whole mailbox. Kept in the `messages.raw` column, every byte went
//! through SQLite three times (the WAL, the checkpoint's read of the WAL, the database file), in
//! 4 KiB pages; that was the sync's largest CPU cost (bench/README.md). Here a batch's bodies are
//! appended to `<db>-bodies` in one go and its rows keep only where they are (`body_at`,
//! `body_len`, with an empty `raw`).
//!
//! The ordering that keeps "nothing lost": the appended bytes are fdatasync'd before the
//! transaction that points at them commits, so no committed row, durable or not, can point at
//! bytes a power loss could take. Bytes whose transaction was lost stay behind as garbage: never
//! read, never pointed at. Appends take an exclusive `flock` of the file, so two processes on one
//! database (`frontdesk run` and a `frontdesk sync`) never append at the same offset; not SQLite's
//! write lock, so that one batch's bodies are appended and synced while the previous batch's rows
//! commit (`Store::stage_imap_batch`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where one body lives in the bodies file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placed {
    /// Byte offset of the body's first byte.
    pub at: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// The bodies file of one database, opened (and created) on first use.
#[derive(Debug)]
pub(crate) struct BodyFile {
    path: PathBuf,
    open: Mutex<Option<File>>,
}

impl BodyFile {
    /// The bodies file beside the database file `db` (`<db>-bodies`).
    pub(crate) fn beside(db: &Path) -> BodyFile {
        BodyFile {
            path: Self::path_beside(db),
            open: Mutex::new(None),
        }
    }

    /// `<db>-bodies`.
    pub(crate) fn path_beside(db: &Path) -> PathBuf {
        let mut path = db.as_os_str().to_owned();
        path.push("-bodies");
        PathBuf::from(path)
    }

    /// Runs `f` on the open file, opening it first; `create`: an append may create the file, a
    /// read of a missing file is an error (it must not leave an empty file behind).
    fn with_file<T>(&self, create: bool, f: impl FnOnce(&File) -> io::Result<T>) -> io::Result<T> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| io::Error::other("bodies file lock poisoned"))?;
        if open.is_none() {
            let created = !self.path.exists();
            if created && !create {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} does not exist", self.path.display()),
                ));
            }
            let file = OpenOptions::new()
                .read(true)
                .append(false)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)?;
            if created {
                // the new name must survive a power loss before any row can point into the file
                file.sync_all()?;
                if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    File::open(dir)?.sync_all()?;
                } else {
                    File::open(".")?.sync_all()?;
                }
            }
            *open = Some(file);
        }
        match open.as_ref() {
            Some(file) => f(file),
            None => Err(io::Error::other("bodies file not open")),
        }
    }

    /// Appends `bodies` at the file's end and makes them durable; returns where each one is.
    /// Blocking: call from a blocking thread.
    pub(crate) fn append<'b>(
        &self,
        bodies: impl IntoIterator<Item = &'b [u8]>,
    ) -> io::Result<Vec<Placed>> {
        self.with_file(true, |file| {
            // this process's appends are serialized by `open`'s mutex, other processes' by the
            // flock (released by the kernel should this one die holding it)
            file.lock()?;
            let placed = Self::append_locked(file, bodies);
            let unlocked = file.unlock();
            let placed = placed?;
            unlocked?;
            Ok(placed)
        })
    }

    /// [`BodyFile::append`] with the file's lock held.
    fn append_locked<'b>(
        file: &File,
        bodies: impl IntoIterator<Item = &'b [u8]>,
    ) -> io::Result<Vec<Placed>> {
        // The end as it is now, not as this process last left it: another process may have
        // appended since (each under the lock this caller holds now). A torn append of a
        // crashed process stays as garbage before it.
        let mut at = file.metadata()?.len();
        let mut placed = Vec::new();
        for body in bodies {
            file.write_all_at(body, at)?;
            let len = body.len() as u64;
            placed.push(Placed { at, len });
            at += len;
        }
        if !placed.is_empty() {
            file.sync_data()?;
        }
        Ok(placed)
    }

    /// Reads the body at `place`. Blocking.
    pub(crate) fn read(&self, place: Placed) -> io::Result<Vec<u8>> {
        let len = usize::try_from(place.len).map_err(io::Error::other)?;
        self.with_file(false, |file| {
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, place.at)?;
            Ok(buf)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_land_after_whatever_is_there_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let bodies = BodyFile::beside(&db);
        assert_eq!(bodies.path, dir.path().join("x.db-bodies"));
        let first = bodies.append([&b"hello"[..], b"", b"world!"]).unwrap();
        assert_eq!(
            first,
            vec![
                Placed { at: 0, len: 5 },
                Placed { at: 5, len: 0 },
                Placed { at: 5, len: 6 }
            ]
        );
        // another process (a second handle) appends, and a crashed one left a torn tail
        let other = BodyFile::beside(&db);
        other.append([&b"xyz"[..]]).unwrap();
        let f = OpenOptions::new().append(true).open(&bodies.path).unwrap();
        std::io::Write::write_all(&mut &f, b"torn").unwrap();
        let next = bodies.append([&b"after"[..]]).unwrap();
        assert_eq!(next, vec![Placed { at: 18, len: 5 }]);
        assert_eq!(bodies.read(first[2]).unwrap(), b"world!");
        assert_eq!(bodies.read(next[0]).unwrap(), b"after");
        assert_eq!(other.read(first[0]).unwrap(), b"hello");
        // a place past the end is an error, not short or zeroed bytes
        assert!(bodies.read(Placed { at: 20, len: 10 }).is_err());
    }

    #[test]
    fn a_read_of_a_missing_file_is_an_error_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let bodies = BodyFile::beside(&dir.path().join("x.db"));
        let err = bodies.read(Placed { at: 0, len: 1 }).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        assert!(!bodies.path.exists(), "a read created the bodies file");
        // an append still creates it, and a later read finds it
        let placed = bodies.append([&b"x"[..]]).unwrap();
        assert_eq!(bodies.read(placed[0]).unwrap(), b"x");
    }

    #[test]
    fn appends_of_other_processes_never_overlap() {
        // each handle is its own open file, as another process's would be: only the flock keeps
        // them from reading the same end and writing over each other
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let threads: Vec<_> = (0..3u8)
            .map(|t| {
                let handle = BodyFile::beside(&db);
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..60u8 {
                        let bodies: Vec<Vec<u8>> = (0..4u8)
                            .map(|k| vec![t * 64 + (i % 16) * 4 + k; 100 + usize::from(k)])
                            .collect();
                        let placed = handle.append(bodies.iter().map(Vec::as_slice)).unwrap();
                        mine.extend(placed.into_iter().zip(bodies));
                    }
                    mine
                })
            })
            .collect();
        let all: Vec<(Placed, Vec<u8>)> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let reader = BodyFile::beside(&db);
        let mut spans: Vec<(u64, u64)> = all.iter().map(|(p, _)| (p.at, p.at + p.len)).collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "overlapping appends: {w:?}");
        }
        for (place, body) in &all {
            assert_eq!(&reader.read(*place).unwrap(), body);
        }
    }
}
