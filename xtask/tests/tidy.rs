//! Tidy checks that run under plain `cargo test`: the dependency direction of the
//! architecture, and conventions every source file follows.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The normal (non-dev) dependencies of a package, by crate name.
fn dependencies(package: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .current_dir(root())
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .expect("cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn assert_free_of(package: &str, forbidden: &[&str]) {
    let deps = dependencies(package);
    for f in forbidden {
        assert!(
            !deps.iter().any(|d| d == f),
            "{package} must not depend on {f} (it does, directly or not)"
        );
    }
}

#[test]
fn bm_domain_knows_nothing_of_async_io_or_the_wire() {
    assert_free_of(
        "bm-domain",
        &[
            "tokio",
            "tonic",
            "prost",
            "bm-proto",
            "rusqlite",
            "async-trait",
        ],
    );
}

#[test]
fn the_engine_and_the_providers_know_nothing_of_grpc() {
    for package in [
        "bm-store",
        "bm-workflow",
        "bm-provider",
        "bm-provider-fake",
        "bm-provider-redfish",
    ] {
        assert_free_of(package, &["tonic", "prost", "bm-proto"]);
    }
    for provider in ["bm-provider", "bm-provider-fake", "bm-provider-redfish"] {
        assert_free_of(provider, &["bm-workflow", "bm-store"]);
    }
    assert_free_of("bm-store", &["bm-workflow", "bm-provider"]);
}

#[test]
fn only_the_adapters_use_the_wire_types() {
    let out = Command::new(env!("CARGO"))
        .current_dir(root())
        .args([
            "tree",
            "--offline",
            "--workspace",
            "-e",
            "normal",
            "-i",
            "bm-proto",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .expect("cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let users: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| n != "bm-proto")
        .collect();
    for user in &users {
        assert!(
            ["bm-server", "bm-cli", "bm-bench"].contains(&user.as_str()),
            "{user} uses bm-proto: only the adapters may"
        );
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && !name.to_string_lossy().starts_with('.') {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_says_what_it_is_for() {
    let mut files = Vec::new();
    rust_files(&root().join("crates"), &mut files);
    rust_files(&root().join("xtask"), &mut files);
    assert!(files.len() > 20, "found only {} files", files.len());
    let missing: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            !text.trim_start().starts_with("//!")
        })
        .map(|f| f.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "files without a //! header: {missing:?}"
    );
}

#[test]
fn no_debugging_leftovers() {
    let mut files = Vec::new();
    rust_files(&root().join("crates"), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            for bad in ["dbg!(", "todo!(", "unimplemented!(", "#[ignore"] {
                assert!(!line.contains(bad), "{}:{}: {bad}", f.display(), n + 1);
            }
        }
    }
}

/// The `.rs` files of bm-server's `src/`, with their path relative to it and their text.
fn server_sources() -> Vec<(String, String)> {
    let src = root().join("crates/bm-server/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 5, "found only {} files", files.len());
    files
        .into_iter()
        .map(|f| {
            let name = f.strip_prefix(&src).unwrap().display().to_string();
            (name, std::fs::read_to_string(&f).unwrap())
        })
        .collect()
}

/// A mention of `krate` in code, not in a comment (`//`, `//!`, `///`).
fn mentions(text: &str, krate: &str) -> bool {
    text.lines().any(|l| {
        let code = l.split("//").next().unwrap_or("");
        code.contains(krate)
    })
}

#[test]
fn the_server_library_knows_nothing_of_the_store() {
    // Only the binary opens a store and hands it to the engine; the library speaks the
    // engine's API and maps its error kinds (bm-server's package depends on bm-store for
    // main.rs alone, so cargo tree cannot tell; the sources can).
    let offenders: Vec<String> = server_sources()
        .into_iter()
        .filter(|(name, text)| name != "main.rs" && mentions(text, "bm_store"))
        .map(|(name, _)| name)
        .collect();
    assert!(
        offenders.is_empty(),
        "bm-server/src/{offenders:?} use bm_store: only main.rs may (the engine's API has \
         its own types; error.rs maps ErrorKind)"
    );
}

#[test]
fn only_convert_knows_both_wire_and_domain_types() {
    let offenders: Vec<String> = server_sources()
        .into_iter()
        .filter(|(name, text)| {
            name != "convert.rs" && mentions(text, "bm_domain") && mentions(text, "bm_proto")
        })
        .map(|(name, _)| name)
        .collect();
    assert!(
        offenders.is_empty(),
        "bm-server/src/{offenders:?} name both bm_domain and bm_proto: wire <-> domain \
         mapping belongs in convert.rs"
    );
}

/// Every file in the repository that is not plain text for people (Markdown).
fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        let name = entry.file_name();
        let hidden = name.to_string_lossy().starts_with('.') && name != ".ci";
        if name == "target" || hidden {
            continue;
        }
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_none_or(|e| e != "md") {
            out.push(path);
        }
    }
}

#[test]
fn nothing_reaches_outside_the_repository() {
    // A user's clone has nothing beside it: no team folder, no absolute paths of our machines.
    let outside = [
        concat!("../", "shared"),
        concat!("/wo", "rk/"),
        concat!("shared/", "tools/"),
    ];
    let mut files = Vec::new();
    source_files(&root(), &mut files);
    assert!(
        files.iter().any(|f| f.ends_with(".ci/run")),
        "the walk must see .ci/run"
    );
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            for bad in outside {
                assert!(
                    !line.contains(bad),
                    "{}:{}: names a path outside the repository ({bad})",
                    f.display(),
                    n + 1
                );
            }
        }
    }
}
