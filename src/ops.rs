//! The operator commands: `stats` (a live table that says which stage to
//! scale) and `dlq` (list, show, replay and purge dead letters).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use image_queue_pipeline::dlq::{self, DeadLetter, Filter};
use image_queue_pipeline::stats::{self, PipelineStats};
use image_queue_pipeline::{now_ms, Pipeline, StageName};

/// Prints the stats: once as JSON, once as a table when not on a terminal,
/// or as a table refreshed every `every` until interrupted.
pub async fn stats(p: &Pipeline, json: bool, every: Duration) -> anyhow::Result<()> {
    if json {
        let s = stats::collect(p).await?;
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let live = std::io::stdout().is_terminal();
    loop {
        let s = stats::collect(p).await?;
        let mut out = String::new();
        if live {
            // Home and clear, so the table redraws in place.
            out.push_str("\x1b[H\x1b[2J");
        }
        out.push_str(&table(&s));
        if live {
            out.push_str(&format!("\n(refreshing every {} s; Ctrl-C to stop)\n", every.as_secs()));
        }
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(out.as_bytes())?;
        stdout.flush()?;
        drop(stdout);
        if !live {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The stats as a fixed-width table, with advice below it.
pub fn table(s: &PipelineStats) -> String {
    let mut out = format!(
        "{:<11} {:>7} {:>7} {:>8} {:>6} {:>6} {:>7} {:>7} {:>7} {:>10} {:>7} {:>6}\n",
        "STAGE",
        "LAG",
        "ACTIVE",
        "OLDEST",
        "RETRY",
        "THROTL",
        "WORKERS",
        "IMG/S1",
        "IMG/S5",
        "PROCESSED",
        "FAILED",
        "DEAD"
    );
    for st in &s.stages {
        let oldest = st
            .oldest_pending_ms
            .map(|ms| format!("{:.0}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<11} {:>7} {:>7} {:>8} {:>6} {:>6} {:>7} {:>7.2} {:>7.2} {:>10} {:>7} {:>6}\n",
            st.stage,
            st.lag,
            st.pending,
            oldest,
            st.retrying,
            st.throttled,
            st.live_workers,
            st.throughput_1m,
            st.throughput_5m,
            st.totals.processed,
            st.totals.failed,
            st.totals.dead
        ));
    }
    out.push_str(&format!(
        "\n{} live worker(s), {} dead letter(s)",
        s.workers.len(),
        s.dead_letters
    ));
    if !s.vendor_backlog.is_empty() {
        let mut v: Vec<_> = s.vendor_backlog.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = v.iter().take(5).map(|(k, n)| format!("{k} {n}")).collect();
        out.push_str(&format!(
            "; backlog by vendor{}: {}",
            if s.backlog_sampled { " (sampled)" } else { "" },
            top.join(", ")
        ));
    }
    out.push('\n');
    // What stages measure of their own work, per worker: bg-removal's
    // inference time and rate, to size its pool by.
    for w in s.workers.iter().filter(|w| !w.measures.is_empty()) {
        let figures: Vec<String> = w
            .measures
            .iter()
            .map(|(name, v)| match name.as_str() {
                "inference_ms" => format!("inference {v:.0} ms/image"),
                "images_per_s" => format!("{v:.2} images/s (last minute)"),
                "cpu_ms" => format!("CPU {v:.0} ms/image"),
                "cpu_wait_ms" => format!("waiting for a core {v:.0} ms/image"),
                _ => format!("{name} {v:.2}"),
            })
            .collect();
        out.push_str(&format!(
            "{} worker {} on {}: {}\n",
            w.stage,
            w.consumer,
            if w.host.is_empty() { "?" } else { &w.host },
            figures.join(", ")
        ));
    }
    if let Some(a) = &s.admission {
        out.push_str(&format!("Admission window: {} images ({})\n", a.window, a.reason));
    }
    let advice: Vec<&str> = s.stages.iter().filter_map(|st| st.advice.as_deref()).collect();
    if advice.is_empty() {
        out.push_str("Every stage keeps up.\n");
    } else {
        for a in advice {
            out.push_str(&format!("* {a}\n"));
        }
    }
    out
}

/// Which dead letters a command applies to.
#[derive(Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// Only this stage's.
    #[arg(long)]
    stage: Option<String>,
    #[arg(long)]
    vendor: Option<String>,
    #[arg(long)]
    job: Option<String>,
    /// Only those whose error contains this text (any case).
    #[arg(long)]
    error: Option<String>,
    /// Only those that failed at least this long ago: 30s, 10m, 2h, 3d.
    #[arg(long, value_parser = parse_age)]
    older_than: Option<u64>,
    /// Only those that failed at most this long ago.
    #[arg(long, value_parser = parse_age)]
    newer_than: Option<u64>,
}

impl FilterArgs {
    fn filter(&self) -> anyhow::Result<Filter> {
        Ok(Filter {
            stage: self.stage.as_deref().map(parse_stage).transpose()?,
            vendor: self.vendor.clone(),
            job: self.job.clone(),
            error: self.error.clone(),
            older_than_ms: self.older_than,
            newer_than_ms: self.newer_than,
        })
    }
}

/// An age such as `90s`, `10m`, `2h` or `3d`, in milliseconds.
fn parse_age(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 30s, 10m, 2h or 3d"))?;
    let ms = match unit {
        "ms" => 1,
        "s" | "" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    Ok(n.saturating_mul(ms))
}

fn parse_stage(s: &str) -> anyhow::Result<StageName> {
    StageName::parse(s)
        .with_context(|| format!("no stage {s:?}: rate-check, bg-removal, face-crop, resize, upload or db-commit"))
}

#[derive(Subcommand)]
pub enum DlqAction {
    /// List dead letters, newest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter, with its event.
    Show { id: String },
    /// Put dead letters back on the stage they failed in (or --to), with
    /// their attempts reset: the given ids, or every one matching the filter.
    Replay {
        ids: Vec<String>,
        /// The stage to replay into, instead of the one each failed in.
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        filter: FilterArgs,
        /// With no ids and no filter: replay every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters: the given ids, or every one matching the filter.
    Purge {
        ids: Vec<String>,
        #[command(flatten)]
        filter: FilterArgs,
        /// With no ids and no filter: delete every dead letter.
        #[arg(long)]
        all: bool,
    },
}

/// The ids a replay or purge applies to.
async fn select(p: &Pipeline, ids: Vec<String>, filter: &FilterArgs, all: bool) -> anyhow::Result<Vec<String>> {
    let f = filter.filter()?;
    if !ids.is_empty() {
        if !f.is_empty() {
            bail!("give dead-letter ids or a filter, not both");
        }
        return Ok(ids);
    }
    if f.is_empty() && !all {
        bail!(
            "give dead-letter ids, a filter (--stage, --vendor, --job, --error, --older-than, --newer-than) or --all"
        );
    }
    Ok(dlq::list(p, &f, dlq::SCAN_MAX)
        .await?
        .into_iter()
        .map(|d| d.id)
        .collect())
}

pub async fn dlq_command(p: &Pipeline, action: DlqAction) -> anyhow::Result<()> {
    match action {
        DlqAction::List { filter, limit, json } => {
            let items = dlq::list(p, &filter.filter()?, limit.max(1)).await?;
            if json {
                for d in &items {
                    println!("{}", serde_json::to_string(d)?);
                }
            } else {
                print_list(&items);
            }
        }
        DlqAction::Show { id } => match dlq::get(p, &id).await? {
            Some(d) => println!("{}", serde_json::to_string_pretty(&d)?),
            None => bail!("no dead letter {id}"),
        },
        DlqAction::Replay { ids, to, filter, all } => {
            let to = to.as_deref().map(parse_stage).transpose()?;
            let ids = select(p, ids, &filter, all).await?;
            let (mut ok, mut failed) = (0, 0);
            for id in &ids {
                match dlq::replay(p, id, to).await {
                    Ok(r) => {
                        ok += 1;
                        println!("replayed {id}: job {} image {} into {}", r.job, r.image, r.to);
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("not replayed {id}: {e}");
                    }
                }
            }
            eprintln!("{ok} replayed, {failed} not");
            if failed > 0 {
                bail!("{failed} dead letter(s) could not be replayed");
            }
        }
        DlqAction::Purge { ids, filter, all } => {
            let ids = select(p, ids, &filter, all).await?;
            let mut n = 0;
            for id in &ids {
                if dlq::delete(p, id).await? {
                    n += 1;
                }
            }
            eprintln!("purged {n} dead letter(s)");
        }
    }
    Ok(())
}

fn print_list(items: &[DeadLetter]) {
    if items.is_empty() {
        println!("No dead letters match.");
        return;
    }
    let now = now_ms();
    println!(
        "{:<17} {:>7} {:<11} {:<14} {:<33} {:>3} {:>3}  ERROR",
        "ID", "AGE", "STAGE", "VENDOR", "JOB", "IMG", "TRY"
    );
    for d in items {
        let age = now.saturating_sub(d.failed_ms) / 1000;
        let age = if age < 120 {
            format!("{age}s")
        } else if age < 7200 {
            format!("{}m", age / 60)
        } else {
            format!("{}h", age / 3600)
        };
        let error: String = d.error.chars().take(80).collect();
        println!(
            "{:<17} {:>7} {:<11} {:<14} {:<33} {:>3} {:>3}  {}",
            d.id, age, d.stage, d.vendor, d.job, d.image, d.attempts, error
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse() {
        assert_eq!(parse_age("90s"), Ok(90_000));
        assert_eq!(parse_age("10m"), Ok(600_000));
        assert_eq!(parse_age("2h"), Ok(7_200_000));
        assert_eq!(parse_age("3d"), Ok(259_200_000));
        assert!(parse_age("ten").is_err());
        assert!(parse_age("5y").is_err());
    }
}
