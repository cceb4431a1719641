//! What each step of a plan does to the hardware: the mapping of a [`StepKind`] to calls of
//! the machine's provider. The executor's side of the plans; `plan.rs` stays pure.

use bm_domain::Operation;
use bm_provider::{ActionContext, Notice, NoticeKind, PowerAction, Provider, ProviderError};
use tracing::Instrument;

use crate::netboot::Netboot;
use crate::plan::StepKind;

/// Runs the step's provider actions once, each in a `provider call` span when `traced`.
pub(crate) async fn run(
    step: StepKind,
    provider: &dyn Provider,
    ctx: ActionContext<'_>,
    op: &Operation,
    netboot: Option<&Netboot>,
    traced: bool,
) -> Result<(), ProviderError> {
    match step {
        StepKind::SetNetboot => call(ctx, traced, "set-netboot", provider.set_netboot(ctx)).await,
        StepKind::RebootToNetboot => {
            let since = std::time::SystemTime::now();
            call(
                ctx,
                traced,
                "power-cycle",
                provider.power(ctx, PowerAction::Cycle),
            )
            .await?;
            match netboot {
                // Booted means the deploy environment checked in, not that the BMC says On.
                Some(nb) => {
                    let span = if !traced {
                        tracing::Span::none()
                    } else {
                        tracing::info_span!(
                        target: crate::TRACE_TARGET,
                        "netboot check-in",
                        error = tracing::field::Empty,
                        otel.status_code = tracing::field::Empty,
                        )
                    };
                    in_span(
                        span,
                        nb.wait(&ctx.machine.id, op.id, since, ctx.cancel, ctx.log),
                    )
                    .await
                }
                None => Ok(()),
            }
        }
        StepKind::Reboot => {
            call(
                ctx,
                traced,
                "power-cycle",
                provider.power(ctx, PowerAction::Cycle),
            )
            .await
        }
        StepKind::RepaveImage => call(ctx, traced, "repave", provider.repave(ctx)).await,
        StepKind::JoinCluster => {
            let token = call(
                ctx,
                traced,
                "mint-join-token",
                provider.mint_join_token(ctx),
            )
            .await?;
            call(
                ctx,
                traced,
                "join-cluster",
                provider.join_cluster(ctx, &token),
            )
            .await
        }
        StepKind::VerifyInCluster => {
            call(
                ctx,
                traced,
                "verify-in-cluster",
                provider.verify_in_cluster(ctx),
            )
            .await
        }
        StepKind::Drain => call(ctx, traced, "drain", provider.drain(ctx)).await,
        StepKind::Uncordon => call(ctx, traced, "uncordon", provider.uncordon(ctx)).await,
        StepKind::Wipe => call(ctx, traced, "wipe-disks", provider.wipe_disks(ctx)).await,
        StepKind::Notify => {
            let note = if op.note.is_empty() {
                "no note given"
            } else {
                &op.note
            };
            let notice = Notice {
                kind: NoticeKind::RmaTicket,
                summary: format!("RMA of machine {} ({}): {note}", op.machine_id, op.id),
            };
            let ticket = call(ctx, traced, "notify", provider.notify(ctx, &notice)).await?;
            ctx.log.line("notify", format!("ticket {ticket} opened"));
            Ok(())
        }
        StepKind::PowerOff => {
            call(
                ctx,
                traced,
                "power-off",
                provider.power(ctx, PowerAction::Off),
            )
            .await
        }
        StepKind::ApplyNetConfig => {
            call(
                ctx,
                traced,
                "apply-network-config",
                provider.apply_network_config(ctx),
            )
            .await
        }
        StepKind::VerifyConnectivity => {
            call(
                ctx,
                traced,
                "verify-connectivity",
                provider.verify_connectivity(ctx),
            )
            .await
        }
    }
}

/// One provider call, in a span of its own named after the provider and the action when
/// `traced`.
async fn call<T>(
    ctx: ActionContext<'_>,
    traced: bool,
    action: &'static str,
    call: impl Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    if !traced {
        return call.await;
    }
    let provider = &ctx.machine.spec.provider;
    let span = tracing::info_span!(
        target: crate::TRACE_TARGET,
        "provider call",
        otel.name = %format_args!("{provider} {action}"),
        otel.kind = "client",
        provider = %provider,
        action,
        error = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    in_span(span, call).await
}

/// Runs `call` in `span`, and marks the span failed with the error when it fails.
async fn in_span<T>(
    span: tracing::Span,
    call: impl Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    let result = call.instrument(span.clone()).await;
    if let Err(e) = &result {
        span.record("error", tracing::field::display(e));
        span.record("otel.status_code", "ERROR");
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bm_domain::{
        Labels, Machine, MachineId, MachineSpec, OperationId, OperationType, RequestId, Timestamp,
    };
    use bm_provider::LogSink;
    use bm_provider_fake::{Action, FakeConfig, FakeProvider, Timing};
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// The fake actions one run of `step` calls, and the log lines it wrote.
    async fn actions_of(step: StepKind) -> (Vec<Action>, Vec<String>) {
        let fake = FakeProvider::new(FakeConfig {
            timing: Timing::Instant,
            ..FakeConfig::default()
        });
        let spec = MachineSpec {
            provider: "fake".into(),
            mac_addresses: vec!["02:00:00:00:00:01".parse().unwrap()],
            ssh_endpoint: "root@10.0.0.1:22".into(),
            image: "ubuntu-24.04".into(),
            target_cluster: "prod".into(),
            ..MachineSpec::default()
        };
        let machine = Machine::register(
            MachineId::new("m-1").unwrap(),
            spec,
            Labels::default(),
            Timestamp::EPOCH,
        )
        .unwrap();
        let op = Operation::new(
            OperationId::from_parts(1, 1),
            machine.id.clone(),
            OperationType::Rma,
            RequestId::new("r").unwrap(),
            "disk 3 clicks".into(),
            Timestamp::EPOCH,
        )
        .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let log = {
            let lines = lines.clone();
            LogSink::new(move |tag, message| {
                lines.lock().unwrap().push(format!("[{tag}] {message}"));
            })
        };
        let cancel = CancellationToken::new();
        let ctx = ActionContext {
            machine: &machine,
            operation_id: op.id,
            cancel: &cancel,
            log: &log,
        };
        run(step, &fake, ctx, &op, None, false)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", step.name()));
        let called = Action::ALL
            .into_iter()
            .filter(|a| fake.calls("m-1", *a) > 0)
            .collect();
        let lines = lines.lock().unwrap().clone();
        (called, lines)
    }

    #[tokio::test]
    async fn each_step_calls_its_provider_actions() {
        use Action as A;
        use StepKind as S;
        let cases: [(StepKind, &[Action]); 13] = [
            (S::SetNetboot, &[A::SetNetboot]),
            (S::RebootToNetboot, &[A::PowerCycle]),
            (S::RepaveImage, &[A::Repave]),
            (S::JoinCluster, &[A::MintJoinToken, A::JoinCluster]),
            (S::VerifyInCluster, &[A::VerifyInCluster]),
            (S::Reboot, &[A::PowerCycle]),
            (S::Drain, &[A::Drain]),
            (S::Uncordon, &[A::Uncordon]),
            (S::Wipe, &[A::WipeDisks]),
            (S::Notify, &[A::Notify]),
            (S::PowerOff, &[A::PowerOff]),
            (S::ApplyNetConfig, &[A::ApplyNetConfig]),
            (S::VerifyConnectivity, &[A::VerifyConnectivity]),
        ];
        assert_eq!(cases.len(), StepKind::ALL.len());
        for (step, want) in cases {
            let (called, _) = actions_of(step).await;
            // A power action may read the state back; that is not a step's choice.
            let called: Vec<Action> = called
                .into_iter()
                .filter(|a| *a != A::PowerStatus)
                .collect();
            assert_eq!(called, want, "{}", step.name());
        }
    }

    #[tokio::test]
    async fn notify_opens_a_ticket_with_the_operators_note() {
        let (_, lines) = actions_of(StepKind::Notify).await;
        let summary = format!(
            "RMA of machine m-1 ({}): disk 3 clicks",
            OperationId::from_parts(1, 1)
        );
        assert!(lines.iter().any(|l| l.ends_with(&summary)), "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("[notify] ticket ") && l.ends_with(" opened")),
            "{lines:?}"
        );
    }
}
