//! Watch and log streams: replay then live, resume from a revision, end with the operation.

use std::time::Duration;

use bm_domain::{EventKind, OperationType};
use bm_provider_fake::LABEL_HANG_ACTION;
use bm_workflow::{EventFilter, ResumePoint, WorkflowError};

use crate::harness::memory;

#[tokio::test]
async fn watch_replays_then_follows_and_resumes_from_a_revision() {
    let h = memory();
    h.machine("machine-1", &[]).await;
    h.machine("machine-2", &[]).await;
    h.run("machine-1", OperationType::EnterMaintenance, "a")
        .await;
    // A live watch of machine-2 only, opened before its operation.
    let mut live = h
        .engine
        .watch(
            EventFilter {
                machine_id: Some(crate::harness::id("machine-2")),
                operation_id: None,
            },
            None,
        )
        .await
        .unwrap();
    let op = h
        .run("machine-2", OperationType::EnterMaintenance, "b")
        .await;
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|e: &std::sync::Arc<bm_domain::OperationEvent>| e.is_terminal())
    {
        seen.extend(live.recv().await.unwrap().unwrap());
    }
    assert!(
        seen.iter().all(|e| e.operation_id == op.id),
        "only machine-2's events"
    );
    assert_eq!(seen.first().unwrap().kind, EventKind::Created);
    let revs: Vec<u64> = seen.iter().map(|e| e.revision).collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");

    // Resuming after a revision replays exactly what came after it.
    let mid = revs[revs.len() / 2];
    let all = h.events_of(op.id).await;
    let mut resumed = h
        .engine
        .watch(
            EventFilter {
                operation_id: Some(op.id),
                machine_id: None,
            },
            Some(mid),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(b) = resumed.recv().await {
        got.extend(b.unwrap().iter().map(|e| e.revision));
    }
    let want: Vec<u64> = all
        .iter()
        .map(|e| e.revision)
        .filter(|r| *r > mid)
        .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn watching_an_unknown_operation_is_an_error() {
    let h = memory();
    let e = h
        .engine
        .watch(
            EventFilter {
                operation_id: Some(bm_domain::OperationId::from_parts(1, 1)),
                machine_id: None,
            },
            Some(0),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    let e = h
        .engine
        .logs(bm_domain::OperationId::from_parts(1, 1), 0)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
}

#[tokio::test]
async fn logs_replay_follow_and_end_with_the_operation() {
    let h = memory();
    h.machine("machine-1", &[(LABEL_HANG_ACTION, "repave")])
        .await;
    h.run("machine-1", OperationType::EnterMaintenance, "e")
        .await;
    let op = h
        .submit("machine-1", OperationType::Reimage, "r")
        .await
        .unwrap();
    h.wait_stage(op.id, "repave-image").await;
    // Opened mid-operation: what was logged so far, then live, then the end.
    let mut rx = h.engine.logs(op.id, 0).await.unwrap();
    let mut lines = Vec::new();
    // Everything up to the hang notice arrives while the operation still runs.
    while !lines
        .iter()
        .any(|l: &std::sync::Arc<bm_domain::LogLine>| l.message.contains("injected hang"))
    {
        lines.extend(rx.recv().await.unwrap().unwrap());
    }
    h.cancel(op.id).await.unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        let mut rest = Vec::new();
        while let Some(b) = rx.recv().await {
            rest.extend(b.unwrap());
        }
        rest
    })
    .await
    .expect("the log stream ends when the operation ends");
    lines.extend(rest);
    let seqs: Vec<u64> = lines.iter().map(|l| l.sequence).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.stage == "set-netboot" && l.tag == "pxe")
    );

    // After the end, a reader gets the whole log and the stream ends at once.
    let mut again = h.engine.logs(op.id, 0).await.unwrap();
    let mut replay = Vec::new();
    while let Some(b) = again.recv().await {
        replay.extend(b.unwrap().iter().map(|l| l.sequence));
    }
    assert_eq!(replay, seqs);
    // Resuming after a sequence number skips what was seen.
    let mut tail = h.engine.logs(op.id, 3).await.unwrap();
    let first = tail.recv().await.unwrap().unwrap();
    assert_eq!(first[0].sequence, 4);
}

#[tokio::test]
async fn streams_end_with_a_resume_hint_on_shutdown_and_refuse_unknown_revisions() {
    let h = memory();
    h.machine("machine-1", &[(LABEL_HANG_ACTION, "drain")])
        .await;
    let op = h
        .submit("machine-1", OperationType::EnterMaintenance, "e")
        .await
        .unwrap();
    h.wait_stage(op.id, "drain").await;
    let mut watch = h
        .engine
        .watch(EventFilter::default(), Some(0))
        .await
        .unwrap();
    let mut logs = h.engine.logs(op.id, 0).await.unwrap();
    h.engine.shutdown(Duration::from_secs(5)).await;
    let mut last = None;
    while let Some(b) = watch.recv().await {
        last = Some(b);
    }
    let e = last.unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            WorkflowError::StreamInterrupted {
                after: ResumePoint::Revision(r)
            } if r > 0
        ),
        "{e}"
    );
    let mut last = None;
    while let Some(b) = logs.recv().await {
        last = Some(b);
    }
    let e = last.unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            WorkflowError::StreamInterrupted {
                after: ResumePoint::Sequence(_)
            }
        ),
        "{e}"
    );

    let beyond = h
        .engine
        .watch(EventFilter::default(), Some(10_000))
        .await
        .unwrap_err();
    assert!(
        matches!(
            beyond,
            WorkflowError::RevisionOutOfRange { asked: 10_000, .. }
        ),
        "{beyond}"
    );
}

#[tokio::test]
async fn watchers_that_do_not_read_hold_a_bounded_number_of_bytes_and_miss_nothing() {
    const BUDGET: usize = 4 * 1024;
    const WATCHERS: usize = 40;
    let h = crate::harness::start(
        std::sync::Arc::new(bm_store::MemoryStore::new()),
        bm_workflow::EngineConfig {
            stream_buffer_bytes: BUDGET,
            // Many batches allowed: only the byte budget holds the streams back.
            stream_buffer: 10_000,
            ..crate::harness::config()
        },
    );
    for m in ["machine-1", "machine-2"] {
        h.machine(m, &[]).await;
    }
    for i in 0..40 {
        let (m, t) = match i % 4 {
            0 => ("machine-1", OperationType::EnterMaintenance),
            1 => ("machine-1", OperationType::ExitMaintenance),
            2 => ("machine-2", OperationType::EnterMaintenance),
            _ => ("machine-2", OperationType::ExitMaintenance),
        };
        h.run(m, t, &format!("r{i}")).await;
    }
    let last = h.store.last_revision().await.unwrap();
    let all_bytes = last as usize * std::mem::size_of::<bm_domain::OperationEvent>();
    assert!(
        all_bytes > 4 * BUDGET,
        "the history ({all_bytes} bytes) is much larger than one watcher's budget"
    );

    // Watchers from revision 0 that do not read.
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        watchers.push(
            h.engine
                .watch(EventFilter::default(), Some(0))
                .await
                .unwrap(),
        );
    }
    // Each stream fills its budget, then waits for its reader.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let stats = loop {
        let stats = h.engine.stream_stats();
        if stats.waiting_for_readers == WATCHERS {
            break stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watchers did not all wait for their readers: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(stats.streams, WATCHERS, "{stats:?}");
    assert!(
        stats.buffered_bytes <= WATCHERS * BUDGET,
        "{} bytes buffered for {WATCHERS} watchers of {BUDGET} bytes each",
        stats.buffered_bytes
    );
    assert!(
        stats.buffered_bytes >= WATCHERS * BUDGET / 2,
        "the budget is what holds them back: {stats:?}"
    );

    // Reading again, each gets every event once, in order.
    for rx in &mut watchers {
        let mut revisions = Vec::new();
        while revisions.last() != Some(&last) {
            let batch = tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .expect("the stream goes on when read")
                .expect("open")
                .expect("no error");
            revisions.extend(batch.iter().map(|e| e.revision));
        }
        assert_eq!(revisions, (1..=last).collect::<Vec<_>>());
    }
    drop(watchers);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let open = |s: bm_workflow::StreamStats| (s.streams, s.buffered_bytes, s.waiting_for_readers);
    while open(h.engine.stream_stats()) != (0, 0, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "streams whose readers left end: {:?}",
            h.engine.stream_stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_watcher_that_falls_behind_the_live_feed_catches_up_from_the_store_and_is_counted() {
    // The live feed keeps 4 events: a watcher that does not read falls behind at once.
    let h = crate::harness::start(
        std::sync::Arc::new(bm_store::MemoryStore::with_broadcast_capacity(4)),
        bm_workflow::EngineConfig {
            stream_buffer_bytes: 1024,
            stream_buffer: 1,
            ..crate::harness::config()
        },
    );
    h.machine("machine-1", &[]).await;
    let first = h.store.last_revision().await.unwrap();
    let mut watcher = h.engine.watch(EventFilter::default(), None).await.unwrap();
    assert_eq!(h.engine.stream_stats().catch_ups, 0);
    for i in 0..10 {
        let t = if i % 2 == 0 {
            OperationType::EnterMaintenance
        } else {
            OperationType::ExitMaintenance
        };
        h.run("machine-1", t, &format!("r{i}")).await;
    }
    let last = h.store.last_revision().await.unwrap();
    assert!(last - first > 8, "more events than the feed keeps");
    let mut revisions = Vec::new();
    while revisions.last() != Some(&last) {
        let batch = tokio::time::timeout(Duration::from_secs(20), watcher.recv())
            .await
            .expect("the stream goes on when read")
            .expect("open")
            .expect("no error");
        revisions.extend(batch.iter().map(|e| e.revision));
    }
    assert_eq!(revisions, (first + 1..=last).collect::<Vec<_>>());
    assert!(
        h.engine.stream_stats().catch_ups >= 1,
        "{:?}",
        h.engine.stream_stats()
    );
}
