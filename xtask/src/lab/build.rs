//! What the lab's machines boot, built from Debian packages only (docs/lab.md):
//!
//! - the **deploy environment** (`boot/vmlinuz`, `boot/initrd.img`): the kernel of
//!   `linux-image-amd64` and an initramfs of `busybox-static` plus Dropbear (`dropbear-bin`,
//!   with the libraries it links), the virtio network and disk modules, and an `/init` that
//!   brings the network up with DHCP, starts the SSH server with the lab's host key and the
//!   provider's public key, then checks in with its one-time token. Busybox and Dropbear
//!   rather than an agent of ours: the Redfish provider's in-band steps are commands over
//!   SSH, and this is the smallest thing that runs them (about 3 MB compressed);
//! - **disk images** (`boot/NAME.img` and `boot/NAME.img.sha256`): 32 MiB with an MBR, one
//!   FAT partition and SYSLINUX, the same kernel and an initramfs that says
//!   `booted image NAME` on the console, answers SSH, and has the stand-ins of the cluster
//!   steps. `lab-corrupt.img` is `lab-a`'s bytes published with a wrong checksum;
//! - the **keys**: the provider's SSH key and the machines' host key (one for the deploy
//!   environment and every image, pinned in the lab's known_hosts).
//!
//! Built once; a change of this file's recipe ([`RECIPE`]) builds everything again.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};

use super::{Apt, find_file, have};

/// Bump when what is built changes, so that an older build is not reused.
const RECIPE: &str = "lab-build-4";

/// The images the lab publishes, with the checksum published for each.
pub(crate) const IMAGES: [&str; 2] = ["lab-a", "lab-b"];

/// An image whose published checksum is wrong (its bytes are `lab-a`'s).
pub(crate) const CORRUPT_IMAGE: &str = "lab-corrupt";

/// The kernel modules loaded at boot, in dependency order (the Debian kernel builds virtio
/// as modules; the initramfs has no modules.dep).
const MODULES: [&str; 9] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
];

const INIT: &str = r#"#!/bin/sh
# The /init of the lab's deploy environment and images (docs/lab.md).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /run /var/log
mount -t devpts devpts /dev/pts
if [ -f /etc/bm-image ]; then role="image $(cat /etc/bm-image)"; else role=deploy; fi
echo "bm-lab: $role: up" > /dev/console
for m in MODULES; do
  insmod "/lib/modules/$m.ko" || echo "bm-lab: insmod $m failed" > /dev/console
done
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -n -q -t 10 -T 2 -s /etc/udhcpc.sh > /dev/console 2>&1
dropbear -r /etc/dropbear/host_key -s -P /run/dropbear.pid
if [ "$role" = deploy ]; then
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
else
  echo "booted image $(cat /etc/bm-image)" > /dev/console
fi
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

/// The deploy environment's repave command (`[redfish.commands] repave`).
const WRITE_IMAGE: &str = r#"#!/bin/sh
# bm-write-image URL SHA256: writes the image at URL to the first disk, reports the SHA-256
# of the bytes it wrote (as they went to the disk), and when that is the expected one,
# reboots into it once this SSH session has ended (as Ironic's agent ends a deploy).
# Otherwise it erases the start of the disk, so that nothing boots a corrupt image, and
# stays, so that the step can be retried.
set -e -o pipefail
url="$1" want="$2" disk=/dev/vda
echo "bm-deploy: writing $url to $disk"
sum=$(wget -q -O- "$url" | tee "$disk" | sha256sum | cut -d' ' -f1)
sync
echo "bm-deploy: wrote the image; its sha256 is $sum"
echo "bm-image-sha256: $sum"
if [ "$sum" != "$want" ]; then
  dd if=/dev/zero of="$disk" bs=1M count=1 conv=fsync 2>/dev/null
  echo "bm-deploy: the image is not what was published ($want); erased its start, not rebooting"
  exit 0
fi
echo "bm-deploy: the image is intact; rebooting into it once this command has ended"
# No new SSH session may reach the deploy environment once this step ended. The reboot
# waits for this command's parent (the shell of the SSH session, or the session) to end,
# at most 10 s, and a second more for the exit status to reach the provider.
kill "$(cat /run/dropbear.pid)"
parent=$PPID
(
  n=0
  while kill -0 "$parent" 2> /dev/null && [ "$n" -lt 50 ]; do sleep 0.2; n=$((n + 1)); done
  sleep 1
  sync
  reboot -f
) < /dev/null > /dev/null 2>&1 &
"#;

/// The images' join-cluster stand-in: records the cluster and the token (on stdin).
const JOIN: &str = r#"#!/bin/sh
# bm-lab-join CLUSTER: the lab's stand-in for joining a cluster.
[ -f /etc/bm-image ] || { echo "bm-lab: not booted from an image (still the deploy environment?)" >&2; exit 1; }
token=$(cat)
[ -n "$token" ] || { echo "bm-lab: no join token on stdin" >&2; exit 1; }
echo "$1" > /run/bm-cluster
echo "bm-lab: image $(cat /etc/bm-image) joined cluster $1 (stand-in)"
"#;

/// The images' verify-in-cluster stand-in: the booted image and the joined cluster.
const VERIFY: &str = r#"#!/bin/sh
# bm-lab-verify IMAGE CLUSTER: succeeds when this system booted IMAGE and joined CLUSTER.
booted=$(cat /etc/bm-image 2>/dev/null || echo "the deploy environment")
[ "$booted" = "$1" ] || { echo "bm-lab: booted $booted, not image $1" >&2; exit 1; }
[ "$(cat /run/bm-cluster 2>/dev/null)" = "$2" ] || { echo "bm-lab: not in cluster $2" >&2; exit 1; }
echo "booted image $1, in cluster $2"
"#;

/// Where the lab's built artifacts are.
pub(crate) struct Built {
    /// The boot service's directory: the deploy kernel and initrd, the images.
    pub(crate) boot: PathBuf,
    /// The provider's SSH private key.
    pub(crate) ssh_key: PathBuf,
    /// `ssh-ed25519 AAAA...`: the machines' host key.
    pub(crate) host_key: String,
}

/// Builds what is missing or stale under `lab` (`target/lab`).
pub(crate) fn build(lab: &Path) -> anyhow::Result<Built> {
    let boot = lab.join("boot");
    let keys = lab.join("keys");
    let stamp = boot.join(".recipe");
    let built = Built {
        boot: boot.clone(),
        ssh_key: keys.join("id_ed25519"),
        host_key: String::new(),
    };
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == RECIPE) {
        let host_key = std::fs::read_to_string(keys.join("host_key.pub"))?;
        return Ok(Built {
            host_key: host_key.trim().to_owned(),
            ..built
        });
    }
    println!(
        "==> building the deploy environment and the disk images (Debian kernel, busybox, dropbear)"
    );
    let cache = lab.join("cache");
    let _ = std::fs::remove_dir_all(&boot);
    let _ = std::fs::remove_dir_all(&keys);
    for dir in [&cache, &boot, &keys] {
        std::fs::create_dir_all(dir)?;
    }
    let host_key = make_keys(&keys)?;
    let tree = cache.join("kernel");
    let _ = std::fs::remove_dir_all(&tree);
    let deb = kernel_deb(&cache)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    let vmlinuz = std::fs::read_dir(tree.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .context("the kernel package has no /boot/vmlinuz-*")?;
    std::fs::copy(&vmlinuz, boot.join("vmlinuz"))?;

    initramfs(&tree, &keys, None, &boot.join("initrd.img"), &cache)?;
    for name in IMAGES {
        let initrd = cache.join(format!("{name}.initrd.img"));
        initramfs(&tree, &keys, Some(name), &initrd, &cache)?;
        let img = boot.join(format!("{name}.img"));
        disk_image(&vmlinuz, &initrd, &img, &cache)?;
        let sum = sha256(&img)?;
        std::fs::write(
            boot.join(format!("{name}.img.sha256")),
            format!("{sum}  {name}.img\n"),
        )?;
    }
    std::fs::copy(
        boot.join(format!("{}.img", IMAGES[0])),
        boot.join(format!("{CORRUPT_IMAGE}.img")),
    )?;
    std::fs::write(
        boot.join(format!("{CORRUPT_IMAGE}.img.sha256")),
        format!("{}  {CORRUPT_IMAGE}.img\n", "0".repeat(64)),
    )?;
    std::fs::write(&stamp, RECIPE)?;
    Ok(Built { host_key, ..built })
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

/// The provider's key pair and the machines' host key; returns the host key's public line.
fn make_keys(keys: &Path) -> anyhow::Result<String> {
    run(Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "bm-lab-provider",
            "-f",
        ])
        .arg(keys.join("id_ed25519")))?;
    run(Command::new("dropbearkey")
        .args(["-t", "ed25519", "-f"])
        .arg(keys.join("host_key"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null()))?;
    let out = Command::new("dropbearkey")
        .args(["-y", "-f"])
        .arg(keys.join("host_key"))
        .output()
        .context("running dropbearkey -y")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("ssh-ed25519 "))
        .context("dropbearkey -y printed no ssh-ed25519 key")?;
    // "ssh-ed25519 BASE64 comment": the comment is not part of a known_hosts entry.
    let public: Vec<&str> = line.split_whitespace().take(2).collect();
    let public = public.join(" ");
    std::fs::write(keys.join("host_key.pub"), &public)?;
    Ok(public)
}

/// An initramfs: the deploy environment (`image` None) or the one of image `image`.
fn initramfs(
    kernel: &Path,
    keys: &Path,
    image: Option<&str>,
    out: &Path,
    cache: &Path,
) -> anyhow::Result<()> {
    let rd = cache.join("initramfs");
    let _ = std::fs::remove_dir_all(&rd);
    for dir in [
        "bin",
        "sbin",
        "lib/modules",
        "lib64",
        "proc",
        "sys",
        "dev",
        "etc/dropbear",
        "tmp",
        "root/.ssh",
    ] {
        std::fs::create_dir_all(rd.join(dir))?;
    }
    std::fs::copy("/bin/busybox", rd.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", rd.join("bin/sh"))?;
    for m in MODULES {
        let found = find_file(&kernel.join("lib/modules"), &format!("{m}.ko"))
            .with_context(|| format!("the kernel package has no {m}.ko"))?;
        std::fs::copy(found, rd.join(format!("lib/modules/{m}.ko")))?;
    }
    // Dropbear and the libraries it links (ldd's absolute paths, copied to the same place).
    let dropbear = Path::new("/usr/sbin/dropbear");
    std::fs::copy(dropbear, rd.join("bin/dropbear"))?;
    let ldd = Command::new("ldd")
        .arg(dropbear)
        .output()
        .context("running ldd")?;
    ensure!(ldd.status.success(), "ldd {} failed", dropbear.display());
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = rd.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().context("a library's directory")?)?;
        std::fs::copy(lib, &to).with_context(|| format!("copying {lib}"))?;
    }
    std::fs::copy(keys.join("host_key"), rd.join("etc/dropbear/host_key"))?;
    std::fs::copy(
        keys.join("id_ed25519.pub"),
        rd.join("root/.ssh/authorized_keys"),
    )?;
    let mut files: Vec<(&str, String)> = vec![
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n".into()),
        ("etc/group", "root:x:0:\n".into()),
        ("etc/shells", "/bin/sh\n".into()),
        ("etc/udhcpc.sh", UDHCPC.into()),
        ("init", INIT.replace("MODULES", &MODULES.join(" "))),
    ];
    match image {
        None => files.push(("bin/bm-write-image", WRITE_IMAGE.into())),
        Some(name) => {
            files.push(("etc/bm-image", format!("{name}\n")));
            files.push(("bin/bm-lab-join", JOIN.into()));
            files.push(("bin/bm-lab-verify", VERIFY.into()));
        }
    }
    for (path, text) in &files {
        std::fs::write(rd.join(path), text)?;
        if text.starts_with("#!") {
            std::fs::set_permissions(rd.join(path), std::fs::Permissions::from_mode(0o755))?;
        }
    }
    for (path, mode) in [
        ("root", 0o700),
        ("root/.ssh", 0o700),
        ("root/.ssh/authorized_keys", 0o600),
        ("etc/dropbear/host_key", 0o600),
    ] {
        std::fs::set_permissions(rd.join(path), std::fs::Permissions::from_mode(mode))?;
    }
    let pack = format!(
        "cd '{}' && find . | busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -9 > '{}'",
        rd.display(),
        out.display()
    );
    run(Command::new("bash").args(["-o", "pipefail", "-c", &pack]))
}

/// A bootable disk image: MBR, one FAT partition from sector 2048 with SYSLINUX, the kernel
/// and `initrd`. Built without loop devices or mounts (mtools).
fn disk_image(vmlinuz: &Path, initrd: &Path, out: &Path, cache: &Path) -> anyhow::Result<()> {
    const SIZE: u64 = 32 << 20;
    const START: u64 = 2048;
    let sectors = SIZE / 512 - START;
    let part = cache.join("part.img");
    let _ = std::fs::remove_file(&part);
    std::fs::File::create(&part)?.set_len(sectors * 512)?;
    run(Command::new("mkfs.vfat")
        .args(["-n", "BMLAB"])
        .arg(&part)
        .stdout(std::process::Stdio::null()))?;
    let cfg = cache.join("syslinux.cfg");
    // No SERIAL line: with SeaBIOS's serial console it would print every line twice.
    std::fs::write(
        &cfg,
        "DEFAULT image\nPROMPT 0\nTIMEOUT 0\nLABEL image\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND console=ttyS0,115200 panic=5\n",
    )?;
    for (from, to) in [
        (vmlinuz, "::/vmlinuz"),
        (initrd, "::/initrd.img"),
        (cfg.as_path(), "::/syslinux.cfg"),
    ] {
        run(Command::new("mcopy").arg("-i").arg(&part).arg(from).arg(to))?;
    }
    run(Command::new("syslinux").arg("--install").arg(&part))?;

    let mut disk = std::fs::read("/usr/lib/syslinux/mbr/mbr.bin")
        .context("reading SYSLINUX's MBR (package syslinux-common)")?;
    ensure!(disk.len() <= 440, "mbr.bin is larger than 440 bytes");
    disk.resize(512, 0);
    // One active FAT32 (LBA) partition; CHS fields saturated, as for any LBA disk.
    let mut entry = vec![0x80, 0xfe, 0xff, 0xff, 0x0c, 0xfe, 0xff, 0xff];
    entry.extend_from_slice(&u32::try_from(START)?.to_le_bytes());
    entry.extend_from_slice(&u32::try_from(sectors)?.to_le_bytes());
    disk[446..462].copy_from_slice(&entry);
    disk[510] = 0x55;
    disk[511] = 0xaa;
    disk.resize(usize::try_from(START * 512)?, 0);
    disk.extend_from_slice(&std::fs::read(&part)?);
    std::fs::write(out, disk)?;
    Ok(())
}

/// The hex SHA-256 of a file (coreutils' sha256sum).
pub(crate) fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum")?;
    ensure!(out.status.success(), "sha256sum {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .context("sha256sum printed nothing")
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
    ensure!(
        have("apt-get"),
        "downloading the kernel package needs apt-get"
    );
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
