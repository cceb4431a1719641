//! `bmctl completion` and `bmctl man`: generated from the clap definitions, so that they
//! always match the commands; they need no server.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::flags::Cli;

/// `bmctl completion SHELL`: the shell's completion script on stdout.
pub(super) fn completion(shell: clap_complete::Shell) -> anyhow::Result<u8> {
    out!("{}", completion_script(shell));
    Ok(0)
}

fn completion_script(shell: clap_complete::Shell) -> String {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "bmctl", &mut script);
    String::from_utf8_lossy(&script).into_owned()
}

/// `bmctl man [--dir DIR]`: bmctl(1) on stdout, or every page written into `dir`.
pub(super) fn man(dir: Option<&Path>) -> anyhow::Result<u8> {
    match dir {
        None => out!("{}", man_page()?),
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), dir)
                .with_context(|| format!("writing the man pages into {}", dir.display()))?;
            outln!("man pages written into {}", dir.display());
        }
    }
    Ok(0)
}

fn man_page() -> anyhow::Result<String> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    Ok(String::from_utf8(page)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of bmctl's commands (not `help`, which clap adds).
    fn commands() -> Vec<String> {
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .collect();
        assert!(names.len() > 20, "{names:?}");
        names
    }

    #[test]
    fn every_completion_script_offers_every_command() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
            clap_complete::Shell::Elvish,
            clap_complete::Shell::PowerShell,
        ] {
            let script = completion_script(shell);
            for c in commands() {
                assert!(script.contains(&c), "{shell}: no {c}");
            }
            // And the flags of a command.
            assert!(script.contains("request-id"), "{shell}: no --request-id");
        }
    }

    #[test]
    fn the_man_page_renders_with_every_command() {
        let page = man_page().unwrap();
        for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS", ".SH SUBCOMMANDS"] {
            assert!(page.contains(section), "no {section}:\n{page}");
        }
        assert!(page.contains("bmctl \\- Command line"), "{page}");
        for c in commands() {
            // Listed as bmctl-NAME(1), with roff's escaped hyphens.
            let entry = format!("bmctl\\-{}(1)", c.replace('-', "\\-"));
            assert!(page.contains(&entry), "no {entry}:\n{page}");
        }
    }

    #[test]
    fn man_dir_writes_a_page_per_command() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("man1");
        man(Some(&dir)).unwrap();
        assert!(dir.join("bmctl.1").is_file());
        for c in commands() {
            let page = dir.join(format!("bmctl-{c}.1"));
            assert!(page.is_file(), "no {}", page.display());
        }
    }
}
