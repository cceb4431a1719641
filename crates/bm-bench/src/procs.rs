//! The processes under test: starting them, and reading their CPU time and memory from /proc.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// A child process that announced its address on its first stdout line.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) addr: String,
}

impl Proc {
    /// Starts `cmd` and reads `<prefix> ADDR` from its first line.
    pub(crate) fn start(mut cmd: Command, prefix: &str) -> anyhow::Result<Proc> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a process")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix(prefix) else {
            let _ = child.kill();
            bail!("unexpected first line {line:?} (wanted {prefix:?})");
        };
        Ok(Proc {
            addr: addr.trim().to_owned(),
            child,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait up to `limit`; true if it exited 0.
    pub(crate) fn stop(mut self, limit: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = std::time::Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return s.success(),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    return false;
                }
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Resident memory now and at its peak, in bytes.
pub(crate) fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|k| k * 1024)
    };
    Ok((
        kib("VmRSS:").context("VmRSS")?,
        kib("VmHWM:").context("VmHWM")?,
    ))
}

/// User plus system CPU time the process used so far.
pub(crate) fn cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// The parent of a process, from its `/proc/<pid>/stat`; None when it is gone.
pub(crate) fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state, then the parent's pid, after the command name in parentheses.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// Small appends with fdatasync, per second, in `dir` (the disk the server writes to).
pub(crate) fn fsync_rate(dir: &Path, run_for: Duration) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let record = [b'x'; 100];
    let started = std::time::Instant::now();
    let mut n = 0u64;
    while started.elapsed() < run_for {
        f.write_all(&record)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(rate)
}
