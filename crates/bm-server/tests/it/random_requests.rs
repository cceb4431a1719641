//! A property test over arbitrary request messages against a real server (issue 11): 10,000
//! requests across every RPC of both services, sent by an admin (so that they reach the
//! handlers), a viewer (the denied path) and nobody. None may panic the server or get an
//! INTERNAL or UNKNOWN status, and a refused request must leave the stored data (every
//! machine, every operation) as it was.
//!
//! Each case starts its own server ([`start_server`], the one place that knows how a server
//! and its credentials are set up), registers a few machines, then sends its requests one
//! at a time. After an accepted request that started an operation, the test waits for the
//! operation to end, so that the data is at rest when the next request comes and a change
//! can only be the next request's doing.

use std::collections::HashMap;
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bm_proto::pbjson_types::FieldMask;
use bm_proto::v1 as pb;
use bm_server::{Auth, Role};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tonic::{Code, Request, Status};

use crate::inproc::InProcess;
use crate::support::{Clients, fake_machine};

/// Cases and requests per case: 10,000 requests in all.
const CASES: u32 = 20;
const REQUESTS_PER_CASE: usize = 500;

/// The machines every case starts with; requests name them often, so that they get past
/// the "not found" of the engine to its rules.
const KNOWN_MACHINES: usize = 4;

/// The name of the threads of the runtime that serves (and runs the test).
const THREAD_NAME: &str = "random-requests";

/// Panics on the runtime's threads, where the server's handlers run.
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics on the runtime's threads, and keeps the default report.
fn count_server_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some(THREAD_NAME) {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

// ---- the requests ---------------------------------------------------------------------

/// A string of a request: a literal, or something only known once the server runs.
#[derive(Clone, Debug)]
enum Text {
    Lit(String),
    /// The id of the n-th operation the case has seen (modulo their number).
    KnownOperation(usize),
    /// The last next_page_token the case was given.
    LastToken,
    /// That token with one character changed.
    MangledToken(usize, char),
}

/// Who sends a request.
#[derive(Clone, Copy, Debug)]
enum Caller {
    Admin,
    Viewer,
    Nobody,
}

/// One call of the API.
#[derive(Clone, Debug)]
enum Call {
    Register(pb::RegisterMachineRequest),
    Import(pb::ImportMachinesRequest),
    Get(pb::GetMachineRequest),
    ListMachines(pb::ListMachinesRequest, Text),
    Update(pb::UpdateMachineRequest),
    Start(OperationRpc, String, String, String),
    GetOperation(Text),
    ListOperations(pb::ListOperationsRequest, Text),
    Cancel(Text),
    Watch(pb::WatchOperationsRequest, Text),
    Logs(Text, u64),
    ListOperationTypes,
}

/// The RPCs of MachineService that start an operation; they share one request shape.
#[derive(Clone, Copy, Debug)]
enum OperationRpc {
    EnterMaintenance,
    ExitMaintenance,
    Reimage,
    Reboot,
    Rma,
    Retire,
    Upgrade,
    ReconfigureNetwork,
    ClearIntervention,
    Readmit,
}

const OPERATION_RPCS: [OperationRpc; 10] = [
    OperationRpc::EnterMaintenance,
    OperationRpc::ExitMaintenance,
    OperationRpc::Reimage,
    OperationRpc::Reboot,
    OperationRpc::Rma,
    OperationRpc::Retire,
    OperationRpc::Upgrade,
    OperationRpc::ReconfigureNetwork,
    OperationRpc::ClearIntervention,
    OperationRpc::Readmit,
];

fn known_machine(i: usize) -> String {
    format!("m-{i}")
}

/// Any string, weighted towards those that mean something to the server.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        2 => Just(String::new()),
        4 => (0..KNOWN_MACHINES).prop_map(known_machine),
        2 => (0..4usize).prop_map(|i| format!("new-{i}")),
        2 => "[a-z0-9][a-z0-9.-]{0,70}",
        2 => any::<String>(),
        1 => "[ -~]{0,40}",
        1 => "[\\x00-\\x1f\\u{7f}\\u{200b}\\u{feff}\\u{10ffff}a-z.=!,() ]{0,24}",
        1 => (0..70_000usize).prop_map(|n| "x".repeat(n)),
    ]
    .boxed()
}

fn enum_value() -> BoxedStrategy<i32> {
    prop_oneof![4 => 0..10i32, 1 => any::<i32>()].boxed()
}

fn mac() -> BoxedStrategy<String> {
    prop_oneof![
        3 => (0..256u32).prop_map(|n| format!("02:00:00:00:01:{n:02x}")),
        1 => Just("ff:ff:ff:ff:ff:ff".to_owned()),
        1 => text(),
    ]
    .boxed()
}

fn spec() -> BoxedStrategy<pb::MachineSpec> {
    (
        prop_oneof![3 => Just("fake".to_owned()), 1 => Just("redfish".to_owned()), 1 => text()],
        prop::collection::vec(mac(), 0..3),
        prop_oneof![3 => Just("root@10.0.0.1:22".to_owned()), 1 => text()],
        prop_oneof![3 => Just(String::new()), 1 => Just("https://10.0.1.1".to_owned()), 1 => text()],
        prop_oneof![Just("ubuntu-24.04".to_owned()), text()],
        prop_oneof![Just("prod".to_owned()), text()],
        prop_oneof![Just(String::new()), text()],
    )
        .prop_map(
            |(provider, mac_addresses, ssh, bmc, image, target_cluster, network_config)| {
                pb::MachineSpec {
                    provider,
                    mac_addresses,
                    ssh_endpoint: ssh,
                    bmc_endpoint: bmc,
                    image,
                    target_cluster,
                    network_config,
                }
            },
        )
        .boxed()
}

fn label_key() -> BoxedStrategy<String> {
    prop_oneof![
        3 => "(example.com/)?[a-z]{1,8}",
        1 => Just("rack".to_owned()),
        1 => text(),
    ]
    .boxed()
}

fn labels() -> BoxedStrategy<HashMap<String, String>> {
    prop::collection::hash_map(
        label_key(),
        prop_oneof![3 => "[a-z0-9]{0,8}", 1 => text()],
        0..4,
    )
    .boxed()
}

fn machine() -> BoxedStrategy<pb::Machine> {
    (
        text(),
        prop::option::weighted(0.8, spec()),
        labels(),
        prop::option::weighted(0.1, Just(pb::MachineStatus::default())),
        prop_oneof![5 => Just(0), 1 => enum_value()],
    )
        .prop_map(|(id, spec, labels, status, effective_state)| pb::Machine {
            id,
            spec,
            labels,
            status,
            effective_state,
            ..Default::default()
        })
        .boxed()
}

fn selector() -> BoxedStrategy<String> {
    prop_oneof![
        2 => Just(String::new()),
        2 => "[a-z]{1,4}(=|==|!=)[a-z0-9]{0,4}",
        2 => "!?[a-z]{1,4}",
        2 => "[a-z]{1,4} (in|notin) \\(([a-z0-9]{0,3},?){0,4}\\)",
        1 => "[a-z=!,() ]{0,30}",
        1 => text(),
    ]
    .boxed()
}

fn mask_path() -> BoxedStrategy<String> {
    prop_oneof![
        Just("spec".to_owned()),
        Just("spec.image".to_owned()),
        Just("spec.mac_addresses".to_owned()),
        Just("spec.provider".to_owned()),
        Just("spec.network_config".to_owned()),
        Just("labels".to_owned()),
        label_key().prop_map(|k| format!("labels.{k}")),
        Just("status.phase".to_owned()),
        Just("labels.".to_owned()),
        text(),
    ]
    .boxed()
}

fn operation_text() -> BoxedStrategy<Text> {
    prop_oneof![
        4 => (0..64usize).prop_map(Text::KnownOperation),
        1 => Just("op-01JD3F5Q2W8Y4ZP0N7R6T9V3KM".to_owned()).prop_map(Text::Lit),
        2 => text().prop_map(Text::Lit),
    ]
    .boxed()
}

fn token() -> BoxedStrategy<Text> {
    prop_oneof![
        3 => Just(Text::Lit(String::new())),
        2 => Just(Text::LastToken),
        2 => (any::<usize>(), any::<char>()).prop_map(|(i, c)| Text::MangledToken(i, c)),
        1 => "([0-9a-f]{2}){0,40}".prop_map(Text::Lit),
        1 => text().prop_map(Text::Lit),
    ]
    .boxed()
}

fn page_size() -> BoxedStrategy<i32> {
    prop_oneof![4 => 0..5i32, 1 => any::<i32>()].boxed()
}

fn call() -> BoxedStrategy<Call> {
    let start = (
        prop::sample::select(&OPERATION_RPCS[..]),
        text(),
        prop_oneof![2 => Just(String::new()), 2 => (0..3u8).prop_map(|i| format!("r-{i}")), 1 => text()],
        prop_oneof![3 => Just(String::new()), 1 => text()],
    )
        .prop_map(|(rpc, m, r, n)| Call::Start(rpc, m, r, n));
    prop_oneof![
        3 => machine().prop_map(|m| Call::Register(pb::RegisterMachineRequest { machine: Some(m) })),
        1 => Just(Call::Register(pb::RegisterMachineRequest { machine: None })),
        2 => (prop::collection::vec(machine(), 0..5), text(), any::<bool>()).prop_map(
            |(machines, source, validate_only)| Call::Import(pb::ImportMachinesRequest {
                machines,
                source,
                validate_only,
            })
        ),
        2 => text().prop_map(|machine_id| Call::Get(pb::GetMachineRequest { machine_id })),
        3 => (page_size(), enum_value(), enum_value(), selector(), token()).prop_map(
            |(page_size, phase, effective_state, label_selector, token)| Call::ListMachines(
                pb::ListMachinesRequest {
                    page_size,
                    page_token: String::new(),
                    phase,
                    effective_state,
                    label_selector,
                },
                token,
            )
        ),
        4 => (
            prop::option::weighted(0.95, machine()),
            prop::option::weighted(0.7, prop::collection::vec(mask_path(), 0..4)),
        )
            .prop_map(|(machine, paths)| Call::Update(pb::UpdateMachineRequest {
                machine,
                update_mask: paths.map(|paths| FieldMask { paths }),
            })),
        8 => start,
        2 => operation_text().prop_map(Call::GetOperation),
        2 => (page_size(), text(), enum_value(), enum_value(), token()).prop_map(
            |(page_size, machine_id, r#type, phase, token)| Call::ListOperations(
                pb::ListOperationsRequest {
                    page_size,
                    page_token: String::new(),
                    machine_id,
                    r#type,
                    phase,
                },
                token,
            )
        ),
        2 => operation_text().prop_map(Call::Cancel),
        1 => (text(), prop::option::of(any::<u64>()), operation_text()).prop_map(
            |(machine_id, after_revision, op)| Call::Watch(
                pb::WatchOperationsRequest {
                    machine_id,
                    operation_id: String::new(),
                    after_revision,
                },
                op,
            )
        ),
        1 => (operation_text(), any::<u64>()).prop_map(|(op, after)| Call::Logs(op, after)),
        1 => Just(Call::ListOperationTypes),
    ]
    .boxed()
}

fn caller() -> BoxedStrategy<Caller> {
    prop_oneof![16 => Just(Caller::Admin), 3 => Just(Caller::Viewer), 1 => Just(Caller::Nobody)]
        .boxed()
}

// ---- the server -------------------------------------------------------------------------

/// A server under test with the tokens of its callers. The one place that knows how the
/// test's server and its credentials are set up.
struct Served {
    server: InProcess,
    clients: Clients,
    admin: String,
    viewer: String,
}

/// The tokens file, made once (hashing a token is slow on purpose).
struct TokenFile {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    admin: String,
    viewer: String,
}

impl TokenFile {
    fn new() -> TokenFile {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tokens.toml");
        let make = |name: &str, role: Role| {
            bm_server::create_token(&path, name, &[role.to_string()], None, false)
                .expect("creating a token")
        };
        let admin = make("proptest-admin", Role::Admin);
        let viewer = make("proptest-viewer", Role::Viewer);
        TokenFile {
            _dir: dir,
            path,
            admin,
            viewer,
        }
    }
}

/// Starts a server that authenticates with `tokens`, with [`KNOWN_MACHINES`] machines.
async fn start_server(tokens: &TokenFile) -> Served {
    let auth = Auth::from_file(&tokens.path).expect("reading the tokens");
    let server = InProcess::start_with_auth(auth).await;
    let mut clients = server.clients().await;
    let machines = (0..KNOWN_MACHINES)
        .map(|i| fake_machine(&known_machine(i), i as u32, &[("rack", "r1")]))
        .collect();
    let import = clients
        .machines
        .import_machines(authorized(
            pb::ImportMachinesRequest {
                machines,
                ..Default::default()
            },
            Some(&tokens.admin),
        ))
        .await
        .expect("importing the known machines")
        .into_inner();
    assert_eq!(import.created_count as usize, KNOWN_MACHINES, "{import:?}");
    Served {
        server,
        clients,
        admin: tokens.admin.clone(),
        viewer: tokens.viewer.clone(),
    }
}

fn authorized<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("a token is ASCII"),
        );
    }
    r
}

/// What the server stores: every machine and every operation, in order.
#[derive(Debug, PartialEq)]
struct Snapshot {
    machines: Vec<pb::Machine>,
    operations: Vec<pb::Operation>,
}

/// What a case learned from the server's answers.
#[derive(Default)]
struct Seen {
    operations: Vec<String>,
    last_token: String,
}

impl Seen {
    fn resolve(&self, t: &Text) -> String {
        match t {
            Text::Lit(s) => s.clone(),
            Text::KnownOperation(i) if !self.operations.is_empty() => {
                self.operations[i % self.operations.len()].clone()
            }
            Text::KnownOperation(_) => String::new(),
            Text::LastToken => self.last_token.clone(),
            Text::MangledToken(i, c) => {
                let mut chars: Vec<char> = self.last_token.chars().collect();
                if chars.is_empty() {
                    return c.to_string();
                }
                let n = chars.len();
                chars[i % n] = *c;
                chars.into_iter().collect()
            }
        }
    }
}

impl Call {
    /// The RPC's name, for the tally.
    fn rpc(&self) -> String {
        match self {
            Call::Register(_) => "RegisterMachine".into(),
            Call::Import(_) => "ImportMachines".into(),
            Call::Get(_) => "GetMachine".into(),
            Call::ListMachines(..) => "ListMachines".into(),
            Call::Update(_) => "UpdateMachine".into(),
            Call::Start(rpc, ..) => format!("{rpc:?}"),
            Call::GetOperation(_) => "GetOperation".into(),
            Call::ListOperations(..) => "ListOperations".into(),
            Call::Cancel(_) => "CancelOperation".into(),
            Call::Watch(..) => "WatchOperations".into(),
            Call::Logs(..) => "StreamLogs".into(),
            Call::ListOperationTypes => "ListOperationTypes".into(),
        }
    }
}

/// How often each RPC got each status code, over the whole run.
type Tally = std::sync::Mutex<std::collections::BTreeMap<(String, String), usize>>;

impl Served {
    fn token(&self, caller: Caller) -> Option<&str> {
        match caller {
            Caller::Admin => Some(&self.admin),
            Caller::Viewer => Some(&self.viewer),
            Caller::Nobody => None,
        }
    }

    async fn snapshot(&mut self) -> Snapshot {
        let token = Some(self.admin.as_str());
        let mut machines = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .clients
                .machines
                .list_machines(authorized(
                    pb::ListMachinesRequest {
                        page_size: 1000,
                        page_token,
                        ..Default::default()
                    },
                    token,
                ))
                .await
                .expect("listing machines")
                .into_inner();
            machines.extend(page.machines);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let mut operations = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .clients
                .operations
                .list_operations(authorized(
                    pb::ListOperationsRequest {
                        page_size: 1000,
                        page_token,
                        ..Default::default()
                    },
                    token,
                ))
                .await
                .expect("listing operations")
                .into_inner();
            operations.extend(page.operations);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        Snapshot {
            machines,
            operations,
        }
    }

    /// Waits until operation `id` has ended (its watch ends with it).
    async fn wait_end(&mut self, id: &str) {
        let mut stream = self
            .clients
            .operations
            .watch_operations(authorized(
                pb::WatchOperationsRequest {
                    operation_id: id.to_owned(),
                    machine_id: String::new(),
                    after_revision: Some(0),
                },
                Some(&self.admin),
            ))
            .await
            .expect("watching an admitted operation")
            .into_inner();
        let drain = async {
            while stream
                .message()
                .await
                .expect("watching an admitted operation")
                .is_some()
            {}
        };
        tokio::time::timeout(Duration::from_secs(60), drain)
            .await
            .unwrap_or_else(|_| panic!("operation {id} did not end within 60 s"));
    }

    /// Sends `call`; returns its result, and the operation it started or named, if any.
    async fn send(
        &mut self,
        call: &Call,
        caller: Caller,
        seen: &mut Seen,
    ) -> Result<Option<String>, Status> {
        let token = self.token(caller).map(str::to_owned);
        let token = token.as_deref();
        let m = &mut self.clients.machines;
        let o = &mut self.clients.operations;
        let op = |r: tonic::Response<pb::Operation>| Some(r.into_inner().id);
        match call.clone() {
            Call::Register(r) => m.register_machine(authorized(r, token)).await.map(|_| None),
            Call::Import(r) => m.import_machines(authorized(r, token)).await.map(|_| None),
            Call::Get(r) => m.get_machine(authorized(r, token)).await.map(|_| None),
            Call::ListMachines(mut r, t) => {
                r.page_token = seen.resolve(&t);
                let page = m.list_machines(authorized(r, token)).await?.into_inner();
                if !page.next_page_token.is_empty() {
                    seen.last_token = page.next_page_token;
                }
                Ok(None)
            }
            Call::Update(r) => m.update_machine(authorized(r, token)).await.map(|_| None),
            Call::Start(rpc, machine_id, request_id, note) => {
                macro_rules! start {
                    ($method:ident, $request:ident) => {
                        m.$method(authorized(
                            pb::$request {
                                machine_id,
                                request_id,
                                note,
                            },
                            token,
                        ))
                        .await
                        .map(op)
                    };
                }
                match rpc {
                    OperationRpc::EnterMaintenance => {
                        start!(enter_maintenance, EnterMaintenanceRequest)
                    }
                    OperationRpc::ExitMaintenance => {
                        start!(exit_maintenance, ExitMaintenanceRequest)
                    }
                    OperationRpc::Reimage => start!(reimage, ReimageRequest),
                    OperationRpc::Reboot => start!(reboot, RebootRequest),
                    OperationRpc::Rma => start!(rma, RmaRequest),
                    OperationRpc::Retire => start!(retire, RetireRequest),
                    OperationRpc::Upgrade => start!(upgrade, UpgradeRequest),
                    OperationRpc::ReconfigureNetwork => {
                        start!(reconfigure_network, ReconfigureNetworkRequest)
                    }
                    OperationRpc::ClearIntervention => {
                        start!(clear_intervention, ClearInterventionRequest)
                    }
                    OperationRpc::Readmit => start!(readmit, ReadmitRequest),
                }
            }
            Call::GetOperation(t) => o
                .get_operation(authorized(
                    pb::GetOperationRequest {
                        operation_id: seen.resolve(&t),
                    },
                    token,
                ))
                .await
                .map(|_| None),
            Call::ListOperations(mut r, t) => {
                r.page_token = seen.resolve(&t);
                let page = o.list_operations(authorized(r, token)).await?.into_inner();
                if !page.next_page_token.is_empty() {
                    seen.last_token = page.next_page_token;
                }
                Ok(None)
            }
            Call::Cancel(t) => o
                .cancel_operation(authorized(
                    pb::CancelOperationRequest {
                        operation_id: seen.resolve(&t),
                    },
                    token,
                ))
                .await
                .map(op),
            // A stream that opens is dropped at once: what the test checks is whether the
            // request was accepted, and that the server survives the client going away.
            Call::Watch(mut r, t) => {
                r.operation_id = seen.resolve(&t);
                o.watch_operations(authorized(r, token)).await.map(|_| None)
            }
            Call::Logs(t, after_sequence) => o
                .stream_logs(authorized(
                    pb::StreamLogsRequest {
                        operation_id: seen.resolve(&t),
                        after_sequence,
                    },
                    token,
                ))
                .await
                .map(|_| None),
            Call::ListOperationTypes => o
                .list_operation_types(authorized(pb::ListOperationTypesRequest {}, token))
                .await
                .map(|_| None),
        }
    }
}

/// Runs one case: `calls` in order against a new server.
async fn run_case(
    tokens: &TokenFile,
    calls: &[(Call, Caller)],
    tally: &Tally,
) -> Result<(), TestCaseError> {
    let mut served = start_server(tokens).await;
    let mut seen = Seen::default();
    let mut at_rest = served.snapshot().await;
    for (i, (call, caller)) in calls.iter().enumerate() {
        let result = served.send(call, *caller, &mut seen).await;
        let code = result.as_ref().err().map_or(Code::Ok, Status::code);
        *tally
            .lock()
            .expect("tally")
            .entry((call.rpc(), bm_proto::code_name(code).to_owned()))
            .or_default() += 1;
        prop_assert_eq!(
            SERVER_PANICS.load(Ordering::SeqCst),
            0,
            "request {} panicked the server: {:?}",
            i,
            call
        );
        match result {
            Err(status) => {
                prop_assert!(
                    !matches!(
                        status.code(),
                        Code::Internal | Code::Unknown | Code::Unavailable
                    ),
                    "request {} ({:?} as {:?}) got {:?}",
                    i,
                    call,
                    caller,
                    status
                );
                let now = served.snapshot().await;
                prop_assert!(
                    now == at_rest,
                    "request {} ({:?} as {:?}) was refused with {:?} but changed the stored data",
                    i,
                    call,
                    caller,
                    status
                );
            }
            Ok(operation) => {
                if let Some(id) = operation {
                    served.wait_end(&id).await;
                    if !seen.operations.contains(&id) {
                        seen.operations.push(id);
                    }
                }
                at_rest = served.snapshot().await;
            }
        }
    }
    served
        .server
        .stop()
        .await
        .expect("the server stops cleanly");
    Ok(())
}

#[test]
fn arbitrary_requests_never_fail_internally_and_refused_ones_change_nothing() {
    count_server_panics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(THREAD_NAME)
        .enable_all()
        .build()
        .expect("runtime");
    let tokens = TokenFile::new();
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        // A failure shrinks by dropping requests; each try starts a server.
        max_shrink_iters: 200,
        failure_persistence: None,
        ..Config::default()
    });
    let requests = prop::collection::vec((call(), caller()), REQUESTS_PER_CASE);
    let tally = Tally::default();
    let result = runner.run(&requests, |calls| {
        runtime.block_on(run_case(&tokens, &calls, &tally))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let tally = tally.into_inner().expect("tally");
    let sent: usize = tally.values().sum();
    assert!(sent >= 10_000, "only {sent} requests were sent");
    // The requests reach the handlers, and the engine's rules, not only the checks in front
    // of them: every RPC was accepted at least once, and refused at least once for what was
    // asked (not only for who asked).
    let count = |rpc: &str, code: &str| tally.get(&(rpc.to_owned(), code.to_owned())).copied();
    for rpc in [
        "RegisterMachine",
        "ImportMachines",
        "GetMachine",
        "ListMachines",
        "UpdateMachine",
        "EnterMaintenance",
        "Reimage",
        "GetOperation",
        "ListOperations",
        "WatchOperations",
        "StreamLogs",
        "ListOperationTypes",
    ] {
        assert!(
            count(rpc, "OK").is_some(),
            "{rpc} was never accepted: {tally:?}"
        );
    }
    for (rpc, code) in [
        ("RegisterMachine", "INVALID_ARGUMENT"),
        ("RegisterMachine", "ALREADY_EXISTS"),
        ("UpdateMachine", "INVALID_ARGUMENT"),
        ("UpdateMachine", "PERMISSION_DENIED"),
        ("GetMachine", "NOT_FOUND"),
        ("ListMachines", "INVALID_ARGUMENT"),
        ("Reimage", "FAILED_PRECONDITION"),
        ("CancelOperation", "FAILED_PRECONDITION"),
        ("GetOperation", "UNAUTHENTICATED"),
    ] {
        assert!(
            count(rpc, code).is_some(),
            "{rpc} never got {code}: {tally:?}"
        );
    }
    #[allow(clippy::print_stderr, reason = "the tally is the test's report")]
    {
        eprintln!("requests by RPC and status: {tally:?}");
    }
}
