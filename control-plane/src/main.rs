//! `mcp-control-plane`: configuration from the environment, logging, signal
//! handling; everything else is in the library (`server::run`).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use mcp_control_plane::config::Config;
use mcp_control_plane::server;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mcp-control-plane: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcp-control-plane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // Not spawned: driven on this task, so it needs no `Send` bound.
        let run = server::run(config, stop_rx);
        tokio::pin!(run);
        let result = tokio::select! {
            r = &mut run => r,
            _ = server::shutdown_signal() => {
                tracing::info!("shutting down");
                let _ = stop_tx.send(true);
                match tokio::time::timeout(Duration::from_secs(10), &mut run).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!("graceful shutdown timed out");
                        return ExitCode::SUCCESS;
                    }
                }
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mcp-control-plane: {e}");
                ExitCode::FAILURE
            }
        }
    });
    let _ = std::io::stdout().flush();
    runtime.shutdown_background();
    code
}
