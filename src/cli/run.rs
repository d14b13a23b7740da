//! `cgsvmm run`: the flags become a [`VmmConfig`] (rules between flags that
//! the config cannot express are checked here; every rule on its values is
//! `VmmConfig::validate`'s), which the library builds and runs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;

use cgsvmm_vmm::boot::linux::LinuxConfig;
use cgsvmm_vmm::confidential::sev::{self, LaunchSecret, SevConfig};
use cgsvmm_vmm::confidential::Confidential;
use cgsvmm_vmm::config::{
    self, BootConfig, HelperLaunch, Incoming, LabGuest, SerialConfig, VmmConfig,
};
use cgsvmm_vmm::machine::exit::ExitReason;
use cgsvmm_vmm::{Vmm, VmmError};

/// The kernel command line when `--cmdline` is not given.
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

#[derive(Clone, Copy, ValueEnum)]
enum GuestArg {
    /// Writes and checks every page in endless passes (default).
    Dirtier,
    /// Prints one line and powers off.
    Hello,
    /// The dirtier entered at CPL0, declaring its shared blocks with
    /// KVM_HC_MAP_GPA_RANGE (needs a host whose ring 0 runs natively).
    DirtierRing0,
    /// The dirtier, and its vCPU 0 turns a shared block private and back
    /// once a pass, writing a marker into it while private (tests of
    /// conversions during a migration).
    Converter,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Guest RAM: a number of MiB or a size with K/M/G/T.
    #[arg(long, default_value = "256M", value_parser = config::parse_memory)]
    memory: u64,
    /// Number of vCPUs the guest sees.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    cpus: i64,
    /// Number of mirror vCPUs (never seen by the guest).
    #[arg(
        long = "mirror-cpus",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    mirror_cpus: i64,
    /// Embedded lab guest to run (when no kernel or firmware is given).
    #[arg(long, value_enum, conflicts_with_all = ["kernel", "firmware"])]
    guest: Option<GuestArg>,
    /// Linux kernel (bzImage or ELF vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: console=ttyS0 reboot=k panic=1].
    #[arg(long, requires = "kernel")]
    cmdline: Option<String>,
    /// Firmware image (e.g. OVMF.fd), mapped to end at 4 GiB.
    #[arg(long)]
    firmware: Option<PathBuf>,
    /// QMP control socket: unix:PATH.
    #[arg(long, value_parser = config::parse_qmp)]
    qmp: Option<PathBuf>,
    /// Serial port: stdio, null or file:PATH (null or a file for a VMM run
    /// in the background: with stdio a shell stops it when it reads).
    #[arg(long, default_value = "stdio", value_parser = config::parse_serial)]
    serial: SerialConfig,
    /// Transport key (64 hex digits) for the migration helper, which then
    /// runs on the mirror vCPUs.
    #[arg(long = "transport-key-file")]
    transport_key_file: Option<PathBuf>,
    /// The VM's UUID (as QEMU's -uuid): bound into the migration helper's
    /// session keys, so give every VM that shares a transport key its own,
    /// and the migration target the source's.
    #[arg(long, value_parser = config::parse_uuid)]
    uuid: Option<[u8; 16]>,
    /// Confidential backend: none (no memory encryption) or sev (AMD SEV;
    /// the migration helper then runs on the mirror vCPUs).
    #[arg(long, value_enum, default_value = "none")]
    confidential: ConfidentialArg,
    /// SEV guest policy (0x... or decimal).
    #[arg(long = "sev-policy", value_parser = config::parse_policy)]
    sev_policy: Option<u32>,
    /// SEV launch secret for the helper's transport key: a JSON file with
    /// base64 "packet-header" and "secret", as QEMU's
    /// sev-inject-launch-secret takes them.
    #[arg(long = "sev-secret")]
    sev_secret: Option<PathBuf>,
    /// The guest owner's Diffie-Hellman certificate (SEV LAUNCH_START).
    #[arg(long = "sev-dh-cert")]
    sev_dh_cert: Option<PathBuf>,
    /// The guest owner's launch session blob (SEV LAUNCH_START).
    #[arg(long = "sev-session")]
    sev_session: Option<PathBuf>,
    /// Receive a migrated guest instead of booting one: tcp:HOST:PORT or
    /// unix:PATH (wait for the source), file:PATH (restore a snapshot), or
    /// defer (wait for QMP migrate-incoming). Needs the migration helper.
    #[arg(long, value_parser = config::parse_incoming)]
    incoming: Option<Incoming>,
    /// Keep the guest paused (after an incoming migration, or before its
    /// first instruction) until QMP cont, as QEMU's -S.
    #[arg(long, short = 'S')]
    paused: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ConfidentialArg {
    /// No memory encryption.
    None,
    /// AMD SEV.
    Sev,
}

impl TryFrom<RunArgs> for VmmConfig {
    type Error = config::ConfigError;

    fn try_from(a: RunArgs) -> Result<Self, Self::Error> {
        let sev_flags = a.sev_policy.is_some()
            || a.sev_secret.is_some()
            || a.sev_dh_cert.is_some()
            || a.sev_session.is_some();
        let confidential = match a.confidential {
            ConfidentialArg::None if sev_flags => {
                return Err(config::ConfigError::Conflict(
                    "--sev-* flags need --confidential sev",
                ))
            }
            ConfidentialArg::None => Confidential::None,
            // Checked before the key file is read (VmmConfig::validate checks
            // it again for every other caller).
            ConfidentialArg::Sev if a.transport_key_file.is_some() => {
                return Err(config::ConfigError::Conflict(
                    config::SEV_WITH_TRANSPORT_KEY,
                ))
            }
            ConfidentialArg::Sev => {
                let secret = match &a.sev_secret {
                    Some(path) => Some(LaunchSecret::from_file(path).map_err(|e| {
                        config::ConfigError::File {
                            flag: "--sev-secret",
                            path: path.clone(),
                            why: e.to_string(),
                        }
                    })?),
                    None => None,
                };
                let blob = |flag, path: &Option<PathBuf>| {
                    path.as_deref()
                        .map(|p| config::read_blob(flag, p))
                        .transpose()
                };
                Confidential::Sev(SevConfig {
                    policy: a.sev_policy.unwrap_or(sev::DEFAULT_POLICY),
                    dh_cert: blob("--sev-dh-cert", &a.sev_dh_cert)?,
                    session: blob("--sev-session", &a.sev_session)?,
                    secret,
                })
            }
        };
        let incoming = a.incoming.is_some();
        let helper = match (&a.transport_key_file, &confidential) {
            (Some(path), _) => Some(HelperLaunch {
                key: Some(config::read_transport_key(path)?),
                vm_id: a.uuid.unwrap_or_default(),
                incoming,
                ..Default::default()
            }),
            // The key arrives by LAUNCH_SECRET.
            (None, Confidential::Sev(_)) => Some(HelperLaunch {
                key: None,
                vm_id: a.uuid.unwrap_or_default(),
                incoming,
                ..Default::default()
            }),
            (None, Confidential::None) if a.uuid.is_some() => {
                return Err(config::ConfigError::Conflict(
                    "--uuid names the VM to its migration helper: it needs \
                     --transport-key-file or --confidential sev",
                ))
            }
            (None, Confidential::None) => None,
        };
        // (clap's `requires` is not checked when --guest is given.)
        if a.kernel.is_none() && (a.initrd.is_some() || a.cmdline.is_some()) {
            return Err(config::ConfigError::Conflict(
                "--initrd and --cmdline go with --kernel; a lab guest takes neither",
            ));
        }
        let linux = a.kernel.map(|kernel| LinuxConfig {
            kernel,
            initrd: a.initrd,
            cmdline: a.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.into()),
        });
        let count = |flag, max, n: i64| {
            usize::try_from(n).map_err(|_| config::ConfigError::CpuCount { flag, max, got: n })
        };
        let cpus = count("cpus", config::MAX_CPUS, a.cpus)?;
        let mirror_cpus = count("mirror-cpus", config::MAX_MIRROR_CPUS, a.mirror_cpus)?;
        let boot = match (a.firmware, linux, a.guest) {
            (Some(path), kernel, _) => BootConfig::Firmware { path, kernel },
            (None, Some(linux), _) => BootConfig::Linux(linux),
            (None, None, Some(GuestArg::Hello)) => BootConfig::Lab(LabGuest::Hello),
            (None, None, Some(GuestArg::DirtierRing0)) => BootConfig::Lab(LabGuest::DirtierRing0),
            (None, None, Some(GuestArg::Converter)) => BootConfig::Lab(LabGuest::Converter),
            (None, None, _) => BootConfig::Lab(LabGuest::Dirtier),
        };
        Ok(VmmConfig {
            memory: a.memory,
            cpus,
            mirror_cpus,
            boot,
            qmp: a.qmp,
            serial: a.serial,
            helper,
            confidential,
            incoming: a.incoming,
            paused: a.paused,
        })
    }
}

/// Builds and runs the VM until it stops; its exit code says why.
pub fn exec(args: RunArgs) -> ExitCode {
    let result = VmmConfig::try_from(args)
        .map_err(VmmError::from)
        .and_then(Vmm::try_from)
        .and_then(Vmm::run);
    match result {
        Ok(reason) => {
            match &reason {
                ExitReason::IncomingFailed(_) => eprintln!("cgsvmm: error: {reason}"),
                r if r.exit_code() != 0 => eprintln!("cgsvmm: stopped: {r}"),
                _ => {}
            }
            ExitCode::from(reason.exit_code())
        }
        Err(e) => super::report(&e),
    }
}
