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
//!
//! Placement and pairing, because the lab hosts are shared VMs whose speed
//! drifts by tens of percent within a minute:
//! - helper `i`'s vCPU and the host thread driving it run on different
//!   CPUs (pinned), as a deployment would place them; left to the
//!   scheduler they sometimes share one CPU and the run measures that;
//! - the one-helper encryption runs in slices of 2048 pages, each
//!   followed by a ceiling sample of as many pages on the helper's CPU
//!   (once the helper has left it), and `helper/host-aead` is the median
//!   over runs of the run's rate over its own ceiling samples.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;

use cgsvmm_migration::helper::{HelperClient, HelperError, RECORD_STRIDE};

use cgsvmm_vmm::config::{BootConfig, HelperLaunch, LabGuest, SerialConfig, VmmConfig};
use cgsvmm_vmm::memory::MIB;
use cgsvmm_vmm::{Vmm, VmmError};

/// What `cgsvmm bench` measures.
#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Migration helper throughput: seed vs batched protocol, 1 and 2
    /// helpers, against the host's own AES-256-GCM rate.
    Helper {
        /// Pages per measurement.
        #[arg(long, default_value_t = 32768)]
        pages: usize,
        /// Runs per measurement (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Seconds per host AES-GCM implementation (0.05 to 60).
        #[arg(
            long,
            default_value = "1.0",
            allow_negative_numbers = true,
            value_parser = cgsvmm_vmm::config::parse_seconds
        )]
        host_seconds: std::time::Duration,
    },
}

/// `cgsvmm bench`: the measurement, then its report.
pub fn exec(what: BenchCommand) -> std::process::ExitCode {
    let BenchCommand::Helper {
        pages,
        reps,
        host_seconds,
    } = what;
    let config = BenchConfig {
        pages,
        reps,
        host_time: host_seconds,
    };
    match run(config) {
        Ok(report) => {
            print!("{}", report.render());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => super::report(&e),
    }
}

use cgsvmm_fw_abi::PAGE_SIZE as PAGE;
const SEED: &str = "seed (1 page/round trip)";
const ONE_HELPER: &str = "batched, 1 helper";
const TWO_HELPERS: &str = "batched, 2 helpers";
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
    /// Host-side AEAD time per implementation when choosing the fastest.
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
    /// (implementation, encrypt) on the host, each timed once on the
    /// helper's CPU to pick the fastest.
    pub host: Vec<(&'static str, Rate)>,
    /// The fastest implementation's samples beside the one-helper runs
    /// (median).
    pub ceiling: Rate,
    /// Median over one-helper runs of encrypt rate / ceiling beside it.
    pub helper_over_ceiling: f64,
    /// Median over runs of one-helper encrypt / seed encrypt.
    pub batched_over_seed: f64,
    /// Where threads ran: (helper vCPU CPU, host thread CPU) per helper, or
    /// None when the process may use only one CPU.
    pub placement: Option<Vec<(usize, usize)>>,
    /// The helper's capabilities (HELLO), which tell how it seals pages.
    pub helper_caps: u64,
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
            // Every bench VM takes pages in at some point.
            incoming: true,
            ..Default::default()
        }),
        ..Default::default()
    })?;
    // The guest never runs: its memory stays still while it is measured.
    vmm.start_mirror()?;
    Ok(vmm)
}

/// The two helpers of `v`, pinned and greeted, and the capabilities the
/// first one reported.
fn clients(v: &Vmm, placement: &Placement) -> Result<(Vec<HelperClient>, u64), BenchError> {
    let mut caps = 0;
    let clients = (0..2)
        .map(|i| {
            if let Some(cpu) = placement.helper(i) {
                v.pin_mirror(i, cpu)?;
            }
            let mut c = v
                .helper_client(i, TIMEOUT)
                .ok_or_else(|| BenchError::Args(format!("no helper {i}")))?;
            let hello = c.hello()?;
            if i == 0 {
                caps = hello.caps;
            }
            Ok(c)
        })
        .collect::<Result<_, BenchError>>()?;
    Ok((clients, caps))
}

/// Which CPUs helper vCPUs and the host threads driving them use.
struct Placement {
    cpus: Vec<usize>,
}

impl Placement {
    /// The CPUs this process may run on.
    fn new() -> Result<Self, BenchError> {
        // SAFETY: cpu_set_t is plain data; the kernel fills it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
        if rc != 0 {
            return Err(BenchError::Args(format!(
                "cannot read this process's CPUs: {}",
                std::io::Error::last_os_error()
            )));
        }
        let cpus = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` is below CPU_SETSIZE, inside `set`.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect();
        Ok(Self { cpus })
    }

    /// Helper `i`'s vCPU CPU (None: one CPU only, nothing to place).
    fn helper(&self, i: usize) -> Option<usize> {
        (self.cpus.len() > 1).then(|| self.cpus[(2 * i + 1) % self.cpus.len()])
    }

    /// The CPU of the host thread that drives helper `i`.
    fn client(&self, i: usize) -> Option<usize> {
        (self.cpus.len() > 1).then(|| self.cpus[(2 * i) % self.cpus.len()])
    }

    /// Pins the calling thread as the driver of helper `i`.
    fn pin_client(&self, i: usize) {
        if let Some(cpu) = self.client(i) {
            // A failed pin only costs stability of the numbers, not their
            // truth: carry on unpinned.
            let _ = cgsvmm_vmm::machine::vcpu::pin_thread(0, cpu);
        }
    }

    fn describe(&self) -> Option<Vec<(usize, usize)>> {
        (self.cpus.len() > 1).then(|| {
            (0..2)
                .filter_map(|i| Some((self.helper(i)?, self.client(i)?)))
                .collect()
        })
    }
}

/// A fresh session between `src` and `dst` (any earlier one ended).
fn session(src: &mut HelperClient, dst: &mut HelperClient) -> Result<(), HelperError> {
    src.end()?;
    dst.end()?;
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

/// An empty buffer with room for `pages` records, its memory touched before
/// any clock starts, as a sender's reused stream buffers would be:
/// first-touch page faults of this process are not the helper's cost.
fn record_buffer(pages: usize) -> Vec<u8> {
    let mut v = vec![0xffu8; pages * RECORD_STRIDE];
    v.clear();
    v
}

/// Batched protocol over `src.len()` helpers in parallel (one host thread
/// each, as a sender would run them).
fn batched_round(
    src: &mut [HelperClient],
    dst: &mut [HelperClient],
    pages: &[(u64, u64)],
    placement: &Placement,
) -> Result<(Rate, Rate), HelperError> {
    let share = pages.len().div_ceil(src.len());
    let mut records: Vec<Vec<u8>> = (0..src.len()).map(|_| record_buffer(share)).collect();
    let (_, enc) = timed(|| {
        std::thread::scope(|s| {
            let jobs: Vec<_> = src
                .iter_mut()
                .zip(pages.chunks(share))
                .zip(records.iter_mut())
                .enumerate()
                .map(|(i, ((c, chunk), out))| {
                    s.spawn(move || {
                        placement.pin_client(i);
                        c.encrypt(chunk, out)
                    })
                })
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
                .enumerate()
                .map(|(i, (c, recs))| {
                    s.spawn(move || {
                        placement.pin_client(i);
                        c.decrypt(recs).map(drop)
                    })
                })
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

/// Pages per slice of the one-helper encryption; the ceiling is sampled on
/// as many pages between slices.
const SLICE: usize = 2048;

/// The one-helper batched round, its encryption cut in slices with a
/// ceiling sample (`aead` on the helper's CPU, as many pages) after each:
/// the helper and the ceiling share every stretch of the machine's speed.
/// Returns (encrypt, decrypt, ceiling).
fn paired_round(
    src: &mut HelperClient,
    dst: &mut HelperClient,
    pages: &[(u64, u64)],
    aead: HostAead,
    cpu: Option<usize>,
) -> Result<(Rate, Rate, Rate), HelperError> {
    let mut records = record_buffer(pages.len());
    let mut enc = Duration::ZERO;
    let mut ceiling = Rate {
        pages: 0,
        elapsed: Duration::ZERO,
    };
    for slice in pages.chunks(SLICE) {
        let (_, took) = timed(|| src.encrypt(slice, &mut records))?;
        enc += took;
        // The helper polls a while after its last request: sample the
        // ceiling once it has left the CPU they share.
        let wait = Instant::now();
        while !src.is_sleeping() && wait.elapsed() < Duration::from_millis(20) {
            std::thread::sleep(Duration::from_micros(50));
        }
        let sample = aead.rate(Duration::MAX, slice.len(), cpu);
        ceiling.pages += sample.pages;
        ceiling.elapsed += sample.elapsed;
    }
    let (_, dec) = timed(|| dst.decrypt(&records).map(drop))?;
    let rate = |elapsed| Rate {
        pages: pages.len(),
        elapsed,
    };
    Ok((rate(enc), rate(dec), ceiling))
}

/// How fast `seal(page, nonce)` encrypts 4 KiB pages on one core: for
/// `time`, or until `pages` are done, whichever comes first.
fn host_rate(time: Duration, pages: usize, mut seal: impl FnMut(&mut [u8], [u8; 12])) -> Rate {
    let mut page = vec![0x5au8; PAGE];
    let mut n: u64 = 0;
    let start = Instant::now();
    while start.elapsed() < time && (n as usize) < pages {
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

/// The host's AES-256-GCM implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostAead {
    RustCrypto,
    Ring,
}

impl HostAead {
    const ALL: [HostAead; 2] = [HostAead::RustCrypto, HostAead::Ring];

    fn name(self) -> &'static str {
        match self {
            HostAead::RustCrypto => "RustCrypto aes-gcm",
            HostAead::Ring => "ring",
        }
    }

    /// Its single-core encryption rate on 4 KiB pages, timed for `time` or
    /// `pages` on `cpu` (a thread pinned there; anywhere if None).
    fn rate(self, time: Duration, pages: usize, cpu: Option<usize>) -> Rate {
        std::thread::scope(|s| {
            s.spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = cgsvmm_vmm::machine::vcpu::pin_thread(0, cpu);
                }
                self.rate_here(time, pages)
            })
            .join()
            .expect("host AEAD thread panicked")
        })
    }

    fn rate_here(self, time: Duration, pages: usize) -> Rate {
        let key = [7u8; 32];
        let aad = [1u8; 32];
        match self {
            HostAead::RustCrypto => {
                let cipher = Aes256Gcm::new_from_slice(&key).expect("32-byte key");
                host_rate(time, pages, |page, nonce| {
                    let tag = cipher
                        .encrypt_inout_detached(&nonce.into(), &aad, page.into())
                        .expect("in-memory encryption");
                    std::hint::black_box(tag);
                })
            }
            HostAead::Ring => {
                let cipher = ring::aead::LessSafeKey::new(
                    ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key)
                        .expect("32-byte key"),
                );
                host_rate(time, pages, |page, nonce| {
                    let tag = cipher
                        .seal_in_place_separate_tag(
                            ring::aead::Nonce::assume_unique_for_key(nonce),
                            ring::aead::Aad::from(&aad),
                            page,
                        )
                        .expect("in-memory encryption");
                    let _ = std::hint::black_box(tag);
                })
            }
        }
    }
}

/// The middle value of `values` (NaN if empty).
fn median_f64(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs every measurement.
pub fn run(config: BenchConfig) -> Result<BenchReport, BenchError> {
    if config.pages == 0 || config.pages > 1 << 20 {
        return Err(BenchError::Args(format!(
            "--pages must be 1..=1048576, got {}",
            config.pages
        )));
    }
    if config.reps == 0 || config.reps > 1000 {
        return Err(BenchError::Args(format!(
            "--reps must be 1..=1000, got {}",
            config.reps
        )));
    }
    let placement = Placement::new()?;
    // The measuring thread drives helper 0 (seed and one-helper runs): it
    // is pinned as that helper's host thread, which the caller's thread
    // should not be.
    std::thread::scope(|s| {
        s.spawn(|| {
            placement.pin_client(0);
            measure(config, &placement)
        })
        .join()
        .expect("bench thread panicked")
    })
}

fn measure(config: BenchConfig, placement: &Placement) -> Result<BenchReport, BenchError> {
    let key = [0x5c; 32];
    let (a, b) = (vm(config.pages, key)?, vm(config.pages, key)?);
    let ((mut src, caps), (mut dst, _)) = (clients(&a, placement)?, clients(&b, placement)?);
    let gpas: Vec<u64> = (0..config.pages as u64)
        .map(|i| FIRST_PAGE + i * PAGE as u64)
        .collect();
    let pages: Vec<(u64, u64)> = gpas.iter().map(|&g| (g, 1)).collect();

    // The fastest host implementation, timed on the helper's CPU.
    let helper_cpu = placement.helper(0);
    let host: Vec<(&'static str, Rate)> = HostAead::ALL
        .iter()
        .map(|aead| {
            (
                aead.name(),
                aead.rate(config.host_time, usize::MAX, helper_cpu),
            )
        })
        .collect();
    let fastest = HostAead::ALL
        .into_iter()
        .zip(&host)
        .max_by(|(_, (_, x)), (_, (_, y))| x.pages_per_sec().total_cmp(&y.pages_per_sec()))
        .map_or(HostAead::Ring, |(aead, _)| aead);

    // Warm-up, not reported: the first touch of each guest page by a helper
    // vCPU costs a shadow-paging fault on this host (docs/LAB.md), paid once per
    // page whatever the protocol; steady state is what is compared.
    session(&mut src[0], &mut dst[0])?;
    batched_round(&mut src[..], &mut dst[..], &pages, placement)?;

    // Each run measures every variant in turn, so that drift of the
    // machine's speed hits them alike.
    let names = [SEED, ONE_HELPER, TWO_HELPERS];
    let mut enc: Vec<Vec<Rate>> = vec![Vec::new(); names.len()];
    let mut dec: Vec<Vec<Rate>> = vec![Vec::new(); names.len()];
    let (mut busy, mut ceilings, mut over_ceiling, mut over_seed) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..config.reps {
        session(&mut src[0], &mut dst[0])?;
        let (seed_enc, seed_dec) = seed_round(&mut src[0], &mut dst[0], &gpas)?;

        session(&mut src[0], &mut dst[0])?;
        let busy_before = src[0].busy_cycles();
        let paired = paired_round(&mut src[0], &mut dst[0], &pages, fastest, helper_cpu)?;
        busy.push(src[0].busy_cycles() - busy_before);
        let (one_enc, one_dec, ceiling) = paired;

        session(&mut src[0], &mut dst[0])?;
        let (two_enc, two_dec) = batched_round(&mut src, &mut dst, &pages, placement)?;

        over_ceiling.push(one_enc.mb_per_sec() / ceiling.mb_per_sec());
        over_seed.push(one_enc.mb_per_sec() / seed_enc.mb_per_sec());
        ceilings.push(ceiling);
        for (i, (e, d)) in [(seed_enc, seed_dec), (one_enc, one_dec), (two_enc, two_dec)]
            .into_iter()
            .enumerate()
        {
            enc[i].push(e);
            dec[i].push(d);
        }
    }
    let helper = names
        .into_iter()
        .zip(enc.into_iter().zip(dec))
        .map(|(name, (e, d))| (name, median(e), median(d)))
        .collect();
    busy.sort_unstable();
    let cycles_per_page = busy.get(busy.len() / 2).copied().unwrap_or(0) / config.pages as u64;
    let helper_busy_per_page =
        Duration::from_nanos(cycles_per_page * 1_000_000 / a.tsc_khz().max(1));
    check_arrived(&a, &b, &gpas)?;
    a.shutdown();
    b.shutdown();
    Ok(BenchReport {
        helper,
        helper_busy_per_page,
        host,
        ceiling: median(ceilings),
        helper_over_ceiling: median_f64(over_ceiling),
        batched_over_seed: median_f64(over_seed),
        placement: placement.describe(),
        helper_caps: caps,
    })
}

/// Sanity: what arrived in B is what A holds.
fn check_arrived(a: &Vmm, b: &Vmm, gpas: &[u64]) -> Result<(), BenchError> {
    use vm_memory::{Bytes, GuestAddress};
    let mut ra = vec![0u8; PAGE];
    let mut rb = vec![0u8; PAGE];
    for &gpa in gpas.iter().step_by(97) {
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
    Ok(())
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
        let ceiling = self.ceiling.mb_per_sec();
        let _ = writeln!(
            out,
            "{:<28} {:>12.0} {:>10.1}   (fastest, beside each 1-helper run)",
            "host ceiling",
            self.ceiling.pages_per_sec(),
            ceiling
        );
        match &self.placement {
            Some(p) => {
                let pairs: Vec<String> = p
                    .iter()
                    .enumerate()
                    .map(|(i, (h, c))| format!("helper {i} on CPU {h}, its host thread on CPU {c}"))
                    .collect();
                let _ = writeln!(out, "placement: {}", pairs.join("; "));
            }
            None => {
                let _ = writeln!(out, "placement: one CPU, nothing pinned");
            }
        }
        let seal = if self.helper_caps & cgsvmm_fw_abi::helper::caps::VAES_PAGE_SEAL != 0 {
            "VAES/VPCLMULQDQ, straight from guest memory to the mailbox"
        } else {
            "ring, through a private copy"
        };
        let _ = writeln!(out, "helper page seal: {seal}");
        let find = |n: &str| {
            self.helper
                .iter()
                .find(|(name, ..)| *name == n)
                .map(|(_, e, _)| e.mb_per_sec())
        };
        let one = find(ONE_HELPER).unwrap_or(f64::NAN);
        let two = find(TWO_HELPERS).unwrap_or(f64::NAN);
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
        let _ = writeln!(out, "batched/seed ratio: {:.2}", self.batched_over_seed);
        let _ = writeln!(
            out,
            "helper/host-aead ratio: {:.2}",
            self.helper_over_ceiling
        );
        out
    }
}
