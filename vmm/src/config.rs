//! What a VM is made of, as plain data, validated once.
//!
//! Front ends (the CLI, tests) build a [`VmmConfig`]; [`VmmConfig::validate`]
//! rejects impossible configurations with one clear message before any KVM
//! call is made.

use std::path::PathBuf;

use crate::boot::linux::LinuxConfig;
use crate::boot::mptable;
use crate::confidential::Confidential;
use crate::memory::{MEMORY_GRANULE, MIB, MIN_MEMORY};

/// How the migration helper is launched.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HelperLaunch {
    /// The transport key (none: the helper refuses sessions).
    pub key: Option<[u8; 32]>,
    /// Allow the debug commands (hang, fault): tests only.
    pub debug: bool,
    /// Seal pages the general way even where the VAES page path could
    /// run: tests of the path CPUs without VAES take.
    pub generic_seal: bool,
    /// The VM's identity (`--uuid`), bound into every session key.
    pub vm_id: [u8; 16],
    /// Make the helper behave as on a CPU without RDSEED and RDRAND, which
    /// refuses every session: tests of that refusal.
    pub no_hw_entropy: bool,
    /// The VM is launched to receive a migration: its helper takes target
    /// sessions (until one verified); a VM launched to boot never does.
    pub incoming: bool,
}

/// Where the guest's serial port goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// The VMM's stdin/stdout.
    #[default]
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    Null,
}

/// The embedded lab guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabGuest {
    /// Writes and checks every page, forever (the migration test guest).
    #[default]
    Dirtier,
    /// Prints a line and powers off.
    Hello,
    /// The dirtier entered at CPL0, so that it declares its shared blocks
    /// with KVM_HC_MAP_GPA_RANGE as a real guest would (hosts whose ring 0
    /// runs natively only).
    DirtierRing0,
    /// The dirtier whose vCPU 0 also turns a shared block private and back
    /// once a pass, marking it while private (`LAB_FLAG_CONVERT`): the
    /// tests of conversions during precopy.
    Converter,
}

impl LabGuest {
    /// The guest's name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LabGuest::Dirtier => "dirtier",
            LabGuest::Hello => "hello",
            LabGuest::DirtierRing0 => "dirtier-ring0",
            LabGuest::Converter => "converter",
        }
    }

    /// The embedded image it runs.
    pub fn image(self) -> &'static str {
        match self {
            LabGuest::Dirtier | LabGuest::DirtierRing0 | LabGuest::Converter => "dirtier",
            LabGuest::Hello => "hello",
        }
    }

    /// Whether it starts at CPL0 (else CPL3).
    pub fn ring0(self) -> bool {
        self == LabGuest::DirtierRing0
    }

    /// Its `LabParams::flags`.
    pub fn flags(self) -> u32 {
        match self {
            LabGuest::Converter => cgsvmm_fw_abi::LAB_FLAG_CONVERT,
            _ => 0,
        }
    }
}

/// What the VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootConfig {
    /// An embedded lab guest, entered at CPL3.
    Lab(LabGuest),
    /// A Linux kernel loaded directly.
    Linux(LinuxConfig),
    /// A firmware image at the top of 4 GiB; an optional kernel reaches it
    /// through fw_cfg.
    Firmware {
        /// The image.
        path: PathBuf,
        /// Kernel for the firmware to boot.
        kernel: Option<LinuxConfig>,
    },
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig::Lab(LabGuest::default())
    }
}

/// A whole VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Main vCPUs.
    pub cpus: usize,
    /// Mirror vCPUs.
    pub mirror_cpus: usize,
    /// What to boot.
    pub boot: BootConfig,
    /// QMP socket path.
    pub qmp: Option<PathBuf>,
    /// Serial port destination.
    pub serial: SerialConfig,
    /// Run the migration helper on the mirror vCPUs (instead of the
    /// counting payload).
    pub helper: Option<HelperLaunch>,
    /// How guest memory is kept from the host.
    pub confidential: Confidential,
    /// Build the VM to receive a migration instead of booting it.
    pub incoming: Option<Incoming>,
    /// Leave the guest paused after an incoming migration (QEMU's `-S`),
    /// or before its first instruction, until `cont`.
    pub paused: bool,
}

/// Where an incoming migration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Listen at (or read) this URI at once.
    Uri(cgsvmm_migration::transport::Uri),
    /// Wait for QMP `migrate-incoming`.
    Defer,
}

/// A flag's value that does not parse (clap shows it after the flag).
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    /// Not a migration URI.
    #[error(transparent)]
    Uri(#[from] cgsvmm_migration::transport::TransportError),
    /// A number of seconds out of its range.
    #[error("must be a number of seconds between 0.05 and 60")]
    SecondsRange,
    /// Not a number.
    #[error("not a number ({0})")]
    NotANumber(#[from] std::num::ParseFloatError),
    /// Not a UUID.
    #[error("not a UUID ({0}); expected e.g. 6a1d3c52-8f0e-4b6e-9a77-3c2b5d1e0f42")]
    Uuid(#[from] uuid::Error),
}

/// Parses `--incoming`: a migration URI or `defer`.
pub fn parse_incoming(s: &str) -> Result<Incoming, ValueError> {
    if s == "defer" {
        return Ok(Incoming::Defer);
    }
    Ok(Incoming::Uri(s.parse()?))
}

impl Default for VmmConfig {
    fn default() -> Self {
        Self {
            memory: 256 * MIB,
            cpus: 1,
            mirror_cpus: 1,
            boot: BootConfig::default(),
            qmp: None,
            serial: SerialConfig::default(),
            helper: None,
            confidential: Confidential::None,
            incoming: None,
            paused: false,
        }
    }
}

/// Most main vCPUs (the MP table's room, the lab boot area's room).
pub const MAX_CPUS: usize = mptable::MAX_CPUS;
/// Most mirror vCPUs.
pub const MAX_MIRROR_CPUS: usize = cgsvmm_fw_abi::MAX_MIRROR_VCPUS;

/// Why an SEV guest takes no transport key from the host (the
/// [`ConfigError::Conflict`] for it).
pub const SEV_WITH_TRANSPORT_KEY: &str =
    "with --confidential sev the transport key comes in the guest owner's \
     launch secret (--sev-secret), not --transport-key-file";

/// Configuration errors; each message is the whole story for the user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size that does not parse.
    #[error("invalid memory size '{0}' (expected e.g. 256M, 2G or a number of MiB)")]
    MemorySyntax(String),
    /// Too little or misaligned memory.
    #[error(
        "--memory must be at least {min} MiB and a multiple of {granule} MiB, got {got} bytes"
    )]
    MemorySize {
        /// Minimum in MiB.
        min: u64,
        /// Granule in MiB.
        granule: u64,
        /// What was asked for.
        got: u64,
    },
    /// More memory than the host has.
    #[error("--memory {asked} MiB does not fit this host ({host} MiB of RAM)")]
    MemoryTooLarge {
        /// MiB asked.
        asked: u64,
        /// MiB the host has.
        host: u64,
    },
    /// vCPU count out of range.
    #[error("--{flag} must be between 1 and {max}, got {got}")]
    CpuCount {
        /// Which flag.
        flag: &'static str,
        /// Maximum.
        max: usize,
        /// What was asked for (negative from the command line).
        got: i64,
    },
    /// A file that does not exist or cannot be read.
    #[error("{flag} {path}: {why}")]
    File {
        /// Which flag.
        flag: &'static str,
        /// Path.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Flags that do not go together.
    #[error("{0}")]
    Conflict(&'static str),
    /// A malformed --qmp or --serial value.
    #[error("invalid {flag} '{value}': {why}")]
    Syntax {
        /// Which flag.
        flag: &'static str,
        /// The value.
        value: String,
        /// Why.
        why: &'static str,
    },
}

/// Parses a memory size: a number with an optional K/M/G/T suffix (binary
/// units, optional "iB"/"B"); a bare number is MiB, as QEMU's `-m` has it.
pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::MemorySyntax(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| err())?;
    let shift = match unit {
        "" | "M" | "m" => 20,
        "K" | "k" => 10,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(err()),
    };
    n.checked_mul(1 << shift).ok_or_else(err)
}

/// Parses `unix:PATH` (QEMU's `server`/`nowait` options are accepted and
/// are what cgsvmm does anyway).
pub fn parse_qmp(s: &str) -> Result<PathBuf, ConfigError> {
    let err = |why| ConfigError::Syntax {
        flag: "--qmp",
        value: s.to_string(),
        why,
    };
    let rest = s
        .strip_prefix("unix:")
        .ok_or_else(|| err("only unix:PATH sockets are supported"))?;
    let mut parts = rest.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| err("missing socket path"))?;
    for opt in parts {
        if !matches!(opt, "server" | "server=on" | "nowait" | "wait=off") {
            return Err(err("unknown option (only server and nowait/wait=off)"));
        }
    }
    Ok(PathBuf::from(path))
}

/// Parses `stdio`, `null` or `file:PATH`.
pub fn parse_serial(s: &str) -> Result<SerialConfig, ConfigError> {
    match s {
        "stdio" => Ok(SerialConfig::Stdio),
        "null" | "none" => Ok(SerialConfig::Null),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
            _ => Err(ConfigError::Syntax {
                flag: "--serial",
                value: s.to_string(),
                why: "expected stdio, null or file:PATH",
            }),
        },
    }
}

/// Seconds between 0.05 and 60 (`bench helper --host-seconds`).
pub fn parse_seconds(s: &str) -> Result<std::time::Duration, ValueError> {
    match s.parse::<f64>()? {
        v if (0.05..=60.0).contains(&v) => Ok(std::time::Duration::from_secs_f64(v)),
        _ => Err(ValueError::SecondsRange),
    }
}

/// A UUID in its usual text form (`--uuid`), as 16 bytes in that order.
pub fn parse_uuid(s: &str) -> Result<[u8; 16], ValueError> {
    Ok(*uuid::Uuid::try_parse(s)?.as_bytes())
}

/// Reads a transport key file: 64 hex digits (256 bits), surrounding
/// whitespace allowed.
pub fn read_transport_key(path: &std::path::Path) -> Result<[u8; 32], ConfigError> {
    let fail = |why: String| ConfigError::File {
        flag: "--transport-key-file",
        path: path.to_path_buf(),
        why,
    };
    const FORM: &str = "expected 64 hex digits (a 256-bit key)";
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    // A raw binary key is not text: say what the file should hold.
    let text = String::from_utf8(bytes).map_err(|_| fail(FORM.into()))?;
    parse_transport_key(text.trim()).ok_or_else(|| fail(FORM.into()))
}

/// Parses an SEV policy: hexadecimal with `0x`, or decimal.
pub fn parse_policy(s: &str) -> Result<u32, ConfigError> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| ConfigError::Syntax {
        flag: "--sev-policy",
        value: s.to_string(),
        why: "expected a 32-bit number (0x... or decimal)",
    })
}

/// Reads a binary file a flag names.
pub fn read_blob(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::File {
        flag,
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// 64 hex digits as 32 bytes.
pub fn parse_transport_key(text: &str) -> Option<[u8; 32]> {
    // Exactly 64 hex digits: no sign, prefix or separator.
    let mut key = [0u8; 32];
    hex::decode_to_slice(text, &mut key).ok()?;
    Some(key)
}

/// The host's physical RAM in bytes (MemTotal), if it can be read.
pub fn host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn check_file(flag: &'static str, path: &PathBuf) -> Result<(), ConfigError> {
    let fail = |why: String| ConfigError::File {
        flag,
        path: path.clone(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| fail(e.to_string()))
}

impl VmmConfig {
    /// Checks everything that can be checked without KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with_host_memory(host_memory())
    }

    /// [`VmmConfig::validate`] against a given host RAM size.
    pub fn validate_with_host_memory(&self, host: Option<u64>) -> Result<(), ConfigError> {
        if self.memory < MIN_MEMORY || !self.memory.is_multiple_of(MEMORY_GRANULE) {
            return Err(ConfigError::MemorySize {
                min: MIN_MEMORY / MIB,
                granule: MEMORY_GRANULE / MIB,
                got: self.memory,
            });
        }
        if let Some(host) = host {
            if self.memory > host {
                return Err(ConfigError::MemoryTooLarge {
                    asked: self.memory / MIB,
                    host: host / MIB,
                });
            }
        }
        if self.incoming.is_some() && self.helper.is_none() {
            return Err(ConfigError::Conflict(
                "--incoming needs the migration helper, which receives the private pages: \
                 give --transport-key-file (or --confidential sev)",
            ));
        }
        // Only QMP can say the word these wait for.
        if self.qmp.is_none() {
            if matches!(self.incoming, Some(Incoming::Defer)) {
                return Err(ConfigError::Conflict(
                    "--incoming defer waits for QMP migrate-incoming: give --qmp unix:PATH",
                ));
            }
            if self.paused {
                return Err(ConfigError::Conflict(
                    "--paused waits for QMP cont: give --qmp unix:PATH",
                ));
            }
        }
        let given_key = self.helper.as_ref().is_some_and(|h| h.key.is_some());
        if matches!(self.confidential, Confidential::Sev(_)) && given_key {
            return Err(ConfigError::Conflict(SEV_WITH_TRANSPORT_KEY));
        }
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            return Err(ConfigError::CpuCount {
                flag: "cpus",
                max: MAX_CPUS,
                got: self.cpus as i64,
            });
        }
        if !(1..=MAX_MIRROR_CPUS).contains(&self.mirror_cpus) {
            return Err(ConfigError::CpuCount {
                flag: "mirror-cpus",
                max: MAX_MIRROR_CPUS,
                got: self.mirror_cpus as i64,
            });
        }
        let check_linux = |l: &LinuxConfig| -> Result<(), ConfigError> {
            check_file("--kernel", &l.kernel)?;
            if let Some(initrd) = &l.initrd {
                check_file("--initrd", initrd)?;
            }
            Ok(())
        };
        match &self.boot {
            BootConfig::Lab(_) => {}
            BootConfig::Linux(l) => check_linux(l)?,
            BootConfig::Firmware { path, kernel } => {
                check_file("--firmware", path)?;
                if let Some(l) = kernel {
                    check_linux(l)?;
                }
            }
        }
        if let SerialConfig::File(path) = &self.serial {
            if path.is_dir() {
                return Err(ConfigError::File {
                    flag: "--serial",
                    path: path.clone(),
                    why: "is a directory".into(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("256M"), Ok(256 << 20));
        assert_eq!(parse_memory("256"), Ok(256 << 20));
        assert_eq!(parse_memory("2G"), Ok(2 << 30));
        assert_eq!(parse_memory("2GiB"), Ok(2 << 30));
        assert_eq!(parse_memory("512MB"), Ok(512 << 20));
        assert_eq!(parse_memory("65536K"), Ok(64 << 20));
        for bad in [
            "",
            "M",
            "12X",
            "-1G",
            "1.5G",
            "99999999999999999999T",
            "1GG",
        ] {
            assert!(parse_memory(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn qmp_and_serial_syntax() {
        assert_eq!(
            parse_qmp("unix:/tmp/q.sock"),
            Ok(PathBuf::from("/tmp/q.sock"))
        );
        assert_eq!(
            parse_qmp("unix:/tmp/q,server,nowait"),
            Ok(PathBuf::from("/tmp/q"))
        );
        assert!(parse_qmp("tcp:127.0.0.1:4444").is_err());
        assert!(parse_qmp("unix:").is_err());
        assert!(parse_qmp("unix:/x,bogus").is_err());
        assert_eq!(parse_serial("stdio"), Ok(SerialConfig::Stdio));
        assert_eq!(parse_serial("null"), Ok(SerialConfig::Null));
        assert_eq!(
            parse_serial("file:/tmp/s"),
            Ok(SerialConfig::File("/tmp/s".into()))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("pty").is_err());
    }

    #[test]
    fn transport_keys() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let key = parse_transport_key(hex).unwrap();
        assert_eq!((key[0], key[1], key[15], key[31]), (0x00, 0x11, 0xff, 0xff));
        assert!(parse_transport_key(&hex[..62]).is_none());
        assert!(parse_transport_key(&hex.replace('0', "g")).is_none());
        assert!(parse_transport_key("é".repeat(32).as_str()).is_none());
        let path = std::env::temp_dir().join(format!("cgsvmm-key-{}", std::process::id()));
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        assert_eq!(read_transport_key(&path), Ok(key));
        std::fs::write(&path, "short").unwrap();
        let err = read_transport_key(&path).unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn validation() {
        let ok = VmmConfig::default();
        assert_eq!(ok.validate_with_host_memory(Some(1 << 30)), Ok(()));
        let sev = VmmConfig {
            confidential: Confidential::Sev(Default::default()),
            helper: Some(HelperLaunch::default()),
            ..ok.clone()
        };
        assert_eq!(sev.validate_with_host_memory(None), Ok(()));
        let keyed = VmmConfig {
            helper: Some(HelperLaunch {
                key: Some([7; 32]),
                ..Default::default()
            }),
            ..sev
        };
        assert_eq!(
            keyed.validate_with_host_memory(None),
            Err(ConfigError::Conflict(SEV_WITH_TRANSPORT_KEY))
        );
        let deaf = VmmConfig {
            helper: Some(HelperLaunch::default()),
            incoming: Some(Incoming::Defer),
            ..ok.clone()
        };
        assert!(matches!(
            deaf.validate_with_host_memory(None),
            Err(ConfigError::Conflict(why)) if why.contains("--qmp")
        ));
        let heard = VmmConfig {
            qmp: Some("/tmp/q.sock".into()),
            ..deaf
        };
        assert_eq!(heard.validate_with_host_memory(None), Ok(()));
        let waits = VmmConfig {
            paused: true,
            ..ok.clone()
        };
        assert!(matches!(
            waits.validate_with_host_memory(None),
            Err(ConfigError::Conflict(why)) if why.contains("cont")
        ));
        let c = VmmConfig {
            cpus: 0,
            ..ok.clone()
        };
        assert!(matches!(
            c.validate_with_host_memory(None),
            Err(ConfigError::CpuCount { flag: "cpus", .. })
        ));
        let c = VmmConfig {
            cpus: MAX_CPUS + 1,
            ..ok.clone()
        };
        assert!(c.validate_with_host_memory(None).is_err());
        let c = VmmConfig {
            mirror_cpus: 0,
            ..ok.clone()
        };
        assert!(matches!(
            c.validate_with_host_memory(None),
            Err(ConfigError::CpuCount {
                flag: "mirror-cpus",
                ..
            })
        ));
        let c = VmmConfig {
            memory: 8 * MIB,
            ..ok.clone()
        };
        assert!(matches!(
            c.validate_with_host_memory(None),
            Err(ConfigError::MemorySize { .. })
        ));
        let c = VmmConfig {
            memory: 17 * MIB,
            ..ok.clone()
        };
        assert!(c.validate_with_host_memory(None).is_err());
        let c = VmmConfig {
            memory: 64 << 30,
            ..ok.clone()
        };
        assert_eq!(
            c.validate_with_host_memory(Some(24 << 30)),
            Err(ConfigError::MemoryTooLarge {
                asked: 64 << 10,
                host: 24 << 10
            })
        );
        let missing = LinuxConfig {
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: None,
            cmdline: String::new(),
        };
        let c = VmmConfig {
            boot: BootConfig::Linux(missing),
            ..ok.clone()
        };
        let err = c.validate_with_host_memory(None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--kernel /nonexistent/vmlinuz: "),
            "{err}"
        );
        let c = VmmConfig {
            boot: BootConfig::Firmware {
                path: "/".into(),
                kernel: None,
            },
            ..ok
        };
        assert!(c
            .validate_with_host_memory(None)
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));
    }
}
