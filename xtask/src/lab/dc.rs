//! The virtual datacenter: `cargo xtask lab up | status | reimage | down | test`.
//!
//! On this one host: virtual machines (QEMU with software emulation) managed by libvirt's
//! system instance, on an isolated libvirt network (a private bridge, no forwarding) whose
//! DHCP (dnsmasq) hands them the boot service's iPXE URL; the sushy-tools Redfish emulator
//! with its libvirt driver as their BMC; and bm-server with the Redfish provider for them.
//! A reimage through the public API then really powers the VM, network-boots it into the
//! deploy environment, writes the image over SSH, boots it from its disk and checks it.
//! docs/lab.md says what is real and what stands in for what.
//!
//! `up` leaves everything running and records it in `target/lab/dc/state.json`; `down`
//! removes all of it (also after a failed `up`), including a libvirtd it started and the
//! firewall chains that one leaves behind.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use super::build::{self, CORRUPT_IMAGE, IMAGES};
use super::{BOOT_NEEDS, Bmctl, DATACENTER_NEEDS, ensure_packages, free_port, have, install, tail};
use crate::proc;

/// libvirt's network and bridge, and the prefix of the lab's domains.
const NETWORK: &str = "bm-lab";
const BRIDGE: &str = "bmlab0";
const DOMAIN_PREFIX: &str = "bm-lab-";
const LIBVIRT: &str = "qemu:///system";

/// The sushy-tools release the lab was measured with.
const SUSHY_TOOLS: &str = "sushy-tools==2.2.0";

/// The cluster the lab's machines join (a stand-in: see the images' `bm-lab-join`).
const CLUSTER: &str = "lab-cluster";

/// How long one reimage may take (measured here: about 40 s); `lab test` (up and two
/// reimages) stays well within CI's 20 min for the step.
const REIMAGE_DEADLINE: Duration = Duration::from_secs(300);

fn dc_dir() -> PathBuf {
    proc::target_dir().join("lab").join("dc")
}

fn state_path() -> PathBuf {
    dc_dir().join("state.json")
}

fn load_state() -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(state_path())
        .context("the lab is not up (no target/lab/dc/state.json): run `cargo xtask lab up`")?;
    Ok(serde_json::from_str(&text)?)
}

fn save_state(state: &Value) -> anyhow::Result<()> {
    std::fs::write(state_path(), serde_json::to_string_pretty(state)?)?;
    Ok(())
}

fn require_root() -> anyhow::Result<()> {
    ensure!(
        crate::test::is_root()?,
        "the virtual datacenter uses libvirt's system instance and creates a bridge: run it as root"
    );
    Ok(())
}

/// `virsh -c qemu:///system ARGS`, its standard output.
fn virsh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("virsh")
        .args(["-q", "-c", LIBVIRT])
        .args(args)
        .output()
        .context("running virsh")?;
    ensure!(
        out.status.success(),
        "virsh {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Waits until `ready` holds, checking every 200 ms, or fails with `what`.
fn wait_for(what: &str, deadline: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !ready() {
        ensure!(
            start.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Starts `cmd` in its own process group (it outlives this task; `down` stops it), with its
/// output in `log`; returns its pid.
fn spawn_detached(cmd: &mut Command, log: &Path) -> anyhow::Result<u32> {
    let out = std::fs::File::create(log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    Ok(child.id())
}

/// Stops the process group of `pid` if that process still runs `program`: SIGTERM, then
/// SIGKILL after 10 s.
fn stop(pid: u64, program: &str) {
    let runs = || {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains(program)
    };
    for signal in ["-TERM", "-KILL"] {
        if !runs() {
            return;
        }
        // The group (a daemon that is its leader, with its children) and the process.
        let _ = Command::new("kill")
            .args([signal, "--", &format!("-{pid}"), &pid.to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = wait_for(program, Duration::from_secs(10), || !runs());
    }
}

/// One HTTP/1.0 GET on the loopback: the status code, or None when nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// `cargo xtask lab up [--vms N]`.
pub(crate) fn up(vms: usize) -> anyhow::Result<()> {
    require_root()?;
    ensure!((1..=9).contains(&vms), "--vms takes 1 to 9");
    if state_path().exists() {
        bail!("the lab is already up (target/lab/dc/state.json): `cargo xtask lab down` first");
    }
    ensure_packages(&[BOOT_NEEDS, DATACENTER_NEEDS])?;
    let lab = proc::target_dir().join("lab");
    let built = build::build(&lab)?;
    println!("==> building bm-server and bmctl");
    let bin = proc::build(&["bm-server", "bm-cli"], false)?;
    let venv = sushy_venv(&lab)?;

    let dir = dc_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // QEMU runs as libvirt-qemu: it must reach the disks and console logs in here.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut state = json!({ "bin": bin, "vms": [] });
    save_state(&state)?;
    let result = bring_up(&mut state, &built, &bin, &venv, vms);
    if let Err(e) = result {
        eprintln!("==> the lab did not come up; taking down what was started");
        if let Err(d) = down() {
            eprintln!("    and that failed too: {d:#}");
        }
        return Err(e);
    }
    status()
}

fn bring_up(
    state: &mut Value,
    built: &build::Built,
    bin: &Path,
    venv: &Path,
    vms: usize,
) -> anyhow::Result<()> {
    let dir = dc_dir();
    if virsh(&["version"]).is_err() {
        println!("==> starting virtlogd and libvirtd (no service manager runs them here)");
        state["libvirtd_started"] = json!(true);
        save_state(state)?;
        let status = Command::new("/usr/sbin/virtlogd").arg("-d").status()?;
        ensure!(status.success(), "virtlogd -d failed");
        // Where /dev/kvm exists but KVM does not work (no vmx/svm: nested virtualisation
        // off), libvirtd finds its cached QEMU capabilities stale at every look and probes
        // QEMU again, twice, which makes each domain define or start take up to a minute. The
        // lab's VMs use software emulation anyway, so its libvirtd runs in a mount namespace
        // of its own where /dev/kvm is an empty file on a read-only mount (which not even
        // root, its QEMU user here, can open for writing), and
        // where its qemu.conf turns off the per-VM /dev namespaces (which would try to carry
        // that mount over, and fail).
        let no_kvm = dc_dir().join("no-kvm");
        std::fs::write(&no_kvm, "")?;
        let qemu_conf = dc_dir().join("qemu.conf");
        let system = std::fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default();
        std::fs::write(
            &qemu_conf,
            // QEMU as root: the lab's disks and consoles are under the project's target
            // directory, which the usual libvirt-qemu user may not be able to reach.
            format!(
                "{system}\n# cargo xtask lab\nnamespaces = []\nuser = \"root\"\ngroup = \"root\"\n"
            ),
        )?;
        let script = format!(
            "if [ -e /dev/kvm ]; then mount --bind '{}' /dev/kvm && mount -o remount,bind,ro /dev/kvm || exit 1; fi; \
             mount --bind '{}' /etc/libvirt/qemu.conf || exit 1; exec /usr/sbin/libvirtd -d",
            no_kvm.display(),
            qemu_conf.display()
        );
        let status = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .status()
            .context("running unshare")?;
        ensure!(
            status.success(),
            "starting libvirtd (unshare, libvirtd -d) failed"
        );
        wait_for("libvirtd answering", Duration::from_secs(30), || {
            virsh(&["version"]).is_ok()
        })?;
    }
    for name in virsh(&["list", "--all", "--name"])?.lines() {
        ensure!(
            !name.starts_with(DOMAIN_PREFIX),
            "libvirt already has a domain {name}: `cargo xtask lab down` first"
        );
    }

    // A /24 no interface or route of this host uses.
    let used = format!(
        "{}{}",
        String::from_utf8_lossy(&Command::new("ip").args(["-4", "addr"]).output()?.stdout),
        String::from_utf8_lossy(&Command::new("ip").args(["-4", "route"]).output()?.stdout)
    );
    let net = (150..250)
        .map(|n| format!("192.168.{n}"))
        .find(|n| !used.contains(&format!("{n}.")))
        .context("no free 192.168.x.0/24 for the lab network")?;
    let host_ip = format!("{net}.1");
    let boot_port = free_port()?;
    let boot_url = format!("http://{host_ip}:{boot_port}");
    let machines: Vec<Value> = (1..=vms)
        .map(|i| {
            json!({
                "name": format!("{DOMAIN_PREFIX}{i}"),
                "mac": format!("52:54:00:b0:08:{i:02x}"),
                "ip": format!("{net}.{}", 10 + i),
            })
        })
        .collect();

    println!("==> network {NETWORK}: bridge {BRIDGE}, {net}.0/24, isolated");
    let hosts: String = machines
        .iter()
        .map(|m| {
            format!(
                "      <host mac='{}' name='{}' ip='{}'/>\n",
                m["mac"].as_str().unwrap_or_default(),
                m["name"].as_str().unwrap_or_default(),
                m["ip"].as_str().unwrap_or_default()
            )
        })
        .collect();
    // The IPv6 subnet is there for its router advertisements: without one, iPXE waits
    // about 16 s for them before it uses its DHCPv4 lease (unless IPv6 is off here).
    let ipv6_off = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .map_or(true, |v| v.trim() == "1");
    let ipv6 = if ipv6_off {
        String::new()
    } else {
        format!(
            "  <ip family='ipv6' address='fd42:{}::1' prefix='64'/>\n",
            net.rsplit('.').next().unwrap_or("150")
        )
    };
    let xml = format!(
        "<network>
  <name>{NETWORK}</name>
  <bridge name='{BRIDGE}' stp='off' delay='0'/>
  <ip address='{host_ip}' netmask='255.255.255.0'>
    <dhcp>
      <range start='{net}.100' end='{net}.199'/>
{hosts}      <bootp file='{boot_url}/boot/ipxe?mac=${{net0/mac}}'/>
    </dhcp>
  </ip>
{ipv6}</network>
"
    );
    let file = dir.join("network.xml");
    std::fs::write(&file, xml)?;
    virsh(&["net-define", path_str(&file)?])?;
    state["network"] = json!(NETWORK);
    save_state(state)?;
    virsh(&["net-start", NETWORK])?;

    for m in &machines {
        let name = m["name"].as_str().unwrap_or_default();
        let disk = dir.join(format!("{name}.img"));
        // A blank disk: the firmware finds nothing to boot on it until a reimage wrote one.
        std::fs::File::create(&disk)?.set_len(32 << 20)?;
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>768</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='network'/>
    <boot dev='hd'/>
    <bios useserial='yes'/>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='{NETWORK}'/>
      <mac address='{mac}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{console}' append='on'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{console}' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
",
            disk = disk.display(),
            mac = m["mac"].as_str().unwrap_or_default(),
            console = dir.join(format!("{name}.console.log")).display(),
        );
        let file = dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml)?;
        virsh(&["define", path_str(&file)?])?;
        let uuid = virsh(&["domuuid", name])?;
        let mut m = m.clone();
        m["uuid"] = json!(uuid);
        state["vms"].as_array_mut().context("state.vms")?.push(m);
        save_state(state)?;
    }
    let machines = state["vms"].as_array().context("state.vms")?.clone();

    println!("==> sushy-tools, the VMs' Redfish BMC (libvirt driver)");
    let sushy_port = free_port()?;
    let uuids: Vec<&str> = machines.iter().filter_map(|m| m["uuid"].as_str()).collect();
    let conf = dir.join("sushy.conf");
    std::fs::write(
        &conf,
        format!("SUSHY_EMULATOR_ALLOWED_INSTANCES = {uuids:?}\n"),
    )?;
    let pid = spawn_detached(
        Command::new(venv.join("bin/sushy-emulator"))
            .args(["-i", "127.0.0.1", "-p", &sushy_port.to_string()])
            .args(["--libvirt-uri", LIBVIRT, "--config"])
            .arg(&conf),
        &dir.join("sushy.log"),
    )?;
    state["sushy"] = json!({ "pid": pid, "port": sushy_port });
    save_state(state)?;
    wait_for("sushy-emulator answering", Duration::from_secs(60), || {
        http_status(sushy_port, "/redfish/v1/Systems") == Some(200)
    })?;

    println!("==> bm-server with the Redfish provider, boot service on {boot_url}");
    let known_hosts: String = machines
        .iter()
        .map(|m| {
            format!(
                "{} {}\n",
                m["ip"].as_str().unwrap_or_default(),
                built.host_key
            )
        })
        .collect();
    std::fs::write(dir.join("known_hosts"), known_hosts)?;
    let provider = format!(
        r#"# The lab's Redfish provider (written by `cargo xtask lab up`; docs/lab.md).
[redfish]
[redfish.bmc."127.0.0.1:{sushy_port}"]
# sushy-tools on the loopback, without TLS or authentication.
allow_plaintext = true

[redfish.ssh]
user = "root"
private_key_file = "{key}"
known_hosts_file = "{known}"
connect_timeout = "10s"
command_timeout = "10m"

[redfish.images]
url = "{boot_url}/boot/files/{{image}}.img"

[redfish.commands]
# In the deploy environment: write, report the SHA-256, reboot into the image if intact.
repave = "bm-write-image {{image_url}} {{image_checksum}}"
# In the booted image: stand-ins for a cluster's join and readiness check.
mint_join_token = "echo lab-join-token-{{machine_id}}"
join_cluster = "bm-lab-join {{target_cluster}}"
verify_in_cluster = "bm-lab-verify {{image}} {{target_cluster}}"
drain = false
uncordon = false
"#,
        key = built.ssh_key.display(),
        known = dir.join("known_hosts").display(),
    );
    std::fs::write(dir.join("provider.toml"), provider)?;
    let grpc = format!("127.0.0.1:{}", free_port()?);
    let data = dir.join("data");
    let pid = spawn_detached(
        Command::new(bin.join("bm-server"))
            .args(["--listen", &grpc])
            .arg("--data-dir")
            .arg(&data)
            .args(["--boot-listen", &format!("{host_ip}:{boot_port}")])
            .args(["--boot-url", &boot_url])
            .arg("--boot-dir")
            .arg(&built.boot)
            .args(["--boot-kernel-args", "console=ttyS0,115200 panic=5"])
            .args(["--netboot-checkin-timeout", "5m"])
            .args(["--status-poll-interval", "30s"])
            .arg("--provider-config")
            .arg(dir.join("provider.toml"))
            .env("NO_COLOR", "1"),
        &dir.join("server.log"),
    )?;
    state["server"] = json!({ "pid": pid, "addr": grpc, "boot_url": boot_url, "data": data });
    save_state(state)?;
    let server_log = dir.join("server.log");
    wait_for("bm-server listening", Duration::from_secs(60), || {
        std::fs::read_to_string(&server_log).is_ok_and(|l| l.contains("bm-server listening on"))
    })
    .with_context(|| format!("bm-server's log:\n{}", tail(&server_log)))?;

    let mut csv =
        String::from("id,provider,mac_addresses,bmc_endpoint,ssh_endpoint,image,target_cluster\n");
    for m in &machines {
        csv.push_str(&format!(
            "{name},redfish,{mac},redfish+http://127.0.0.1:{sushy_port}/redfish/v1/Systems/{uuid},root@{ip},{image},{CLUSTER}\n",
            name = m["name"].as_str().unwrap_or_default(),
            mac = m["mac"].as_str().unwrap_or_default(),
            uuid = m["uuid"].as_str().unwrap_or_default(),
            ip = m["ip"].as_str().unwrap_or_default(),
            image = IMAGES[0],
        ));
    }
    let inventory = dir.join("inventory.csv");
    std::fs::write(&inventory, csv)?;
    bmctl(state, &["import", "--file", path_str(&inventory)?])?;
    for m in &machines {
        bmctl(
            state,
            &["enter-maintenance", m["name"].as_str().unwrap_or_default()],
        )?;
    }
    Ok(())
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// The sushy-tools virtualenv (from Debian's python3, which sees python3-libvirt).
fn sushy_venv(lab: &Path) -> anyhow::Result<PathBuf> {
    let venv = lab.join("sushy-venv");
    if venv.join("bin/sushy-emulator").exists() {
        return Ok(venv);
    }
    if !crate::test::venv_works(Path::new("/usr/bin/python3")) {
        install(&["python3-venv"])?;
    }
    println!("==> sushy-tools from PyPI into {}", venv.display());
    let status = Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--system-site-packages"])
        .arg(&venv)
        .status()?;
    ensure!(
        status.success(),
        "creating the sushy-tools virtualenv failed"
    );
    let status = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", SUSHY_TOOLS])
        .status()?;
    ensure!(status.success(), "pip install sushy-tools failed");
    Ok(venv)
}

/// `bmctl ARGS` against the lab's server; its standard output.
fn bmctl(state: &Value, args: &[&str]) -> anyhow::Result<String> {
    ctl(state)?.run(args)
}

/// bmctl for the lab's server.
fn ctl(state: &Value) -> anyhow::Result<Bmctl> {
    Ok(Bmctl {
        bin: PathBuf::from(state["bin"].as_str().context("state.bin")?),
        addr: state["server"]["addr"]
            .as_str()
            .context("state.server")?
            .to_owned(),
        data: PathBuf::from(state["server"]["data"].as_str().unwrap_or_default()),
    })
}

/// `cargo xtask lab status`.
pub(crate) fn status() -> anyhow::Result<()> {
    let state = load_state()?;
    let server = &state["server"];
    println!(
        "bm-server     {} (gRPC), boot service {}",
        server["addr"].as_str().unwrap_or("-"),
        server["boot_url"].as_str().unwrap_or("-")
    );
    println!(
        "Redfish BMC   sushy-tools on http://127.0.0.1:{}",
        state["sushy"]["port"]
    );
    println!("network       {NETWORK} (bridge {BRIDGE})");
    for m in state["vms"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or_default();
        let domstate = virsh(&["domstate", name]).unwrap_or_else(|e| format!("{e:#}"));
        println!(
            "VM {name:<10} {} {:<15} {domstate:<9} console {}",
            m["mac"].as_str().unwrap_or_default(),
            m["ip"].as_str().unwrap_or_default(),
            dc_dir().join(format!("{name}.console.log")).display()
        );
    }
    println!(
        "\n$ bmctl --server {} list",
        server["addr"].as_str().unwrap_or("-")
    );
    print!("{}", bmctl(&state, &["list"])?);
    println!(
        "\n(BM_DATA_DIR={} for bmctl's admin token)",
        server["data"].as_str().unwrap_or("-")
    );
    Ok(())
}

/// `cargo xtask lab reimage [VM] [--image NAME]`: reimages the VM through the public API,
/// following its log live; succeeds when the operation does and the VM's console shows the
/// image booted from its disk. With `expect_failure`, succeeds when the operation fails in
/// `repave-image` on the checksum (for [`CORRUPT_IMAGE`]).
pub(crate) fn reimage(vm: &str, image: &str) -> anyhow::Result<()> {
    let state = load_state()?;
    let expect_failure = image == CORRUPT_IMAGE;
    let known = state["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|m| m["name"] == vm);
    ensure!(known, "the lab has no VM {vm} (`cargo xtask lab status`)");
    let console = dc_dir().join(format!("{vm}.console.log"));
    let console_before = std::fs::metadata(&console).map_or(0, |m| m.len());

    bmctl(&state, &["update", vm, "--image", image])?;
    let op: Value =
        serde_json::from_str(&bmctl(&state, &["-o", "json", "reimage", vm, "--no-wait"])?)?;
    let op = op["id"].as_str().context("the reimage's id")?.to_owned();
    println!("==> reimage {op} of {vm} with image {image}; its log, live:");
    let started = Instant::now();
    let mut logs = ctl(&state)?
        .command(&["logs", &op])
        .stdout(Stdio::inherit())
        .spawn()
        .context("running bmctl logs")?;
    let phase = match ctl(&state)?.wait_op(&op, started + REIMAGE_DEADLINE, &console) {
        Ok(ended) => ended,
        Err(e) => {
            let _ = logs.kill();
            return Err(e);
        }
    };
    // `bmctl logs` ends with the operation.
    let _ = logs.wait();
    let took = started.elapsed();
    let text = std::fs::read(&console).unwrap_or_default();
    let console_text =
        String::from_utf8_lossy(&text[usize::try_from(console_before)?.min(text.len())..])
            .into_owned();
    let phase_name = phase["phase"].as_str().unwrap_or_default();
    println!("\n$ bmctl op {op}\n{}", bmctl(&state, &["op", &op])?);
    let log = bmctl(&state, &["logs", &op])?;
    if expect_failure {
        let error = phase["error"].as_str().unwrap_or_default();
        ensure!(
            phase_name.ends_with("FAILED"),
            "the reimage with a wrongly published checksum ended {phase_name}, not FAILED"
        );
        ensure!(
            error.starts_with("repave-image: ") && error.contains("not the published"),
            "the reimage failed, but not on the checksum in repave-image: {error}"
        );
        ensure!(
            !error.contains("could not be disarmed"),
            "the netboot override was not disarmed after the failure: {error}"
        );
        ensure!(
            log.contains("boot override points at the disk")
                || log.contains("boot override disabled"),
            "the failed reimage's log does not show the netboot disarmed:\n{log}"
        );
        ensure!(
            !console_text.contains("booted image "),
            "the VM booted an image from its disk during a reimage that failed its checksum:\n{}",
            tail(&console)
        );
        println!(
            "==> as it must, the reimage with a wrongly published checksum failed in repave-image after {:.0} s, and the netboot was disarmed",
            took.as_secs_f64()
        );
        return Ok(());
    }
    ensure!(
        phase_name.ends_with("SUCCEEDED"),
        "the reimage ended {phase_name}; the VM's console:\n{}",
        tail(&console)
    );
    let booted = format!("booted image {image}");
    ensure!(
        console_text.contains("bm-deploy: ready") && console_text.contains(&booted),
        "the reimage succeeded, but the VM's console does not show the deploy environment and then '{booted}':\n{}",
        tail(&console)
    );
    ensure!(
        log.contains(&format!("booted image {image}, in cluster {CLUSTER}")),
        "verify-in-cluster did not report the booted image; the log:\n{log}"
    );
    println!(
        "==> {vm} network-booted the deploy environment, got image {image} written over SSH, booted it from its disk and passed verify-in-cluster: {:.0} s",
        took.as_secs_f64()
    );
    Ok(())
}

/// `cargo xtask lab down`: removes everything `up` made, also after a failed `up`; goes on
/// past what fails and reports it at the end.
pub(crate) fn down() -> anyhow::Result<()> {
    // One at a time: an interrupted `lab test` takes the lab down from its signal handler
    // while its main thread may be doing the same.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    require_root()?;
    let state = load_state().unwrap_or_else(|_| json!({}));
    if let Some(pid) = state["server"]["pid"].as_u64() {
        stop(pid, "bm-server");
    }
    if let Some(pid) = state["sushy"]["pid"].as_u64() {
        stop(pid, "sushy-emulator");
    }
    let mut failed = Vec::new();
    if have("virsh") && virsh(&["version"]).is_ok() {
        let domains = virsh(&["list", "--all", "--name"]).unwrap_or_default();
        for name in domains.lines().filter(|n| n.starts_with(DOMAIN_PREFIX)) {
            let _ = virsh(&["destroy", name]);
            if let Err(e) = virsh(&["undefine", name]) {
                failed.push(format!("{e:#}"));
            }
        }
        if virsh(&["net-info", NETWORK]).is_ok() {
            let _ = virsh(&["net-destroy", NETWORK]);
            if let Err(e) = virsh(&["net-undefine", NETWORK]) {
                failed.push(format!("{e:#}"));
            }
        }
    } else if state["network"].is_string() {
        failed.push(format!(
            "libvirtd does not answer: the domains {DOMAIN_PREFIX}* and the network {NETWORK} (bridge {BRIDGE}) may be left; start libvirtd and run `cargo xtask lab down` again"
        ));
    }
    if state["libvirtd_started"] == json!(true) {
        for (daemon, pidfile) in [
            ("libvirtd", "/run/libvirtd.pid"),
            ("virtlogd", "/run/virtlogd.pid"),
        ] {
            match std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<u64>().ok())
            {
                Some(pid) => stop(pid, daemon),
                None => failed.push(format!("no {pidfile}: is {daemon} still running?")),
            }
        }
        remove_libvirt_chains();
    }
    let _ = std::fs::remove_file(state_path());
    ensure!(
        failed.is_empty(),
        "the lab is down, but not all of it:\n  {}",
        failed.join("\n  ")
    );
    println!("==> the lab is down (logs stay in {})", dc_dir().display());
    Ok(())
}

/// libvirtd leaves its firewall chains (`LIBVIRT_*`) behind when it stops; a libvirtd that
/// the lab started is gone, so they are removed: first the jumps to them, then the chains.
fn remove_libvirt_chains() {
    for tool in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle"] {
            let Ok(out) = Command::new(tool).args(["-t", table, "-S"]).output() else {
                continue;
            };
            let rules = String::from_utf8_lossy(&out.stdout).into_owned();
            for rule in rules.lines() {
                let words: Vec<&str> = rule.split_whitespace().collect();
                if words.first() == Some(&"-A")
                    && !words.get(1).is_some_and(|c| c.starts_with("LIBVIRT_"))
                    && words
                        .windows(2)
                        .any(|w| w[0] == "-j" && w[1].starts_with("LIBVIRT_"))
                {
                    let _ = Command::new(tool)
                        .args(["-t", table, "-D"])
                        .args(&words[1..])
                        .stderr(Stdio::null())
                        .status();
                }
            }
            for rule in rules.lines() {
                if let Some(chain) = rule
                    .strip_prefix("-N ")
                    .filter(|c| c.starts_with("LIBVIRT_"))
                {
                    for op in ["-F", "-X"] {
                        let _ = Command::new(tool)
                            .args(["-t", table, op, chain])
                            .stderr(Stdio::null())
                            .status();
                    }
                }
            }
        }
    }
}

/// `cargo xtask lab test`: the end-to-end check CI runs: up with one VM, a reimage that
/// must succeed, one with a wrongly published checksum that must fail in `repave-image`,
/// and down whatever happened.
pub(crate) fn test() -> anyhow::Result<()> {
    require_root()?;
    // Interrupted (Ctrl+C, or CI's timeout), it still takes everything down.
    ctrlc::set_handler(|| {
        eprintln!("\n==> interrupted: taking the lab down");
        if let Err(e) = down() {
            eprintln!("{e:#}");
        }
        std::process::exit(130);
    })
    .context("installing the signal handler")?;
    let started = Instant::now();
    let vm = format!("{DOMAIN_PREFIX}1");
    let result = up(1)
        .and_then(|()| reimage(&vm, IMAGES[1]))
        .and_then(|()| reimage(&vm, CORRUPT_IMAGE));
    if let Err(e) = &result {
        eprintln!(
            "==> failed: {e:#}\n    the server's log: {}",
            tail(&dc_dir().join("server.log"))
        );
    }
    let down = down();
    result?;
    down?;
    println!(
        "==> lab test passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
