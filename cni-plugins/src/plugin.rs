//! The plugin side: reading a CNI invocation (environment + stdin), validating it, dispatching to
//! a [`Plugin`] and printing the result or the spec's error JSON; plus delegation to another
//! plugin (IPAM) found on `CNI_PATH`.
//!
//! A plugin binary is a thin `main`:
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     deckhand_cni::plugin::run(&deckhand_cni::loopback::Loopback)
//! }
//! ```
//!
//! [`run`] prints nothing on stdout but the result (ADD, VERSION) or the error JSON, and exits 0
//! on success and 1 on error, as the spec requires.

use std::ffi::OsString;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::error::CniError;
use crate::types::{CniResult, GcAttachment, NetConf};
use crate::version::{CniVersion, SUPPORTED_VERSIONS, VersionInfo};

/// The longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// A CNI command (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Attach a container to a network.
    Add,
    /// Detach; idempotent.
    Del,
    /// Verify an attachment (0.4.0+).
    Check,
    /// Clean up resources of attachments not in the valid list (1.1).
    Gc,
    /// Report readiness (1.1).
    Status,
    /// Report supported versions.
    Version,
}

impl Command {
    /// The name as in `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }

    /// Whether the command needs (CNI_CONTAINERID, CNI_IFNAME), and whether it needs CNI_NETNS.
    fn needs_attachment(self) -> (bool, bool) {
        match self {
            Command::Add | Command::Check => (true, true),
            Command::Del => (true, false),
            Command::Gc | Command::Status | Command::Version => (false, false),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Command {
    type Err = CniError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            _ => return Err(CniError::invalid_env(format!("unknown CNI_COMMAND: {s:?}"))),
        })
    }
}

/// One validated invocation, as a [`Plugin`] receives it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The command.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty for GC and STATUS).
    pub container_id: String,
    /// `CNI_NETNS` (required for ADD and CHECK, optional for DEL).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME` (empty for GC and STATUS).
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs, in order.
    pub args: Vec<(String, String)>,
    /// `CNI_PATH` split on `:`.
    pub cni_path: Vec<PathBuf>,
    /// The configuration as received on stdin (what to pass to a delegate).
    pub stdin: Vec<u8>,
    /// The configuration's common fields.
    pub config: NetConf,
    /// The configuration's (and the result's) version.
    pub version: CniVersion,
}

impl Request {
    /// Parses the configuration into the plugin's own type (unknown keys should be allowed).
    /// A malformed configuration is the spec's error 7 (invalid network config).
    pub fn parse_config<T: DeserializeOwned>(&self) -> Result<T, CniError> {
        serde_json::from_slice(&self.stdin)
            .map_err(|e| CniError::invalid_config(format!("invalid configuration: {e}")))
    }

    /// The value of a `CNI_ARGS` key.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The parsed `prevResult`, if any.
    pub fn prev_result(&self) -> Result<Option<CniResult>, CniError> {
        self.config.parsed_prev_result()
    }

    /// The attachments to keep (GC).
    pub fn valid_attachments(&self) -> Result<Vec<GcAttachment>, CniError> {
        self.config.valid_attachments()
    }

    /// The environment a delegate gets: this invocation's CNI variables with `command`.
    pub fn delegate_env(&self, command: Command) -> Vec<(String, OsString)> {
        let mut env: Vec<(String, OsString)> =
            vec![("CNI_COMMAND".into(), command.as_str().into())];
        if !self.container_id.is_empty() {
            env.push(("CNI_CONTAINERID".into(), self.container_id.clone().into()));
        }
        if let Some(ns) = &self.netns {
            env.push(("CNI_NETNS".into(), ns.clone().into_os_string()));
        }
        if !self.ifname.is_empty() {
            env.push(("CNI_IFNAME".into(), self.ifname.clone().into()));
        }
        let args = self
            .args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";");
        env.push(("CNI_ARGS".into(), args.into()));
        env.push(("CNI_PATH".into(), join_path(&self.cni_path)));
        env
    }

    /// Runs `plugin_type` (found on `CNI_PATH`) with `command`, this invocation's environment and
    /// the same configuration on stdin; returns its stdout. Errors are the delegate's own.
    pub fn delegate(&self, plugin_type: &str, command: Command) -> Result<Vec<u8>, CniError> {
        let bin = find_plugin(plugin_type, &self.cni_path).ok_or_else(|| {
            CniError::invalid_config(format!(
                "failed to find plugin {plugin_type:?} in path {:?}",
                self.cni_path
            ))
        })?;
        exec_plugin(&bin, &self.delegate_env(command), &self.stdin).map_err(|e| e.into_cni_error())
    }

    /// Delegated ADD (e.g. to the IPAM plugin in `ipam.type`): its result, converted to the
    /// current form.
    pub fn delegate_add(&self, plugin_type: &str) -> Result<CniResult, CniError> {
        let out = self.delegate(plugin_type, Command::Add)?;
        CniResult::from_json(&out)
    }

    /// Delegated DEL.
    pub fn delegate_del(&self, plugin_type: &str) -> Result<(), CniError> {
        self.delegate(plugin_type, Command::Del).map(drop)
    }

    /// Delegated CHECK.
    pub fn delegate_check(&self, plugin_type: &str) -> Result<(), CniError> {
        self.delegate(plugin_type, Command::Check).map(drop)
    }

    /// Delegated GC.
    pub fn delegate_gc(&self, plugin_type: &str) -> Result<(), CniError> {
        self.delegate(plugin_type, Command::Gc).map(drop)
    }

    /// Delegated STATUS.
    pub fn delegate_status(&self, plugin_type: &str) -> Result<(), CniError> {
        self.delegate(plugin_type, Command::Status).map(drop)
    }
}

/// What a plugin implements. Every method gets the validated [`Request`]; errors are printed as
/// the spec's error JSON by [`run`].
pub trait Plugin {
    /// The versions the plugin accepts (default: all this library supports).
    fn supported_versions(&self) -> &[CniVersion] {
        SUPPORTED_VERSIONS
    }

    /// A one-line description printed on stderr when run without `CNI_COMMAND`.
    fn about(&self) -> String {
        String::new()
    }

    /// ADD: returns the result (printed in the configuration's version).
    fn add(&self, req: &Request) -> Result<CniResult, CniError>;

    /// DEL: must succeed when there is nothing to delete.
    fn del(&self, req: &Request) -> Result<(), CniError>;

    /// CHECK (0.4.0+): `req.config.prev_result` holds the result of the ADD.
    fn check(&self, req: &Request) -> Result<(), CniError>;

    /// GC (1.1): release what belongs to attachments not in `req.valid_attachments()`.
    fn gc(&self, _req: &Request) -> Result<(), CniError> {
        Ok(())
    }

    /// STATUS (1.1): `Err` with code 50 when not ready for ADD.
    fn status(&self, _req: &Request) -> Result<(), CniError> {
        Ok(())
    }
}

/// Runs a plugin with the process's environment, stdin and stdout; the `main` of a plugin binary.
pub fn run<P: Plugin + ?Sized>(plugin: &P) -> ExitCode {
    ExitCode::from(run_code(plugin))
}

/// The body of a plugin binary's C `main` (`#![no_main]`, see the binaries in `src/bin`): the
/// part of Rust's runtime start-up a plugin needs, then [`run`]; returns the exit status.
///
/// A plugin runs for a few milliseconds, and std's start-up is a noticeable part of that (about
/// 0.3 ms of CPU here, mostly finding the main thread's stack guard by parsing
/// `/proc/self/maps`, plus the stack-overflow handlers and their alternate stack). What of it
/// matters is done here: the standard descriptors are opened on `/dev/null` if the caller closed
/// them (so no socket or file we open later becomes our stdout), and `SIGPIPE` is ignored (a
/// delegate that exits without reading its stdin is an error, not our death). A stack overflow
/// then ends in a plain `SIGSEGV` rather than std's message.
pub fn c_main<P: Plugin + ?Sized>(plugin: &P) -> i32 {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only inspects the descriptor table.
        if unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } == -1 {
            // The lowest free descriptor is `fd` (the lower ones are open by now); leaking it is
            // the point.
            if let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                std::mem::forget(f);
            }
        }
    }
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
    unsafe { nix::libc::signal(nix::libc::SIGPIPE, nix::libc::SIG_IGN) };
    i32::from(run_code(plugin))
}

fn run_code<P: Plugin + ?Sized>(plugin: &P) -> u8 {
    let mut stdin = Vec::new();
    let read = std::io::stdin().lock().read_to_end(&mut stdin);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let code = match read {
        Ok(_) => run_with(plugin, &|k| std::env::var(k).ok(), &stdin, &mut out),
        Err(e) => {
            let _ = writeln!(
                out,
                "{}",
                CniError::io(format!("reading stdin: {e}"))
                    .to_json(&CniVersion::LATEST.to_string())
            );
            1
        }
    };
    let _ = out.flush();
    code
}

/// Runs a plugin with the given environment lookup and stdin, writing to `out`; returns the exit
/// code (0 or 1). [`run`] is this over the real process; tests call it directly.
pub fn run_with<P: Plugin + ?Sized>(
    plugin: &P,
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    out: &mut dyn Write,
) -> u8 {
    // The version errors are reported in: the config's, if it has a readable one.
    let err_version = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|s| s.as_str())
                .map(str::to_string)
        })
        .filter(|s| s.parse::<CniVersion>().is_ok())
        .unwrap_or_else(|| CniVersion::LATEST.to_string());
    match dispatch(plugin, env, stdin) {
        Ok(Some(text)) => {
            if writeln!(out, "{text}").is_err() {
                return 1;
            }
            0
        }
        Ok(None) => 0,
        Err(e) => {
            tracing::debug!(code = e.code, msg = %e.msg, "plugin error");
            let _ = writeln!(out, "{}", e.to_json(&err_version));
            1
        }
    }
}

fn dispatch<P: Plugin + ?Sized>(
    plugin: &P,
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Option<String>, CniError> {
    let command = match env("CNI_COMMAND") {
        Some(c) if !c.is_empty() => c.parse::<Command>()?,
        _ => {
            let about = plugin.about();
            let versions: Vec<String> = plugin
                .supported_versions()
                .iter()
                .map(|v| v.to_string())
                .collect();
            eprintln!(
                "{about}\nCNI protocol versions supported: {}",
                versions.join(", ")
            );
            // As the reference plugins: a person ran the binary; tell them what it is.
            return Ok(None);
        }
    };
    let supported: Vec<String> = plugin
        .supported_versions()
        .iter()
        .map(|v| v.to_string())
        .collect();
    if command == Command::Version {
        let asked = serde_json::from_slice::<serde_json::Value>(stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(|s| s.as_str())
                    .map(str::to_string)
            })
            .filter(|s| s.parse::<CniVersion>().is_ok())
            .unwrap_or_else(|| CniVersion::LATEST.to_string());
        let info = VersionInfo {
            cni_version: asked,
            supported_versions: supported,
        };
        return serde_json::to_string(&info)
            .map(Some)
            .map_err(|e| CniError::io(e.to_string()));
    }

    let req = parse_request(command, env, stdin)?;
    if !plugin.supported_versions().contains(&req.version) {
        return Err(CniError::incompatible_version(format!(
            "incompatible CNI versions; config is \"{}\", plugin supports {supported:?}",
            req.config.cni_version
        )));
    }
    match command {
        Command::Check if !req.version.supports_check() => {
            return Err(CniError::incompatible_version(
                "config version does not allow CHECK",
            ));
        }
        Command::Gc | Command::Status if !req.version.supports_gc_status() => {
            return Err(CniError::incompatible_version(format!(
                "config version does not allow {command}"
            )));
        }
        _ => {}
    }
    tracing::debug!(%command, container = %req.container_id, ifname = %req.ifname, "CNI request");
    match command {
        Command::Add => {
            let result = plugin.add(&req)?;
            result.to_json(req.version).map(Some)
        }
        Command::Del => plugin.del(&req).map(|()| None),
        Command::Check => plugin.check(&req).map(|()| None),
        Command::Gc => plugin.gc(&req).map(|()| None),
        Command::Status => plugin.status(&req).map(|()| None),
        Command::Version => Ok(None),
    }
}

/// Builds and validates a [`Request`] from an environment lookup and stdin. Missing or invalid
/// variables are the spec's error 4, an undecodable configuration error 6, a bad version error 1.
pub fn parse_request(
    command: Command,
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Request, CniError> {
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    let (needs_att, needs_netns) = command.needs_attachment();
    let mut missing = Vec::new();
    let container_id = get("CNI_CONTAINERID").unwrap_or_default();
    let ifname = get("CNI_IFNAME").unwrap_or_default();
    let netns = get("CNI_NETNS").map(PathBuf::from);
    if needs_att && container_id.is_empty() {
        missing.push("CNI_CONTAINERID");
    }
    if needs_netns && netns.is_none() {
        missing.push("CNI_NETNS");
    }
    if needs_att && ifname.is_empty() {
        missing.push("CNI_IFNAME");
    }
    let cni_path_raw = get("CNI_PATH");
    if cni_path_raw.is_none() {
        missing.push("CNI_PATH");
    }
    if !missing.is_empty() {
        return Err(CniError::invalid_env(format!(
            "required env variables [{}] missing",
            missing.join(",")
        )));
    }
    if !container_id.is_empty() {
        validate_container_id(&container_id)?;
    }
    if !ifname.is_empty() {
        validate_ifname(&ifname)?;
    }
    let args = parse_cni_args(&get("CNI_ARGS").unwrap_or_default())?;
    let cni_path = cni_path_raw
        .unwrap_or_default()
        .split(':')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect();
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Err(CniError::decode("no network configuration on stdin"));
    }
    let config: NetConf = serde_json::from_slice(stdin)
        .map_err(|e| CniError::decode(format!("decoding network configuration: {e}")))?;
    let version = config.version()?;
    Ok(Request {
        command,
        container_id,
        netns,
        ifname,
        args,
        cni_path,
        stdin: stdin.to_vec(),
        config,
        version,
    })
}

/// Checks a container id as the spec requires: a letter or digit, then letters, digits, `_`,
/// `.` and `-`. Error 4 otherwise.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::invalid_env(format!(
            "invalid characters in containerID {id:?}"
        )))
    }
}

/// Checks a network name, which runtimes and IPAM plugins use in file names: a letter or digit,
/// then letters, digits, `_`, `.` and `-`. Error 7 otherwise.
pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::invalid_config(format!(
            "invalid network name {name:?}"
        )))
    }
}

/// Checks an interface name as Linux would accept it. Error 4 otherwise.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = name.is_empty()
        || name.len() > MAX_IFNAME_LEN
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if bad {
        Err(CniError::invalid_env(format!(
            "invalid interface name {name:?}"
        )))
    } else {
        Ok(())
    }
}

/// Parses `CNI_ARGS` (`K=V;K=V`). A pair without `=` is error 4.
pub fn parse_cni_args(s: &str) -> Result<Vec<(String, String)>, CniError> {
    s.split(';')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CniError::invalid_env(format!(
                "CNI_ARGS: invalid pair {p:?}"
            ))),
        })
        .collect()
}

fn join_path(dirs: &[PathBuf]) -> OsString {
    let mut s = OsString::new();
    for (i, d) in dirs.iter().enumerate() {
        if i > 0 {
            s.push(":");
        }
        s.push(d.as_os_str());
    }
    s
}

/// The first executable file named `plugin_type` in `dirs`. A type containing `/` is refused.
pub fn find_plugin(plugin_type: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if plugin_type.is_empty()
        || plugin_type.contains('/')
        || plugin_type == "."
        || plugin_type == ".."
    {
        return None;
    }
    dirs.iter().map(|d| d.join(plugin_type)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Why executing a plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The binary could not be started or talked to.
    #[error("executing {path}: {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The plugin exited non-zero; this is the error it printed (or one made from its stderr).
    #[error("{0}")]
    Plugin(CniError),
}

impl ExecError {
    /// The error as a CNI error (a spawn failure is error 5).
    pub fn into_cni_error(self) -> CniError {
        match self {
            ExecError::Spawn { .. } => CniError::io(self.to_string()),
            ExecError::Plugin(e) => e,
        }
    }
}

/// The CNI variables a plugin reads from its environment.
pub const CNI_ENV_VARS: &[&str] = &[
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

/// The code given to a failed plugin whose stdout is not an error JSON.
pub const UNPARSED_ERROR_CODE: u32 = 999;

/// Executes a plugin binary: `env` on top of the process's environment, `stdin` piped in,
/// stdout returned. A start that fails with ETXTBSY (the binary is still being written) is
/// retried a few times. A non-zero exit becomes [`ExecError::Plugin`] with the error the plugin
/// printed, or, if it printed none, one with code [`UNPARSED_ERROR_CODE`] and its stderr.
pub fn exec_plugin(
    path: &Path,
    env: &[(String, OsString)],
    stdin: &[u8],
) -> Result<Vec<u8>, ExecError> {
    use std::process::{Command as Cmd, Stdio};
    let mut attempt = 0;
    let mut child = loop {
        let mut cmd = Cmd::new(path);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        match cmd.spawn() {
            Ok(c) => break c,
            Err(e)
                if e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32) && attempt < 10 =>
            {
                attempt += 1;
                tracing::debug!(path = %path.display(), attempt, "plugin binary busy, retrying");
                std::thread::sleep(Duration::from_millis(50 * attempt));
            }
            Err(source) => {
                return Err(ExecError::Spawn {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    };
    // Write stdin from a thread so a plugin that writes a lot before reading cannot deadlock us.
    let writer = child.stdin.take().map(|mut w| {
        let data = stdin.to_vec();
        std::thread::spawn(move || {
            // A plugin may exit without reading its stdin: EPIPE is not our error.
            let _ = w.write_all(&data);
        })
    });
    let output = child
        .wait_with_output()
        .map_err(|source| ExecError::Spawn {
            path: path.to_path_buf(),
            source,
        })?;
    if let Some(w) = writer {
        let _ = w.join();
    }
    if output.status.success() {
        return Ok(output.stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    match serde_json::from_slice::<CniError>(&output.stdout) {
        Ok(e) if e.code != 0 || !e.msg.is_empty() => Err(ExecError::Plugin(e)),
        _ => Err(ExecError::Plugin(
            CniError::plugin(
                UNPARSED_ERROR_CODE,
                format!("netplugin failed ({})", output.status),
            )
            .with_details(if stderr.is_empty() {
                String::from_utf8_lossy(&output.stdout).trim().to_string()
            } else {
                stderr
            }),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<(Command, String)>>,
    }

    impl Plugin for Fake {
        fn add(&self, req: &Request) -> Result<CniResult, CniError> {
            self.calls
                .lock()
                .expect("lock")
                .push((Command::Add, req.container_id.clone()));
            Ok(CniResult {
                ips: vec![crate::types::IpConfig {
                    interface: None,
                    address: "10.0.0.2/24".parse().expect("net"),
                    gateway: None,
                }],
                ..Default::default()
            })
        }
        fn del(&self, req: &Request) -> Result<(), CniError> {
            self.calls
                .lock()
                .expect("lock")
                .push((Command::Del, req.container_id.clone()));
            Err(CniError::plugin(101, "nope"))
        }
        fn check(&self, _req: &Request) -> Result<(), CniError> {
            Ok(())
        }
    }

    fn call(p: &Fake, env: &[(&str, &str)], stdin: &str) -> (u8, serde_json::Value) {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut out = Vec::new();
        let code = run_with(p, &|k| env.get(k).cloned(), stdin.as_bytes(), &mut out);
        let v = if out.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&out).expect("json out")
        };
        (code, v)
    }

    const FULL: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p"),
    ];

    #[test]
    fn add_prints_result_in_requested_version() {
        let p = Fake::default();
        let (code, v) = call(
            &p,
            FULL,
            r#"{"cniVersion":"0.4.0","name":"n","type":"fake"}"#,
        );
        assert_eq!(code, 0);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["ips"][0]["version"], "4");
        let (code, v) = call(
            &p,
            FULL,
            r#"{"cniVersion":"1.1.0","name":"n","type":"fake"}"#,
        );
        assert_eq!(code, 0);
        assert!(v["ips"][0].get("version").is_none());
    }

    #[test]
    fn env_and_version_errors() {
        let p = Fake::default();
        let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"fake"}"#;
        let (code, v) = call(&p, &FULL[..2], conf);
        assert_eq!((code, v["code"].as_u64()), (1, Some(4)));
        assert!(v["msg"].as_str().expect("msg").contains("CNI_NETNS"));
        let (_, v) = call(&p, &[("CNI_COMMAND", "FOO")], conf);
        assert_eq!(v["code"], 4);
        let (_, v) = call(
            &p,
            FULL,
            r#"{"cniVersion":"0.2.0","name":"n","type":"fake"}"#,
        );
        assert_eq!(v["code"], 1);
        assert_eq!(v["cniVersion"], "0.2.0");
        let (_, v) = call(&p, FULL, "{not json");
        assert_eq!(v["code"], 6);
        let mut check = FULL.to_vec();
        check[0] = ("CNI_COMMAND", "CHECK");
        let (_, v) = call(
            &p,
            &check,
            r#"{"cniVersion":"0.3.1","name":"n","type":"fake"}"#,
        );
        assert_eq!(v["code"], 1);
        let gc = [("CNI_COMMAND", "GC"), ("CNI_PATH", "/x")];
        let (_, v) = call(&p, &gc, conf);
        assert_eq!(v["code"], 1);
        let (code, _) = call(
            &p,
            &gc,
            r#"{"cniVersion":"1.1.0","name":"n","type":"fake"}"#,
        );
        assert_eq!(code, 0);
        let mut bad_id = FULL.to_vec();
        bad_id[1] = ("CNI_CONTAINERID", "../etc");
        assert_eq!(call(&p, &bad_id, conf).1["code"], 4);
        let mut bad_if = FULL.to_vec();
        bad_if[3] = ("CNI_IFNAME", "a/b");
        assert_eq!(call(&p, &bad_if, conf).1["code"], 4);
        assert!(
            p.calls.lock().expect("lock").is_empty(),
            "nothing dispatched on bad input"
        );
    }

    #[test]
    fn del_without_netns_and_plugin_error() {
        let p = Fake::default();
        let env = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c2"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/x"),
        ];
        let (code, v) = call(
            &p,
            &env,
            r#"{"cniVersion":"1.1.0","name":"n","type":"fake"}"#,
        );
        assert_eq!(code, 1);
        assert_eq!(
            v,
            serde_json::json!({"cniVersion": "1.1.0", "code": 101, "msg": "nope"})
        );
        assert_eq!(
            p.calls.lock().expect("lock")[0],
            (Command::Del, "c2".to_string())
        );
    }

    #[test]
    fn version_command() {
        let p = Fake::default();
        let (code, v) = call(&p, &[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(code, 0);
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(
            v["supportedVersions"].as_array().expect("list").len(),
            SUPPORTED_VERSIONS.len()
        );
        let (_, v) = call(
            &p,
            &[("CNI_COMMAND", "VERSION")],
            r#"{"cniVersion":"0.4.0"}"#,
        );
        assert_eq!(v["cniVersion"], "0.4.0");
    }

    #[test]
    fn missing_command_prints_nothing_on_stdout() {
        let p = Fake::default();
        assert_eq!(call(&p, &[], ""), (0, serde_json::Value::Null));
    }

    #[test]
    fn exec_retries_while_binary_is_busy_and_parses_errors() {
        let tmp = tempfile::Builder::new()
            .prefix("dh-cni-exec-")
            .tempdir()
            .expect("tmp");
        let path = tmp.path().join("dh-busy");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&path)
            .expect("create");
        f.write_all(b"#!/bin/sh\ncat\n").expect("write");
        f.flush().expect("flush");
        // Still open for writing: exec fails with ETXTBSY until the writer closes it.
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(120));
            drop(f);
        });
        let out = exec_plugin(&path, &[], b"{\"x\":1}").expect("runs after retries");
        closer.join().expect("closer");
        assert_eq!(out, b"{\"x\":1}");

        let fail = tmp.path().join("dh-fail");
        std::fs::write(&fail, "#!/bin/sh\necho oops >&2\nexit 3\n").expect("write");
        std::fs::set_permissions(&fail, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        match exec_plugin(&fail, &[], b"") {
            Err(ExecError::Plugin(e)) => {
                assert_eq!((e.code, e.details.as_str()), (UNPARSED_ERROR_CODE, "oops"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            find_plugin("dh-fail", &[tmp.path().to_path_buf()]),
            Some(fail)
        );
        assert_eq!(find_plugin("../dh-fail", &[tmp.path().to_path_buf()]), None);
    }

    #[test]
    fn args_parsing() {
        let a = parse_cni_args("A=1;B=x=y;;").expect("ok");
        assert_eq!(
            a,
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(parse_cni_args("A").expect_err("bad").code, 4);
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("0123456789abcdef").is_err());
        assert!(validate_container_id("abc_1.2-3").is_ok());
        assert!(validate_container_id("-abc").is_err());
    }
}
