//! The commands: one module per group, each function taking its parsed arguments and the
//! connected clients and returning the exit code.

mod generate;
mod machines;
mod operations;
mod plans;
mod rollouts;
mod streams;
mod version;

use crate::config::{self as file, Config};
use crate::connect::{Clients, Settings, connect};
use crate::flags::{Cli, Command, ConfigCommand, OpType, Output};
use crate::render::Palette;

/// Runs a command line; returns the exit code. Commands that need no server (completion,
/// man) do not connect.
pub(crate) async fn run(cli: Cli) -> anyhow::Result<u8> {
    let pal = Palette::color();
    let json = cli.output == Output::Json;
    let mut c: Clients = match &cli.command {
        Command::Completion { shell } => return generate::completion(*shell),
        Command::Man { dir } => return generate::man(dir.as_deref()),
        Command::Config(cmd) => return config(&cli, cmd),
        _ => connect(&Settings::resolve(&cli)?).await?,
    };
    let c = &mut c;
    let pal = &pal;
    match cli.command {
        Command::Import(args) => machines::import(c, args, json, pal).await,
        Command::List(args) => machines::list(c, args, json, pal).await,
        Command::Stats => machines::stats(c, json).await,
        Command::Get { machine } => machines::get(c, machine, json, pal).await,
        Command::Events { machine, after } => machines::events(c, machine, after, json).await,
        Command::Update(args) => machines::update(c, args, json, pal).await,
        Command::Ops(args) => operations::list(c, args, json, pal).await,
        Command::Op { operation } => operations::get(c, operation, json, pal).await,
        Command::EnterMaintenance(a) => {
            operations::start(c, OpType::EnterMaintenance, a, json, pal).await
        }
        Command::ExitMaintenance(a) => {
            operations::start(c, OpType::ExitMaintenance, a, json, pal).await
        }
        Command::Reimage(a) => operations::start(c, OpType::Reimage, a, json, pal).await,
        Command::Reboot(a) => operations::start(c, OpType::Reboot, a, json, pal).await,
        Command::Rma(a) => operations::start(c, OpType::Rma, a, json, pal).await,
        Command::Retire(a) => operations::start(c, OpType::Retire, a, json, pal).await,
        Command::Upgrade(a) => operations::start(c, OpType::Upgrade, a, json, pal).await,
        Command::NetReconfig(a) => operations::start(c, OpType::NetReconfig, a, json, pal).await,
        Command::ClearIntervention(a) => {
            operations::start(c, OpType::ClearIntervention, a, json, pal).await
        }
        Command::Readmit(a) => operations::start(c, OpType::Readmit, a, json, pal).await,
        Command::Follow { operation } => operations::follow(c, operation, json, pal).await,
        Command::Cancel { operation } => operations::cancel(c, operation, json, pal).await,
        Command::Watch(args) => streams::watch(c, args, json, pal).await,
        Command::Logs { operation, after } => streams::logs(c, operation, after, json, pal).await,
        Command::Plans => plans::plans(c, json, pal).await,
        Command::Rollout(cmd) => rollouts::run(c, cmd, json, pal).await,
        Command::Version => version::version(c, json).await,
        Command::Completion { .. } | Command::Man { .. } | Command::Config(_) => {
            unreachable!("answered above without a server")
        }
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints a resource as JSON or through its renderer; exit code 0.
fn show<T: serde::Serialize>(
    json: bool,
    value: &T,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<u8> {
    if json {
        print_json(value)?;
    } else {
        out!("{}", render(value));
    }
    Ok(0)
}

/// `bmctl config ...`.
#[allow(clippy::print_stdout, reason = "the command's output")]
fn config(cli: &Cli, cmd: &ConfigCommand) -> anyhow::Result<u8> {
    let Some(path) = file::path() else {
        anyhow::bail!("no configuration file: set BMCTL_CONFIG or HOME");
    };
    let mut config = Config::load(&path)?;
    match cmd {
        ConfigCommand::GetContexts => {
            for (name, c) in &config.contexts {
                let mark = if config.current_context.as_deref() == Some(name) {
                    "*"
                } else {
                    " "
                };
                let server = c.server.as_deref().unwrap_or("-");
                println!("{mark} {name}\t{server}");
            }
        }
        ConfigCommand::UseContext { name } => {
            anyhow::ensure!(
                config.contexts.contains_key(name),
                "no context named {name:?} in {}; `bmctl config set-context {name} --server ...` makes one",
                path.display()
            );
            config.current_context = Some(name.clone());
            config.save(&path)?;
            println!("current context: {name}");
        }
        ConfigCommand::SetContext { name } => {
            let c = config.contexts.entry(name.clone()).or_default();
            if let Some(s) = &cli.server {
                c.server = Some(s.clone());
            }
            if let Some(v) = &cli.ca {
                c.ca = Some(v.clone());
            }
            if let Some(v) = &cli.cert {
                c.cert = Some(v.clone());
            }
            if let Some(v) = &cli.key {
                c.key = Some(v.clone());
            }
            if let Some(v) = &cli.token_file {
                c.token_file = Some(v.clone());
            }
            if config.current_context.is_none() {
                config.current_context = Some(name.clone());
            }
            config.save(&path)?;
            println!("context {name} saved in {}", path.display());
        }
    }
    Ok(0)
}
