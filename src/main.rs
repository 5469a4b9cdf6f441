//! `image-queue`: one binary for every role.
//!
//! `up` runs everything in one process on embedded defaults; `api` runs the
//! HTTP API alone; `worker --stage X` runs one stage, on any host, as many
//! times as a hot stage needs; the rest are operator tools.
//!
//! This file reads the command line and the configuration and dispatches;
//! the commands live in their modules: `cli` (the flags), `compose` (Redis,
//! stages, API and webhooks put together), `up`, `vendors`, `models`, `ops`
//! (stats and dead letters), `bench`, `config` and `config_print`, and
//! `signals`.

mod bench;
mod bench_images;
mod bench_shares;
mod bench_window;
mod cli;
mod compose;
mod config;
mod config_print;
mod models;
mod ops;
mod signals;
mod up;
mod vendors;

use anyhow::{bail, Context};
use clap::Parser;
use image_queue_pipeline::runner::StageRunner;
use tracing::info;

use crate::cli::{BenchWhat, Cli, Command, ModelsAction};
use crate::config::Config;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        // Colours only for a person at a terminal, never into a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(url) = &cli.redis_url {
        config.redis_url = url.clone();
    }
    if let Some(url) = &cli.database_url {
        config.database_url = url.clone();
    }
    if let Some(dir) = &cli.data_dir {
        config.data_dir = dir.clone();
    }
    config.resolve_paths();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(cli.command, config))
}

async fn run(command: Command, mut config: Config) -> anyhow::Result<()> {
    match command {
        Command::Up { listen } => {
            if let Some(l) = listen {
                config.listen = l;
            }
            up::up(config).await
        }
        Command::Api { listen } => {
            if let Some(l) = listen {
                config.listen = l;
            }
            let p = compose::connect(&config).await?;
            let shutdown = signals::shutdown_on_signal();
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            compose::serve_api_on(&config, p, listener, shutdown).await
        }
        Command::Worker {
            stage: name,
            concurrency,
            metrics_listen,
        } => {
            if let Some(c) = concurrency {
                if c == 0 {
                    bail!("--concurrency must be at least 1");
                }
                config.concurrency.insert(name.as_str().into(), c);
            }
            image_queue_api::metrics::install();
            let p = compose::connect(&config).await?;
            let shutdown = signals::shutdown_on_signal();
            if let Some(addr) = metrics_listen {
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?;
                let s = shutdown.clone();
                tokio::spawn(async move {
                    let router = axum::Router::new().route(
                        "/metrics",
                        axum::routing::get(|| async { image_queue_api::metrics::install().render() }),
                    );
                    axum::serve(listener, router)
                        .with_graceful_shutdown(async move { s.cancelled().await })
                        .await
                        .ok();
                });
            }
            let stage = compose::build_stage(name, &config, &p).await?;
            StageRunner::new(p, stage, config.runner(name)).run(shutdown).await?;
            Ok(())
        }
        Command::Migrate => {
            std::fs::create_dir_all(&config.data_dir).ok();
            image_queue_stages::db_commit::connect(&config.database_url(), 1)
                .await
                .context("connecting to the database")?;
            info!("migrations applied");
            Ok(())
        }
        Command::Vendors { action } => vendors::command(&config, action).await,
        Command::Webhooks => {
            let p = compose::connect(&config).await?;
            let shutdown = signals::shutdown_on_signal();
            compose::deliver_webhooks(&config, p, shutdown).await
        }
        Command::Stats { json, every } => {
            let p = compose::connect(&config).await?;
            ops::stats(&p, json, std::time::Duration::from_secs(every.max(1))).await
        }
        Command::Dlq { action } => {
            let p = compose::connect(&config).await?;
            ops::dlq_command(&p, action).await
        }
        Command::Bench { what } => {
            if config.redis_url.is_empty() {
                bail!("pass --redis-url (or REDIS_URL): the benchmark runs on a Redis of yours, under keys of its own");
            }
            match what {
                BenchWhat::Pipeline {
                    jobs,
                    rate,
                    concurrency,
                    window,
                    min_replicas,
                } => {
                    bench::pipeline(bench::BenchArgs {
                        redis_url: config.redis_url.clone(),
                        jobs,
                        rate,
                        concurrency,
                        window,
                        min_replicas,
                    })
                    .await
                }
                BenchWhat::Window {
                    work_ms,
                    concurrency,
                    phase_s,
                } => {
                    bench_window::window(bench_window::WindowArgs {
                        redis_url: config.redis_url.clone(),
                        work: std::time::Duration::from_millis(work_ms.max(1)),
                        concurrency: concurrency.max(1),
                        phase: std::time::Duration::from_secs(phase_s.max(5)),
                    })
                    .await
                }
                BenchWhat::Shares {
                    backlog,
                    work_ms,
                    concurrency,
                } => {
                    bench_shares::shares(bench_shares::SharesArgs {
                        redis_url: config.redis_url.clone(),
                        backlog: backlog.max(100),
                        work: std::time::Duration::from_millis(work_ms),
                        concurrency: concurrency.max(1),
                    })
                    .await
                }
                BenchWhat::Images { images, photos } => {
                    let redis_url = config.redis_url.clone();
                    let args = bench_images::ImagesArgs {
                        images: images.max(1),
                        photos,
                    };
                    bench_images::images(&redis_url, config, args).await
                }
                BenchWhat::Fairness {
                    backlog,
                    work_ms,
                    concurrency,
                    window,
                    real,
                    modes,
                    no_drain,
                } => {
                    bench::fairness(bench::FairnessArgs {
                        redis_url: config.redis_url.clone(),
                        backlog,
                        work: work_ms.into_iter().map(std::time::Duration::from_millis).collect(),
                        concurrency: concurrency.max(1),
                        window: window.max(1),
                        real,
                        modes,
                        drain: !no_drain,
                    })
                    .await
                }
            }
        }
        Command::Config => {
            print!("{}", config.to_display_toml()?);
            Ok(())
        }
        Command::Models {
            action: ModelsAction::Fetch { dir, from },
        } => {
            let dir = dir.unwrap_or_else(|| config.data_dir.join("models"));
            models::fetch_u2netp(&dir, from.as_deref()).await
        }
    }
}
