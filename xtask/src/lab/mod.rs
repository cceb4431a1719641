//! `cargo xtask lab netboot`: a real machine boots through the boot service.
//!
//! A QEMU virtual machine (software emulation, no KVM needed; QEMU's own user-mode network,
//! so nothing outside this host is touched and no root-only network setup is needed)
//! network-boots with iPXE while a reimage of its machine record runs on the fake provider:
//! the boot service must hand it the deploy environment, the deploy environment must check in
//! with its one-time token, and `reboot-to-netboot` must end on that check-in. It fails
//! otherwise, within its deadline, with the VM's console and the server's log.
//!
//! The deploy environment is built here from Debian packages only (docs/netboot.md): the
//! kernel of `linux-image-amd64` and an initramfs of `busybox-static` with the kernel's
//! virtio network modules and an `/init` that brings the network up with DHCP, reads its
//! token and callback from the kernel command line and checks in. What is missing is
//! installed (QEMU 10 from bookworm-backports through a private apt source list, so that the
//! system's own lists are left as they are).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::proc;

/// The kernel modules the deploy environment loads, in dependency order (the Debian kernel
/// builds virtio networking as modules; the initramfs has no modules.dep).
const MODULES: [&str; 8] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
];

/// The VM's MAC address, in the machine record too.
const MAC: &str = "52:54:00:b0:07:01";

/// How long the VM may take from power-on to the check-in (measured here: about 15 s).
const BOOT_DEADLINE: Duration = Duration::from_secs(240);

const INIT: &str = r#"#!/bin/sh
# The deploy environment of `cargo xtask lab` (docs/netboot.md): network, then check in.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "bm-deploy: up" > /dev/console
for m in MODULES; do
  insmod "/lib/modules/$m.ko" || echo "bm-deploy: insmod $m failed" > /dev/console
done
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -n -q -t 10 -T 2 -s /udhcpc.sh > /dev/console 2>&1
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    bm.token=*) token="${arg#bm.token=}" ;;
    bm.callback=*) callback="${arg#bm.callback=}" ;;
  esac
done
echo "bm-deploy: checking in at $callback" > /dev/console
n=0
until wget -q -O- --post-data "token=$token" "$callback" > /dev/console 2>&1; do
  n=$((n + 1))
  [ "$n" -ge 30 ] && break
  sleep 2
done
echo "bm-deploy: ready" > /dev/console
exec sleep 2147483647
"#;

const UDHCPC: &str = r#"#!/bin/sh
case "$1" in
  bound|renew)
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
    ;;
esac
"#;

/// `cargo xtask lab ARGS`.
pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("netboot") => netboot(),
        _ => bail!(
            "usage: cargo xtask lab netboot\n  boots a QEMU VM through the boot service into the deploy environment during a reimage"
        ),
    }
}

fn netboot() -> anyhow::Result<()> {
    ensure_packages()?;
    let lab = proc::target_dir().join("lab");
    let boot = lab.join("boot");
    build_deploy_environment(&lab, &boot)?;
    println!("==> building bm-server and bmctl");
    let bin = proc::build(&["bm-server", "bm-cli"], false)?;

    let run = lab.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&run)?;
    let result = boot_once(&bin, &boot, &run);
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&run);
    } else {
        eprintln!(
            "\nthe VM's console and the server's log are in {}",
            run.display()
        );
    }
    result
}

/// A free TCP port on the loopback (the guest reaches the host's loopback as 10.0.2.2).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Kills a child process when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn boot_once(bin: &Path, boot: &Path, run: &Path) -> anyhow::Result<()> {
    let data = run.join("data");
    let boot_port = free_port()?;
    // The URL the VM uses: QEMU's user network makes the host's loopback 10.0.2.2.
    let boot_url = format!("http://10.0.2.2:{boot_port}");
    let mut server = Command::new(bin.join("bm-server"));
    server
        .args(["--listen", "127.0.0.1:0", "--fake-timing", "normal"])
        .args(["--status-poll-interval", "0"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--boot-listen", &format!("127.0.0.1:{boot_port}")])
        .args(["--boot-url", &boot_url])
        .arg("--boot-dir")
        .arg(boot)
        .args(["--boot-kernel-args", "console=ttyS0 panic=5"])
        .args(["--netboot-checkin-timeout", "4m"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(run.join("server.log"))?);
    let mut child = server.spawn().context("starting bm-server")?;
    let stdout = child.stdout.take().context("server stdout")?;
    let server = Guard(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let Some(addr) = line.trim().strip_prefix("bm-server listening on ") else {
        bail!("bm-server did not start: {line:?}");
    };
    println!(
        "==> bm-server on {addr}, boot service on 127.0.0.1:{boot_port} ({boot_url} for the VM)"
    );

    let bmctl = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(bin.join("bmctl"))
            .args(["--server", addr])
            .args(args)
            .env("BM_DATA_DIR", &data)
            .env("NO_COLOR", "1")
            .output()
            .context("running bmctl")?;
        ensure!(
            out.status.success(),
            "bmctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let inventory = run.join("inventory.csv");
    std::fs::write(
        &inventory,
        format!("id,provider,mac_addresses,image\nvm-1,fake,{MAC},ubuntu-24.04\n"),
    )?;
    bmctl(&["import", "--file", inventory.to_str().context("path")?])?;
    bmctl(&["enter-maintenance", "vm-1"])?;
    let op: serde_json::Value =
        serde_json::from_str(&bmctl(&["-o", "json", "reimage", "vm-1", "--no-wait"])?)?;
    let op = op["id"].as_str().context("the reimage's id")?.to_owned();
    println!("==> reimage {op} admitted; starting the VM (QEMU, TCG)");

    let console = run.join("console.log");
    let started = Instant::now();
    let qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-machine", "pc,graphics=off", "-m", "768"])
        .args([
            "-smp",
            "1",
            "-display",
            "none",
            "-no-reboot",
            "-monitor",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-boot", "n"])
        .arg("-netdev")
        .arg(format!(
            "user,id=n0,bootfile={boot_url}/boot/ipxe?mac={MAC}"
        ))
        .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={MAC}")])
        .stdout(std::fs::File::create(run.join("qemu.log"))?)
        .stderr(std::fs::File::create(run.join("qemu.err"))?)
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let _vm = Guard(qemu);

    // The operation's outcome is what counts; the console says how far the VM got.
    let phase = loop {
        let got: serde_json::Value = serde_json::from_str(&bmctl(&["-o", "json", "op", &op])?)?;
        let phase = got["phase"].as_str().unwrap_or_default().to_owned();
        if phase.ends_with("SUCCEEDED") || phase.ends_with("FAILED") || phase.ends_with("CANCELED")
        {
            break phase;
        }
        if started.elapsed() > BOOT_DEADLINE {
            bail!(
                "the reimage did not end within {BOOT_DEADLINE:?} (phase {phase}); the VM's console:\n{}",
                tail(&console)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let took = started.elapsed();
    let logs = bmctl(&["logs", &op])?;
    let console_text = std::fs::read_to_string(&console).unwrap_or_default();
    ensure!(
        phase.ends_with("SUCCEEDED"),
        "the reimage ended {phase}; its log:\n{logs}\nthe VM's console:\n{}",
        tail(&console)
    );
    ensure!(
        logs.contains("the deploy environment checked in"),
        "the reimage succeeded without the check-in; its log:\n{logs}"
    );
    ensure!(
        console_text.contains("bm-deploy: ready"),
        "the VM's console does not show the deploy environment:\n{}",
        tail(&console)
    );
    drop(server);
    println!(
        "==> the VM network-booted the deploy environment, which checked in; the reimage {op} succeeded {:.1} s after power-on",
        took.as_secs_f64()
    );
    Ok(())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A program, where the tests would find it.
fn have(program: &str) -> bool {
    crate::test::find(program).is_some()
}

/// apt with a private source list (the system's Debian sources plus bookworm-backports) and
/// private package lists, so that the system's own are left as they are. QEMU comes from
/// backports because the release's 7.2 would replace a backports qemu-utils the machine may
/// have (and 10.x finds its iPXE ROMs by itself).
struct Apt {
    opts: Vec<String>,
}

impl Apt {
    fn new() -> anyhow::Result<Apt> {
        ensure!(
            have("apt-get"),
            "the lab needs Debian's apt-get (qemu-system-x86, ipxe-qemu, busybox-static and a kernel package)"
        );
        let apt = proc::target_dir().join("lab").join("apt");
        let parts = apt.join("parts");
        let lists = apt.join("lists");
        std::fs::create_dir_all(&parts)?;
        std::fs::create_dir_all(lists.join("partial"))?;
        // The system's Debian sources, in either format (the release's kernel package).
        for (system, copy) in [
            ("/etc/apt/sources.list.d/debian.sources", "debian.sources"),
            ("/etc/apt/sources.list", "system.list"),
        ] {
            if Path::new(system).exists() {
                std::fs::copy(system, parts.join(copy))?;
            }
        }
        std::fs::write(
            parts.join("backports.list"),
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main\n",
        )?;
        let apt = Apt {
            opts: vec![
                // Downloads land in the project's target directory, which the _apt user
                // may not be able to enter.
                "-o".to_owned(),
                "APT::Sandbox::User=root".to_owned(),
                "-o".to_owned(),
                "Dir::Etc::sourcelist=/dev/null".to_owned(),
                "-o".to_owned(),
                format!("Dir::Etc::sourceparts={}", parts.display()),
                "-o".to_owned(),
                format!("Dir::State::lists={}", lists.display()),
            ],
        };
        let fresh = std::fs::read_dir(&lists)?.filter_map(Result::ok).count() > 1;
        if !fresh {
            apt.get(&["update", "-qq"], None)?;
        }
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.args(&self.opts).env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    fn get(&self, args: &[&str], dir: Option<&Path>) -> anyhow::Result<()> {
        crate::test::apt_get(&self.opts, args, dir)
    }
}

/// Installs QEMU (from bookworm-backports), its iPXE ROMs and busybox when missing.
fn ensure_packages() -> anyhow::Result<()> {
    let qemu = have("qemu-system-x86_64") && Path::new("/usr/lib/ipxe/qemu").is_dir();
    let busybox = Path::new("/bin/busybox").exists();
    if qemu && busybox {
        return Ok(());
    }
    println!("==> installing QEMU (bookworm-backports), ipxe-qemu and busybox-static");
    Apt::new()?.get(
        &[
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "qemu-system-x86/bookworm-backports",
            "qemu-system-common/bookworm-backports",
            "qemu-system-data/bookworm-backports",
            "seabios/bookworm-backports",
            "ipxe-qemu",
            "busybox-static",
        ],
        None,
    )
}

/// Builds `boot/vmlinuz` and `boot/initrd.img` (once; delete `target/lab` to build again).
fn build_deploy_environment(lab: &Path, boot: &Path) -> anyhow::Result<()> {
    let (kernel, initrd) = (boot.join("vmlinuz"), boot.join("initrd.img"));
    if kernel.exists() && initrd.exists() {
        return Ok(());
    }
    println!("==> building the deploy environment (Debian kernel, busybox initramfs)");
    let cache = lab.join("cache");
    std::fs::create_dir_all(&cache)?;
    std::fs::create_dir_all(boot)?;
    let deb = kernel_deb(&cache)?;
    let tree = cache.join("kernel");
    let _ = std::fs::remove_dir_all(&tree);
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&tree)
        .status()
        .context("running dpkg-deb")?;
    ensure!(status.success(), "dpkg-deb -x {} failed", deb.display());

    let rd = cache.join("initramfs");
    let _ = std::fs::remove_dir_all(&rd);
    for dir in ["bin", "lib/modules", "proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(rd.join(dir))?;
    }
    std::fs::copy("/bin/busybox", rd.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", rd.join("bin/sh"))?;
    for m in MODULES {
        let found = find_file(&tree.join("lib/modules"), &format!("{m}.ko"))
            .with_context(|| format!("the kernel package has no {m}.ko"))?;
        std::fs::copy(found, rd.join(format!("lib/modules/{m}.ko")))?;
    }
    std::fs::write(rd.join("init"), INIT.replace("MODULES", &MODULES.join(" ")))?;
    std::fs::write(rd.join("udhcpc.sh"), UDHCPC)?;
    for script in ["init", "udhcpc.sh"] {
        std::fs::set_permissions(rd.join(script), std::fs::Permissions::from_mode(0o755))?;
    }
    let pack = format!(
        "cd '{}' && find . | busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -9 > '{}'",
        rd.display(),
        initrd.display()
    );
    let status = Command::new("sh").args(["-c", &pack]).status()?;
    ensure!(status.success(), "packing the initramfs failed");
    let vmlinuz = std::fs::read_dir(tree.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .context("the kernel package has no /boot/vmlinuz-*")?;
    std::fs::copy(vmlinuz, &kernel)?;
    Ok(())
}

/// The Debian kernel package (`linux-image-amd64`'s current kernel), downloaded once.
fn kernel_deb(cache: &Path) -> anyhow::Result<PathBuf> {
    let existing = || {
        std::fs::read_dir(cache).ok().and_then(|d| {
            d.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("linux-image-") && n.ends_with(".deb"))
            })
        })
    };
    if let Some(deb) = existing() {
        return Ok(deb);
    }
    let apt = Apt::new()?;
    let deps = apt
        .command("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .context("running apt-cache")?;
    let text = String::from_utf8_lossy(&deps.stdout);
    let name = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-"))
        .context("apt knows no kernel package for linux-image-amd64")?;
    apt.get(&["download", "-q", name], Some(cache))?;
    existing().context("the downloaded kernel package is not where apt-get put it")
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().and_then(|n| n.to_str()) == Some(name) {
            return Some(path);
        }
    }
    None
}
