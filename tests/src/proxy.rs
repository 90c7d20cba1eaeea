//! A TCP proxy for fault injection between gateway and ingest.
//!
//! Modes, switchable at any time:
//! - `Pass`: bytes flow both ways.
//! - `DropDownstream`: bytes from the upstream (ingest) to the client
//!   (gateway) are read and discarded; the client's bytes still arrive. Acks
//!   are lost while batches are stored: the classic lost-ack case.
//! - `Blackhole`: bytes are discarded both ways and connections stay open, as
//!   when packets vanish without a RST.
//! - `Refuse`: every open connection is closed and new ones are closed at once.
//! - `Reset`: like `Refuse`, but connections end with a TCP RST.
//! - `Delay(ms)`: bytes flow both ways, each direction delayed by `ms`
//!   (a round-trip time of twice that).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    DropDownstream,
    Blackhole,
    Refuse,
    Reset,
    Delay(u64),
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    task: JoinHandle<()>,
    /// Bytes forwarded from clients to the upstream.
    pub bytes_up: Arc<AtomicU64>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        // Clients of the proxy reach the upstream's TLS server.
        if let Some(ca) = crate::procs::ca_for(upstream) {
            crate::procs::note_ca(addr, &ca);
        }
        let (tx, _) = watch::channel(Mode::Pass);
        let mode = Arc::new(tx);
        let m = mode.clone();
        let bytes_up = Arc::new(AtomicU64::new(0));
        let counter = bytes_up.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = m.subscribe();
                match *rx.borrow() {
                    Mode::Refuse => {
                        drop(client);
                        continue;
                    }
                    Mode::Reset => {
                        // A zero linger makes close send RST and never blocks.
                        #[allow(deprecated)]
                        let _ = client.set_linger(Some(std::time::Duration::ZERO));
                        drop(client);
                        continue;
                    }
                    _ => {}
                }
                tokio::spawn(relay(client, upstream, rx, counter.clone()));
            }
        });
        Ok(Proxy {
            addr,
            mode,
            task,
            bytes_up,
        })
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.mode.send_replace(Mode::Refuse);
    }
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    bytes_up: Arc<AtomicU64>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, mode.clone(), false, Some(bytes_up));
    let down = pump(sr, cw, mode, true, None);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    downstream: bool,
    counter: Option<Arc<AtomicU64>>,
) {
    // Writes go through a queue so that a delay holds bytes without
    // stopping the reads (the link keeps its bandwidth, only latency grows).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        let mut to = to;
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                let m = *mode.borrow();
                if changed.is_err() || matches!(m, Mode::Refuse | Mode::Reset) {
                    break;
                }
                continue;
            }
        };
        if let Some(c) = &counter {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        let now = tokio::time::Instant::now();
        let due = match *mode.borrow() {
            Mode::Pass => Some(now),
            Mode::DropDownstream => (!downstream).then_some(now),
            Mode::Blackhole => None,
            Mode::Refuse | Mode::Reset => break,
            Mode::Delay(ms) => Some(now + std::time::Duration::from_millis(ms)),
        };
        if let Some(due) = due
            && tx.send((due, buf[..n].to_vec())).is_err()
        {
            break;
        }
    }
    drop(tx);
    if matches!(*mode.borrow(), Mode::Refuse | Mode::Reset) {
        writer.abort();
    } else {
        let _ = writer.await;
    }
}
