//! Authentication and authorization: who is calling (a bearer token or a client
//! certificate), and whether the role table lets them make the call.
//!
//! - [`role_table`] maps every RPC (full method path) to the [`Role`] it needs; health and
//!   reflection are open. An RPC missing from the table is refused.
//! - [`Auth`] holds the tokens file: token secrets stored as argon2id hashes, with grants and
//!   an optional expiry, and the grants of client certificate identities. Verifying an
//!   argon2 hash takes tens of milliseconds by design, so a verified token is cached, keyed
//!   by a BLAKE2b digest of what the client presented; expiry and revocation (a token gone
//!   from the file after a reload) are checked again on every call.
//! - [`AuthLayer`] runs before every handler: it authenticates, checks the table and puts
//!   the [`Principal`] in the request's extensions for the handlers (the audit trail).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::SystemTime;

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use blake2::Digest;
/// The audit trail's actor, as the handlers pass it on (they do not name the domain crate).
pub(crate) use bm_domain::Actor;
use bm_domain::{LabelSelector, Labels, Machine, MachineId, Operation, OperationId};
use bm_workflow::{Engine, Scope, WorkflowError};
use futures::future::BoxFuture;

use crate::error::ApiError;
use crate::limits::{ConnInfo, Throttle};

/// What a grant lets its holder do; each role includes the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Get, list, watch, read logs.
    Viewer,
    /// Also the lifecycle operations, cancel and clear-intervention.
    Operator,
    /// Everything: register, import, update, RMA, retire, readmit.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                AuthError::Invalid(format!(
                    "unknown role {s:?}; the roles are viewer, operator, admin"
                ))
            })
    }
}

/// A role, on every machine or on the machines a label selector matches:
/// `operator` or `operator on team=storage,rack in (r1,r2)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The role.
    pub role: Role,
    /// The machines it applies to; `None` is all of them.
    pub scope: Option<LabelSelector>,
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            None => write!(f, "{}", self.role),
            Some(s) => write!(f, "{} on {s}", self.role),
        }
    }
}

impl std::str::FromStr for Grant {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (role, scope) = match s.split_once(" on ") {
            Some((role, scope)) => (role.trim(), Some(scope.trim())),
            None => (s, None),
        };
        let scope = match scope {
            None => None,
            Some(sel) => {
                let sel: LabelSelector = sel
                    .parse()
                    .map_err(|e| AuthError::Invalid(format!("grant {s:?}: {e}")))?;
                if sel.is_empty() {
                    return Err(AuthError::Invalid(format!(
                        "grant {s:?}: the scope after \"on\" is empty"
                    )));
                }
                Some(sel)
            }
        };
        Ok(Grant {
            role: role.parse()?,
            scope,
        })
    }
}

/// How a principal authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// A bearer token of the tokens file.
    Token,
    /// A client certificate verified against the client CA.
    Cert,
    /// The admin token the server wrote into its data directory at first start.
    LocalAdmin,
    /// Nobody: the server runs with `--insecure`.
    Insecure,
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMethod::Token => "token",
            AuthMethod::Cert => "cert",
            AuthMethod::LocalAdmin => "local-admin",
            AuthMethod::Insecure => "insecure",
        })
    }
}

/// Who is calling, with what they may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's name or the certificate's identity.
    pub name: String,
    /// How they authenticated.
    pub method: AuthMethod,
    /// What they may do.
    pub grants: Vec<Grant>,
}

impl Principal {
    /// The anonymous admin of an `--insecure` server.
    pub fn insecure() -> Principal {
        Principal {
            name: "anonymous".to_owned(),
            method: AuthMethod::Insecure,
            grants: vec![Grant {
                role: Role::Admin,
                scope: None,
            }],
        }
    }

    /// True when a grant, scoped or not, holds `role`: the call may be made, and the
    /// handler then checks the machines it touches against [`Principal::scope`].
    pub fn has_role(&self, role: Role) -> bool {
        self.grants.iter().any(|g| g.role >= role)
    }

    /// The machines on which this principal holds `role`: all of them when an unscoped
    /// grant holds it, else those any scoped grant holding it matches (none without one).
    pub fn scope(&self, role: Role) -> Scope {
        let mut selectors = Vec::new();
        for g in self.grants.iter().filter(|g| g.role >= role) {
            match &g.scope {
                None => return Scope::All,
                Some(s) => selectors.push(s.clone()),
            }
        }
        Scope::AnyOf(selectors)
    }

    /// Who this is and what they hold, for a refusal: `alice (token) has operator on team=a`.
    pub(crate) fn describe(&self) -> String {
        format!("{} ({}) has {}", self.name, self.method, self.grants_text())
    }

    fn grants_text(&self) -> String {
        if self.grants.is_empty() {
            return "no grant".to_owned();
        }
        self.grants
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The role every RPC needs, by full method path. Health and reflection are open.
const ROLE_TABLE: &[(&str, Role)] = &[
    ("/baremetal.v1.MachineService/RegisterMachine", Role::Admin),
    ("/baremetal.v1.MachineService/ImportMachines", Role::Admin),
    ("/baremetal.v1.MachineService/GetMachine", Role::Viewer),
    ("/baremetal.v1.MachineService/ListMachines", Role::Viewer),
    (
        "/baremetal.v1.MachineService/ListMachineEvents",
        Role::Viewer,
    ),
    ("/baremetal.v1.MachineService/UpdateMachine", Role::Admin),
    (
        "/baremetal.v1.MachineService/EnterMaintenance",
        Role::Operator,
    ),
    (
        "/baremetal.v1.MachineService/ExitMaintenance",
        Role::Operator,
    ),
    ("/baremetal.v1.MachineService/Reimage", Role::Operator),
    ("/baremetal.v1.MachineService/Reboot", Role::Operator),
    ("/baremetal.v1.MachineService/Rma", Role::Admin),
    ("/baremetal.v1.MachineService/Retire", Role::Admin),
    ("/baremetal.v1.MachineService/Upgrade", Role::Operator),
    (
        "/baremetal.v1.MachineService/ReconfigureNetwork",
        Role::Operator,
    ),
    (
        "/baremetal.v1.MachineService/ClearIntervention",
        Role::Operator,
    ),
    ("/baremetal.v1.MachineService/Readmit", Role::Admin),
    ("/baremetal.v1.OperationService/GetOperation", Role::Viewer),
    (
        "/baremetal.v1.OperationService/ListOperations",
        Role::Viewer,
    ),
    (
        "/baremetal.v1.OperationService/CancelOperation",
        Role::Operator,
    ),
    (
        "/baremetal.v1.OperationService/WatchOperations",
        Role::Viewer,
    ),
    ("/baremetal.v1.OperationService/StreamLogs", Role::Viewer),
    (
        "/baremetal.v1.OperationService/ListOperationTypes",
        Role::Viewer,
    ),
    ("/baremetal.v1.RolloutService/CreateRollout", Role::Operator),
    ("/baremetal.v1.RolloutService/GetRollout", Role::Viewer),
    ("/baremetal.v1.RolloutService/ListRollouts", Role::Viewer),
    ("/baremetal.v1.RolloutService/PauseRollout", Role::Operator),
    ("/baremetal.v1.RolloutService/ResumeRollout", Role::Operator),
    ("/baremetal.v1.RolloutService/AbortRollout", Role::Operator),
    ("/baremetal.v1.RolloutService/WatchRollout", Role::Viewer),
];

/// The response header (gRPC initial metadata) of every answer of a server started with
/// `--insecure`, health checks included, so that a probe or `bmctl version` shows it.
pub const INSECURE_HEADER: &str = "bm-insecure";
/// Its value.
const INSECURE_VALUE: &str =
    "no TLS requirement, no authentication: every caller is an anonymous admin";

/// The services anyone may call: health checks (load balancers and orchestrators probe
/// without credentials) and reflection (it describes the API, which is public).
const OPEN_SERVICES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The role table: every RPC of the API with the role it needs.
pub fn role_table() -> &'static [(&'static str, Role)] {
    ROLE_TABLE
}

fn role_for(path: &str) -> Option<Role> {
    ROLE_TABLE.iter().find(|(p, _)| *p == path).map(|(_, r)| *r)
}

/// Why the tokens file could not be used, or a token not made.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file, or an argument, is not valid.
    #[error("{0}")]
    Invalid(String),
}

/// One `[[token]]` of the tokens file.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    /// The argon2id PHC string of the secret.
    hash: String,
    grants: Vec<String>,
    /// RFC 3339; after it the token is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires: Option<String>,
    /// The token the server made for the local admin at first start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    local_admin: bool,
}

/// One `[[cert]]`: the grants of a client certificate identity.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct CertEntry {
    name: String,
    grants: Vec<String>,
}

#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct TokensDoc {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    token: Vec<TokenEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cert: Vec<CertEntry>,
}

/// A token of the file, checked.
#[derive(Debug)]
struct Token {
    hash: String,
    grants: Vec<Grant>,
    expires: Option<SystemTime>,
    local_admin: bool,
}

/// The tokens file, checked.
#[derive(Debug, Default)]
struct Tokens {
    tokens: HashMap<String, Token>,
    certs: HashMap<String, Vec<Grant>>,
}

fn grants(owner: &str, texts: &[String]) -> Result<Vec<Grant>, AuthError> {
    texts
        .iter()
        .map(|g| {
            g.parse::<Grant>()
                .map_err(|e| AuthError::Invalid(format!("{owner}: {e}")))
        })
        .collect()
}

fn parse_tokens(path: &Path, text: &str) -> Result<Tokens, AuthError> {
    let at = |msg: String| AuthError::Invalid(format!("{}: {msg}", path.display()));
    let doc: TokensDoc = toml::from_str(text).map_err(|e| at(e.to_string()))?;
    let mut out = Tokens::default();
    for t in doc.token {
        let owner = format!("token {:?}", t.name);
        PasswordHash::new(&t.hash)
            .map_err(|e| at(format!("{owner}: hash is not a PHC string: {e}")))?;
        let expires = t
            .expires
            .as_deref()
            .map(|e| {
                humantime::parse_rfc3339_weak(e).map_err(|err| {
                    at(format!(
                        "{owner}: expires {e:?} is not an RFC 3339 time: {err}"
                    ))
                })
            })
            .transpose()?;
        let token = Token {
            hash: t.hash,
            grants: grants(&owner, &t.grants).map_err(|e| at(e.to_string()))?,
            expires,
            local_admin: t.local_admin,
        };
        if out.tokens.insert(t.name.clone(), token).is_some() {
            return Err(at(format!("{owner} appears twice")));
        }
    }
    for c in doc.cert {
        let owner = format!("cert {:?}", c.name);
        let g = grants(&owner, &c.grants).map_err(|e| at(e.to_string()))?;
        if out.certs.insert(c.name, g).is_some() {
            return Err(at(format!("{owner} appears twice")));
        }
    }
    Ok(out)
}

/// A verified token in the cache: what was verified, so that a token replaced in the file
/// is verified again.
#[derive(Debug, Clone)]
struct Verified {
    name: String,
    hash: String,
}

/// Who may call: the tokens file (or nobody checked, with `--insecure`).
#[derive(Debug)]
pub struct Auth {
    /// `None`: insecure, everyone is [`Principal::insecure`].
    path: Option<PathBuf>,
    tokens: RwLock<Arc<Tokens>>,
    cache: Mutex<HashMap<[u8; 32], Verified>>,
    warn_denied: Throttle,
}

/// Verified tokens kept; past it the cache starts over (a flood of garbage is never
/// cached, only tokens that verified).
const CACHE_ENTRIES: usize = 4096;

impl Auth {
    /// No authentication: every caller is the anonymous admin (`--insecure`).
    pub fn insecure() -> Auth {
        Auth {
            path: None,
            tokens: RwLock::new(Arc::default()),
            cache: Mutex::default(),
            warn_denied: Throttle::default(),
        }
    }

    /// The tokens file at `path`.
    ///
    /// # Errors
    ///
    /// [`AuthError`] when it cannot be read or is not valid.
    pub fn from_file(path: &Path) -> Result<Auth, AuthError> {
        let auth = Auth {
            path: Some(path.to_owned()),
            tokens: RwLock::new(Arc::default()),
            cache: Mutex::default(),
            warn_denied: Throttle::default(),
        };
        auth.reload()?;
        Ok(auth)
    }

    /// True without authentication (`--insecure`).
    pub fn is_insecure(&self) -> bool {
        self.path.is_none()
    }

    /// Re-reads the tokens file: removed tokens are refused from now on.
    ///
    /// # Errors
    ///
    /// [`AuthError`] when the file does not load; the tokens in force stay.
    pub fn reload(&self) -> Result<(), AuthError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Io {
            path: path.clone(),
            source,
        })?;
        let tokens = parse_tokens(path, &text)?;
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tokens);
        Ok(())
    }

    fn current(&self) -> Arc<Tokens> {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Who presented `bearer` (the token, `NAME.SECRET`) or the certificate identity
    /// `cert`. A token wins over a certificate.
    ///
    /// # Errors
    ///
    /// The message for an UNAUTHENTICATED status: what is missing or refused, never which
    /// part of a secret was wrong.
    pub async fn authenticate(
        self: &Arc<Self>,
        bearer: Option<&str>,
        cert: Option<&str>,
    ) -> Result<Principal, String> {
        if self.is_insecure() {
            return Ok(Principal::insecure());
        }
        let tokens = self.current();
        let Some(bearer) = bearer else {
            if let Some(cert) = cert {
                return match tokens.certs.get(cert) {
                    Some(grants) => Ok(Principal {
                        name: cert.to_owned(),
                        method: AuthMethod::Cert,
                        grants: grants.clone(),
                    }),
                    None => Err(format!(
                        "the client certificate {cert:?} has no [[cert]] entry in the tokens file"
                    )),
                };
            }
            return Err("no credentials: send a bearer token (authorization: Bearer NAME.SECRET; bmctl --token or --token-file) or a client certificate".to_owned());
        };
        let refused =
            || "the bearer token is not valid (unknown, revoked or wrong secret)".to_owned();
        let Some((name, _)) = bearer.rsplit_once('.') else {
            return Err(refused());
        };
        let Some(token) = tokens.tokens.get(name) else {
            return Err(refused());
        };
        if token.expires.is_some_and(|e| e <= SystemTime::now()) {
            return Err(format!(
                "the bearer token {name:?} has expired; ask for a new one"
            ));
        }
        let digest: [u8; 32] = blake2::Blake2s256::digest(bearer.as_bytes()).into();
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&digest)
            .cloned();
        let verified = match cached {
            Some(v) => v.name == name && v.hash == token.hash,
            None => false,
        };
        if !verified {
            let (secret, hash) = (bearer.to_owned(), token.hash.clone());
            let ok = tokio::task::spawn_blocking(move || {
                PasswordHash::new(&hash).is_ok_and(|h| {
                    Argon2::default()
                        .verify_password(secret.as_bytes(), &h)
                        .is_ok()
                })
            })
            .await
            .unwrap_or(false);
            if !ok {
                return Err(refused());
            }
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(
                digest,
                Verified {
                    name: name.to_owned(),
                    hash: token.hash.clone(),
                },
            );
        }
        Ok(Principal {
            name: name.to_owned(),
            method: if token.local_admin {
                AuthMethod::LocalAdmin
            } else {
                AuthMethod::Token
            },
            grants: token.grants.clone(),
        })
    }
}

/// A new token for `name` with `grants`, expiring at `expires` (RFC 3339) if given:
/// appends its hashed entry to the tokens file at `path` (created, mode 0600, if absent)
/// and returns the token to hand out, `NAME.SECRET`, which is stored nowhere.
///
/// # Errors
///
/// [`AuthError`] for a bad name, grant or time, a name already in the file, or a file that
/// cannot be read or written.
pub fn create_token(
    path: &Path,
    name: &str,
    grant_texts: &[String],
    expires: Option<&str>,
    local_admin: bool,
) -> Result<String, AuthError> {
    let name_ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_@:".contains(c));
    if !name_ok {
        return Err(AuthError::Invalid(format!(
            "token name {name:?}: use 1 to 128 letters, digits, '-', '_', '@' or ':'"
        )));
    }
    if grant_texts.is_empty() {
        return Err(AuthError::Invalid(
            "a token needs at least one grant (--role)".to_owned(),
        ));
    }
    grants(&format!("token {name:?}"), grant_texts)?;
    if let Some(e) = expires {
        humantime::parse_rfc3339_weak(e).map_err(|err| {
            AuthError::Invalid(format!(
                "--expires {e:?} is not an RFC 3339 time (2027-01-31T00:00:00Z): {err}"
            ))
        })?;
    }
    let io = |source| AuthError::Io {
        path: path.to_owned(),
        source,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(e)),
    };
    let existing = parse_tokens(path, &text)?;
    if existing.tokens.contains_key(name) {
        return Err(AuthError::Invalid(format!(
            "{}: a token named {name:?} exists already; remove its [[token]] entry to replace it",
            path.display()
        )));
    }
    let mut secret = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut secret);
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let token = format!("{name}.{secret}");
    let hash = Argon2::default()
        .hash_password(token.as_bytes())
        .map_err(|e| AuthError::Invalid(format!("hashing the token: {e}")))?
        .to_string();
    let entry = TokensDoc {
        token: vec![TokenEntry {
            name: name.to_owned(),
            hash,
            grants: grant_texts.to_vec(),
            expires: expires.map(str::to_owned),
            local_admin,
        }],
        cert: Vec::new(),
    };
    let entry = toml::to_string(&entry).map_err(|e| AuthError::Invalid(e.to_string()))?;
    let mut new = text;
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    if !new.is_empty() {
        new.push('\n');
    }
    new.push_str(&entry);
    write_private(path, new.as_bytes()).map_err(io)?;
    Ok(token)
}

/// Writes `bytes` to `path` through a temporary file, readable by the owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Authenticates and authorizes every call before its handler (see the module doc).
#[derive(Clone, Debug)]
pub(crate) struct AuthLayer {
    auth: Arc<Auth>,
}

impl AuthLayer {
    pub(crate) fn new(auth: Arc<Auth>) -> Self {
        AuthLayer { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// The service of [`AuthLayer`].
#[derive(Clone, Debug)]
pub(crate) struct AuthService<S> {
    inner: S,
    auth: Arc<Auth>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let answer = self.answer(req);
        if !self.auth.is_insecure() {
            return answer;
        }
        // Every answer, health checks included, says that nobody is checked.
        Box::pin(async move {
            let mut response = answer.await?;
            response.headers_mut().insert(
                INSECURE_HEADER,
                http::HeaderValue::from_static(INSECURE_VALUE),
            );
            Ok(response)
        })
    }
}

impl<S> AuthService<S> {
    /// Authenticates and authorizes `req`, then calls the service (or answers the refusal).
    fn answer<ReqBody, ResBody>(
        &mut self,
        mut req: http::Request<ReqBody>,
    ) -> BoxFuture<'static, Result<http::Response<ResBody>, S::Error>>
    where
        S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        ReqBody: Send + 'static,
        ResBody: Default + Send + 'static,
    {
        // The clone that was made ready serves this call; the new clone waits for its own.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_owned();
        if OPEN_SERVICES.iter().any(|s| path.starts_with(s)) {
            return Box::pin(inner.call(req));
        }
        let auth = self.auth.clone();
        let bearer = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|v| v.trim().to_owned());
        let cert = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.client_cert.clone());
        Box::pin(async move {
            let principal = match auth.authenticate(bearer.as_deref(), cert.as_deref()).await {
                Ok(p) => p,
                Err(msg) => {
                    auth.denied("-", &path, &msg);
                    return Ok(refusal(ApiError::Unauthenticated(msg)));
                }
            };
            let Some(role) = role_for(&path) else {
                let msg = format!("{path} is not in the role table; nobody may call it");
                auth.denied(&principal.name, &path, &msg);
                return Ok(refusal(ApiError::PermissionDenied(msg)));
            };
            if !principal.has_role(role) {
                let msg = format!("{path} needs the {role} role; {}", principal.describe());
                auth.denied(&principal.name, &path, &msg);
                return Ok(refusal(ApiError::PermissionDenied(msg)));
            }
            req.extensions_mut().insert(Caller {
                principal,
                rpc: path,
                role,
                auth: Some(auth),
            });
            inner.call(req).await
        })
    }
}

impl Auth {
    /// Logs a refused call, at most once per period (see [`Throttle`]).
    pub(crate) fn denied(&self, principal: &str, rpc: &str, reason: &str) {
        self.denied_on(principal, rpc, "-", reason);
    }

    /// Logs a refused call about `machine`, at most once per period (see [`Throttle`]).
    pub(crate) fn denied_on(&self, principal: &str, rpc: &str, machine: &str, reason: &str) {
        if let Some(held_back) = self.warn_denied.hit() {
            tracing::warn!(principal, rpc, machine, reason, held_back, "call denied");
        }
    }
}

/// The caller of an RPC as the [`AuthLayer`] put it in the request's extensions: the
/// principal, the RPC, and what the handlers need to check machines against the
/// principal's scoped grants and to log a refusal.
///
/// When the machine is outside every scope the principal has for `viewer`, the answer is
/// NOT_FOUND, worded as for a machine that does not exist: a principal learns nothing of
/// machines it may not see. When it may see the machine but lacks the role the call needs
/// on it, the answer is PERMISSION_DENIED naming the role, the machine and the caller's
/// grants (it can see the machine, so naming it tells nothing new).
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub(crate) principal: Principal,
    rpc: String,
    /// The role the RPC needs (the table's).
    role: Role,
    auth: Option<Arc<Auth>>,
}

impl Caller {
    /// The caller of `r`. A request that did not pass the layer (it always does) gets a
    /// principal without grants: it sees nothing.
    pub(crate) fn of<T>(r: &tonic::Request<T>) -> Caller {
        r.extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(|| Caller {
                principal: Principal {
                    name: "-".to_owned(),
                    method: AuthMethod::Insecure,
                    grants: Vec::new(),
                },
                rpc: "-".to_owned(),
                role: Role::Admin,
                auth: None,
            })
    }

    /// The role the RPC needs.
    pub(crate) fn role(&self) -> Role {
        self.role
    }

    /// The actor of the call, for the audit trail.
    pub(crate) fn actor(&self) -> Actor {
        Actor::new(
            self.principal.name.clone(),
            self.principal.method.to_string(),
        )
    }

    /// The machines the caller holds `role` on.
    pub(crate) fn scope(&self, role: Role) -> Scope {
        self.principal.scope(role)
    }

    fn deny(&self, machine: &str, reason: &str) {
        if let Some(auth) = &self.auth {
            auth.denied_on(&self.principal.name, &self.rpc, machine, reason);
        }
    }

    /// Checks that the caller holds `role` on machine `id` with `labels` (see the type's
    /// doc for which refusal applies).
    pub(crate) fn check(
        &self,
        role: Role,
        id: &MachineId,
        labels: &Labels,
    ) -> Result<(), ApiError> {
        if self.scope(role).matches(labels) {
            return Ok(());
        }
        if !self.scope(Role::Viewer).matches(labels) {
            self.deny(id.as_str(), "machine outside every scope of the caller");
            return Err(WorkflowError::machine_not_found(id.clone()).into());
        }
        let msg = format!(
            "{} needs the {role} role on machine {id}; {}",
            self.rpc,
            self.principal.describe()
        );
        self.deny(id.as_str(), &msg);
        Err(ApiError::PermissionDenied(msg))
    }

    /// Checks that a machine given the `labels` (registered, imported, or changed) would be
    /// in the caller's `role` scope: a scoped admin creates machines in its scope only, and
    /// cannot move one out of it.
    pub(crate) fn check_new_labels(
        &self,
        role: Role,
        id: &MachineId,
        labels: &Labels,
    ) -> Result<(), ApiError> {
        let scope = self.scope(role);
        if scope.matches(labels) {
            return Ok(());
        }
        let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let msg = format!(
            "{} needs the {role} role on machines labeled {{{}}} (machine {id}); {}: the labels must match {scope}",
            self.rpc,
            shown.join(","),
            self.principal.describe()
        );
        self.deny(id.as_str(), &msg);
        Err(ApiError::PermissionDenied(msg))
    }

    /// Machine `id`, when the caller holds `role` on it. An unscoped caller's call reads
    /// nothing here.
    pub(crate) async fn machine(
        &self,
        engine: &Engine,
        role: Role,
        id: &MachineId,
    ) -> Result<Option<Machine>, ApiError> {
        if self.scope(role).is_all() {
            return Ok(None);
        }
        let m = engine.get_machine(id).await?;
        self.check(role, id, &m.labels)?;
        Ok(Some(m))
    }

    /// Operation `id`, when the caller holds `role` on its machine; an operation of a
    /// machine the caller may not see is NOT_FOUND like one that does not exist.
    pub(crate) async fn operation(
        &self,
        engine: &Engine,
        role: Role,
        id: OperationId,
    ) -> Result<Operation, ApiError> {
        let op = engine.get_operation(id).await?;
        if self.scope(role).is_all() {
            return Ok(op);
        }
        let m = match engine.get_machine(&op.machine_id).await {
            Ok(m) => m,
            Err(e) if e.kind() == bm_workflow::ErrorKind::NotFound => {
                return Err(WorkflowError::operation_not_found(id).into());
            }
            Err(e) => return Err(e.into()),
        };
        match self.check(role, &op.machine_id, &m.labels) {
            Err(ApiError::Workflow(_)) => Err(WorkflowError::operation_not_found(id).into()),
            other => other.map(|()| op),
        }
    }
}

/// The response of a refused call.
fn refusal<B: Default>(e: ApiError) -> http::Response<B> {
    tonic::Status::from(e).into_http()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_read_like_the_issue_writes_them() {
        let g: Grant = "operator on team=storage,rack in (r1,r2)".parse().unwrap();
        assert_eq!(g.role, Role::Operator);
        assert_eq!(g.to_string(), "operator on team=storage,rack in (r1,r2)");
        assert_eq!("viewer".parse::<Grant>().unwrap().scope, None);
        for bad in ["root", "operator on ", "operator on team in (", ""] {
            assert!(bad.parse::<Grant>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_scoped_grant_lets_the_call_through_and_scopes_it_to_its_machines() {
        let p = Principal {
            name: "storage-ops".into(),
            method: AuthMethod::Token,
            grants: vec![
                "viewer on team=web".parse().unwrap(),
                "admin on team=storage".parse().unwrap(),
                "operator on rack=r1".parse().unwrap(),
            ],
        };
        assert!(p.has_role(Role::Admin));
        let labels =
            |pairs: &[(&str, &str)]| bm_domain::Labels::from_pairs(pairs.iter().copied()).unwrap();
        let (web, storage, r1) = (
            labels(&[("team", "web")]),
            labels(&[("team", "storage")]),
            labels(&[("team", "db"), ("rack", "r1")]),
        );
        let viewer = p.scope(Role::Viewer);
        assert!(viewer.matches(&web) && viewer.matches(&storage) && viewer.matches(&r1));
        assert!(!viewer.matches(&labels(&[("team", "db")])));
        let operator = p.scope(Role::Operator);
        assert!(!operator.matches(&web) && operator.matches(&storage) && operator.matches(&r1));
        let admin = p.scope(Role::Admin);
        assert!(!admin.matches(&r1) && admin.matches(&storage));
        // An unscoped grant covers everything; no grant for the role covers nothing.
        let mut q = p.clone();
        q.grants.push("viewer".parse().unwrap());
        assert!(q.scope(Role::Viewer).is_all());
        assert!(!q.scope(Role::Operator).is_all());
        let none = Principal {
            grants: vec!["viewer".parse().unwrap()],
            ..p
        };
        assert_eq!(none.scope(Role::Operator), Scope::AnyOf(Vec::new()));
        assert!(!none.has_role(Role::Operator));
    }

    #[tokio::test]
    async fn tokens_verify_expire_and_are_revoked_by_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let alice = create_token(&path, "alice", &["operator".into()], None, false).unwrap();
        let old = create_token(
            &path,
            "old",
            &["viewer".into()],
            Some("2001-01-01T00:00:00Z"),
            false,
        )
        .unwrap();
        assert!(create_token(&path, "alice", &["viewer".into()], None, false).is_err());
        let auth = Arc::new(Auth::from_file(&path).unwrap());
        let p = auth.authenticate(Some(&alice), None).await.unwrap();
        assert_eq!((p.name.as_str(), p.method), ("alice", AuthMethod::Token));
        assert!(p.has_role(Role::Operator) && !p.has_role(Role::Admin));
        // Cached now; a second call gives the same answer.
        assert_eq!(auth.authenticate(Some(&alice), None).await.unwrap(), p);
        let wrong = format!("{}0", &alice[..alice.len() - 1]);
        let wrong = if wrong == alice {
            format!("{}1", &alice[..alice.len() - 1])
        } else {
            wrong
        };
        assert!(auth.authenticate(Some(&wrong), None).await.is_err());
        assert!(auth.authenticate(Some("garbage"), None).await.is_err());
        assert!(
            auth.authenticate(None, None)
                .await
                .unwrap_err()
                .contains("no credentials")
        );
        assert!(
            auth.authenticate(Some(&old), None)
                .await
                .unwrap_err()
                .contains("expired")
        );
        // Revoked: the entry removed from the file and the file reloaded.
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text
            .split("\n\n")
            .filter(|e| !e.contains("\"alice\""))
            .collect();
        std::fs::write(&path, kept.join("\n\n")).unwrap();
        auth.reload().unwrap();
        assert!(auth.authenticate(Some(&alice), None).await.is_err());
    }
}
