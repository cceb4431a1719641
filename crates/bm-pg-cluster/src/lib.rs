//! A throwaway PostgreSQL cluster for tests, CI, the demo and the benchmark.
//!
//! [`Cluster::start`] finds Debian's PostgreSQL binaries (the newest
//! `/usr/lib/postgresql/*/bin`), runs `initdb` into a temporary directory with trust
//! authentication, and `pg_ctl start`s it on a free loopback port (no Unix socket). As root
//! the binaries run as the `postgres` user (PostgreSQL refuses to run as root), through
//! `runuser`, on a directory handed to that user. Each test makes its own database
//! ([`Cluster::create_database`], a few milliseconds), so one cluster serves a whole test
//! binary ([`Cluster::shared`]).
//!
//! The cluster stops when the [`Cluster`] is dropped, and in any case when the process that
//! started it is gone (a watchdog shell polls it), so that a test binary killed halfway, or
//! the shared cluster (a static, never dropped), leaves no server behind.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where Debian installs PostgreSQL, one directory per major version.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// Why a cluster could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// PostgreSQL's server binaries are not installed.
    #[error(
        "PostgreSQL is not installed (no {DEBIAN_ROOT}/*/bin/initdb): apt-get install postgresql"
    )]
    NotInstalled,
    /// A PostgreSQL program failed.
    #[error("{program} failed ({status}): {output}")]
    Failed {
        /// The program.
        program: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
    },
    /// A file or a process could not be handled.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// How a cluster is configured.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Commits wait for the disk (`fsync`, `synchronous_commit`), as in production: for the
    /// benchmark. Off by default: tests need no durability across a power cut, and it makes
    /// them several times faster.
    pub durable: bool,
    /// More `postgresql.conf` settings (name, value as written in the file, e.g. `'on'`).
    pub settings: Vec<(String, String)>,
    /// The whole `pg_hba.conf`, replacing initdb's (e.g. `hostssl` lines only, so that a test
    /// knows a connection that works used TLS).
    pub hba: Option<String>,
}

/// A running throwaway cluster; stopped and deleted on drop.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    as_postgres: bool,
    /// Deleted after the server stopped.
    dir: Option<tempfile::TempDir>,
}

/// The newest installed PostgreSQL's binary directory.
///
/// # Errors
///
/// [`ClusterError::NotInstalled`] when there is none.
pub fn find_binaries() -> Result<PathBuf, ClusterError> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_ROOT)
        .map_err(|_| ClusterError::NotInstalled)?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .ok_or(ClusterError::NotInstalled)
}

/// True when this process runs as root (the owner of its `/proc/self`).
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Runs a command to its end; its output is the error's when it fails.
fn run(mut cmd: Command, program: &str) -> Result<String, ClusterError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running {program}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(ClusterError::Failed {
            program: program.to_owned(),
            status: out.status.to_string(),
            output: text.trim().to_owned(),
        })
    }
}

/// A free loopback port, as the kernel picks it (it is free again once the probe closes).
fn free_port() -> Result<u16, ClusterError> {
    let probe =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(io("finding a free loopback port"))?;
    Ok(probe
        .local_addr()
        .map_err(io("finding a free loopback port"))?
        .port())
}

impl Cluster {
    /// Starts a cluster with the default [`Options`] (not durable).
    ///
    /// # Errors
    ///
    /// [`ClusterError::NotInstalled`], or a failure of `initdb` or `pg_ctl`.
    pub fn start() -> Result<Cluster, ClusterError> {
        Cluster::start_with(&Options::default())
    }

    /// One cluster for the whole process (a test binary), started at the first call.
    ///
    /// # Panics
    ///
    /// When it cannot start: tests cannot go on without it, and the message says why
    /// (`apt-get install postgresql` when it is missing).
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(|| match Cluster::start() {
            Ok(c) => c,
            Err(e) => panic!("cannot start a throwaway PostgreSQL: {e}"),
        })
    }

    /// Starts a cluster configured by `options`.
    ///
    /// # Errors
    ///
    /// [`ClusterError::NotInstalled`], or a failure of `initdb` or `pg_ctl`.
    pub fn start_with(options: &Options) -> Result<Cluster, ClusterError> {
        let bin = find_binaries()?;
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("bm-pg-")
            .tempdir()
            .map_err(io("creating the cluster's directory"))?;
        if as_postgres {
            let mut chown = Command::new("chown");
            chown.arg("postgres:").arg(dir.path());
            run(chown, "chown")?;
        }
        let data = dir.path().join("data");
        let mut cluster = Cluster {
            bin,
            data,
            port: 0,
            as_postgres,
            dir: Some(dir),
        };
        let mut initdb = cluster.command("initdb");
        initdb
            .arg("-D")
            .arg(&cluster.data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg("--locale=C");
        run(initdb, "initdb")?;
        let mut conf = String::from(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\nmax_connections = 400\n",
        );
        if !options.durable {
            conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        for (name, value) in &options.settings {
            conf.push_str(&format!("{name} = {value}\n"));
        }
        let conf_path = cluster.data.join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .map_err(io(format!("opening {}", conf_path.display())))?;
        std::io::Write::write_all(&mut file, conf.as_bytes())
            .map_err(io(format!("writing {}", conf_path.display())))?;
        if let Some(hba) = &options.hba {
            let path = cluster.data.join("pg_hba.conf");
            std::fs::write(&path, hba).map_err(io(format!("writing {}", path.display())))?;
        }
        // The port is free when probed; another process may take it before the server
        // binds it, so a failed start is tried again on another port.
        let mut last = None;
        for _ in 0..3 {
            cluster.port = free_port()?;
            let mut start = cluster.command("pg_ctl");
            start
                .arg("start")
                .arg("-D")
                .arg(&cluster.data)
                .arg("-w")
                .arg("-l")
                .arg(cluster.log())
                .arg("-o")
                .arg(format!("-p {}", cluster.port));
            match run(start, "pg_ctl start") {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            let log = std::fs::read_to_string(cluster.log()).unwrap_or_default();
            return Err(match e {
                ClusterError::Failed {
                    program, status, ..
                } => ClusterError::Failed {
                    program,
                    status,
                    output: log,
                },
                e => e,
            });
        }
        cluster.watchdog()?;
        Ok(cluster)
    }

    /// A PostgreSQL program, run as the `postgres` user when this process is root.
    pub fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// The server's log file.
    pub fn log(&self) -> PathBuf {
        self.data.with_file_name("server.log")
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The directory of the PostgreSQL binaries used.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new empty database with a name unique in this cluster; returns its URL.
    ///
    /// # Errors
    ///
    /// A failure of `createdb`.
    pub fn create_database(&self) -> Result<String, ClusterError> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let name = format!(
            "db_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut createdb = self.command("createdb");
        createdb
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg(&name);
        run(createdb, "createdb")?;
        Ok(self.url(&name))
    }

    /// Stops the server when this process is gone, whether it dropped the cluster or not
    /// (the shared cluster is a static; a killed test binary drops nothing).
    fn watchdog(&self) -> Result<(), ClusterError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = if self.as_postgres {
            format!("runuser -u postgres -- '{}'", pg_ctl.display())
        } else {
            format!("'{}'", pg_ctl.display())
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {stop} stop -D '{data}' -m immediate >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            data = self.data.display(),
            dir = dir.path().display(),
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting the cluster's watchdog"))?;
        Ok(())
    }

    /// Stops the server now (fast: no checkpoint; the cluster is thrown away).
    pub fn stop(&mut self) {
        if self.dir.is_none() {
            return;
        }
        let mut stop = self.command("pg_ctl");
        stop.arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w"]);
        let _ = run(stop, "pg_ctl stop");
        self.dir.take();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_makes_databases_and_stops() {
        let mut cluster = Cluster::start().unwrap();
        let a = cluster.create_database().unwrap();
        let b = cluster.create_database().unwrap();
        assert_ne!(a, b);
        let port = cluster.port();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        let data = cluster.data_dir().to_owned();
        cluster.stop();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        assert!(!data.exists());
    }
}
