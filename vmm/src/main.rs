//! The `cgsvmm` command: parses the command line into a `VmmConfig` and hands
//! it to the library. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use cgsvmm::boot::linux::LinuxConfig;
use cgsvmm::confidential::sev::{self, LaunchSecret, SevConfig};
use cgsvmm::confidential::Confidential;
use cgsvmm::config::{self, BootConfig, HelperLaunch, Incoming, LabGuest, SerialConfig, VmmConfig};
use cgsvmm::Vmm;

/// The kernel command line when `--cmdline` is not given.
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

#[derive(Parser)]
#[command(
    name = "cgsvmm",
    version,
    about = "A minimal KVM VMM that live-migrates confidential guests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until it powers off, `quit` over QMP, or Ctrl-C.
    Run(Box<RunArgs>),
    /// Send one QMP command to a running cgsvmm and print its reply.
    Qmp(QmpArgs),
    /// Migrate a running cgsvmm's guest live (over its QMP socket), with a
    /// progress bar and a summary.
    Migrate(MigrateArgs),
    /// Start a source and a target on this machine, migrate the embedded
    /// dirtier live between them, and check that it verifies its memory on
    /// the target (exit 0 only then).
    Demo(DemoArgs),
    /// Measure a component and print the numbers.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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
            value_parser = config::parse_seconds
        )]
        host_seconds: std::time::Duration,
    },
}

#[derive(clap::Args)]
struct QmpArgs {
    /// The VMM's QMP socket: unix:PATH, as given to `run --qmp` (or just
    /// the path).
    #[arg(value_parser = parse_qmp_socket)]
    socket: PathBuf,
    /// The command, e.g. query-status, stop, cont, quit.
    command: String,
    /// Its arguments, as a JSON object.
    #[arg(value_parser = parse_json_object)]
    arguments: Option<serde_json::Map<String, serde_json::Value>>,
    /// Seconds to wait for the socket to appear (at most 2) and for the
    /// reply (0.05 to 60).
    #[arg(
        long,
        default_value = "10",
        allow_negative_numbers = true,
        value_parser = config::parse_seconds
    )]
    timeout: std::time::Duration,
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// The source's QMP socket: unix:PATH, as given to `run --qmp`.
    #[arg(long, value_parser = parse_qmp_socket)]
    qmp: PathBuf,
    /// Where the guest goes: tcp:HOST:PORT or unix:PATH (a target started
    /// with --incoming), or file:PATH (a snapshot).
    #[arg(value_parser = parse_migration_uri)]
    uri: String,
    /// Longest pause the guest should see, in milliseconds (QEMU's
    /// downtime-limit; default 300).
    #[arg(long = "downtime-limit")]
    downtime_limit: Option<u64>,
    /// Bytes per second at most on the wire, with K/M/G for KiB/MiB/GiB
    /// (QEMU's max-bandwidth; 0, the default, for no limit).
    #[arg(long = "max-bandwidth", value_parser = parse_bandwidth)]
    max_bandwidth: Option<u64>,
    /// Migration helpers to use (default: all the VM has).
    #[arg(long)]
    helpers: Option<u64>,
    /// No progress bar (only the summary).
    #[arg(long = "no-progress")]
    no_progress: bool,
}

fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("expected bytes per second, e.g. 50000000 or 50M, got '{s}'"))
}

fn parse_migration_uri(s: &str) -> Result<String, String> {
    s.parse::<cgsvmm_migration::transport::Uri>()
        .map(|u| u.to_string())
        .map_err(|e| e.to_string())
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Guest RAM.
    #[arg(long, default_value = "256M", value_parser = config::parse_memory)]
    memory: u64,
    /// Guest vCPUs (1-8).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=8))]
    cpus: u8,
    /// Migration helpers on each side (1-4).
    #[arg(long = "mirror-cpus", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=4))]
    mirror_cpus: u8,
    /// Longest pause the guest should see, in milliseconds.
    #[arg(long = "downtime-limit", default_value_t = 300)]
    downtime_limit: u64,
    /// Seconds the guest verifies itself on the target (1-60).
    #[arg(long = "verify-seconds", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    verify_seconds: u64,
    /// No progress bar.
    #[arg(long = "no-progress")]
    no_progress: bool,
}

fn parse_qmp_socket(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("unix:") {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        Some(_) => Err("no path after unix:".into()),
        None if s.contains(':') && !s.starts_with('/') && !s.starts_with('.') => {
            Err("only unix:PATH sockets are supported".into())
        }
        None => Ok(PathBuf::from(s)),
    }
}

fn parse_json_object(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err("arguments must be a JSON object, e.g. '{\"name\": \"value\"}'".into()),
        Err(e) => Err(format!("not JSON ({e})")),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum GuestArg {
    /// Writes and checks every page in endless passes (default).
    Dirtier,
    /// Prints one line and powers off.
    Hello,
    /// The dirtier entered at CPL0, declaring its shared blocks with
    /// KVM_HC_MAP_GPA_RANGE (needs a host whose ring 0 runs natively).
    DirtierRing0,
}

#[derive(clap::Args)]
struct RunArgs {
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
            ConfidentialArg::Sev if a.transport_key_file.is_some() => {
                return Err(config::ConfigError::Conflict(
                    "with --confidential sev the transport key comes in the guest owner's \
                     launch secret (--sev-secret), not --transport-key-file",
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

/// The error and its causes on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench {
            what:
                BenchCommand::Helper {
                    pages,
                    reps,
                    host_seconds,
                },
        } => {
            let config = cgsvmm::bench::BenchConfig {
                pages,
                reps,
                host_time: host_seconds,
            };
            match cgsvmm::bench::run(config) {
                Ok(report) => {
                    print!("{}", report.render());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cgsvmm: error: {}", one_line(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate(a) => {
            let request = cgsvmm::migrate_cmd::MigrateRequest {
                uri: a.uri.clone(),
                downtime_limit_ms: a.downtime_limit,
                max_bandwidth: a.max_bandwidth,
                helpers: a.helpers,
                progress: !a.no_progress,
            };
            match cgsvmm::migrate_cmd::migrate(&a.qmp, &request) {
                Ok(summary) => {
                    print!("{}", summary.render(&a.uri));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cgsvmm: error: {}", one_line(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo(a) => {
            // The same checks `run` makes, before anything starts.
            let probe = VmmConfig {
                memory: a.memory,
                ..Default::default()
            };
            if let Err(e) = probe.validate() {
                eprintln!("cgsvmm: error: {}", one_line(&e));
                return ExitCode::from(2);
            }
            let config = cgsvmm::demo::DemoConfig {
                memory: format!("{}M", a.memory >> 20),
                cpus: usize::from(a.cpus),
                helpers: usize::from(a.mirror_cpus),
                downtime_limit_ms: a.downtime_limit,
                verify_for: std::time::Duration::from_secs(a.verify_seconds),
                progress: !a.no_progress,
            };
            match cgsvmm::demo::run(&config) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cgsvmm: error: {}", one_line(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Qmp(a) => {
            match cgsvmm::qmp::client::call(&a.socket, &a.command, a.arguments, a.timeout) {
                Ok(reply) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&reply).unwrap_or_else(|_| reply.to_string())
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cgsvmm: error: {}", one_line(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            let result = VmmConfig::try_from(*args)
                .map_err(cgsvmm::VmmError::from)
                .and_then(Vmm::try_from)
                .and_then(Vmm::run);
            match result {
                Ok(reason) => {
                    match &reason {
                        cgsvmm::exit::ExitReason::IncomingFailed(why) => {
                            eprintln!("cgsvmm: error: incoming migration {why}")
                        }
                        r if r.exit_code() != 0 => eprintln!("cgsvmm: stopped: {r:?}"),
                        _ => {}
                    }
                    ExitCode::from(reason.exit_code() as u8)
                }
                Err(e) => {
                    eprintln!("cgsvmm: error: {}", one_line(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}
