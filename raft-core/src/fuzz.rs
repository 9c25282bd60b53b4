//! Mutation fuzzing on stable Rust, for any decoder of untrusted bytes (a
//! wire message, a disk record, a configuration file): valid inputs,
//! damaged the ways bytes get damaged (bits flipped, bytes overwritten,
//! inserted, deleted, truncated, spliced from another input, length
//! prefixes blown up), must be decoded to a value or refused with an
//! error, never panic.
//!
//! A run is a function of its seed: `FUZZ_SEED` (default 1), `FUZZ_ITERS`
//! damaged inputs (default: the caller's), or `FUZZ_SECS` to run for a
//! time instead. A panic fails the run with the seed, the iteration and
//! the input in hex, to be kept as a regression case: every file in the
//! regressions directory holds such inputs, one hex line each (`#` starts
//! a comment), and each run feeds them all to every decoder first.
//!
//! ```
//! use raft_core::fuzz::{self, Options, Target};
//!
//! // A decoder of "<n>:<n bytes>" frames.
//! fn frame(b: &[u8]) -> bool {
//!     let Some(colon) = b.iter().position(|&c| c == b':') else { return false };
//!     let Some(n) = std::str::from_utf8(&b[..colon]).ok().and_then(|s| s.parse::<usize>().ok())
//!     else { return false };
//!     b.len() - colon - 1 == n
//! }
//! let targets = [Target::new("frame", b"5:hello".to_vec(), &frame)];
//! let report = fuzz::run(&targets, None, Options { iters: 1_000, ..Options::from_env(0) });
//! assert_eq!(report.inputs, 1_000);
//! ```

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::engine::rng::Rng;

/// One valid input and the decoder that reads it.
pub struct Target<'a> {
    /// Names the decoder in a failure.
    pub name: &'static str,
    /// A valid input: what the damage starts from.
    pub input: Vec<u8>,
    /// Decodes its bytes; whether they made a value. Must not panic.
    pub decode: &'a dyn Fn(&[u8]) -> bool,
}

impl<'a> Target<'a> {
    /// `decode` with one of its valid inputs.
    pub fn new(name: &'static str, input: Vec<u8>, decode: &'a dyn Fn(&[u8]) -> bool) -> Self {
        Target {
            name,
            input,
            decode,
        }
    }
}

/// How long a run is and where it starts.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The seed the damage follows from.
    pub seed: u64,
    /// Damaged inputs to try, unless `secs` is set.
    pub iters: u64,
    /// Run for this long instead.
    pub secs: Option<u64>,
}

impl Options {
    /// `FUZZ_SEED`, `FUZZ_ITERS` (default `iters`) and `FUZZ_SECS` from the
    /// environment.
    pub fn from_env(iters: u64) -> Options {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
        Options {
            seed: var("FUZZ_SEED").unwrap_or(1),
            iters: var("FUZZ_ITERS").unwrap_or(iters),
            secs: var("FUZZ_SECS"),
        }
    }
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Damaged inputs tried.
    pub inputs: u64,
    /// Of them, those that still decoded as a value (the rest were refused
    /// with an error).
    pub still_valid: u64,
    /// Kept regression inputs replayed (each through every decoder).
    pub regressions: usize,
}

/// Feeds every kept input in `regressions` (a directory, if any) to every
/// decoder, then damaged copies of the targets' inputs, chosen and damaged
/// by `opts.seed`, to the targets' decoders. Panics, naming the seed, the
/// iteration and the input, if a decoder panics.
pub fn run(targets: &[Target<'_>], regressions: Option<&Path>, opts: Options) -> Report {
    assert!(!targets.is_empty(), "fuzzing needs at least one target");
    let kept = regressions.map(load_regressions).unwrap_or_default();
    for input in &kept {
        for t in targets {
            let r = catch_unwind(AssertUnwindSafe(|| (t.decode)(input)));
            assert!(
                r.is_ok(),
                "{} panicked on a kept regression input: {}",
                t.name,
                hex(input)
            );
        }
    }
    let deadline = opts.secs.map(|s| Instant::now() + Duration::from_secs(s));
    let mut rng = Rng::new(opts.seed);
    let mut report = Report {
        regressions: kept.len(),
        ..Report::default()
    };
    let n = targets.len() as u64;
    while deadline.map_or(report.inputs < opts.iters, |d| Instant::now() < d) {
        let t = &targets[rng.range(0, n) as usize];
        let other = &targets[rng.range(0, n) as usize].input;
        let input = mutate(&mut rng, &t.input, other);
        match catch_unwind(AssertUnwindSafe(|| (t.decode)(&input))) {
            Ok(valid) => report.still_valid += u64::from(valid),
            Err(_) => panic!(
                "{} panicked (FUZZ_SEED={}, iteration {}); keep this input as a regression case: {}",
                t.name,
                opts.seed,
                report.inputs,
                hex(&input)
            ),
        }
        report.inputs += 1;
    }
    report
}

/// What a crate's fuzz test does: checks that every target's input
/// decodes as it is (damage to an input already refused tests nothing),
/// runs with [`Options::from_env`] (`iters` inputs by default) after the
/// inputs kept in `regressions`, and prints what the run did, naming it
/// `what`.
pub fn run_test(what: &str, targets: &[Target<'_>], regressions: &Path, iters: u64) -> Report {
    for t in targets {
        assert!(
            (t.decode)(&t.input),
            "{} does not decode its own input",
            t.name
        );
    }
    let opts = Options::from_env(iters);
    let r = run(targets, Some(regressions), opts);
    println!(
        "{what} fuzz: {} damaged inputs (seed {}), {} kept ones: no panic; {} still decoded \
         as a value, the rest were refused with an error",
        r.inputs, opts.seed, r.regressions, r.still_valid
    );
    r
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One damaged copy of `bytes` (`other` is another input to splice from).
pub fn mutate(rng: &mut Rng, bytes: &[u8], other: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for _ in 0..rng.range(1, 4) {
        let at = |rng: &mut Rng, b: &Vec<u8>| rng.range(0, b.len().max(1) as u64) as usize;
        match rng.range(0, 8) {
            0 if !b.is_empty() => {
                let i = at(rng, &b);
                b[i] ^= 1 << rng.range(0, 8);
            }
            1 if !b.is_empty() => {
                let i = at(rng, &b);
                b[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = at(rng, &b).min(b.len());
                let n = rng.range(1, 9) as usize;
                let junk: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                b.splice(i..i, junk);
            }
            3 if !b.is_empty() => {
                let i = at(rng, &b);
                let end = (i + rng.range(1, 9) as usize).min(b.len());
                b.drain(i..end);
            }
            4 => {
                let keep = rng.range(0, b.len() as u64 + 1) as usize;
                b.truncate(keep);
            }
            5 if !other.is_empty() => {
                let i = at(rng, &b).min(b.len());
                let from = rng.range(0, other.len() as u64) as usize;
                let end = (from + rng.range(1, 33) as usize).min(other.len());
                b.splice(i..i, other[from..end].iter().copied());
            }
            // A bincode varint length prefix blown up: 0xFB then a huge u64.
            6 => {
                let i = at(rng, &b).min(b.len());
                let mut huge = vec![0xFB];
                huge.extend_from_slice(&(u64::MAX - rng.range(0, 1 << 20)).to_le_bytes());
                b.splice(i..i, huge);
            }
            // 0xFA then a u32: a mid-sized length.
            _ => {
                let i = at(rng, &b).min(b.len());
                let mut len = vec![0xFA];
                len.extend_from_slice(&(rng.next_u64() as u32).to_le_bytes());
                b.splice(i..i, len);
            }
        }
    }
    b
}

/// The kept inputs of every file in `dir` (none if it does not exist).
pub fn load_regressions(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(files) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for f in files.flatten() {
        let text = std::fs::read_to_string(f.path()).unwrap_or_default();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let bytes: Option<Vec<u8>> = (0..line.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(line.get(i..i + 2)?, 16).ok())
                .collect();
            out.extend(bytes);
        }
    }
    out
}
