//! Leader election over a `coordination.k8s.io/v1` Lease (kube-lease-manager): only the holder
//! reconciles and writes the `derp-map` ConfigMap; every replica serves the map. The state is a
//! `watch::Receiver<bool>` the controller and the map task read. On shutdown the Lease is
//! released so a successor takes over at once rather than after the lease duration.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Lease timing (seconds). A leader renews `grace` before expiry, so 15/5 renews every ~10 s and
/// a crashed leader is replaced within 15 s; the same order as kube-controller-manager's
/// defaults (15 s lease, 10 s renew deadline).
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration_secs: u64,
    pub grace_secs: u64,
}

/// Retry delay when the Lease cannot be read or created at all (API server down at start).
const BUILD_RETRY: Duration = Duration::from_secs(2);

/// Runs the election until `cancel`, publishing leadership to `tx`. Always leaves `tx` false.
pub async fn run(
    client: Client,
    cfg: LeaseConfig,
    tx: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let manager = loop {
        let built = LeaseManagerBuilder::new(client.clone(), &cfg.name)
            .with_namespace(&cfg.namespace)
            .with_identity(&cfg.identity)
            .with_duration(cfg.duration_secs)
            .with_grace(cfg.grace_secs)
            .build()
            .await;
        match built {
            Ok(m) => break m,
            Err(e) => {
                warn!(lease = %cfg.name, "leader election: {e}; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => { tx.send_replace(false); return }
                    _ = tokio::time::sleep(BUILD_RETRY) => {}
                }
            }
        }
    };
    let (mut rx, task) = manager.watch().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = rx.changed() => {
                if r.is_err() { break }
                let leading = *rx.borrow_and_update();
                info!(identity = %cfg.identity, leading, "leadership changed");
                tx.send_replace(leading);
            }
        }
    }
    // Stop acting first, then hand the Lease back (dropping the receiver makes the manager
    // release it and end).
    tx.send_replace(false);
    drop(rx);
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(Ok(Ok(_))) => info!("lease released"),
        Ok(Ok(Err(e))) => warn!("releasing the lease: {e}"),
        Ok(Err(e)) => warn!("lease task: {e}"),
        // The API server may be gone already; the Lease then expires on its own.
        Err(_) => warn!("releasing the lease timed out"),
    }
}
