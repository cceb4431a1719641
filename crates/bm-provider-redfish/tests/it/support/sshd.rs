//! A real OpenSSH server for the SSH runner's tests: found like any system program (see
//! [`super::tools`]), on an ephemeral loopback port, with throwaway keys; killed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;

use super::{lock, temp_dir, tools};

/// An Ed25519 key pair written in OpenSSH format; returns the private key.
pub(crate) fn write_key(path: &Path, seed_from: &str) -> PrivateKey {
    // A seed that differs per call: the path and the time.
    let mut seed = [0u8; 32];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        .to_le_bytes();
    for (i, b) in path
        .to_string_lossy()
        .bytes()
        .chain(seed_from.bytes())
        .chain(nanos)
        .enumerate()
    {
        seed[i % 32] = seed[i % 32].wrapping_mul(31).wrapping_add(b);
    }
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.write_openssh_file(path, LineEnding::LF).unwrap();
    set_mode(path, 0o600);
    key
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A real sshd on 127.0.0.1 with a throwaway host key, accepting one generated client key
/// for the current user; killed on drop.
pub(crate) struct Sshd {
    pub(crate) port: u16,
    pub(crate) user: String,
    /// The client's private key file.
    pub(crate) client_key: PathBuf,
    /// The host's public key, `ssh-ed25519 AAAA...`.
    pub(crate) host_public: String,
    pub(crate) dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
    child: Child,
}

impl Sshd {
    pub(crate) fn start() -> Sshd {
        let sshd = tools::find("sshd", "openssh-server");
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned();
        // sshd started as root insists on its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let dir = temp_dir("sshd-");
        let d = dir.path();
        let host = write_key(&d.join("host_key"), "host");
        let client = write_key(&d.join("client_key"), "client");
        let host_public = host.public_key().to_openssh().unwrap();
        std::fs::write(
            d.join("authorized_keys"),
            format!("{}\n", client.public_key().to_openssh().unwrap()),
        )
        .unwrap();
        for attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = format!(
                "ListenAddress 127.0.0.1:{port}\n\
                 HostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\n\
                 PidFile {d}/sshd.pid\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\n\
                 AllowUsers {user}\n\
                 LogLevel VERBOSE\n",
                d = d.display()
            );
            std::fs::write(d.join("sshd_config"), config).unwrap();
            let mut child = Command::new(&sshd)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(d.join("sshd_config"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", sshd.display()));
            // Wait for "Server listening" on its log: an event, not a sleep.
            let stderr = child.stderr.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel::<String>();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            let mut log = Vec::new();
            let ready = loop {
                match rx.recv_timeout(Duration::from_secs(10)) {
                    Ok(line) if line.contains("Server listening on") => break true,
                    Ok(line) => log.push(line),
                    Err(_) => break false,
                }
            };
            if ready {
                // Keep draining its log so that sshd never blocks on a full pipe.
                let kept = Arc::new(Mutex::new(log));
                let k2 = kept.clone();
                std::thread::spawn(move || {
                    for line in rx {
                        lock(&k2).push(line);
                    }
                });
                return Sshd {
                    log: kept,
                    port,
                    user,
                    client_key: d.join("client_key"),
                    host_public,
                    dir,
                    child,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            let busy = log.iter().any(|l| l.contains("Address already in use"));
            assert!(
                busy && attempt < 4,
                "sshd did not start: {}",
                log.join("\n")
            );
        }
        unreachable!()
    }

    /// The server's log so far, for failure messages.
    pub(crate) fn log(&self) -> String {
        lock(&self.log).join("\n")
    }

    /// `user@127.0.0.1:port`.
    pub(crate) fn endpoint(&self) -> String {
        format!("{}@127.0.0.1:{}", self.user, self.port)
    }

    /// A known_hosts line for this server with `public` as its key.
    pub(crate) fn known_hosts_line(&self, public: &str) -> String {
        format!("[127.0.0.1]:{} {public}\n", self.port)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
