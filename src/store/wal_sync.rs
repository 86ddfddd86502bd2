//! The fsync behind a webhook acknowledgement, taken off the single writer's path.
//!
//! A webhook batch commits with `synchronous=NORMAL`: SQLite writes the batch's WAL frames (commit
//! frame included) but does not fsync them. The writer hands the batch to a syncer, which calls
//! `fdatasync` on the WAL file and only then answers the batch's requests; meanwhile the writer
//! commits the next batch. One fdatasync covers every frame written before it, so the syncer
//! acknowledges every batch that queued up during the previous one in a single call. Durability
//! is what `synchronous=FULL` gives (the frames are on disk before any 2xx), without the writer
//! idling through each fsync: with `FULL`, half the clients waited while the other half's commit
//! fsynced, so batches held half the connections and throughput was bounded by the disk's latency.
//!
//! Why this is safe with SQLite's WAL: recovery replays every frame up to the last valid commit
//! frame found on disk, so frames that reached the disk are a committed transaction whether
//! SQLite or we synced them; checkpoints still sync the WAL before copying and the database after
//! (`NORMAL` keeps those syncs), and SQLite deletes the WAL file only after a complete, synced
//! checkpoint. A replaced WAL file (deleted and created again when every connection closed) is
//! noticed by its inode and reopened.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The WAL file of one database, opened on first use and reopened when SQLite replaced it.
#[derive(Debug)]
pub(crate) struct WalFile {
    path: PathBuf,
    open: Mutex<Option<(File, (u64, u64))>>,
}

impl WalFile {
    /// The WAL beside the database file `db` (`<db>-wal`).
    pub(crate) fn beside(db: &Path) -> WalFile {
        let mut path = db.as_os_str().to_owned();
        path.push("-wal");
        WalFile {
            path: PathBuf::from(path),
            open: Mutex::new(None),
        }
    }

    /// Makes every WAL frame written so far durable (blocking: call from a blocking thread).
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        let on_disk = match std::fs::metadata(&self.path) {
            Ok(m) => (m.dev(), m.ino()),
            // No WAL: SQLite removed it after a complete checkpoint, which synced the database
            // file, so every committed frame is already durable there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut open = self
            .open
            .lock()
            .map_err(|_| std::io::Error::other("wal file lock poisoned"))?;
        if open.as_ref().map(|(_, id)| *id) != Some(on_disk) {
            let file = File::open(&self.path)?;
            let m = file.metadata()?;
            *open = Some((file, (m.dev(), m.ino())));
        }
        match open.as_ref() {
            Some((file, _)) => file.sync_data(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_wal_needs_no_sync_and_a_replaced_one_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let wal = WalFile::beside(&db);
        assert_eq!(wal.path, dir.path().join("x.db-wal"));
        wal.sync().unwrap();
        std::fs::write(&wal.path, b"one").unwrap();
        wal.sync().unwrap();
        let first = wal.open.lock().unwrap().as_ref().map(|(_, id)| *id);
        // Renamed, not removed: the old inode stays alive, so the new file cannot reuse its
        // number and a syncer still holding the old file would show here.
        std::fs::rename(&wal.path, dir.path().join("old-wal")).unwrap();
        std::fs::write(&wal.path, b"two").unwrap();
        wal.sync().unwrap();
        let second = wal.open.lock().unwrap().as_ref().map(|(_, id)| *id);
        let now = std::fs::metadata(&wal.path).unwrap();
        assert!(first.is_some());
        assert_ne!(first, second, "still syncing the replaced file");
        assert_eq!(second, Some((now.dev(), now.ino())));
    }
}
