//! The in-band runner: one command per step over SSH (russh), its output streamed line by
//! line to the action's log, its exit status checked, stopped on timeout or cancellation.
//!
//! Host keys are checked against a known_hosts file; with trust-on-first-use, the key of a
//! host that has no entry yet is pinned into that file. A key that differs from the pinned
//! one is always refused.
//!
//! Stopping a command: every command is prefixed with a line that reports its shell's PID on
//! standard error (`sshd` makes the shell a session leader, so that PID is the process
//! group of everything the command starts). To stop it, the runner sends an SSH `signal`
//! request (`SIGTERM`) and, because sshd ignores those for root logins before OpenSSH 9.8
//! and dropbear ignores them altogether, also runs `kill -TERM -<pgid>` on a second channel,
//! then `kill -KILL -<pgid>` if the command has not ended two seconds later. The action
//! returns as soon as the stop is under way; the clean-up finishes in the background. This
//! needs a POSIX login shell on the machine (sh, bash, dash, busybox ash, zsh).
//!
//! Once the command is sent, everything (writing its standard input included) happens under
//! the command timeout and the cancellation token, and every way out but a normal end goes
//! through that stop.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bm_provider::{ActionContext, ErrorKind, LogSink, ProviderError};
use russh::client::{self, Handle};
use russh::keys::known_hosts::{known_host_keys_path, learn_known_hosts_path};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelMsg, Disconnect, Sig};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::endpoint::SshTarget;

/// The longest line passed to the log; longer ones are split.
const MAX_LINE: usize = 4096;
/// How many lines of output an error message quotes.
const TAIL_LINES: usize = 5;
/// The most standard output kept (its last lines) for a command whose output is its result.
const MAX_CAPTURE: usize = 64 * 1024;
/// How long a stopped command has to exit after `SIGTERM` before `SIGKILL`.
const KILL_AFTER: Duration = Duration::from_secs(2);
/// The prefix of the line that reports the remote shell's PID (not logged).
const PGID_MARKER: &str = "bm-provider-redfish:pgid=";

/// How the runner connects.
#[derive(Clone, Debug)]
pub(crate) struct SshSettings {
    pub(crate) user: String,
    pub(crate) key: Arc<PrivateKey>,
    pub(crate) key_path: PathBuf,
    pub(crate) known_hosts: PathBuf,
    pub(crate) tofu: bool,
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
}

/// One command to run.
#[derive(Debug)]
pub(crate) struct Command {
    /// The log tag, the step's name, e.g. `repave`.
    pub(crate) tag: &'static str,
    /// The command line for the remote shell.
    pub(crate) command: String,
    /// The command line as it may be logged.
    pub(crate) display: String,
    /// Written to the command's standard input (then end of file).
    pub(crate) stdin: Option<String>,
    /// Keep standard output as the result instead of logging it (it holds a secret).
    pub(crate) capture_stdout: bool,
    /// Keep, besides logging it, the last line of standard output that starts with this (a
    /// result the command reports, e.g. the checksum of what it wrote).
    pub(crate) keep_line: Option<&'static str>,
}

/// What a successful command left.
#[derive(Debug, Default)]
pub(crate) struct Output {
    /// Its standard output, if captured.
    pub(crate) stdout: String,
    /// The last line that started with [`Command::keep_line`], without that prefix.
    pub(crate) kept: Option<String>,
}

/// Runs commands on machines over SSH.
#[derive(Debug)]
pub(crate) struct SshRunner {
    settings: SshSettings,
    config: Arc<client::Config>,
    /// Serialises host-key checks, so that two first connections do not pin twice.
    pin_lock: Arc<Mutex<()>>,
}

impl SshRunner {
    pub(crate) fn new(settings: SshSettings) -> Self {
        let config = client::Config {
            // A long command may print nothing for a while; keepalives notice a dead peer.
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            ..client::Config::default()
        };
        SshRunner {
            settings,
            config: Arc::new(config),
            pin_lock: Arc::new(Mutex::new(())),
        }
    }

    /// Runs `cmd` on `target` and returns when it exited with status 0.
    ///
    /// # Errors
    ///
    /// Unreachable when no SSH session could be opened; Permanent for a refused host key or
    /// key; for a non-zero exit status Transient (Permanent for 126 and 127, a command that
    /// cannot run), with its last lines of output; Transient on timeout (the command
    /// timeout); Canceled.
    pub(crate) async fn run(
        &self,
        ctx: &ActionContext<'_>,
        target: &SshTarget,
        cmd: Command,
    ) -> Result<Output, ProviderError> {
        let user = target
            .user
            .clone()
            .unwrap_or_else(|| self.settings.user.clone());
        let endpoint = format!("{user}@{target}");
        ctx.log
            .line(cmd.tag, format!("$ {}  (on {endpoint})", cmd.display));
        let connect = tokio::time::timeout(
            self.settings.connect_timeout,
            self.connect(ctx.log, cmd.tag, target, &user),
        );
        let handle = tokio::select! {
            r = connect => match r {
                Ok(r) => r?,
                Err(_) => return Err(ProviderError::unreachable(format!(
                    "no SSH session with {endpoint} within {}s",
                    self.settings.connect_timeout.as_secs()
                ))),
            },
            () = ctx.cancel.cancelled() => return Err(ProviderError::canceled()),
        };
        let opened = tokio::select! {
            r = open_session(&handle, &endpoint) => Some(r),
            () = ctx.cancel.cancelled() => None,
        };
        let channel = match opened {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                close_in_background(handle, None);
                return Err(e);
            }
            None => {
                close_in_background(handle, None);
                return Err(ProviderError::canceled());
            }
        };
        let mut run = Running {
            tag: cmd.tag,
            endpoint: &endpoint,
            log: ctx.log,
            capture: cmd.capture_stdout,
            keep_line: cmd.keep_line,
            kept: None,
            stdout: Lines::default(),
            stderr: Lines::default(),
            tail: VecDeque::new(),
            captured: Capture::default(),
            pgid: None,
        };
        let timeout = self.settings.command_timeout;
        let (result, stopped) = run.drive(channel, &cmd, ctx, timeout).await;
        close_in_background(handle, stopped);
        result
    }

    /// Connects, checks the host key and authenticates.
    async fn connect(
        &self,
        log: &LogSink,
        tag: &'static str,
        target: &SshTarget,
        user: &str,
    ) -> Result<Handle<HostKeyCheck>, ProviderError> {
        let endpoint = format!("{user}@{target}");
        let check = HostKeyCheck {
            host: target.host.clone(),
            port: target.port,
            known_hosts: self.settings.known_hosts.clone(),
            tofu: self.settings.tofu,
            pin_lock: self.pin_lock.clone(),
            log: log.clone(),
            tag,
        };
        let mut handle = client::connect(
            self.config.clone(),
            (target.host.as_str(), target.port),
            check,
        )
        .await
        .map_err(|e| connect_error(&endpoint, e))?;
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(|e| connect_error(&endpoint, SshFailure::Ssh(e)))?
            .flatten();
        let key = PrivateKeyWithHashAlg::new(self.settings.key.clone(), hash);
        let auth = handle
            .authenticate_publickey(user, key)
            .await
            .map_err(|e| connect_error(&endpoint, SshFailure::Ssh(e)))?;
        if !auth.success() {
            return Err(ProviderError::permanent(format!(
                "SSH server {endpoint} refused the key {}: add its public key to the authorized_keys of {user} on the machine",
                self.settings.key_path.display()
            )));
        }
        Ok(handle)
    }
}

/// The failure of a step of the SSH session (the connection is gone).
fn session_failed(endpoint: &str, what: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::unreachable(format!("SSH session with {endpoint}: {what} failed: {e}"))
}

/// Opens a session channel (nothing runs yet).
async fn open_session(
    handle: &Handle<HostKeyCheck>,
    endpoint: &str,
) -> Result<Channel<client::Msg>, ProviderError> {
    handle
        .channel_open_session()
        .await
        .map_err(|e| session_failed(endpoint, "opening a channel", e))
}

/// The command line sent: the PID report comes first, on a line of its own, so that no
/// command text can change how it is parsed.
fn wrapped(command: &str) -> String {
    format!("printf '{PGID_MARKER}%s\\n' \"$$\" >&2\n{command}")
}

/// Writes `input` to the command's standard input, then end of file. `writer` is apart from
/// the channel, so that the output is read while this waits for the remote side to take the
/// input.
async fn feed_stdin(mut writer: impl AsyncWrite + Unpin, input: Option<String>) -> io::Result<()> {
    if let Some(input) = input {
        writer.write_all(input.as_bytes()).await?;
    }
    // The channel's writer sends end of file on shutdown.
    writer.shutdown().await
}

/// Why a started command is being stopped.
enum Stop {
    Canceled,
    TimedOut,
    Failed(ProviderError),
}

/// A command that was stopped: its channel and, if it reported it, its process group.
struct Stopped {
    channel: Channel<client::Msg>,
    pgid: Option<u32>,
}

/// Ends a connection without making the action wait. A stopped command's process group is
/// sent `SIGTERM` through a second channel, and `SIGKILL` if the command has not ended
/// `KILL_AFTER` later.
fn close_in_background(handle: Handle<HostKeyCheck>, stopped: Option<Stopped>) {
    tokio::spawn(async move {
        if let Some(Stopped { mut channel, pgid }) = stopped {
            if let Some(pgid) = pgid {
                run_quietly(&handle, &format!("kill -TERM -{pgid}")).await;
            }
            let ended = tokio::time::timeout(KILL_AFTER, async {
                while let Some(msg) = channel.wait().await {
                    if matches!(msg, ChannelMsg::Close) {
                        break;
                    }
                }
            })
            .await;
            if ended.is_err() {
                let _ = channel.signal(Sig::KILL).await;
                if let Some(pgid) = pgid {
                    run_quietly(&handle, &format!("kill -KILL -{pgid}")).await;
                }
            }
            let _ = channel.close().await;
        }
        let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
    });
}

/// Runs a short command on a new channel and waits (a little) for it to end.
async fn run_quietly(handle: &Handle<HostKeyCheck>, command: &str) {
    let Ok(mut ch) = handle.channel_open_session().await else {
        return;
    };
    if ch.exec(false, command.as_bytes()).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(msg) = ch.wait().await {
            if matches!(msg, ChannelMsg::Close) {
                break;
            }
        }
    })
    .await;
}

/// The state of one running command.
struct Running<'a> {
    tag: &'static str,
    endpoint: &'a str,
    log: &'a LogSink,
    capture: bool,
    keep_line: Option<&'static str>,
    kept: Option<String>,
    stdout: Lines,
    stderr: Lines,
    tail: VecDeque<String>,
    captured: Capture,
    /// The remote shell's process group, once reported.
    pgid: Option<u32>,
}

impl Running<'_> {
    fn line(&mut self, line: String, is_stdout: bool) {
        if !is_stdout
            && self.pgid.is_none()
            && let Some(pid) = line.strip_prefix(PGID_MARKER)
        {
            self.pgid = pid.trim().parse().ok();
            return;
        }
        if is_stdout && self.capture {
            self.captured.push(line);
            return;
        }
        if is_stdout && let Some(rest) = self.keep_line.and_then(|p| line.strip_prefix(p)) {
            self.kept = Some(rest.trim().to_owned());
        }
        self.log.line(self.tag, &line);
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    fn last_output(&self) -> String {
        if self.tail.is_empty() {
            " (no output)".to_owned()
        } else {
            format!(
                "; last output: {}",
                self.tail.iter().cloned().collect::<Vec<_>>().join(" | ")
            )
        }
    }

    /// Starts the command, feeds its standard input and pumps its output until it ends,
    /// times out or is canceled. A stopped command is handed back for the clean-up.
    async fn drive(
        &mut self,
        mut channel: Channel<client::Msg>,
        cmd: &Command,
        ctx: &ActionContext<'_>,
        timeout: Duration,
    ) -> (Result<Output, ProviderError>, Option<Stopped>) {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        // From exec on, the command may run: every way out below but its end stops it.
        let started = tokio::select! {
            biased;
            () = ctx.cancel.cancelled() => Err(Stop::Canceled),
            () = &mut deadline => Err(Stop::TimedOut),
            r = channel.exec(true, wrapped(&cmd.command)) => r.map_err(|e| {
                Stop::Failed(session_failed(self.endpoint, "starting the command", e))
            }),
        };
        if let Err(why) = started {
            return self.stop(channel, why, timeout).await;
        }
        let feed = feed_stdin(channel.make_writer(), cmd.stdin.clone());
        tokio::pin!(feed);
        let mut fed = false;
        let mut status: Option<u32> = None;
        let mut signal: Option<String> = None;
        loop {
            let why = tokio::select! {
                biased;
                () = ctx.cancel.cancelled() => Stop::Canceled,
                () = &mut deadline => Stop::TimedOut,
                r = &mut feed, if !fed => match r {
                    Ok(()) => {
                        fed = true;
                        continue;
                    }
                    Err(e) => Stop::Failed(session_failed(self.endpoint, "writing standard input", e)),
                },
                msg = channel.wait() => match msg {
                    None | Some(ChannelMsg::Close) => break,
                    Some(ChannelMsg::Data { data }) => {
                        for l in self.stdout.push(&data) {
                            self.line(l, true);
                        }
                        continue;
                    }
                    Some(ChannelMsg::ExtendedData { data, .. }) => {
                        for l in self.stderr.push(&data) {
                            self.line(l, false);
                        }
                        continue;
                    }
                    Some(ChannelMsg::ExitStatus { exit_status }) => {
                        status = Some(exit_status);
                        continue;
                    }
                    Some(ChannelMsg::ExitSignal { signal_name, error_message, .. }) => {
                        let mut s = sig_name(&signal_name);
                        if !error_message.is_empty() {
                            s = format!("{s} ({error_message})");
                        }
                        signal = Some(s);
                        continue;
                    }
                    Some(ChannelMsg::Failure) => {
                        let e = ProviderError::permanent(format!(
                            "the SSH server {} refused to run the {} command",
                            self.endpoint, self.tag
                        ));
                        return (Err(e), None);
                    }
                    Some(_) => continue,
                },
            };
            return self.stop(channel, why, timeout).await;
        }
        self.flush();
        let result = match (status, signal) {
            (Some(0), _) => Ok(Output {
                stdout: self.captured.take(),
                kept: self.kept.take(),
            }),
            (Some(code), _) => {
                let kind = if matches!(code, 126 | 127) {
                    ErrorKind::Permanent
                } else {
                    ErrorKind::Transient
                };
                Err(ProviderError::new(
                    kind,
                    format!(
                        "{} failed on {}: exit status {code}{}",
                        self.tag,
                        self.endpoint,
                        self.last_output()
                    ),
                ))
            }
            (None, Some(sig)) => Err(ProviderError::transient(format!(
                "{} on {} was killed by signal {sig}{}",
                self.tag,
                self.endpoint,
                self.last_output()
            ))),
            (None, None) => Err(ProviderError::unreachable(format!(
                "the SSH connection to {} ended before {} reported an exit status{}",
                self.endpoint,
                self.tag,
                self.last_output()
            ))),
        };
        (result, None)
    }

    /// Stops a started command: `SIGTERM` on its channel now, the rest (its process group
    /// killed) in the background once the action has returned.
    async fn stop(
        &mut self,
        channel: Channel<client::Msg>,
        why: Stop,
        timeout: Duration,
    ) -> (Result<Output, ProviderError>, Option<Stopped>) {
        let _ = channel.signal(Sig::TERM).await;
        let e = match why {
            Stop::Canceled => {
                self.log
                    .line(self.tag, "canceled: stopping the remote command");
                ProviderError::canceled()
            }
            Stop::TimedOut => {
                self.flush();
                ProviderError::transient(format!(
                    "{} on {} timed out after {}s and was stopped{}",
                    self.tag,
                    self.endpoint,
                    timeout.as_secs(),
                    self.last_output()
                ))
            }
            Stop::Failed(e) => e,
        };
        let stopped = Stopped {
            channel,
            pgid: self.pgid,
        };
        (Err(e), Some(stopped))
    }

    fn flush(&mut self) {
        if let Some(l) = self.stdout.finish() {
            self.line(l, true);
        }
        if let Some(l) = self.stderr.finish() {
            self.line(l, false);
        }
    }
}

fn sig_name(sig: &Sig) -> String {
    match sig {
        Sig::Custom(s) => s.clone(),
        other => format!("SIG{other:?}"),
    }
}

/// The last lines of a command's standard output, at most [`MAX_CAPTURE`] bytes: when a
/// command prints more, its result (a token) is what it printed last, so the oldest lines
/// go.
#[derive(Debug, Default)]
pub(crate) struct Capture {
    lines: VecDeque<String>,
    /// The bytes of `lines`, a newline each included.
    bytes: usize,
}

impl Capture {
    /// Adds a line, dropping the oldest ones beyond the limit (never the newest).
    pub(crate) fn push(&mut self, line: String) {
        self.bytes += line.len() + 1;
        self.lines.push_back(line);
        while self.bytes > MAX_CAPTURE && self.lines.len() > 1 {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.len() + 1;
            }
        }
    }

    /// The lines kept, each ended by a newline; empties the capture.
    pub(crate) fn take(&mut self) -> String {
        let mut out = String::with_capacity(self.bytes);
        for line in self.lines.drain(..) {
            out.push_str(&line);
            out.push('\n');
        }
        self.bytes = 0;
        out
    }
}

/// Splits a byte stream into lines (without `\n` or `\r\n`), at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    /// The complete lines after `data`.
    pub(crate) fn push(&mut self, data: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                out.push(String::from_utf8_lossy(&line).into_owned());
            } else if self.buf.len() >= MAX_LINE {
                let line: Vec<u8> = self.buf.drain(..MAX_LINE).collect();
                out.push(String::from_utf8_lossy(&line).into_owned());
            } else {
                return out;
            }
        }
    }

    /// The last, unterminated line, if any.
    pub(crate) fn finish(&mut self) -> Option<String> {
        if self.buf.is_empty() {
            return None;
        }
        let line = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        Some(line)
    }
}

/// The russh handler: checks the server's host key.
struct HostKeyCheck {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    tofu: bool,
    pin_lock: Arc<Mutex<()>>,
    log: LogSink,
    tag: &'static str,
}

/// Why a connection failed: an SSH error, or a host key refused.
#[derive(Debug)]
enum SshFailure {
    Ssh(russh::Error),
    HostKey(ProviderError),
}

impl From<russh::Error> for SshFailure {
    fn from(e: russh::Error) -> Self {
        SshFailure::Ssh(e)
    }
}

impl client::Handler for HostKeyCheck {
    type Error = SshFailure;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(_) => {
                return Err(SshFailure::HostKey(ProviderError::permanent(format!(
                    "{}:{} presented a host certificate; only plain host keys checked against a known_hosts file are supported",
                    self.host, self.port
                ))));
            }
        };
        let _pinning = self.pin_lock.lock().await;
        let (path, host, port, tofu) = (
            self.known_hosts.clone(),
            self.host.clone(),
            self.port,
            self.tofu,
        );
        let verdict =
            tokio::task::spawn_blocking(move || check_host_key(&path, &host, port, &key, tofu))
                .await
                .map_err(|e| {
                    SshFailure::HostKey(ProviderError::transient(format!(
                        "checking the host key failed: {e}"
                    )))
                })?
                .map_err(SshFailure::HostKey)?;
        if let HostKeyVerdict::Pinned(fingerprint) = verdict {
            self.log.line(
                self.tag,
                format!(
                    "trusted the host key {fingerprint} of {} on first use and pinned it in {}",
                    self.host,
                    self.known_hosts.display()
                ),
            );
        }
        Ok(true)
    }
}

/// The outcome of a successful host-key check.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HostKeyVerdict {
    /// The key is in the file.
    Known,
    /// The host had no key in the file; this one was added (its fingerprint).
    Pinned(String),
}

/// Checks `key` of `host:port` against the known_hosts file at `path`, pinning it there on
/// first use if `tofu`.
pub(crate) fn check_host_key(
    path: &Path,
    host: &str,
    port: u16,
    key: &PublicKey,
    tofu: bool,
) -> Result<HostKeyVerdict, ProviderError> {
    let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
    let name = if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    };
    let known = known_host_keys_path(host, port, path).map_err(|e| {
        ProviderError::permanent(format!(
            "cannot read the known_hosts file {} for {name}: {e}",
            path.display()
        ))
    })?;
    if known.iter().any(|(_, k)| k == key) {
        return Ok(HostKeyVerdict::Known);
    }
    if let Some((line, _)) = known.first() {
        return Err(ProviderError::permanent(format!(
            "host key mismatch for {name}: it offered {fingerprint}, which is not the key recorded in {} (line {line}); if the machine was reinstalled, remove that line, otherwise someone may be impersonating it",
            path.display()
        )));
    }
    if !tofu {
        return Err(ProviderError::permanent(format!(
            "unknown host key for {name} ({fingerprint}): it is not in {}; add it (e.g. with ssh-keyscan) or enable ssh.trust_on_first_use",
            path.display()
        )));
    }
    learn_known_hosts_path(host, port, key, path).map_err(|e| {
        ProviderError::permanent(format!(
            "cannot pin the host key of {name} in {}: {e}",
            path.display()
        ))
    })?;
    Ok(HostKeyVerdict::Pinned(fingerprint))
}

fn connect_error(endpoint: &str, e: SshFailure) -> ProviderError {
    use russh::Error as E;
    match e {
        SshFailure::HostKey(e) => e,
        SshFailure::Ssh(E::IO(io)) => {
            ProviderError::unreachable(format!("cannot connect to SSH at {endpoint}: {io}"))
        }
        SshFailure::Ssh(
            e @ (E::Disconnect
            | E::HUP
            | E::ConnectionTimeout
            | E::KeepaliveTimeout
            | E::InactivityTimeout
            | E::SendError),
        ) => ProviderError::unreachable(format!("SSH connection to {endpoint} failed: {e}")),
        SshFailure::Ssh(e) => {
            ProviderError::transient(format!("SSH handshake with {endpoint} failed: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_as_they_complete() {
        let mut l = Lines::default();
        assert!(l.push(b"par").is_empty());
        assert_eq!(l.push(b"tial\nsecond\r\nthi"), ["partial", "second"]);
        assert_eq!(l.finish().as_deref(), Some("thi"));
        assert_eq!(l.finish(), None);
        let long = vec![b'x'; MAX_LINE + 10];
        let out = l.push(&long);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), MAX_LINE);
        assert_eq!(l.finish().map(|s| s.len()), Some(10));
        // Invalid UTF-8 does not fail.
        assert_eq!(l.push(b"\xff ok\n"), ["\u{fffd} ok"]);
    }

    #[test]
    fn the_capture_keeps_the_last_lines() {
        let mut c = Capture::default();
        let filler = "x".repeat(1000);
        for _ in 0..200 {
            c.push(filler.clone());
        }
        c.push("the-token".to_owned());
        let out = c.take();
        assert!(out.len() <= MAX_CAPTURE, "{}", out.len());
        assert!(out.len() > MAX_CAPTURE - 1002, "{}", out.len());
        assert_eq!(out.lines().last(), Some("the-token"));
        assert!(out.lines().rev().skip(1).all(|l| l == filler));
        assert_eq!(c.take(), "");
        c.push("a".to_owned());
        c.push(String::new());
        assert_eq!(c.take(), "a\n\n");
    }

    fn key(seed: u8) -> PublicKey {
        let kp = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]);
        PublicKey::from(kp.public)
    }

    #[test]
    fn host_keys_are_checked_and_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pins").join("known_hosts");
        let (a, b) = (key(1), key(2));
        // Unknown without TOFU: refused, nothing written.
        let e = check_host_key(&path, "10.0.0.1", 2222, &a, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent);
        assert!(
            e.to_string()
                .contains("unknown host key for [10.0.0.1]:2222"),
            "{e}"
        );
        assert!(!path.exists());
        // TOFU pins it, then it is known.
        let v = check_host_key(&path, "10.0.0.1", 2222, &a, true).unwrap();
        assert!(
            matches!(v, HostKeyVerdict::Pinned(ref f) if f.starts_with("SHA256:")),
            "{v:?}"
        );
        assert_eq!(
            check_host_key(&path, "10.0.0.1", 2222, &a, true).unwrap(),
            HostKeyVerdict::Known
        );
        // Another key for the same host is refused, TOFU or not.
        let e = check_host_key(&path, "10.0.0.1", 2222, &b, true).unwrap_err();
        assert!(
            e.to_string()
                .contains("host key mismatch for [10.0.0.1]:2222"),
            "{e}"
        );
        // Other hosts and ports are separate.
        check_host_key(&path, "10.0.0.1", 22, &b, true).unwrap();
        check_host_key(&path, "10.0.0.2", 2222, &b, true).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        // (russh starts an empty file with a blank line.)
        assert_eq!(text.lines().filter(|l| !l.is_empty()).count(), 3, "{text}");
    }
}
