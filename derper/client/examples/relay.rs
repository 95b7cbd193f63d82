//! Relay benchmark: connects two clients to one server, sends N packets of one size from A to B
//! with at most WINDOW in flight (Go's server queues 32 per client and drops the oldest beyond
//! that), and prints packets/s and MB/s as measured at the receiver.
//!
//! ```text
//! cargo run --release -p derp-client --example relay -- URL [--pin sha256-raw:HEX | --insecure]
//!     [-n PACKETS] [-s BYTES] [-w WINDOW] [--ws] [--no-fast-start]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use derp_client::{Client, ClientConfig, ClientError, ServerToClient, TlsTrust, Transport};
use derp_proto::NodePrivate;
use tokio::sync::Notify;

struct Args {
    url: String,
    tls: TlsTrust,
    packets: u64,
    size: usize,
    window: u64,
    transport: Transport,
    fast_start: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        url: String::new(),
        tls: TlsTrust::WebPki,
        packets: 100_000,
        size: 1280,
        window: 24,
        transport: Transport::Derp,
        fast_start: true,
    };
    let num = |v: Option<String>, what: &str| -> Result<u64, String> {
        v.ok_or(format!("{what} needs a value"))?
            .parse()
            .map_err(|e| format!("{what}: {e}"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--pin" => {
                let v = it.next().ok_or("--pin needs a value")?;
                a.tls = TlsTrust::from_sha256_raw(&v).map_err(|e| e.to_string())?;
            }
            "--insecure" => a.tls = TlsTrust::Insecure,
            "-n" => a.packets = num(it.next(), "-n")?,
            "-s" => a.size = num(it.next(), "-s")? as usize,
            "-w" => a.window = num(it.next(), "-w")?.max(1),
            "--ws" => a.transport = Transport::WebSocket,
            "--no-fast-start" => a.fast_start = false,
            s if !s.starts_with('-') && a.url.is_empty() => a.url = s.to_owned(),
            s => return Err(format!("unknown argument {s:?}")),
        }
    }
    if a.url.is_empty() {
        return Err("usage: relay URL [--pin sha256-raw:HEX | --insecure] [-n N] [-s BYTES] [-w WINDOW] [--ws] [--no-fast-start]".into());
    }
    Ok(a)
}

async fn run(a: Args) -> Result<(), ClientError> {
    let cfg = |key| {
        let mut c = ClientConfig::new(a.url.clone(), key);
        c.tls = a.tls.clone();
        c.transport = a.transport;
        c.fast_start = a.fast_start;
        c
    };
    let (tx, _tx_rx) = Client::connect(&cfg(NodePrivate::generate()))
        .await?
        .split();
    let (rx_handle, mut rx) = Client::connect(&cfg(NodePrivate::generate()))
        .await?
        .split();
    println!(
        "connected: server {} fast_start={} tls={:?}",
        tx.server_key(),
        tx.conn_info().fast_start,
        tx.conn_info().tls_version
    );
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    // Wakes the sender when the receiver makes room in the window (no busy loop: the server
    // under test shares the CPU).
    let progress = Arc::new(Notify::new());
    let wake = progress.clone();
    let total = a.packets;
    let receiver = tokio::spawn(async move {
        let mut first = None;
        while counter.load(Ordering::Relaxed) < total {
            match rx.recv().await? {
                ServerToClient::RecvPacket { .. } => {
                    first.get_or_insert_with(Instant::now);
                    counter.fetch_add(1, Ordering::Relaxed);
                    wake.notify_one();
                }
                _ => continue,
            }
        }
        Ok::<_, ClientError>(first)
    });
    let dst = rx_handle.public_key();
    let packet = vec![0xa5u8; a.size];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        // Keep at most `window` packets between us and the receiver.
        let room = (received.load(Ordering::Relaxed) + a.window).saturating_sub(sent);
        if room == 0 {
            // notify_one stores a permit, so a wake between the check and here is not lost.
            progress.notified().await;
            continue;
        }
        let batch = room.min(total - sent);
        tx.send_packets(&dst, (0..batch).map(|_| packet.as_slice()))
            .await?;
        sent += batch;
    }
    match tokio::time::timeout(Duration::from_secs(10), receiver).await {
        Ok(Ok(res)) => {
            res?;
        }
        Ok(Err(e)) => return Err(ClientError::Closed(format!("receiver task: {e}"))),
        Err(_) => {
            let got = received.load(Ordering::Relaxed);
            println!("timed out: {got}/{total} received ({} lost)", total - got);
            return Ok(());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = total as f64 * a.size as f64;
    println!(
        "{total} packets of {} bytes in {secs:.3} s: {:.0} packets/s, {:.1} MB/s",
        a.size,
        total as f64 / secs,
        bytes / secs / 1e6
    );
    Ok(())
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("relay: {e}");
        std::process::exit(1);
    }
}
