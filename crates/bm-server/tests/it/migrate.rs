//! `bm-server migrate [--check]` and the schema check at start, on both stores, through the
//! real binary: a database with migrations pending (SQLite: the committed schema-version-1
//! fixture of bm-store's golden tests; PostgreSQL: a new database, its first schema being
//! version 1) is reported pending (exit 1) and changed by nothing but `migrate`; after it,
//! current (exit 0); a database of a newer schema is reported as such (exit 2), left as it
//! is, and the server refuses to start on it, saying so; one that does not answer is
//! reported unreadable (exit 3), never pending.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use bm_pg_cluster::Cluster;

/// A committed fixture of bm-store's golden tests.
fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bm-store/tests/it/golden")
        .join(name)
}

fn bm_server(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bm-server"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("BM_STORE")
        .env_remove("BM_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("running bm-server")
}

/// Runs `bm-server migrate ARGS` and returns its exit code and what it printed.
fn migrate(args: &[&str]) -> (i32, String) {
    let out = bm_server(&[&["migrate"], args].concat());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exit code"), text)
}

/// Starts the server on `store_args` and expects it to exit, before listening, with an
/// error that says the schema is newer; returns its output.
fn refuses_to_start(store_args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bm-server"))
        .args(["--insecure", "--listen", "127.0.0.1:0"])
        .args(store_args)
        .env("NO_COLOR", "1")
        .env_remove("BM_STORE")
        .env_remove("BM_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting bm-server");
    // A server that starts prints its address first; one that refuses closes stdout.
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("reading stdout");
    if first.starts_with("bm-server listening on") {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the server started on a database of a newer schema");
    }
    let out = child.wait_with_output().expect("waiting for bm-server");
    assert!(!out.status.success(), "exit status {:?}", out.status);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_says(text: &str, what: &str) {
    assert!(text.contains(what), "expected {what:?} in:\n{text}");
}

#[test]
fn sqlite_migrate_check_then_migrate_then_newer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let db = dir.join("baremetal.db");
    std::fs::copy(fixture("store-v1.db"), &db).unwrap();
    let before = std::fs::read(&db).unwrap();
    let data_dir = dir.to_str().unwrap();

    let (code, text) = migrate(&["--check", "--data-dir", data_dir]);
    assert_eq!(code, 1, "{text}");
    assert_says(&text, "schema version 1,");
    assert_says(&text, "pending");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "--check changed the database"
    );

    let (code, text) = migrate(&["--data-dir", data_dir]);
    assert_eq!(code, 0, "{text}");
    assert_says(&text, "migrated from schema version 1 to");
    let (code, text) = migrate(&["--check", "--data-dir", data_dir]);
    assert_eq!(code, 0, "{text}");
    assert_says(&text, "current");

    // A database written by a newer program.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    conn.pragma_update(None, "user_version", version + 1)
        .unwrap();
    drop(conn);
    let (code, text) = migrate(&["--check", "--data-dir", data_dir]);
    assert_eq!(code, 2, "{text}");
    assert_says(&text, "newer than the");
    let (code, text) = migrate(&["--data-dir", data_dir]);
    assert_eq!(code, 2, "migrate must not touch a newer schema: {text}");
    let err = refuses_to_start(&["--data-dir", data_dir]);
    assert_says(&err, &format!("schema version {}, newer than", version + 1));
}

#[test]
fn postgres_migrate_check_then_migrate_then_newer() {
    let cluster = Cluster::shared();
    let psql = |url: &str, args: &[&str]| {
        let out = cluster
            .command("psql")
            .args(["-q", "-X", "-v", "ON_ERROR_STOP=1", "-d", url])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "psql {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let version = |url: &str| {
        psql(
            url,
            &["-t", "-A", "-c", "SELECT version FROM schema_version"],
        )
    };

    // A new database: every migration is pending, and --check creates nothing.
    let url = cluster.create_database().expect("database");
    let (code, text) = migrate(&["--check", "--store", &url]);
    assert_eq!(code, 1, "{text}");
    assert_says(&text, "schema version 0,");
    assert_eq!(
        psql(
            &url,
            &[
                "-t",
                "-A",
                "-c",
                "SELECT to_regclass('schema_version') IS NULL"
            ]
        ),
        "t",
        "--check created the schema"
    );
    let (code, text) = migrate(&["--store", &url]);
    assert_eq!(code, 0, "{text}");
    assert_says(&text, "migrated from schema version 0 to");
    let current: i64 = version(&url).parse().unwrap();
    let (code, text) = migrate(&["--check", "--store", &url]);
    assert_eq!(code, 0, "{text}");
    assert_says(&text, &format!("schema version {current}, current"));

    // The committed dump of schema version 1 (PostgreSQL's first) checks as what it is.
    let old = cluster.create_database().expect("database");
    psql(&old, &["-f", fixture("store-pg-v1.sql").to_str().unwrap()]);
    let (code, text) = migrate(&["--check", "--store", &old]);
    let pending = current - 1;
    assert_eq!(code, if pending == 0 { 0 } else { 1 }, "{text}");
    assert_says(&text, "schema version 1,");
    assert_eq!(version(&old), "1", "--check changed the schema");

    // A database written by a newer program.
    psql(
        &url,
        &["-c", "UPDATE schema_version SET version = version + 1"],
    );
    let (code, text) = migrate(&["--check", "--store", &url]);
    assert_eq!(code, 2, "{text}");
    assert_says(&text, "newer than the");
    let (code, text) = migrate(&["--store", &url]);
    assert_eq!(code, 2, "migrate must not touch a newer schema: {text}");
    assert_eq!(version(&url), (current + 1).to_string());
    let err = refuses_to_start(&["--store", &url]);
    assert_says(&err, &format!("schema version {}, newer than", current + 1));

    // A database that does not answer is neither current nor pending.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let (code, text) = migrate(&[
        "--check",
        "--store",
        &format!("postgres://postgres@127.0.0.1:{closed}/nothing"),
    ]);
    assert_eq!(code, 3, "{text}");
    assert_says(&text, "reading the schema version of");
}
