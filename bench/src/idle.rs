//! Idle memory: connect clients in steps (e.g. 1k, then up to 10k), let the server settle,
//! and read its resident memory before and after each step.

use std::time::Duration;

use anyhow::Result;
use derp_client::{Client, TlsTrust};
use serde::Serialize;
use tokio::time::Instant;

use crate::procfs;

#[derive(Debug, Clone, Serialize)]
pub struct IdleStep {
    pub clients: usize,
    pub rss_kib: u64,
    pub fds: u64,
    /// (RSS now - RSS with no clients) / clients, in KiB.
    pub kib_per_client: f64,
    pub connect_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    pub rss_before_kib: u64,
    pub steps: Vec<IdleStep>,
}

pub async fn run(
    url: &str,
    trust: &TlsTrust,
    steps: &[usize],
    pid: u32,
    settle: Duration,
) -> Result<IdleResult> {
    let before = procfs::rss_kib(pid)?;
    let mut held: Vec<Client> = Vec::new();
    let mut out = Vec::new();
    for &target in steps {
        let start = Instant::now();
        let more = target.saturating_sub(held.len());
        held.extend(crate::load::connect_many(url, trust, more).await?);
        let connect_secs = start.elapsed().as_secs_f64();
        tokio::time::sleep(settle).await;
        let rss = procfs::rss_kib(pid)?;
        let step = IdleStep {
            clients: held.len(),
            rss_kib: rss,
            fds: procfs::open_fds(pid)?,
            kib_per_client: rss.saturating_sub(before) as f64 / held.len().max(1) as f64,
            connect_secs,
        };
        eprintln!(
            "idle: {} clients, RSS {} KiB (+{:.1} KiB/client), connected in {:.1} s",
            step.clients, step.rss_kib, step.kib_per_client, step.connect_secs
        );
        out.push(step);
    }
    Ok(IdleResult {
        rss_before_kib: before,
        steps: out,
    })
}
