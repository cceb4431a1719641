//! The boot service: the HTTP side of network boots (`--boot-listen`), for iPXE.
//!
//! - `GET /boot/ipxe?mac=${net0/mac}`: the machine's iPXE script. While an operation of that
//!   machine is in `reboot-to-netboot`, it chains the deploy kernel and initrd with the
//!   kernel command line the deploy environment needs (`bm.machine`, `bm.operation`, a
//!   one-time `bm.token`, and `bm.callback`, where to check in); at any other time, and for a
//!   MAC no machine has, it boots the local disk (`sanboot` of the first disk on BIOS, `exit`
//!   back to the firmware's boot order on UEFI).
//! - `GET /boot/files/NAME`: the deploy kernel, initrd and images from `--boot-dir`, with
//!   Range requests (a machine can resume or stream a download).
//! - `POST /boot/checkin` with the form field `token`: the deploy environment says it booted;
//!   `reboot-to-netboot` ends on it. 200 with the machine and operation; 403 for a token no
//!   ticket has; 410 for one used already or expired.
//!
//! The decisions are the engine's ([`Engine::netboot_answer`], [`Netboot::check_in`]); this
//! module only adapts them to HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bm_domain::MacAddress;
use bm_workflow::{BootAnswer, CheckInError, Engine, Netboot};
use serde::Deserialize;
use tokio::net::TcpListener;
use tower_http::services::ServeDir;

/// What the boot service serves, and how machines reach it.
#[derive(Clone, Debug)]
pub struct BootService {
    /// The engine whose operations decide what a machine boots.
    pub engine: Engine,
    /// The engine's tickets and check-ins (the one in its configuration).
    pub netboot: Arc<Netboot>,
    /// The directory of the deploy kernel, initrd and images.
    pub dir: PathBuf,
    /// The deploy kernel's file name in `dir`.
    pub kernel: String,
    /// The deploy initrd's file name in `dir`.
    pub initrd: String,
    /// More kernel arguments for the deploy environment (e.g. `console=ttyS0`).
    pub kernel_args: String,
    /// The URL machines reach this service at (`http://HOST:PORT`), without a trailing
    /// slash.
    pub base_url: String,
}

#[derive(Deserialize)]
struct MacQuery {
    mac: Option<String>,
}

#[derive(Deserialize)]
struct CheckInForm {
    token: String,
}

/// The local-disk answer: iPXE's `sanboot` of the first BIOS disk, or back to the UEFI
/// firmware, which goes on with its boot order.
fn local_disk(why: &str) -> String {
    format!(
        "#!ipxe\n\
         echo bm: boot from the local disk ({why})\n\
         iseq ${{platform}} pcbios && sanboot --no-describe --drive 0x80 ||\n\
         exit\n"
    )
}

fn script(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

async fn ipxe(State(svc): State<Arc<BootService>>, Query(q): Query<MacQuery>) -> Response {
    let Some(raw) = q.mac.filter(|m| !m.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            "the mac query parameter is missing: chain /boot/ipxe?mac=${net0/mac}\n",
        )
            .into_response();
    };
    let mac: MacAddress = match raw.parse() {
        Ok(mac) => mac,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("mac={raw:?} is not a MAC address: {e}\n"),
            )
                .into_response();
        }
    };
    match svc.engine.netboot_answer(&mac).await {
        Ok(BootAnswer::Deploy {
            machine_id,
            operation_id,
            token,
        }) => {
            tracing::info!(%mac, machine = %machine_id, operation = %operation_id, "netboot: serving the deploy environment");
            let base = &svc.base_url;
            let args = format!(
                "bm.machine={machine_id} bm.operation={operation_id} bm.token={token} bm.callback={base}/boot/checkin {}",
                svc.kernel_args
            );
            script(format!(
                "#!ipxe\n\
                 echo bm: deploy environment for {machine_id} ({operation_id})\n\
                 kernel {base}/boot/files/{kernel} initrd={initrd} {args}\n\
                 initrd {base}/boot/files/{initrd}\n\
                 boot\n",
                kernel = svc.kernel,
                initrd = svc.initrd,
                args = args.trim_end(),
            ))
        }
        Ok(BootAnswer::LocalDisk { machine_id, why }) => {
            match &machine_id {
                Some(m) => tracing::info!(%mac, machine = %m, %why, "netboot: local disk"),
                None => {
                    tracing::warn!(%mac, "netboot: a machine with an unknown MAC booted; told to boot its local disk");
                }
            }
            script(local_disk(&why))
        }
        Err(e) => {
            // The store is down: a machine must not wait for it, nor be reimaged blindly.
            tracing::error!(%mac, error = %e, "netboot: cannot decide; local disk");
            script(local_disk("the control plane cannot read its store"))
        }
    }
}

async fn check_in(State(svc): State<Arc<BootService>>, Form(form): Form<CheckInForm>) -> Response {
    match svc
        .netboot
        .check_in(&form.token, std::time::SystemTime::now())
    {
        Ok(c) => {
            tracing::info!(machine = %c.machine_id, operation = %c.operation_id, "netboot: the deploy environment checked in");
            (
                StatusCode::OK,
                format!("machine={} operation={}\n", c.machine_id, c.operation_id),
            )
                .into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "netboot: check-in refused");
            let status = match e {
                CheckInError::Unknown => StatusCode::FORBIDDEN,
                CheckInError::Expired(_) | CheckInError::Used(_) => StatusCode::GONE,
            };
            (status, format!("{e}\n")).into_response()
        }
    }
}

/// The routes of the boot service.
pub fn router(svc: BootService) -> Router {
    let files = ServeDir::new(&svc.dir);
    Router::new()
        .route("/boot/ipxe", get(ipxe))
        .route("/boot/checkin", post(check_in))
        .nest_service("/boot/files", files)
        .with_state(Arc::new(svc))
}

/// Serves the boot service on `listener` until `shutdown` completes.
///
/// # Errors
///
/// An IO error of the listener.
pub async fn serve_boot(
    listener: TcpListener,
    svc: BootService,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local: SocketAddr = listener.local_addr()?;
    tracing::info!(addr = %local, dir = %svc.dir.display(), "boot service listening on {local}");
    axum::serve(listener, router(svc))
        .with_graceful_shutdown(shutdown)
        .await
}
