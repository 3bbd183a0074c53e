//! `amicus-registry`: the registry service on its own, without the station runtime (what the
//! registry's container image runs). `amicus registry serve|user add` are the same commands.

use amicus_registryd::{ServeCommand, UserAddCommand};
use clap::{Parser, Subcommand};

/// The amicus registry: stations pull work from it, researchers submit trains, tasks and
/// federated jobs to it, auditors read its trail. It never runs trains.
#[derive(Parser)]
#[command(name = "amicus-registry", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry service until SIGTERM or SIGINT (requests in flight finish first).
    Serve(ServeCommand),
    /// People, added directly in the database (the way to create the first admin).
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a person with a role; prints the token once (or writes it with --token-out).
    Add(UserAddCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match &cli.command {
            Command::Serve(c) => amicus_registryd::serve(c).await,
            Command::User(UserCommand::Add(c)) => amicus_registryd::user_add(c).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
