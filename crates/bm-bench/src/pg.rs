//! PostgreSQL for the benchmark: the database's own single-row commit rate (pgbench, one
//! client, the limit line of the PostgreSQL fleet rows) and the CPU time its processes use.

use std::time::Duration;

use anyhow::{Context, ensure};
use bm_pg_cluster::Cluster;

/// Durable single-row commits per second from one client (`pgbench -c 1` running
/// `INSERT INTO t VALUES (1)`, each its own transaction), on a fresh database of `cluster`.
pub(crate) fn commit_rate(cluster: &Cluster, run_for: Duration) -> anyhow::Result<f64> {
    let url = cluster.create_database()?;
    let db = url.rsplit('/').next().context("database name")?.to_owned();
    let port = cluster.port().to_string();
    let connect = ["-h", "127.0.0.1", "-U", "postgres", "-p", &port];
    let psql = cluster
        .command("psql")
        .args(connect)
        .args(["-q", "-c", "CREATE TABLE t (v int)", &db])
        .output()
        .context("running psql")?;
    ensure!(
        psql.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&psql.stderr)
    );
    // The script must be readable by the user PostgreSQL runs as.
    let script = cluster.data_dir().with_file_name("one_row.sql");
    std::fs::write(&script, "INSERT INTO t VALUES (1);\n")?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let out = cluster
        .command("pgbench")
        .args(connect)
        .args(["-n", "-c", "1", "-T"])
        .arg(run_for.as_secs().max(1).to_string())
        .arg("-f")
        .arg(&script)
        .arg(&db)
        .output()
        .context("running pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_tps(&text).with_context(|| format!("no tps in pgbench's output: {text}"))
}

/// How many times the cluster has flushed its WAL to disk so far (`pg_stat_wal.wal_sync`):
/// one per durable commit, or per group of commits that PostgreSQL flushed together.
pub(crate) fn wal_syncs(cluster: &Cluster) -> anyhow::Result<u64> {
    let port = cluster.port().to_string();
    let out = cluster
        .command("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
            &port,
            "-tAq",
            "-c",
        ])
        .arg("SELECT wal_sync FROM pg_stat_wal")
        .arg("postgres")
        .output()
        .context("running psql")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "reading pg_stat_wal failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.trim()
        .parse()
        .with_context(|| format!("pg_stat_wal.wal_sync is {text:?}"))
}

/// The transactions per second of pgbench's report (`tps = 242.51 (without initial
/// connection time)`).
fn parse_tps(report: &str) -> Option<f64> {
    report
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The CPU time used so far by the cluster's server processes: the postmaster (its pid is
/// the first line of `postmaster.pid`) and its children (backends, WAL writer, checkpointer).
/// Backends that exited are not counted; the servers keep their connections for the run.
pub(crate) fn cpu(cluster: &Cluster) -> anyhow::Result<Duration> {
    let pid_file = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid"))
        .context("reading postmaster.pid")?;
    let postmaster: u32 = pid_file
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .context("postmaster.pid has no pid")?;
    let mut total = crate::procs::cpu(postmaster)?;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if crate::procs::parent(pid) == Some(postmaster) {
            // A backend may exit between the listing and the read.
            total += crate::procs::cpu(pid).unwrap_or_default();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbench_tps() {
        let report = "number of failed transactions: 0 (0.000%)\n\
                      latency average = 4.1 ms\n\
                      initial connection time = 2.9 ms\n\
                      tps = 242.517890 (without initial connection time)\n";
        assert_eq!(parse_tps(report), Some(242.51789));
        assert_eq!(parse_tps("tps: ?"), None);
    }
}
