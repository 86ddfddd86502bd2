//! A seeded TCP fault proxy between frontdesk and a real server (Dovecot, SMTP): each accepted
//! connection draws one fault from a weighted plan with an RNG seeded per connection, so a
//! failing run replays with `FRONTDESK_FAULT_SEED`. A fake server is not involved: the faults are
//! what a network shows (latency, thin bandwidth, 1-byte segments, a cut after N bytes or after
//! some time, a blackhole, a reset), and the server behind is real.
//!
//! N1 below puts frontdesk's IMAP source behind the proxy, N2 (in digest.rs) its SMTP sender;
//! both check that it reconnects and retries with nothing lost and nothing duplicated beyond
//! D9's documented case (a reply lost after the final `.` of DATA -> the retry may deliver a
//! second copy with the same Message-ID).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One connection's fault.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Forward untouched.
    Clean,
    /// Every chunk waits this long before it is forwarded (both directions).
    Latency(Duration),
    /// At most this many bytes per second in each direction.
    Bandwidth(u32),
    /// Every byte is written on its own (1-byte TCP segments).
    OneByteSegments,
    /// Both sides are closed (FIN) once this many bytes went through in either direction.
    CutAfterBytes(u64),
    /// Both sides are closed after this long, whatever is in flight.
    CutAfterTime(Duration),
    /// After this many bytes nothing more is forwarded, but the sockets stay open.
    BlackholeAfterBytes(u64),
    /// The client side gets a TCP RST once this many bytes went through.
    ResetAfterBytes(u64),
}

impl Fault {
    fn fatal(self) -> bool {
        !matches!(
            self,
            Fault::Clean | Fault::Latency(_) | Fault::Bandwidth(_) | Fault::OneByteSegments
        )
    }
}

/// How faults are drawn: the weight of each kind (0 disables it) and the byte range for the
/// "after N bytes" kinds.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Weights of Clean, Latency, Bandwidth, OneByteSegments, CutAfterBytes, CutAfterTime,
    /// BlackholeAfterBytes, ResetAfterBytes.
    pub weights: [u32; 8],
    /// N for the byte-triggered faults is drawn from this range.
    pub bytes: std::ops::Range<u64>,
    /// The time-triggered cut is drawn from this range (milliseconds).
    pub millis: std::ops::Range<u64>,
    /// Every connection, whatever its fault, is cut after a lifetime drawn from this range
    /// (milliseconds), so a long IDLE connection also meets the faults of the next one.
    pub life: std::ops::Range<u64>,
}

impl Plan {
    fn draw(&self, rng: &mut StdRng) -> Fault {
        let total: u32 = self.weights.iter().sum();
        let mut pick = rng.random_range(0..total.max(1));
        let mut kind = 0;
        for (i, w) in self.weights.iter().enumerate() {
            if pick < *w {
                kind = i;
                break;
            }
            pick -= w;
        }
        let n = rng.random_range(self.bytes.clone());
        match kind {
            0 => Fault::Clean,
            1 => Fault::Latency(Duration::from_millis(rng.random_range(5..80))),
            2 => Fault::Bandwidth(rng.random_range(2_000..50_000)),
            3 => Fault::OneByteSegments,
            4 => Fault::CutAfterBytes(n),
            5 => Fault::CutAfterTime(Duration::from_millis(rng.random_range(self.millis.clone()))),
            6 => Fault::BlackholeAfterBytes(n),
            _ => Fault::ResetAfterBytes(n),
        }
    }
}

/// A running proxy; it stops when dropped.
pub struct FaultProxy {
    /// The port frontdesk connects to.
    pub port: u16,
    /// The fault of each connection so far, in accept order.
    pub faults: Arc<Mutex<Vec<Fault>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The seed from `FRONTDESK_FAULT_SEED`, else a fresh one (printed by the tests on every run).
pub fn seed() -> u64 {
    std::env::var("FRONTDESK_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream` under `plan`.
    pub async fn start(upstream: u16, plan: Plan, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Mutex::new(Vec::new()));
        let accepted = AtomicUsize::new(0);
        let task = {
            let faults = faults.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let n = accepted.fetch_add(1, Ordering::SeqCst) as u64;
                    let mut rng =
                        StdRng::seed_from_u64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    let life = Duration::from_millis(rng.random_range(plan.life.clone()));
                    let fault = plan.draw(&mut rng);
                    faults.lock().unwrap().push(fault);
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                            return;
                        };
                        relay(client, server, fault, life).await;
                    });
                }
            })
        };
        FaultProxy { port, faults, task }
    }

    /// How many connections got each kind of fault, for the figures.
    pub fn summary(&self) -> String {
        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for f in self.faults.lock().unwrap().iter() {
            let name = match f {
                Fault::Clean => "clean",
                Fault::Latency(_) => "latency",
                Fault::Bandwidth(_) => "bandwidth",
                Fault::OneByteSegments => "1-byte",
                Fault::CutAfterBytes(_) => "cut-bytes",
                Fault::CutAfterTime(_) => "cut-time",
                Fault::BlackholeAfterBytes(_) => "blackhole",
                Fault::ResetAfterBytes(_) => "reset",
            };
            *by_kind.entry(name).or_default() += 1;
        }
        by_kind
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Connections that ended (or will end) because of their fault.
    pub fn fatal_count(&self) -> usize {
        self.faults
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f.fatal())
            .count()
    }
}

/// Forwards one connection under `fault` until either side closes or the fault ends it. One
/// task owns both sockets, so a cut closes both and a reset aborts the client side (RST).
async fn relay(mut client: TcpStream, mut server: TcpStream, fault: Fault, life: Duration) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let deadline = tokio::time::Instant::now()
        + match fault {
            Fault::CutAfterTime(d) => d.min(life),
            _ => life,
        };
    let limit = match fault {
        Fault::CutAfterBytes(l) | Fault::BlackholeAfterBytes(l) | Fault::ResetAfterBytes(l) => l,
        _ => u64::MAX,
    };
    let (mut up, mut down) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let mut moved = 0u64;
    let mut swallowing = false;
    loop {
        let (to_server, n) = tokio::select! {
            r = client.read(&mut up) => (true, r.unwrap_or(0)),
            r = server.read(&mut down) => (false, r.unwrap_or(0)),
            _ = tokio::time::sleep_until(deadline) => return,
        };
        if n == 0 {
            // One side closed: pass the close on (dropping both sockets).
            return;
        }
        if swallowing {
            continue;
        }
        let (buf, out) = if to_server {
            (&up[..n], &mut server)
        } else {
            (&down[..n], &mut client)
        };
        let mut chunk = buf;
        let mut fire = false;
        if moved + n as u64 >= limit {
            chunk = &chunk[..(limit - moved) as usize];
            fire = true;
        }
        moved += chunk.len() as u64;
        let written = match fault {
            Fault::Latency(d) => {
                tokio::time::sleep(d).await;
                out.write_all(chunk).await
            }
            Fault::Bandwidth(per_sec) => {
                let mut r = Ok(());
                for piece in chunk.chunks((per_sec as usize / 20).max(1)) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    r = out.write_all(piece).await;
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
            Fault::OneByteSegments => {
                let mut r = Ok(());
                for b in chunk {
                    r = out.write_all(std::slice::from_ref(b)).await;
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
            _ => out.write_all(chunk).await,
        };
        if written.is_err() {
            return;
        }
        if fire {
            match fault {
                Fault::BlackholeAfterBytes(_) => swallowing = true,
                Fault::ResetAfterBytes(_) => {
                    let _ = client.set_zero_linger();
                    let _ = server.set_zero_linger();
                    return;
                }
                _ => {
                    let _ = client.shutdown().await;
                    let _ = server.shutdown().await;
                    return;
                }
            }
        }
    }
}

/// Waits for `cond` up to `limit`, polling.
pub async fn wait_for<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// N1: `frontdesk run` reads Dovecot through the proxy while every connection draws a fault
/// (latency, thin bandwidth, 1-byte segments, cuts, blackholes, resets) and mail keeps arriving
/// -> every Message-ID exactly once, mailbox untouched. Per commit 100 + 50 messages; long
/// 500 + 300.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_through_network_faults_loses_and_duplicates_nothing() {
    use crate::reliability::{client_mail, imap_daemon_yaml, mailbox_untouched, message_ids};
    let (before, during) = if crate::support::long_run() {
        (500, 300)
    } else {
        (100, 50)
    };
    let rig = crate::rig::Rig::shared();
    let user = rig.new_mailbox("n1fault");
    rig.append_many(&user, "INBOX", (0..before).map(|i| client_mail(i, "n1")));
    let seed = seed();
    let plan = Plan {
        weights: [3, 2, 1, 1, 1, 1, 1, 1],
        bytes: 200..40_000,
        millis: 300..3_000,
        life: 500..4_000,
    };
    let proxy = FaultProxy::start(rig.imaps_port, plan, seed).await;
    println!("fault proxy seed {seed} (FRONTDESK_FAULT_SEED replays it)");
    let mut d = crate::support::TestDaemon::start(&imap_daemon_yaml(rig, &user, proxy.port, "2s"));
    let db = d.db();
    let total = before + during;
    let started = Instant::now();
    for i in before..total {
        rig.append(&user, "INBOX", &client_mail(i, "n1"));
        let pause = rand::rng().random_range(0..400);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let all = wait_for(Duration::from_secs(120), || async {
        message_ids(&db).await.len() >= total
    })
    .await;
    let took = started.elapsed();
    let ids = message_ids(&db).await;
    d.signal_and_wait(15, Duration::from_secs(10));
    let dups = ids.values().filter(|n| **n > 1).count();
    let connections = proxy.faults.lock().unwrap().len();
    crate::support::figure(
        "N1",
        &format!(
            "IMAP via fault proxy, seed {seed}, {before} before + {during} arriving, timeout 2 s"
        ),
        &format!(
            "{} of {total} ingested, {dups} dup, {} connections ({}), {:.0} s",
            ids.len(),
            connections,
            proxy.summary(),
            took.as_secs_f64()
        ),
    );
    assert!(
        all,
        "seed {seed}: {} of {total}; log:\n{}",
        ids.len(),
        d.log.lock().unwrap()
    );
    assert_eq!(dups, 0, "seed {seed}");
    assert_eq!(ids.len(), total, "seed {seed}");
    // Every connection ends in a fault (its own or the lifetime cut): a second one means
    // frontdesk reconnected at least once.
    assert!(connections >= 2, "seed {seed}: never reconnected");
    mailbox_untouched(rig, &user, total as u32);
}
