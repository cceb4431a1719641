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
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::proc;

mod build;
mod dc;

/// The VM's MAC address, in the machine record too.
const MAC: &str = "52:54:00:b0:07:01";

/// How long the VM may take from power-on to the check-in (measured here: about 15 s).
const BOOT_DEADLINE: Duration = Duration::from_secs(240);

const USAGE: &str = "usage: cargo xtask lab COMMAND (docs/lab.md)
  netboot                      a QEMU VM boots through the boot service into the deploy environment during a reimage (no root)
  up [--vms N]                 the virtual datacenter: N libvirt VMs (default 2) behind sushy-tools, bm-server with the Redfish provider (root)
  status                       what runs, where, and `bmctl list`
  reimage [VM] [--image NAME]  a real reimage of VM (default bm-lab-1) with image NAME (default lab-b), its log live
  down                         removes everything `up` made
  test                         up, a reimage that must succeed, one with a wrong checksum that must fail, down (CI)";

/// `cargo xtask lab ARGS`.
pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let mut words = args.iter().map(String::as_str);
    let command = words.next();
    let mut positional = Vec::new();
    let (mut vms, mut image) = (2usize, build::IMAGES[1].to_owned());
    while let Some(word) = words.next() {
        match word {
            "--vms" => vms = words.next().context("--vms takes a number")?.parse()?,
            "--image" => image = words.next().context("--image takes a name")?.to_owned(),
            other if !other.starts_with('-') => positional.push(other),
            other => bail!("unknown option {other}\n{USAGE}"),
        }
    }
    match (command, positional.as_slice()) {
        (Some("netboot"), []) => netboot(),
        (Some("up"), []) => dc::up(vms),
        (Some("status"), []) => dc::status(),
        (Some("reimage"), []) => dc::reimage("bm-lab-1", &image),
        (Some("reimage"), [vm]) => dc::reimage(vm, &image),
        (Some("down"), []) => dc::down(),
        (Some("test"), []) => dc::test(),
        _ => bail!("{USAGE}"),
    }
}

fn netboot() -> anyhow::Result<()> {
    ensure_packages(&[BOOT_NEEDS])?;
    let lab = proc::target_dir().join("lab");
    let boot = build::build(&lab)?.boot;
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

/// `bmctl` against one of the lab's servers, with that server's local admin token.
pub(crate) struct Bmctl {
    pub(crate) bin: PathBuf,
    pub(crate) addr: String,
    /// The server's data directory (its admin token).
    pub(crate) data: PathBuf,
}

impl Bmctl {
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join("bmctl"));
        c.args(["--server", &self.addr])
            .args(args)
            .env("BM_DATA_DIR", &self.data)
            .env("NO_COLOR", "1");
        c
    }

    /// Runs `bmctl ARGS`; its standard output.
    pub(crate) fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(args).output().context("running bmctl")?;
        ensure!(
            out.status.success(),
            "bmctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Reads operation `op` every half second until it ended, at most until `deadline`;
    /// its record (`bmctl -o json op`). The error on the deadline shows the VM's `console`.
    pub(crate) fn wait_op(
        &self,
        op: &str,
        deadline: Instant,
        console: &Path,
    ) -> anyhow::Result<serde_json::Value> {
        loop {
            let got: serde_json::Value =
                serde_json::from_str(&self.run(&["-o", "json", "op", op])?)?;
            let phase = got["phase"].as_str().unwrap_or_default();
            if ["SUCCEEDED", "FAILED", "CANCELED"]
                .iter()
                .any(|p| phase.ends_with(p))
            {
                return Ok(got);
            }
            ensure!(
                Instant::now() < deadline,
                "operation {op} did not end in time (phase {phase}); the VM's console:\n{}",
                tail(console)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
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

    let ctl = Bmctl {
        bin: bin.to_owned(),
        addr: addr.to_owned(),
        data: data.clone(),
    };
    let bmctl = |args: &[&str]| ctl.run(args);
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
    let ended = ctl.wait_op(&op, started + BOOT_DEADLINE, &console)?;
    let phase = ended["phase"].as_str().unwrap_or_default().to_owned();
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

/// What building and booting the lab's machines needs: a file each package installs, and
/// the packages. QEMU comes from bookworm-backports (see [`Apt`]).
const BOOT_NEEDS: &[(&str, &[&str])] = &[
    (
        "/usr/bin/qemu-system-x86_64",
        &[
            "qemu-system-x86/bookworm-backports",
            "qemu-system-common/bookworm-backports",
            "qemu-system-data/bookworm-backports",
            "seabios/bookworm-backports",
        ],
    ),
    ("/usr/lib/ipxe/qemu", &["ipxe-qemu"]),
    ("/bin/busybox", &["busybox-static"]),
    ("/usr/sbin/dropbear", &["dropbear-bin"]),
    ("/usr/bin/ssh-keygen", &["openssh-client"]),
    ("/usr/bin/syslinux", &["syslinux"]),
    ("/usr/lib/syslinux/mbr/mbr.bin", &["syslinux-common"]),
    ("/usr/bin/mcopy", &["mtools"]),
    ("/usr/sbin/mkfs.vfat", &["dosfstools"]),
];

/// What the virtual datacenter needs besides: libvirt, its network's dnsmasq, and the Python
/// binding sushy-tools drives libvirt with (sushy-tools itself comes from PyPI).
const DATACENTER_NEEDS: &[(&str, &[&str])] = &[
    ("/usr/sbin/libvirtd", &["libvirt-daemon-system"]),
    ("/usr/bin/virsh", &["libvirt-clients"]),
    ("/usr/sbin/dnsmasq", &["dnsmasq-base"]),
    ("/usr/sbin/iptables", &["iptables"]),
    ("/bin/kill", &["procps"]),
    ("/bin/ip", &["iproute2"]),
    (
        "/usr/lib/python3/dist-packages/libvirt.py",
        &["python3-libvirt"],
    ),
];

/// Installs the packages of `needs` whose file is missing, in one apt-get run.
fn ensure_packages(needs: &[&[(&str, &[&str])]]) -> anyhow::Result<()> {
    let missing: Vec<&str> = needs
        .iter()
        .flat_map(|n| n.iter())
        .filter(|(file, _)| !Path::new(file).exists())
        .flat_map(|(_, packages)| packages.iter().copied())
        .collect();
    install(&missing)
}

/// Installs `packages` in one apt-get run (nothing when empty).
fn install(packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    println!("==> installing {}", packages.join(" "));
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(packages);
    let apt = Apt::new()?;
    if apt.get(&args, None).is_err() {
        // Package lists from an earlier run may name versions the mirror no longer has.
        apt.get(&["update", "-qq"], None)?;
        apt.get(&args, None)?;
    }
    Ok(())
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
