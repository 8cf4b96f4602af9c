//! `ragtune serve`: the OpenAI-compatible HTTP server ([`ragtune::serve`]).

use std::future::IntoFuture;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ragtune::serve::{router, ServeConfig};

use super::Context;

/// Arguments of `ragtune serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The address to listen on; anything but loopback needs --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// The port (0: any free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long, env = "RAGTUNE_API_KEY")]
    api_key: Option<String>,
    /// Answers generated at once.
    #[arg(long, default_value_t = ServeConfig::default().max_concurrent)]
    max_concurrent: usize,
    /// Requests that may wait for a slot; more get 503 with Retry-After.
    #[arg(long, default_value_t = ServeConfig::default().queue)]
    queue: usize,
    /// The default adapter of `hybrid`/`finetune` (a name under [adapters] or a directory).
    #[arg(long)]
    adapter: Option<String>,
    /// On SIGTERM or Ctrl-C, seconds to let in-flight answers finish before exiting.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.max_concurrent >= 1,
        "--max-concurrent {} must be at least 1",
        args.max_concurrent
    );
    if !args.host.is_loopback() && args.api_key.is_none() {
        anyhow::bail!(
            "--host {} listens beyond this machine: give --api-key KEY (or RAGTUNE_API_KEY) so \
             that only clients with the key are answered, or use --host 127.0.0.1",
            args.host
        );
    }
    let engine = Arc::new(ctx.engine(args.adapter.as_deref())?);
    let app = router(
        engine,
        ServeConfig {
            max_concurrent: args.max_concurrent,
            queue: args.queue,
            api_key: args.api_key,
        },
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let addr = SocketAddr::new(args.host, args.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let bound = listener.local_addr()?;
        eprintln!(
            "ragtune serve: listening on http://{bound} (OpenAI API under /v1; Ctrl-C stops)"
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut server = tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .into_future(),
        );
        tokio::select! {
            result = &mut server => return result?.context("serving"),
            () = shutdown_signal() => {}
        }
        eprintln!(
            "ragtune serve: stopping; finishing in-flight answers (up to {} s)",
            args.shutdown_timeout
        );
        let _ = stop_tx.send(());
        match tokio::time::timeout(Duration::from_secs(args.shutdown_timeout), server).await {
            Ok(result) => result?.context("serving")?,
            Err(_) => eprintln!(
                "ragtune serve: in-flight answers did not finish within {} s; exiting",
                args.shutdown_timeout
            ),
        }
        Ok(())
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
