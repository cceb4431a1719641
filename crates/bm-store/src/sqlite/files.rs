//! The data directory and its files: permissions, the lock that keeps a second process out,
//! the checks that refuse a damaged or missing database before SQLite sees it, and backups.
//!
//! **Permissions.** The directory is created 0700 and the database 0600 (before SQLite opens
//! it: SQLite gives its `-wal` and `-shm` files the database's mode). Existing files that
//! other users may read are reported at open.
//!
//! **The lock.** An exclusive `flock` on the database file itself, held as long as any
//! connection is open: deleting a file cannot bypass it (a second process opening the same
//! database finds it locked). `flock` locks are independent of the POSIX record locks SQLite
//! takes on the same file on Linux; the directory must be on a local filesystem (over NFS
//! `flock` is emulated with record locks, and SQLite's WAL needs shared memory anyway). The
//! `LOCK` file of earlier versions is still locked too, so that an older server cannot run
//! beside this one.
//!
//! Closing *any* descriptor of a file drops every POSIX lock the process holds on it, SQLite's
//! included; so the descriptor that holds the lock ([`DataDir`]) is shared by every connection
//! and closed only after the last of them.
//!
//! **A new store** is written under a temporary name and linked into place when complete, so
//! that a database file that exists but is empty can only be the result of damage (a
//! truncation, a bad restore): it is refused, not taken for a new, empty inventory.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rusqlite::backup::{Backup, StepResult};

use super::schema;
use crate::{Result, StoreError};

/// The database file in the data directory.
pub(super) const DB_FILE: &str = "baremetal.db";
/// The lock file of versions before the lock on the database itself.
const LEGACY_LOCK: &str = "LOCK";

/// An open data directory: it holds the locks until dropped.
#[derive(Debug)]
pub(super) struct DataDir {
    dir: PathBuf,
    db: PathBuf,
    /// The database file, `flock`ed. Dropped last (see the module documentation).
    _db_lock: File,
    _legacy_lock: File,
}

impl DataDir {
    /// Creates the directory if missing (0700), takes the locks, and checks the database
    /// file: a missing one is created (0600) as an empty store; an empty one is refused.
    pub(super) fn open(dir: &Path) -> Result<DataDir> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_error(e, "creating the data directory", dir))?;
        let locked = || StoreError::Locked(dir.display().to_string());
        let legacy_lock = private_file(&dir.join(LEGACY_LOCK), false)?;
        try_lock(&legacy_lock).map_err(|e| e.unwrap_or_else(locked))?;
        let db = dir.join(DB_FILE);
        match fs::metadata(&db) {
            Ok(m) if m.len() == 0 => {
                return Err(StoreError::Damaged {
                    path: db.display().to_string(),
                    detail: "the file is empty (0 bytes): it was truncated or never completely written. If this is a new installation, delete it and start again".into(),
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if wal_path(&db).exists() {
                    return Err(StoreError::Damaged {
                        path: db.display().to_string(),
                        detail: format!(
                            "the file is missing but its write-ahead log {} is there: the database was deleted or moved. To start a new, empty store instead, delete {0} and {}",
                            wal_path(&db).display(),
                            shm_path(&db).display()
                        ),
                    });
                }
                create(&db)?;
            }
            Err(e) => return Err(io_error(e, "reading", &db)),
        }
        let db_lock = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&db)
            .map_err(|e| io_error(e, "opening", &db))?;
        try_lock(&db_lock).map_err(|e| e.unwrap_or_else(locked))?;
        Ok(DataDir {
            dir: dir.to_owned(),
            db,
            _db_lock: db_lock,
            _legacy_lock: legacy_lock,
        })
    }

    /// The database file.
    pub(super) fn db(&self) -> &Path {
        &self.db
    }

    /// Logs every file of the store that other users may read or write.
    pub(super) fn warn_if_exposed(&self) {
        for (path, mode) in exposed(&self.dir) {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "other users can access the store's files; run chmod 700 on the data directory and chmod 600 on the files in it"
            );
        }
    }
}

/// Takes an exclusive `flock` without waiting: `Err(None)` if another open file holds it.
fn try_lock(file: &File) -> std::result::Result<(), Option<StoreError>> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(fs::TryLockError::WouldBlock) => Err(None),
        Err(fs::TryLockError::Error(e)) => Err(Some(StoreError::backend(e))),
    }
}

/// The store's files (the directory, the database, its journal files, the lock file) whose
/// mode lets other users in, with their modes.
pub(super) fn exposed(dir: &Path) -> Vec<(PathBuf, u32)> {
    let db = dir.join(DB_FILE);
    [
        dir.to_owned(),
        wal_path(&db),
        shm_path(&db),
        db,
        dir.join(LEGACY_LOCK),
    ]
    .into_iter()
    .filter_map(|p| {
        let mode = fs::metadata(&p).ok()?.mode() & 0o777;
        (mode & 0o077 != 0).then_some((p, mode))
    })
    .collect()
}

pub(super) fn wal_path(db: &Path) -> PathBuf {
    with_suffix(db, "-wal")
}

fn shm_path(db: &Path) -> PathBuf {
    with_suffix(db, "-shm")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Opens (creating if missing) a file only its owner may read and write.
fn private_file(path: &Path, create_new: bool) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).mode(0o600);
    if create_new {
        options.create_new(true);
    } else {
        options.create(true).truncate(false);
    }
    options
        .open(path)
        .map_err(|e| io_error(e, "creating", path))
}

/// Writes a new, empty store at `db`: under a temporary name, then linked into place (a
/// link never replaces an existing file).
fn create(db: &Path) -> Result<()> {
    let tmp = with_suffix(db, ".new");
    // What a crash during an earlier creation left behind: never a store anyone used.
    for leftover in [tmp.clone(), wal_path(&tmp), shm_path(&tmp)] {
        match fs::remove_file(&leftover) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(e, "removing", &leftover)),
        }
    }
    drop(private_file(&tmp, true)?);
    {
        let mut conn = schema::open(&tmp, 1024)?;
        schema::migrate(&mut conn)?;
        // Closing the only connection checkpoints the WAL into the file and deletes it.
    }
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(e, "syncing", &tmp))?;
    fs::hard_link(&tmp, db).map_err(|e| io_error(e, "linking the new database to", db))?;
    fs::remove_file(&tmp).map_err(|e| io_error(e, "removing", &tmp))?;
    sync_dir(db)?;
    tracing::info!(path = %db.display(), "created a new, empty store");
    Ok(())
}

/// Makes a rename or link in `file`'s directory durable.
fn sync_dir(file: &Path) -> Result<()> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(e, "syncing", dir))
}

fn io_error(e: io::Error, doing: &str, path: &Path) -> StoreError {
    StoreError::backend(io::Error::new(
        e.kind(),
        format!("{doing} {}: {e}", path.display()),
    ))
}

/// What [`backup`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupReport {
    /// The backup file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// The machines in it.
    pub machines: u64,
    /// The operations in it.
    pub operations: u64,
    /// The last event revision in it.
    pub last_revision: u64,
    /// Its schema version (how many migrations it has seen).
    pub schema_version: i64,
}

/// Copies the store in `dir` to a new file `to`, consistently, while a server may be using
/// the store (SQLite's online backup reads one snapshot and blocks no writer). The copy is
/// checked with SQLite's quick integrity check, written 0600 under a temporary name next to
/// `to` and renamed into place only when complete; it is a single file (no write-ahead log),
/// ready to be put in place as `baremetal.db` (see docs/operations.md).
///
/// # Errors
///
/// `to` exists, the store cannot be read, the copy fails its check, or an IO error.
pub fn backup(dir: &Path, to: &Path) -> Result<BackupReport> {
    let db = dir.join(DB_FILE);
    match fs::metadata(&db) {
        Ok(m) if m.len() > 0 => {}
        Ok(_) => {
            return Err(StoreError::Damaged {
                path: db.display().to_string(),
                detail: "the file is empty (0 bytes); there is nothing to back up".into(),
            });
        }
        Err(e) => return Err(io_error(e, "reading the store", &db)),
    }
    if to.exists() {
        return Err(io_error(
            io::Error::from(io::ErrorKind::AlreadyExists),
            "not overwriting",
            to,
        ));
    }
    let name = to
        .file_name()
        .ok_or_else(|| io_error(io::ErrorKind::InvalidInput.into(), "backing up to", to))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".partial");
    let tmp = to.with_file_name(tmp_name);
    let _ = fs::remove_file(&tmp);
    drop(private_file(&tmp, true)?);
    let result = copy_into(&db, &tmp).and_then(|mut report| {
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_error(e, "syncing", &tmp))?;
        // `to` was checked above; a rename never leaves a half-written backup under its name.
        fs::rename(&tmp, to).map_err(|e| io_error(e, "renaming the backup to", to))?;
        sync_dir(to)?;
        report.path = to.to_owned();
        report.bytes = fs::metadata(to).map_or(0, |m| m.len());
        Ok(report)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies the database `db` into the (empty) file `tmp` and checks the copy.
fn copy_into(db: &Path, tmp: &Path) -> Result<BackupReport> {
    let source = schema::open_read_only(db, 4096)?;
    let mut copy = rusqlite::Connection::open(tmp)?;
    {
        let backup = Backup::new(&source, &mut copy)?;
        // All pages in one step: one read transaction, so one consistent snapshot however
        // much is written meanwhile (smaller steps would restart at every commit).
        let mut waits = 0;
        loop {
            match backup.step(-1)? {
                StepResult::Done => break,
                StepResult::More => {}
                StepResult::Busy | StepResult::Locked if waits < 100 => {
                    waits += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => {
                    return Err(StoreError::backend(io::Error::other(format!(
                        "the store stayed busy; the backup gave up ({other:?})"
                    ))));
                }
            }
        }
    }
    // A single file: no write-ahead log beside it.
    copy.pragma_update(None, "journal_mode", "DELETE")?;
    let problems = schema::quick_check(&copy)?;
    if !problems.is_empty() {
        return Err(StoreError::Damaged {
            path: db.display().to_string(),
            detail: format!(
                "its copy failed the integrity check ({}); the store itself may be damaged",
                problems.join("; ")
            ),
        });
    }
    let count = |sql: &str| -> Result<u64> {
        Ok(copy
            .query_row(sql, [], |r| r.get::<_, Option<i64>>(0))?
            .unwrap_or(0) as u64)
    };
    Ok(BackupReport {
        path: tmp.to_owned(),
        bytes: 0,
        machines: count("SELECT COUNT(*) FROM machines")?,
        operations: count("SELECT COUNT(*) FROM operations")?,
        last_revision: count("SELECT MAX(revision) FROM events")?,
        schema_version: schema::version(&copy)?,
    })
}
