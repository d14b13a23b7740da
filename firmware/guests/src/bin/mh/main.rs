//! `mh`: the migration helper.
//!
//! Runs on every mirror vCPU at CPL3 with all guest RAM mapped. Each helper
//! vCPU serves its own mailbox (cgsvmm protocol); helper 0 also serves the
//! QEMU RFC seed protocol in the same mailbox. Pages leave encrypted with
//! AES-256-GCM under a per-session key derived from the transport key and
//! nonces of both helpers; see `cgsvmm_fw_abi::helper` for the wire layout
//! and the session lifecycle, `crypto` for the keys.
//!
//! Rules it keeps whatever the host does: only page-aligned GPAs inside guest
//! RAM are read or written; a page is written only after its record
//! authenticated, from a private copy (the host cannot change the ciphertext
//! between the tag check and the decryption), and only if its generation is
//! newer than the last one written there; a helper serves only the index it
//! claimed (below the configured helper count, no other helper's).
//!
//! # Threat model
//!
//! The host (its kernel, the VMM, the network) is untrusted for the
//! confidentiality and integrity of private pages. It may send any command
//! to any helper at any time and in any order, race helpers against each
//! other, change the mailbox while a helper reads it, pause a helper
//! between two instructions, replay, reorder, drop or splice records and
//! seals, lie in CPUID and in the launch configuration it writes.
//!
//! **What the helper guarantees, on any backend**, as long as its own
//! private memory and registers are out of the host's reach (see below):
//! - no (key, nonce) pair is ever used twice: nonce counters live in the
//!   session state, are reserved under the session lock and never reset
//!   within a boot; keys are fresh per session (both sides' nonces);
//! - the target writes only pages the source's helper sealed in this
//!   session, for this GPA and generation, never an older generation over a
//!   newer one, never a torn page (one writer per page at a time);
//! - a session ends for good: no ENCRYPT after SEAL, no DECRYPT after
//!   VERIFY_SEAL, keys wiped (`zeroize`, and `Wiped` for ring's and the AES
//!   crate's key schedules);
//! - VERIFY_SEAL succeeds only if every RAM page outside the shared ranges
//!   was written in this session, the source sealed every such page too,
//!   both sides declared the same shared ranges, the target applied
//!   exactly the records the source sealed (count and keyed digest), and
//!   the host's stream hash matches the one the source's helper sealed (the
//!   VMMs hash every frame from the configuration to the seal in order,
//!   helper records by their headers and tags: a stream whose frames were
//!   altered, moved, split, dropped or added on the way does not verify);
//! - session nonces come from RDSEED/RDRAND or there is no session (no TSC
//!   fallback; all-0, all-1 and repeated words are refused);
//! - sessions are bound to the VM's identity (`vm_id`, the owner's UUID, and
//!   its RAM ranges, from the measured launch configuration): a transport key
//!   shared by several VMs does not carry pages between them;
//! - anything read from shared memory that a decision depends on is read
//!   once: request slots and headers into locals, pages and ciphertext by
//!   single loads (`cgsvmm-page-gcm` reads through an `asm!` load per 32
//!   bytes; the general path through one `rep movsb` into private memory),
//!   shared ranges once each, hashed as read.
//!
//! The guest is not trusted with the transport key either: the mirror
//! region (this image, its key page, counters, generation table and the
//! mailboxes) is mapped only into the mirror VM, so nothing the guest runs,
//! at any privilege, can read or write it (the VMM's `Memory::main_slots`).
//!
//! **What the host learns**: which GPAs it asked for and when, their
//! generations, record and seal sizes (constant), how long the helper took
//! (the AES-GCM code paths are constant time; what varies is the host's own
//! scheduling), and which pages it declared shared (it knows that anyway).
//! Never a private page's plaintext, unless one of the platform limits
//! below applies.
//!
//! **What the host can always do**: stop migrating (not run the helpers,
//! drop everything: denial of service is out of scope); choose which dirty
//! pages to send. Whether the last version of a page was sent depends on
//! the host's dirty log: the helper cannot tell that a page changed after
//! it sealed it. It may declare private pages shared: they then leave
//! through the VMM, which on SEV reads only their ciphertext under the
//! source's memory key, so the target gets garbage there (an integrity
//! loss plain SEV has anyway), never plaintext.
//!
//! **Per backend**:
//! - `none` (no memory encryption): the host reads and writes all guest
//!   memory, the helper's included. The helper then protects the stream in
//!   transit (a network attacker can neither read nor alter pages) and
//!   nothing against the host itself.
//! - plain SEV: memory is encrypted but neither register state nor memory
//!   integrity is protected. At any exit (the idle wait's `out`, a signal
//!   kick, an interrupt) the host can read the helper's general and vector
//!   registers, which hold round keys, GHASH powers and plaintext being
//!   sealed: a host willing to do so can take a session key and read that
//!   session's records. It can also replay old ciphertext of the helper's
//!   private memory (its counters, its generation table, its claims).
//!   Plain SEV therefore keeps private pages from a passive or buggy host,
//!   not from a determined one.
//! - SEV-ES would encrypt register state (the VMSA) and measure the mirror
//!   vCPU's initial state; the helper would need a #VC handler (CPUID, the
//!   `out` of its idle wait and of the lab port become #VC exceptions handled
//!   through the GHCB, which means a small CPL0 stub) and a measured VMSA for
//!   each mirror vCPU. SEV-SNP adds memory integrity (the RMP: no replay or
//!   remapping of private memory), validated CPUID, and lets the helper check
//!   with PVALIDATE/RMPQUERY-style evidence which pages are really private.
//!   That port is future work; the helper uses no feature that would stand in
//!   its way.
//! - CPUID is the host's word until SNP: hiding VAES only moves the helper
//!   to the general path (same output); hiding RDSEED/RDRAND makes it refuse
//!   sessions; claiming features the CPU lacks faults the helper (denial of
//!   service, never a weaker key).
#![no_std]
#![no_main]

mod crypto;
mod mailbox;

use core::sync::atomic::AtomicU32;

use cgsvmm_guests::ranges::valid_ram;
use cgsvmm_guests::sync::IndexClaims;

use cgsvmm_guests::abi::helper::{self as h, cmd, status};
use cgsvmm_guests::abi::{self, GpaRange, MirrorParams};
use cgsvmm_guests::{guest_image, outl, rdtsc};

use mailbox::Mailbox;

// The HelperHeader follows the image header.
guest_image!(abi::IMAGE_KIND_HELPER, main;
    ".ascii \"CGSVMH01\"",
    ".long {abi}",
    ".long {max_helpers}",
    ".quad __mh_config",
    ".quad __mh_secret",
    ".quad __mh_mailbox",
    ".quad {stride}",
    ".quad __mh_gen_table",
    ".quad __mh_gen_table_size";
    abi = h::MH_ABI_VERSION,
    max_helpers = h::MAX_HELPERS,
    stride = h::MAILBOX_SIZE
);

/// How long a helper keeps polling after its last request before it leaves
/// the CPU (a mailbox round trip costs ~0.4 µs, a wake-up ~20 µs). Short:
/// during a migration on a 2-core host four helpers and their clients
/// share the CPUs, and a helper polling for the next frame takes the CPU
/// the host needs to deliver it (200 µs: a 256 MiB migration took 690 ms;
/// 50 µs: 510 ms).
const IDLE_POLL_US: u64 = 50;

/// The header the linker placed at the start of the image.
fn helper_header() -> h::HelperHeader {
    // SAFETY: the HelperHeader immediately follows the 40-byte ImageHeader at
    // the image's load address (see the global_asm above); it is read-only.
    unsafe { core::ptr::read_volatile((abi::MIRROR_IMAGE_GPA + 40) as *const h::HelperHeader) }
}

/// What every helper needs to know, read once at start.
#[derive(Clone, Copy)]
pub struct Env {
    /// Guest RAM ranges (the only GPAs we touch).
    pub ram: [GpaRange; 2],
    /// Valid entries of `ram`.
    pub ram_count: usize,
    /// Generation table base (one AtomicU32 per guest page).
    pub gen_table: u64,
    /// Entries the table holds.
    pub gen_entries: u64,
    /// Helpers running.
    pub helper_count: u32,
    /// Debug commands allowed.
    pub debug: bool,
    /// Pages are sealed on the VAES page path (else through ring).
    pub page_seal: bool,
    /// TSC ticks per microsecond.
    pub tsc_per_us: u64,
    /// Behave as if the CPU had no RDSEED/RDRAND (tests).
    pub no_hw_entropy: bool,
    /// Launched to receive a migration: target sessions allowed (until one
    /// verified).
    pub incoming: bool,
    /// HKDF info: `HKDF_INFO || vm_id || RAM range count (u64 LE) ||
    /// ranges (start, end as u64 LE)`, the VM's identity from the measured
    /// launch configuration.
    pub hkdf_info: [u8; HKDF_INFO_LEN],
}

/// Bytes of [`Env::hkdf_info`].
pub const HKDF_INFO_LEN: usize = h::HKDF_INFO.len() + 16 + 8 + 2 * 16;

/// The VM's identity as the key derivation binds it.
fn hkdf_info(config: &h::HelperConfig) -> [u8; HKDF_INFO_LEN] {
    let mut info = [0u8; HKDF_INFO_LEN];
    let (prefix, rest) = info.split_at_mut(h::HKDF_INFO.len());
    prefix.copy_from_slice(h::HKDF_INFO);
    rest[..16].copy_from_slice(&config.vm_id);
    rest[16..24].copy_from_slice(&config.ram_range_count.to_le_bytes());
    for (i, r) in config
        .ram
        .iter()
        .take(config.ram_range_count as usize)
        .enumerate()
    {
        let at = 24 + i * 16;
        rest[at..at + 8].copy_from_slice(&r.start.to_le_bytes());
        rest[at + 8..at + 16].copy_from_slice(&r.end.to_le_bytes());
    }
    info
}

impl Env {
    /// The generation-table index of `gpa`, if it is a page of guest RAM.
    pub fn page_index(&self, gpa: u64) -> Option<u64> {
        if !gpa.is_multiple_of(h::PAGE_SIZE as u64) {
            return None;
        }
        let mut base = 0;
        for r in &self.ram[..self.ram_count] {
            if gpa >= r.start && gpa.checked_add(h::PAGE_SIZE as u64)? <= r.end {
                let index = base + (gpa - r.start) / h::PAGE_SIZE as u64;
                return (index < self.gen_entries).then_some(index);
            }
            base += (r.end - r.start) / h::PAGE_SIZE as u64;
        }
        None
    }

    /// The generation last written at table index `i`.
    pub fn generation(&self, i: u64) -> &AtomicU32 {
        // SAFETY: page_index bounds `i` by gen_entries, which the VMM sized to
        // the table's mapped, private area; AtomicU32 has u32's layout.
        unsafe { &*((self.gen_table + i * 4) as *const AtomicU32) }
    }

    /// Pages of RAM (entries the table uses).
    pub fn ram_pages(&self) -> u64 {
        self.ram[..self.ram_count]
            .iter()
            .map(|r| (r.end - r.start) / h::PAGE_SIZE as u64)
            .sum()
    }
}

/// The launch configuration, if it is usable: magic, at most two RAM
/// ranges, each page aligned, ascending, disjoint and outside the mirror
/// region (see `ranges::valid_ram`), no more pages than the generation
/// table has entries.
fn read_env() -> Option<Env> {
    let header = helper_header();
    // SAFETY: the config page named by our own header is mapped; read once.
    let config: h::HelperConfig =
        unsafe { core::ptr::read_volatile(header.config_gpa as *const h::HelperConfig) };
    let count = config.ram_range_count as usize;
    let mirror = GpaRange {
        start: abi::MIRROR_REGION_GPA,
        end: abi::MIRROR_REGION_GPA + abi::MIRROR_REGION_SIZE,
    };
    if config.magic != h::CONFIG_MAGIC
        || count > config.ram.len()
        || !valid_ram(&config.ram[..count], &mirror)
    {
        return None;
    }
    let env = Env {
        ram: config.ram,
        ram_count: count,
        gen_table: header.gen_table_gpa,
        gen_entries: header.gen_table_size / 4,
        helper_count: config
            .helper_count
            .min(h::MAX_HELPERS)
            .min(header.max_helpers),
        debug: config.flags & h::CONFIG_FLAG_DEBUG != 0,
        page_seal: config.flags & h::CONFIG_FLAG_GENERIC_SEAL == 0 && cgsvmm_page_gcm::supported(),
        tsc_per_us: (config.tsc_khz / 1000).max(1),
        no_hw_entropy: config.flags & h::CONFIG_FLAG_NO_HW_ENTROPY != 0,
        incoming: config.flags & h::CONFIG_FLAG_INCOMING != 0,
        hkdf_info: hkdf_info(&config),
    };
    // Every RAM page needs its generation-table entry.
    (env.ram_pages() <= env.gen_entries).then_some(env)
}

/// The helper indices taken (in private memory).
static CLAIMS: IndexClaims = IndexClaims::new();

/// Serves nothing, ever: a helper without a usable configuration or whose
/// index was refused tells the VMM once per wake-up and leaves the CPU.
fn refuse() -> ! {
    loop {
        outl(abi::LAB_PORT, abi::LAB_CMD_HELPER_REFUSED);
    }
}

/// Leaves the CPU until the VMM re-enters us (doorbell or timeout).
fn wait_for_work(index: u32) {
    outl(abi::LAB_PORT, abi::LAB_CMD_WAIT | index << 16);
}

extern "C" fn main(params: &MirrorParams) -> ! {
    let Some(env) = read_env() else { refuse() };
    // The index names our mailbox, nonce counter and scratch page: it must
    // be one of the configured helpers' and nobody else's.
    let vcpu_index = params.vcpu_index;
    if !CLAIMS.claim(vcpu_index, env.helper_count) {
        refuse();
    }
    let index = vcpu_index as u32;
    let header = helper_header();
    let mbox = Mailbox::new(header.mailbox_gpa + u64::from(index) * header.mailbox_stride);
    let mut served = mbox.resp_seq();
    // Whether the last request answered succeeded (CHAIN requests need it).
    let mut last_ok = true;
    let mut idle_since = rdtsc();
    loop {
        let mut worked = false;
        if index == 0 && mbox.seed_go() {
            mailbox::serve_seed(&mbox, &env);
            worked = true;
        }
        // Queued requests are answered one at a time, in order.
        if mbox.req_seq() != served {
            let n = served.wrapping_add(1);
            last_ok = serve(&mbox, &env, index, n, last_ok);
            mbox.finish(n);
            served = n;
            worked = true;
        }
        if worked {
            idle_since = rdtsc();
            continue;
        }
        if rdtsc().wrapping_sub(idle_since) > IDLE_POLL_US * env.tsc_per_us {
            mbox.set_state(h::state::SLEEPING);
            // Re-check after announcing sleep, so a request posted meanwhile
            // is seen here or rings our doorbell.
            if mbox.req_seq() == served && !(index == 0 && mbox.seed_go()) {
                wait_for_work(index);
            }
            mbox.set_state(h::state::AWAKE);
            mbox.bump_heartbeat();
            // No reset of idle_since: woken without work, the helper looks
            // once and leaves the CPU again; only real work earns it a
            // polling period (which would otherwise steal a core from busy
            // helpers every time an idle one wakes up).
        }
        core::hint::spin_loop();
    }
}

/// Runs request `n` (its slot is read once); returns whether it succeeded.
/// A CHAIN request after one that did not succeed is not run.
fn serve(mbox: &Mailbox, env: &Env, index: u32, n: u64, previous_ok: bool) -> bool {
    let request = mbox.request(n);
    let start = rdtsc();
    let result = if request.flags & h::flags::CHAIN != 0 && !previous_ok {
        Err((status::SKIPPED, request.first))
    } else {
        run(mbox, env, index, &request)
    };
    let busy = rdtsc().wrapping_sub(start);
    match result {
        Ok(count) => mbox.set_result(n, status::OK, count, 0, busy),
        Err((code, at)) => mbox.set_result(n, code, 0, at, busy),
    }
    result.is_ok()
}

fn run(
    mbox: &Mailbox,
    env: &Env,
    index: u32,
    request: &h::RequestSlot,
) -> Result<u32, crypto::Failure> {
    match request.cmd {
        cmd::HELLO => {
            let reply = h::HelloReply {
                version: h::MH_ABI_VERSION,
                helper_index: index,
                caps: h::caps::BATCH
                    | h::caps::MULTI_HELPER
                    | h::caps::IDLE_WAIT
                    | h::caps::AES256_GCM
                    | h::caps::SEAL
                    | h::caps::QUEUE
                    | if env.page_seal {
                        h::caps::VAES_PAGE_SEAL
                    } else {
                        0
                    },
                max_batch: h::MAX_BATCH,
                helper_count: env.helper_count,
            };
            mbox.write_arg(&reply);
            Ok(0)
        }
        cmd::SESSION_BEGIN => crypto::begin(mbox, env).map(|_| 0),
        cmd::SESSION_PEER => crypto::peer(mbox, env).map(|_| 0),
        cmd::SESSION_END => {
            crypto::end();
            Ok(0)
        }
        cmd::ENCRYPT_BATCH => crypto::encrypt_batch(mbox, request, env, index),
        cmd::DECRYPT_BATCH => crypto::decrypt_batch(mbox, request, env, index),
        cmd::SEAL => crypto::seal(mbox, env).map(|_| 0),
        cmd::VERIFY_SEAL => crypto::verify_seal(mbox, env).map(|_| 0),
        cmd::DEBUG_HANG if env.debug => loop {
            core::hint::spin_loop();
        },
        cmd::DEBUG_FAULT if env.debug => {
            // SAFETY: deliberately faults (no IDT: triple fault, which the
            // VMM reports as a helper fault).
            unsafe { core::arch::asm!("ud2", options(noreturn)) }
        }
        cmd::DEBUG_HANG | cmd::DEBUG_FAULT => Err((status::DEBUG_DISABLED, 0)),
        _ => Err((status::BAD_COMMAND, 0)),
    }
}
