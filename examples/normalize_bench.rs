//! Normalizes every message of a Maildir with the full parse (`normalize_unoptimized`) and with
//! the lean path (`normalize`), alternating, and prints CPU seconds and MB/s of each; run by
//! `bench/normalize.sh`.
//!
//! Both paths run in this one process on the same bytes, alternating for `ROUNDS` rounds, so a
//! busy machine shifts both alike; CPU time (user + system) reads true where wall time does not.
//! The global allocator is mimalloc with `frontdesk`'s options, so the decoded buffers cost what
//! they cost there.

use std::time::Instant;

use chrono::DateTime;
use frontdesk::ingest::email::{
    lean_skipped_bytes, lean_text_bytes, normalize, normalize_unoptimized,
};
use frontdesk::message::{Message, Origin};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// The options `frontdesk` sets, from the same function: freed memory goes back to the OS at
// once, so a decoded attachment buffer page-faults anew each time, as in `frontdesk sync`.
#[used]
#[unsafe(link_section = ".init_array")]
static MIMALLOC_OPTIONS: extern "C" fn() = frontdesk::mimalloc_options;

const ROUNDS: usize = 5;

type Normalize = fn(&str, Origin, Vec<u8>, DateTime<chrono::Utc>) -> Message;

/// CPU time of this process (user + system) in seconds, and its minor page faults so far.
fn cpu_and_faults() -> (f64, i64) {
    // SAFETY: getrusage fills one rusage through a valid pointer; zeroed is a valid rusage.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime) + secs(usage.ru_stime), usage.ru_minflt)
}

/// One pass over the corpus: CPU seconds, wall seconds, minor page faults.
fn run(corpus: &[Vec<u8>], f: Normalize) -> (f64, f64, i64) {
    // copies made before the clock starts: normalize takes the bytes by value
    let copies: Vec<Vec<u8>> = corpus.to_vec();
    let ((cpu, faults), wall) = (cpu_and_faults(), Instant::now());
    let mut texts = 0usize;
    for (i, raw) in copies.into_iter().enumerate() {
        let origin = Origin::Imap {
            folder: "INBOX".into(),
            uid_validity: 1,
            uid: i as u32,
        };
        let m = f("bench", origin, raw, DateTime::UNIX_EPOCH);
        texts += m.text.map_or(0, |t| t.len());
    }
    std::hint::black_box(texts);
    let wall = wall.elapsed().as_secs_f64();
    let (cpu_end, faults_end) = cpu_and_faults();
    (cpu_end - cpu, wall, faults_end - faults)
}

/// The median of a few figures.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: normalize_bench MAILDIR")?;
    let mut paths: Vec<_> = std::fs::read_dir(std::path::Path::new(&dir).join("cur"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.sort();
    let corpus: Vec<Vec<u8>> = paths.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let bytes: usize = corpus.iter().map(Vec::len).sum();
    let mb = bytes as f64 / 1e6;

    let mut lean_messages = 0;
    let mut skipped = 0;
    let mut text = 0;
    let mut differ = 0;
    for (i, raw) in corpus.iter().enumerate() {
        let s = lean_skipped_bytes(raw);
        let t = lean_text_bytes(raw);
        lean_messages += usize::from(s + t > 0);
        skipped += s;
        text += t;
        let origin = || Origin::Imap {
            folder: "INBOX".into(),
            uid_validity: 1,
            uid: i as u32,
        };
        let a = normalize("bench", origin(), raw.clone(), DateTime::UNIX_EPOCH);
        let b = normalize_unoptimized("bench", origin(), raw.clone(), DateTime::UNIX_EPOCH);
        differ += usize::from(a != b);
    }
    println!(
        "corpus: {} messages, {mb:.1} MB; lean path taken for {lean_messages}, skipping {:.1} MB \
         of attachment and HTML bodies, decoding {:.1} MB of text/plain bodies itself; messages \
         that differ: {differ}",
        corpus.len(),
        skipped as f64 / 1e6,
        text as f64 / 1e6
    );

    let names: [(&str, Normalize); 2] = [("full", normalize_unoptimized), ("lean", normalize)];
    let mut runs: [Vec<(f64, f64, i64)>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=ROUNDS {
        for (k, (name, f)) in names.iter().enumerate() {
            let (cpu, wall, faults) = run(&corpus, *f);
            println!(
                "round {round} {name}: cpu {cpu:.3} s, wall {wall:.3} s, {faults} page faults"
            );
            runs[k].push((cpu, wall, faults));
        }
    }
    let mut cpu_median = [0.0; 2];
    for (k, (name, _)) in names.iter().enumerate() {
        let cpu = median(runs[k].iter().map(|r| r.0).collect());
        let best = runs[k].iter().map(|r| r.0).fold(f64::MAX, f64::min);
        let wall = median(runs[k].iter().map(|r| r.1).collect());
        let faults = median(runs[k].iter().map(|r| r.2 as f64).collect());
        cpu_median[k] = cpu;
        println!(
            "{name}: cpu median {cpu:.3} s ({:.0} MB/s), best {best:.3} s ({:.0} MB/s); \
             wall median {wall:.3} s ({:.0} MB/s); page faults median {faults:.0}",
            mb / cpu,
            mb / best,
            mb / wall
        );
    }
    println!(
        "lean / full, CPU medians: {:.2}x",
        cpu_median[1] / cpu_median[0]
    );
    if differ > 0 {
        return Err(format!("{differ} messages differ").into());
    }
    Ok(())
}
