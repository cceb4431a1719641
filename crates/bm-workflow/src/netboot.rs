//! Network boots the control plane serves itself: which machine gets the deploy environment,
//! the one-time tickets that the deploy environment checks in with, and the wait of
//! `reboot-to-netboot` for that check-in.
//!
//! A machine that network-boots asks for its boot script by MAC
//! ([`Engine::netboot_answer`](crate::Engine::netboot_answer)). Only while an operation of
//! that machine is in its `reboot-to-netboot` stage does it get the deploy environment, with
//! a ticket: a random token bound to the machine and the operation, single-use, that expires.
//! At any other time, and for a MAC no machine has, the answer is "boot from the local
//! disk", so a machine whose firmware always tries the network first is never reimaged by
//! accident. The deploy environment checks in with its token
//! ([`Netboot::check_in`]); `reboot-to-netboot` ends on that check-in (not when the BMC
//! reports power), and fails when none comes within [`NetbootConfig::checkin_timeout`].
//!
//! Tickets and check-ins live in this process: with several replicas, the boot service's
//! requests must reach the replica that runs the operation (or one replica serves boots).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bm_domain::{MachineId, OperationId};
use bm_provider::{BootWitness, LogSink, ProviderError};
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The stage during which a machine gets the deploy environment.
pub const NETBOOT_STAGE: &str = "reboot-to-netboot";

/// Settings of the boot service's side of the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetbootConfig {
    /// How long a ticket may wait for its check-in (a machine takes minutes to boot).
    pub ticket_ttl: Duration,
    /// How long `reboot-to-netboot` waits, after the power cycle, for the deploy environment
    /// to check in.
    pub checkin_timeout: Duration,
}

impl Default for NetbootConfig {
    fn default() -> Self {
        NetbootConfig {
            ticket_ttl: Duration::from_secs(30 * 60),
            checkin_timeout: Duration::from_secs(10 * 60),
        }
    }
}

/// What a machine that network-boots is told to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootAnswer {
    /// Boot the deploy environment: the machine's operation is in its netboot stage.
    Deploy {
        /// The machine.
        machine_id: MachineId,
        /// Its operation.
        operation_id: OperationId,
        /// The one-time token the deploy environment checks in with.
        token: String,
    },
    /// Boot from the local disk.
    LocalDisk {
        /// The machine, when the MAC is known.
        machine_id: Option<MachineId>,
        /// Why, for the log.
        why: String,
    },
}

/// A check-in that was accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckIn {
    /// The machine that booted the deploy environment.
    pub machine_id: MachineId,
    /// The operation it booted it for.
    pub operation_id: OperationId,
}

/// Why a check-in was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckInError {
    /// No ticket has this token (never issued, or issued by another replica).
    #[error("no boot ticket has this token")]
    Unknown,
    /// The ticket expired before the check-in.
    #[error("the boot ticket of machine {0} expired; the next netboot gets a new one")]
    Expired(MachineId),
    /// The ticket was used already: tokens are single-use.
    #[error("the boot ticket of machine {0} was used already")]
    Used(MachineId),
}

struct Ticket {
    machine_id: MachineId,
    operation_id: OperationId,
    expires: SystemTime,
    used: bool,
}

/// The tickets and check-ins of this process. One per engine; providers that prove reboots
/// by check-ins take it as their [`BootWitness`].
pub struct Netboot {
    config: NetbootConfig,
    tickets: Mutex<HashMap<String, Ticket>>,
    /// The last check-in of each machine: its operation and when.
    checkins: Mutex<HashMap<MachineId, (OperationId, SystemTime)>>,
    checked_in: Notify,
}

impl std::fmt::Debug for Netboot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netboot")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Netboot {
    /// No tickets yet.
    pub fn new(config: NetbootConfig) -> Self {
        Netboot {
            config,
            tickets: Mutex::new(HashMap::new()),
            checkins: Mutex::new(HashMap::new()),
            checked_in: Notify::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &NetbootConfig {
        &self.config
    }

    /// A ticket for `operation_id` on `machine_id`: the unused one it has (a firmware that
    /// asks again gets the same token), or a new one (after a check-in, a second netboot of
    /// the same operation, e.g. a retried reboot-to-netboot, gets a fresh ticket). Expired
    /// tickets are dropped.
    pub(crate) fn ticket(
        &self,
        machine_id: &MachineId,
        operation_id: OperationId,
        now: SystemTime,
    ) -> String {
        let mut tickets = lock(&self.tickets);
        // A used ticket is kept until it expires, so that its reuse is told apart (410) from
        // a token never issued (403).
        tickets.retain(|_, t| t.expires > now);
        if let Some((token, _)) = tickets
            .iter()
            .find(|(_, t)| !t.used && t.operation_id == operation_id && t.machine_id == *machine_id)
        {
            return token.clone();
        }
        let bytes: [u8; 24] = rand::rng().random();
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        tickets.insert(
            token.clone(),
            Ticket {
                machine_id: machine_id.clone(),
                operation_id,
                expires: now + self.config.ticket_ttl,
                used: false,
            },
        );
        token
    }

    /// Accepts the check-in of a deploy environment with its token, once.
    ///
    /// # Errors
    ///
    /// [`CheckInError`]: unknown, expired or used token.
    pub fn check_in(&self, token: &str, now: SystemTime) -> Result<CheckIn, CheckInError> {
        let checkin = {
            let mut tickets = lock(&self.tickets);
            let ticket = tickets.get_mut(token).ok_or(CheckInError::Unknown)?;
            if ticket.used {
                return Err(CheckInError::Used(ticket.machine_id.clone()));
            }
            if ticket.expires <= now {
                return Err(CheckInError::Expired(ticket.machine_id.clone()));
            }
            ticket.used = true;
            CheckIn {
                machine_id: ticket.machine_id.clone(),
                operation_id: ticket.operation_id,
            }
        };
        lock(&self.checkins).insert(checkin.machine_id.clone(), (checkin.operation_id, now));
        self.checked_in.notify_waiters();
        Ok(checkin)
    }

    /// Whether `machine` checked in after `since` (for `op` only, when given).
    fn checked_in(&self, machine: &MachineId, op: Option<OperationId>, since: SystemTime) -> bool {
        lock(&self.checkins)
            .get(machine)
            .is_some_and(|(o, t)| op.is_none_or(|op| *o == op) && *t >= since)
    }

    fn checked_in_for(&self, machine: &MachineId, op: OperationId, since: SystemTime) -> bool {
        self.checked_in(machine, Some(op), since)
    }

    /// Waits until the deploy environment of `op` on `machine` checks in (after `since`),
    /// at most the configured check-in timeout.
    pub(crate) async fn wait(
        &self,
        machine: &MachineId,
        op: OperationId,
        since: SystemTime,
        cancel: &CancellationToken,
        log: &LogSink,
    ) -> Result<(), ProviderError> {
        let timeout = self.config.checkin_timeout;
        log.line(
            "netboot",
            format!("waiting up to {timeout:?} for the deploy environment to check in"),
        );
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.checked_in.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.checked_in_for(machine, op, since) {
                log.line("netboot", "the deploy environment checked in");
                return Ok(());
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ProviderError::transient(format!(
                        "machine {machine} did not boot the deploy environment within {timeout:?} \
                         of its power cycle: check that DHCP gives it the boot service's iPXE \
                         script, that the boot service logged a request for its MAC, and its \
                         console"
                    )));
                }
                () = cancel.cancelled() => return Err(ProviderError::canceled()),
            }
        }
    }
}

#[async_trait]
impl BootWitness for Netboot {
    async fn checked_in_since(&self, machine: &MachineId, since: SystemTime) -> bool {
        self.checked_in(machine, None, since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_ticket_is_single_use_bound_and_expires() {
        let nb = Netboot::new(NetbootConfig {
            ticket_ttl: Duration::from_secs(60),
            ..NetbootConfig::default()
        });
        let m = MachineId::new("m-1").unwrap();
        let op = OperationId::from_parts(1, 1);
        let token = nb.ticket(&m, op, at(100));
        assert_eq!(token.len(), 48);
        assert_eq!(
            nb.ticket(&m, op, at(110)),
            token,
            "asked again: same ticket"
        );
        let other = nb.ticket(&m, OperationId::from_parts(1, 2), at(110));
        assert_ne!(other, token, "another operation gets another ticket");

        assert_eq!(nb.check_in("nope", at(120)), Err(CheckInError::Unknown));
        assert_eq!(
            nb.check_in(&token, at(120)),
            Ok(CheckIn {
                machine_id: m.clone(),
                operation_id: op
            })
        );
        assert!(nb.checked_in_for(&m, op, at(120)));
        assert!(
            !nb.checked_in_for(&m, op, at(121)),
            "not since a later reset"
        );
        assert_eq!(
            nb.check_in(&token, at(121)),
            Err(CheckInError::Used(m.clone()))
        );
        assert_eq!(nb.check_in(&other, at(171)), Err(CheckInError::Expired(m)));
    }
}
