//! `deckhand-runc`: an OCI runtime CLI with runc's command line, over `deckhand_cri::oci`.
//! Single-threaded, no async runtime: `create`/`run`/`exec` clone the container's processes.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use deckhand_cri::oci::{self, CreateOptions, ExecOptions, Runtime};

#[derive(Parser)]
#[command(
    name = "deckhand-runc",
    version,
    about = "Deckhand's OCI runtime (runc-compatible command line)"
)]
struct Cli {
    /// Root directory for container state.
    #[arg(long, global = true, default_value = oci::DEFAULT_ROOT)]
    root: PathBuf,
    /// Also write errors and warnings to this file.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for compatibility (cgroups are driven through cgroupfs).
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    #[arg(long, global = true, hide = true)]
    rootless: Option<String>,
    #[arg(long, global = true, hide = true)]
    criu: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct CreateArgs {
    /// Path to the bundle directory.
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    #[arg(long)]
    pid_file: Option<PathBuf>,
    #[arg(long)]
    console_socket: Option<PathBuf>,
    #[arg(long)]
    no_pivot: bool,
    #[arg(long)]
    no_new_keyring: bool,
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
    id: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a container (its process waits for `start`).
    Create(CreateArgs),
    /// Start a created container.
    Start { id: String },
    /// Output the state of a container as OCI state JSON.
    State { id: String },
    /// Send a signal to the container's init (default SIGTERM).
    Kill {
        #[arg(short, long)]
        all: bool,
        id: String,
        signal: Option<String>,
    },
    /// Delete a container.
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// Create and start a container; wait for it and return its exit code unless --detach.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        #[arg(short, long)]
        detach: bool,
    },
    /// Run a process in a running container.
    Exec {
        /// An OCI process JSON file.
        #[arg(short, long)]
        process: Option<PathBuf>,
        #[arg(short, long)]
        detach: bool,
        #[arg(long)]
        pid_file: Option<PathBuf>,
        #[arg(short, long)]
        tty: bool,
        #[arg(long)]
        console_socket: Option<PathBuf>,
        #[arg(long)]
        cwd: Option<PathBuf>,
        #[arg(short, long)]
        env: Vec<String>,
        #[arg(long)]
        no_new_privs: bool,
        #[arg(long, default_value_t = 0)]
        preserve_fds: u32,
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// List the processes of a container.
    Ps {
        #[arg(short, long, default_value = "table")]
        format: String,
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// List containers.
    List {
        #[arg(short, long, default_value = "table")]
        format: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Output what this runtime supports (OCI features JSON, partial).
    Features,
}

struct Log {
    file: Option<std::fs::File>,
    json: bool,
}

impl Log {
    fn write(&mut self, level: &str, msg: &str) {
        if let Some(f) = &mut self.file {
            let line = if self.json {
                serde_json::json!({"level": level, "msg": msg, "time": oci::time::now()})
                    .to_string()
            } else {
                format!("time=\"{}\" level={level} msg={msg:?}", oci::time::now())
            };
            let _ = writeln!(f, "{line}");
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut log = Log {
        file: cli.log.as_ref().and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        }),
        json: cli.log_format == LogFormat::Json,
    };
    if matches!(cli.cmd, Cmd::Create(_) | Cmd::Run { .. } | Cmd::Exec { .. })
        && let Err(e) = oci::sealed::ensure_sealed()
    {
        {
            log.write("error", &format!("re-executing from a sealed copy: {e}"));
            eprintln!("deckhand-runc: re-executing from a sealed copy: {e}");
            return ExitCode::from(1);
        }
    }
    match run(cli, &mut log) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let msg = format!("{e:#}");
            log.write("error", &msg);
            eprintln!("{msg}");
            ExitCode::from(1)
        }
    }
}

fn create(rt: &Runtime, a: &CreateArgs, log: &mut Log) -> Result<i32> {
    let c = rt.create(
        &a.id,
        &a.bundle,
        &CreateOptions {
            pid_file: a.pid_file.clone(),
            stdio: None,
            console_socket: a.console_socket.clone(),
        },
    )?;
    for w in &c.warnings {
        log.write("warning", w);
        if log.file.is_none() {
            eprintln!("warning: {w}");
        }
    }
    Ok(c.pid)
}

fn run(cli: Cli, log: &mut Log) -> Result<u8> {
    let rt = Runtime::new(&cli.root);
    match cli.cmd {
        Cmd::Create(a) => {
            create(&rt, &a, log)?;
        }
        Cmd::Start { id } => rt.start(&id)?,
        Cmd::State { id } => println!("{}", serde_json::to_string_pretty(&rt.state(&id)?)?),
        Cmd::Kill { all, id, signal } => {
            let s = signal.as_deref().unwrap_or("TERM");
            let sig = oci::parse_signal(s).ok_or_else(|| anyhow!("invalid signal {s:?}"))?;
            rt.kill(&id, sig, all)?;
        }
        Cmd::Delete { force, id } => match rt.delete(&id, force) {
            Err(oci::Error::NotFound(_)) if force => {}
            r => r?,
        },
        Cmd::Run { create: a, detach } => {
            let pid = create(&rt, &a, log)?;
            if let Err(e) = rt.start(&a.id) {
                let _ = rt.delete(&a.id, true);
                return Err(e.into());
            }
            if detach {
                return Ok(0);
            }
            let code = rt.wait_init(pid).unwrap_or(255);
            rt.delete(&a.id, true)?;
            return Ok(code as u8);
        }
        Cmd::Exec {
            process,
            detach,
            pid_file,
            tty,
            console_socket,
            cwd,
            env,
            no_new_privs,
            preserve_fds: _,
            id,
            args,
        } => {
            let proc_spec: oci_spec::runtime::Process = match process {
                Some(p) => {
                    let data =
                        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                    serde_json::from_slice(&data)
                        .with_context(|| format!("parsing {}", p.display()))?
                }
                None => {
                    if args.is_empty() {
                        bail!("exec: no command given (args or --process)");
                    }
                    let st = rt.state(&id)?;
                    let data = std::fs::read(st.bundle.join("config.json"))
                        .context("reading the container's config.json")?;
                    let spec: oci_spec::runtime::Spec =
                        serde_json::from_slice(&data).context("parsing config.json")?;
                    let mut p = spec
                        .process()
                        .clone()
                        .ok_or_else(|| anyhow!("config.json has no process"))?;
                    p.set_args(Some(args));
                    p.set_terminal(Some(tty));
                    let mut e = p.env().clone().unwrap_or_default();
                    e.extend(env);
                    p.set_env(Some(e));
                    if let Some(c) = cwd {
                        p.set_cwd(c);
                    }
                    if no_new_privs {
                        p.set_no_new_privileges(Some(true));
                    }
                    p
                }
            };
            let (_, code) = rt.exec(
                &id,
                &proc_spec,
                &ExecOptions {
                    pid_file,
                    detach,
                    stdio: None,
                    console_socket,
                },
            )?;
            return Ok(code.unwrap_or(0) as u8);
        }
        Cmd::Ps {
            format,
            id,
            ps_args: _,
        } => {
            let pids = rt.pids(&id)?;
            if format == "json" {
                println!("{}", serde_json::to_string(&pids)?);
            } else {
                println!("PID");
                for p in pids {
                    println!("{p}");
                }
            }
        }
        Cmd::List { format, quiet } => {
            let states: Vec<_> = rt
                .list()?
                .iter()
                .filter_map(|id| rt.state(id).ok())
                .collect();
            if format == "json" {
                println!("{}", serde_json::to_string(&states)?);
            } else if quiet {
                states.iter().for_each(|s| println!("{}", s.id));
            } else {
                println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED");
                for s in states {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        s.id,
                        s.pid,
                        s.status,
                        s.bundle.display(),
                        s.created
                    );
                }
            }
        }
        Cmd::Features => {
            let f = serde_json::json!({
                "ociVersionMin": "1.0.0",
                "ociVersionMax": "1.0.2",
                "mountOptions": ["ro","rw","nosuid","suid","nodev","dev","noexec","exec","bind","rbind",
                    "private","rprivate","shared","rshared","slave","rslave","unbindable","runbindable",
                    "relatime","norelatime","strictatime","nostrictatime","noatime","atime"],
                "linux": {
                    "namespaces": ["mount","pid","network","ipc","uts","cgroup"],
                    "seccomp": {"enabled": true, "actions": ["SCMP_ACT_ALLOW","SCMP_ACT_ERRNO","SCMP_ACT_KILL",
                        "SCMP_ACT_KILL_THREAD","SCMP_ACT_KILL_PROCESS","SCMP_ACT_LOG","SCMP_ACT_TRAP","SCMP_ACT_TRACE"],
                        "operators": ["SCMP_CMP_NE","SCMP_CMP_LT","SCMP_CMP_LE","SCMP_CMP_EQ","SCMP_CMP_GE","SCMP_CMP_GT","SCMP_CMP_MASKED_EQ"],
                        "archs": [if cfg!(target_arch = "x86_64") { "SCMP_ARCH_X86_64" } else { "SCMP_ARCH_AARCH64" }]},
                },
            });
            println!("{}", serde_json::to_string_pretty(&f)?);
        }
    }
    Ok(0)
}
