//! `cgsvmm bench helper`: how fast pages move through the migration helper.
//!
//! One run on one machine measures, on the same pages:
//! - the seed protocol (QEMU RFC: one page per mailbox round trip),
//! - the batched protocol with one helper and with two in parallel,
//!
//! each for encryption (source VM A) and decryption (target VM B), the
//! median of several runs after an unreported warm-up, and, as
//! the ceiling, this process's own single-core AES-256-GCM rate on 4 KiB
//! pages with the fastest implementation it has (RustCrypto `aes-gcm` or
//! `ring`). The last two lines are `batched/seed ratio: <x>` (one helper,
//! encrypt) and `helper/host-aead ratio: <x>` (one helper, encrypt, against
//! the ceiling), for scripts.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;

use cgsvmm_migration::helper::{HelperClient, HelperError, RECORD_STRIDE};

use crate::config::{BootConfig, HelperLaunch, LabGuest, SerialConfig, VmmConfig};
use crate::memory::MIB;
use crate::vmm::{Vmm, VmmError};

const PAGE: usize = 4096;
const ONE_HELPER: &str = "batched, 1 helper";
/// Where the benchmarked pages start: the lab data area.
const FIRST_PAGE: u64 = cgsvmm_fw_abi::LAB_DATA_GPA;
/// Helper requests time out after this.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A VM could not be built.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A helper failed.
    #[error(transparent)]
    Helper(#[from] HelperError),
    /// Arguments out of range.
    #[error("{0}")]
    Args(String),
    /// The pages that arrived are not the pages that were sent.
    #[error("Round trip check failed: {0}")]
    Check(String),
}

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct BenchConfig {
    /// Pages per measurement.
    pub pages: usize,
    /// Host-side AEAD time per implementation.
    pub host_time: Duration,
    /// Runs of each helper measurement; the median is reported (this host
    /// is noisy: single runs vary by ±40%).
    pub reps: usize,
}

/// The median of `rates` by throughput.
fn median(mut rates: Vec<Rate>) -> Rate {
    rates.sort_by(|a, b| a.pages_per_sec().total_cmp(&b.pages_per_sec()));
    rates[rates.len() / 2]
}

/// One measured rate.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Pages moved.
    pub pages: usize,
    /// How long it took.
    pub elapsed: Duration,
}

impl Rate {
    /// Pages per second.
    pub fn pages_per_sec(&self) -> f64 {
        self.pages as f64 / self.elapsed.as_secs_f64()
    }

    /// Megabytes (10^6 bytes) of page data per second.
    pub fn mb_per_sec(&self) -> f64 {
        self.pages_per_sec() * PAGE as f64 / 1e6
    }
}

/// Everything one run measured.
#[derive(Debug)]
pub struct BenchReport {
    /// (name, encrypt, decrypt) per protocol variant.
    pub helper: Vec<(&'static str, Rate, Rate)>,
    /// The source helper's own time per page in the one-helper batched
    /// encryption (median run), from the cycles it reports per batch.
    pub helper_busy_per_page: Duration,
    /// (implementation, encrypt) on the host.
    pub host: Vec<(&'static str, Rate)>,
}

fn vm(pages: usize, key: [u8; 32]) -> Result<Vmm, VmmError> {
    let bytes = FIRST_PAGE + (pages * PAGE) as u64;
    let memory = bytes.div_ceil(2 * MIB) * 2 * MIB + 16 * MIB;
    let vmm = Vmm::try_from(VmmConfig {
        memory,
        cpus: 1,
        mirror_cpus: 2,
        boot: BootConfig::Lab(LabGuest::Hello),
        qmp: None,
        serial: SerialConfig::Null,
        helper: Some(HelperLaunch {
            key: Some(key),
            debug: false,
        }),
    })?;
    // The guest never runs: its memory stays still while it is measured.
    vmm.start_mirror()?;
    Ok(vmm)
}

fn clients(v: &Vmm) -> Result<Vec<HelperClient>, BenchError> {
    (0..2)
        .map(|i| {
            let mut c = v.helper_client(i, TIMEOUT).expect("two helpers configured");
            c.hello()?;
            Ok(c)
        })
        .collect()
}

fn session(src: &mut HelperClient, dst: &mut HelperClient) -> Result<(), HelperError> {
    let nonce = src.begin_source()?;
    let (target_nonce, _) = dst.begin_target(nonce)?;
    src.complete_source(target_nonce)?;
    Ok(())
}

fn timed<T>(f: impl FnOnce() -> Result<T, HelperError>) -> Result<(T, Duration), HelperError> {
    let start = Instant::now();
    let out = f()?;
    Ok((out, start.elapsed()))
}

/// Seed protocol, one page per round trip.
fn seed_round(
    src: &mut HelperClient,
    dst: &mut HelperClient,
    gpas: &[u64],
) -> Result<(Rate, Rate), HelperError> {
    src.seed_init()?;
    let mut headers = Vec::with_capacity(gpas.len());
    let mut pages = vec![[0u8; PAGE]; gpas.len()];
    let (_, enc) = timed(|| {
        for (gpa, page) in gpas.iter().zip(pages.iter_mut()) {
            let mut header = Vec::new();
            src.seed_encrypt(*gpa, &mut header, page)?;
            headers.push(header);
        }
        Ok(())
    })?;
    let (_, dec) = timed(|| {
        for ((gpa, header), page) in gpas.iter().zip(&headers).zip(&pages) {
            dst.seed_decrypt(*gpa, header, page)?;
        }
        Ok(())
    })?;
    Ok((
        Rate {
            pages: gpas.len(),
            elapsed: enc,
        },
        Rate {
            pages: gpas.len(),
            elapsed: dec,
        },
    ))
}

/// Batched protocol over `src.len()` helpers in parallel (one host thread
/// each, as a sender would run them).
fn batched_round(
    src: &mut [HelperClient],
    dst: &mut [HelperClient],
    pages: &[(u64, u64)],
) -> Result<(Rate, Rate), HelperError> {
    let share = pages.len().div_ceil(src.len());
    // Output buffers are touched before the clock starts, as a sender's
    // reused stream buffers would be: first-touch page faults of this
    // process are not the helper's cost.
    let mut records: Vec<Vec<u8>> = (0..src.len())
        .map(|_| {
            let mut v = vec![0xffu8; share * RECORD_STRIDE];
            v.clear();
            v
        })
        .collect();
    let (_, enc) = timed(|| {
        std::thread::scope(|s| {
            let jobs: Vec<_> = src
                .iter_mut()
                .zip(pages.chunks(share))
                .zip(records.iter_mut())
                .map(|((c, chunk), out)| s.spawn(move || c.encrypt(chunk, out)))
                .collect();
            jobs.into_iter()
                .try_for_each(|j| j.join().expect("encrypt thread panicked"))
        })
    })?;
    let (_, dec) = timed(|| {
        std::thread::scope(|s| {
            let jobs: Vec<_> = dst
                .iter_mut()
                .zip(records.iter())
                .map(|(c, recs)| s.spawn(move || c.decrypt(recs).map(drop)))
                .collect();
            jobs.into_iter()
                .try_for_each(|j| j.join().expect("decrypt thread panicked"))
        })
    })?;
    Ok((
        Rate {
            pages: pages.len(),
            elapsed: enc,
        },
        Rate {
            pages: pages.len(),
            elapsed: dec,
        },
    ))
}

/// How many 4 KiB pages `seal(page, nonce)` encrypts in `time`, one core.
fn host_rate(time: Duration, mut seal: impl FnMut(&mut [u8], [u8; 12])) -> Rate {
    let mut page = vec![0x5au8; PAGE];
    let mut n: u64 = 0;
    let start = Instant::now();
    while start.elapsed() < time {
        for _ in 0..64 {
            n += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&n.to_le_bytes());
            seal(&mut page, nonce);
        }
    }
    Rate {
        pages: n as usize,
        elapsed: start.elapsed(),
    }
}

/// The host's single-core AES-256-GCM encryption rate on 4 KiB pages, per
/// implementation.
fn host_rates(time: Duration) -> Vec<(&'static str, Rate)> {
    let key = [7u8; 32];
    let aad = [1u8; 32];
    let rustcrypto = Aes256Gcm::new_from_slice(&key).expect("32-byte key");
    let rc = host_rate(time, |page, nonce| {
        let tag = rustcrypto
            .encrypt_inout_detached(&nonce.into(), &aad, page.into())
            .expect("in-memory encryption");
        std::hint::black_box(tag);
    });
    let ring_key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).expect("32-byte key"),
    );
    let ring_rate = host_rate(time, |page, nonce| {
        let tag = ring_key
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(&aad),
                page,
            )
            .expect("in-memory encryption");
        let _ = std::hint::black_box(tag);
    });
    vec![("RustCrypto aes-gcm", rc), ("ring", ring_rate)]
}

/// Runs every measurement.
pub fn run(config: BenchConfig) -> Result<BenchReport, BenchError> {
    if config.pages == 0 || config.pages > 1 << 20 {
        return Err(BenchError::Args(format!(
            "--pages must be 1..=1048576, got {}",
            config.pages
        )));
    }
    let key = [0x5c; 32];
    let (a, b) = (vm(config.pages, key)?, vm(config.pages, key)?);
    let (mut src, mut dst) = (clients(&a)?, clients(&b)?);
    let gpas: Vec<u64> = (0..config.pages as u64)
        .map(|i| FIRST_PAGE + i * PAGE as u64)
        .collect();
    let pages: Vec<(u64, u64)> = gpas.iter().map(|&g| (g, 1)).collect();
    let mut helper = Vec::new();

    // Warm-up, not reported: the first touch of each guest page by a helper
    // vCPU costs a shadow-paging fault on this host (LAB.md), paid once per
    // page whatever the protocol; steady state is what is compared.
    session(&mut src[0], &mut dst[0])?;
    batched_round(&mut src[..], &mut dst[..], &pages)?;

    type Round<'a> = Box<
        dyn FnMut(&mut [HelperClient], &mut [HelperClient]) -> Result<(Rate, Rate), HelperError>
            + 'a,
    >;
    let variants: [(&'static str, Round); 3] = [
        (
            "seed (1 page/round trip)",
            Box::new(|s, d| seed_round(&mut s[0], &mut d[0], &gpas)),
        ),
        (
            "batched, 1 helper",
            Box::new(|s, d| batched_round(&mut s[..1], &mut d[..1], &pages)),
        ),
        (
            "batched, 2 helpers",
            Box::new(|s, d| batched_round(s, d, &pages)),
        ),
    ];
    let mut busy = Vec::new();
    for (name, mut round) in variants {
        let mut enc = Vec::with_capacity(config.reps);
        let mut dec = Vec::with_capacity(config.reps);
        for _ in 0..config.reps {
            session(&mut src[0], &mut dst[0])?;
            let before = src[0].busy_cycles();
            let (e, d) = round(&mut src, &mut dst)?;
            if name == ONE_HELPER {
                busy.push(src[0].busy_cycles() - before);
            }
            enc.push(e);
            dec.push(d);
        }
        helper.push((name, median(enc), median(dec)));
    }
    busy.sort_unstable();
    let cycles_per_page = busy.get(busy.len() / 2).copied().unwrap_or(0) / config.pages as u64;
    let helper_busy_per_page =
        Duration::from_nanos(cycles_per_page * 1_000_000 / a.tsc_khz().max(1));
    // Sanity: what arrived is what was sent.
    let mut ra = vec![0u8; PAGE];
    let mut rb = vec![0u8; PAGE];
    for &gpa in gpas.iter().step_by(97) {
        use vm_memory::{Bytes, GuestAddress};
        a.memory()
            .ram
            .read_slice(&mut ra, GuestAddress(gpa))
            .map_err(|_| BenchError::Check(format!("cannot read {gpa:#x} in A")))?;
        b.memory()
            .ram
            .read_slice(&mut rb, GuestAddress(gpa))
            .map_err(|_| BenchError::Check(format!("cannot read {gpa:#x} in B")))?;
        if ra != rb {
            return Err(BenchError::Check(format!("page {gpa:#x} differs")));
        }
    }
    a.shutdown();
    b.shutdown();

    let host = host_rates(config.host_time);
    Ok(BenchReport {
        helper,
        helper_busy_per_page,
        host,
    })
}

impl BenchReport {
    /// The report as printed, ending with the two ratio lines.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<28} {:>12} {:>10} {:>12} {:>10}",
            "migration helper", "enc pages/s", "enc MB/s", "dec pages/s", "dec MB/s"
        );
        for (name, e, d) in &self.helper {
            let _ = writeln!(
                out,
                "{name:<28} {:>12.0} {:>10.1} {:>12.0} {:>10.1}",
                e.pages_per_sec(),
                e.mb_per_sec(),
                d.pages_per_sec(),
                d.mb_per_sec()
            );
        }
        for (name, r) in &self.host {
            let _ = writeln!(
                out,
                "host {name:<23} {:>12.0} {:>10.1}   (one core, encrypt)",
                r.pages_per_sec(),
                r.mb_per_sec()
            );
        }
        let ceiling = self
            .host
            .iter()
            .map(|(_, r)| r.mb_per_sec())
            .fold(0.0, f64::max);
        let find = |n: &str| {
            self.helper
                .iter()
                .find(|(name, ..)| name.starts_with(n))
                .map(|(_, e, _)| e.mb_per_sec())
        };
        let seed = find("seed").unwrap_or(f64::NAN);
        let one = find("batched, 1").unwrap_or(f64::NAN);
        let two = find("batched, 2").unwrap_or(f64::NAN);
        let busy = self.helper_busy_per_page.as_secs_f64();
        let own = if busy > 0.0 {
            PAGE as f64 / busy / 1e6
        } else {
            f64::NAN
        };
        let _ = writeln!(
            out,
            "helper's own time, 1 helper encrypt: {:.2} us/page = {own:.1} MB/s while working ({:.2} of the ceiling)",
            busy * 1e6,
            own / ceiling
        );
        let _ = writeln!(out, "2 helpers/1 helper encrypt ratio: {:.2}", two / one);
        let _ = writeln!(out, "batched/seed ratio: {:.2}", one / seed);
        let _ = writeln!(out, "helper/host-aead ratio: {:.2}", one / ceiling);
        out
    }
}
