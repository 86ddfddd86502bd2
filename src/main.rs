//! The `frontdesk` command line: parses arguments, sets up logging, maps errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use frontdesk::config;
use frontdesk::store::{MessageFilter, Store};

/// mimalloc instead of glibc's malloc: on the webhook path glibc spent about a tenth of the CPU in
/// arena locks and bin upkeep (request bodies are freed on the writer thread, not where they were
/// allocated); the same run with mimalloc acknowledged ~10% more requests (bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sets mimalloc's options (`frontdesk::mimalloc_options` says why) before `main` and before any
/// allocation. The entry belongs to the binary that chose mimalloc, not to the library: there it
/// would run in every binary linking it, the tests and fuzz targets among them.
#[used]
#[unsafe(link_section = ".init_array")]
static MIMALLOC_OPTIONS: extern "C" fn() = frontdesk::mimalloc_options;

/// EX_CONFIG from sysexits.h: the unit's `RestartPreventExitStatus=78` keeps systemd from looping.
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "frontdesk",
    version,
    about = "Every client message in one queue, answered on time"
)]
struct Cli {
    /// Config file (default: $FRONTDESK_CONFIG, else /etc/frontdesk/frontdesk.yaml)
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log format: auto (journal under systemd, else text), text, json, journald
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Auto,
    Text,
    Json,
    Journald,
}

/// `frontdesk store ...`.
#[derive(Subcommand, Debug)]
enum StoreAction {
    /// Copy every table from a SQLite file into an empty PostgreSQL database and verify row
    /// counts and per-table SHA-256 checksums (stop the daemon first; the password may come
    /// from PGPASSWORD)
    Copy {
        /// sqlite:PATH (the source database file)
        #[arg(long)]
        from: String,
        /// postgres:URL (an empty database; e.g. postgres:postgres://frontdesk@db/frontdesk)
        #[arg(long)]
        to: String,
        /// One JSON array of {table, rows, sha256} on stdout
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: sources, core, sender and the HTTP server
    Run,
    /// Validate the config and print every problem
    Check {
        /// Config file to check (overrides --config)
        path: Option<PathBuf>,
    },
    /// Print the JSON Schema of the config file
    Schema,
    /// List stored messages, newest first
    Messages {
        /// One JSON array on stdout
        #[arg(long)]
        json: bool,
        /// Only this source
        #[arg(long)]
        source: Option<String>,
        /// At most this many
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Write a consistent copy of the database to PATH while the daemon runs
    Backup {
        /// The new database file (must not exist)
        path: PathBuf,
    },
    /// Move the queue between storage backends
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
    /// List conversations with their SLA state, most urgent first
    Conversations {
        /// One JSON array on stdout
        #[arg(long)]
        json: bool,
        /// idle, waiting, at_risk, breached or all
        #[arg(long, default_value = "all")]
        state: String,
        /// Only this owner's conversations
        #[arg(long)]
        owner: Option<String>,
    },
    /// Response-time statistics: count, median, p90 (business and calendar), share met
    Stats {
        /// One JSON array on stdout
        #[arg(long)]
        json: bool,
        /// From this date (YYYY-MM-DD or RFC 3339; default: 28 days ago)
        #[arg(long)]
        since: Option<String>,
        /// Until this date (exclusive; default: now)
        #[arg(long)]
        until: Option<String>,
        /// client, owner or source (default: everything together)
        #[arg(long)]
        by: Option<String>,
    },
    /// Explain a message's (or with --conversation, a conversation's) client, owner, policy and due time
    Explain {
        /// Message id (or conversation id with --conversation)
        id: i64,
        /// Treat ID as a conversation id
        #[arg(long)]
        conversation: bool,
    },
    /// Print the man page (roff) to stdout
    #[command(hide = true)]
    Manpage,
    /// Print shell completions to stdout
    #[command(hide = true)]
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Show the digest that would go out now (--preview) or send it now through the outbox (--send)
    Digest {
        /// Print the digest instead of sending it
        #[arg(long, conflicts_with = "send", required_unless_present = "send")]
        preview: bool,
        /// Send it now through the outbox
        #[arg(long)]
        send: bool,
        /// text or html (preview only)
        #[arg(long, value_enum, default_value_t = DigestFormat::Text)]
        format: DigestFormat,
        /// Only this owner's digest (their conversations plus unowned ones)
        #[arg(long)]
        owner: Option<String>,
        /// Which configured digest (default: the first)
        #[arg(long)]
        name: Option<String>,
    },
    /// One pass over the IMAP sources, then exit
    Sync {
        /// Only this source
        #[arg(long)]
        source: Option<String>,
    },
    /// Per source and folder: health, counts and the "nothing lost" ledger
    Sources {
        /// One JSON array on stdout
        #[arg(long)]
        json: bool,
    },
    /// OAuth2 logins of IMAP sources and SMTP channels
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Sign in once and store the refresh token in the state directory (mode 0600)
    Login {
        /// The IMAP source to sign in
        #[arg(long, conflicts_with = "channel", required_unless_present = "channel")]
        source: Option<String>,
        /// The SMTP channel to sign in
        #[arg(long)]
        channel: Option<String>,
        /// Device code flow: open a URL on any device and type a code (default where the provider allows it)
        #[arg(long, conflicts_with = "browser")]
        device: bool,
        /// Browser flow: open the printed URL; the browser returns to a listener on 127.0.0.1
        #[arg(long)]
        browser: bool,
        /// Port of the browser flow's loopback listener (default: any free port)
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
}

/// How `digest --preview` prints.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DigestFormat {
    /// The text part, with the subject on top
    Text,
    /// The HTML part
    Html,
}

/// A failure with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure {
            code: 1,
            message: format!("{e:#}"),
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    // One crypto provider for rustls, installed before any TLS client is built (stack.md §5.1).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("frontdesk: {}", f.message.trim_end());
            }
            ExitCode::from(f.code)
        }
    }
}

/// Keeps glibc's allocator from holding on to freed message buffers.
///
/// An IMAP sync hands every message between threads (fetched and normalized on one, its batch
/// committed from a runtime worker, its rows copied to sqlx's SQLite thread). By default glibc
/// gives each thread its own arena, and after the first large buffer is freed it raises its mmap
/// threshold (up to 32 MiB), so later message-sized buffers are carved from those arenas and
/// their freed space stays in the process: peak RSS then follows how the scheduler spread the
/// work rather than what is alive (81 MB was measured on an idle machine, where heaptrack counts
/// 13 MB live at the peak). Two arenas and a fixed 128 KiB mmap threshold (which also fixes the
/// trim threshold) hand large buffers back to the kernel when they are freed. It has to be a call
/// made before the first thread starts: glibc reads `MALLOC_ARENA_MAX` and friends only at
/// process start, so setting them from inside the process would have no effect.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_env("FRONTDESK_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,hyper=warn"));
    // async-imap traces every encoded command, LOGIN and AUTHENTICATE with their secrets
    // included: cap it at debug, whatever the filter says. lettre logs every line it writes at
    // debug ("Wrote: AUTH XOAUTH2 <base64 token>", AUTH PLAIN likewise): cap it at info.
    let filter = ["async_imap=debug", "imap_proto=debug", "lettre=info"]
        .iter()
        .filter_map(|d| d.parse().ok())
        .fold(filter, |f, d| f.add_directive(d));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let format = match format {
        LogFormat::Auto if under_journal => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    if format == LogFormat::Journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(layer)
                    .init();
                return;
            }
            // No journal socket (a container, a test): fall back to plain text on stderr.
            Err(_) => {
                let fmt = tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .with_ansi(false)
                    .without_time();
                tracing_subscriber::registry().with(filter).with(fmt).init();
                return;
            }
        }
    }
    if format == LogFormat::Json {
        let fmt = tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr);
        tracing_subscriber::registry().with(filter).with(fmt).init();
        return;
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry().with(filter).with(fmt).init();
}

fn load_config(path: &std::path::Path) -> Result<config::Loaded, Failure> {
    match config::load(path) {
        Ok(l) => {
            for w in &l.warnings {
                tracing::warn!("{w}");
            }
            Ok(l)
        }
        Err(e) => Err(Failure {
            code: EXIT_CONFIG,
            message: e.to_string(),
        }),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure {
            code: 1,
            message: format!("cannot start the async runtime: {e}"),
        })
}

fn dispatch(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Check { path } => {
            let path = config::resolve_path(path.as_deref().or(cli.config.as_deref()));
            match config::load(&path) {
                Ok(loaded) => {
                    for w in &loaded.warnings {
                        emit(&format!("warning: {w}\n"));
                    }
                    let c = &loaded.config;
                    emit(&format!(
                        "{}: ok ({} sources, {} channels, {} digests)\n",
                        path.display(),
                        c.sources.len(),
                        c.channels.len(),
                        c.digests.len()
                    ));
                    for o in oauth_logins(c) {
                        match frontdesk::oauth::login_needed(o) {
                            None => emit(&format!(
                                "oauth2 {}: logged in as {} (token in {})\n",
                                o.target,
                                o.username,
                                o.token_file.display()
                            )),
                            Some(why) => emit(&format!("login needed: {}: {why}\n", o.target)),
                        }
                    }
                    Ok(())
                }
                Err(e) => {
                    emit(&e.to_string());
                    Err(Failure {
                        code: EXIT_CONFIG,
                        message: String::new(),
                    })
                }
            }
        }
        Command::Backup { path } => {
            let cfg = config::resolve_path(cli.config.as_deref());
            let loaded = load_config(&cfg)?;
            runtime()?.block_on(async move {
                let store = open_store(&loaded.config).await?;
                store.backup(&path).await.map_err(anyhow::Error::from)?;
                let copy = Store::open(&path).await.map_err(anyhow::Error::from)?;
                let verdict = copy.integrity_check().await.map_err(anyhow::Error::from)?;
                if verdict != "ok" {
                    return Err(Failure {
                        code: 1,
                        message: format!(
                            "backup {} failed its integrity check: {verdict}",
                            path.display()
                        ),
                    });
                }
                emit(&format!(
                    "{}: {} messages, integrity ok\n",
                    path.display(),
                    copy.message_count().await.map_err(anyhow::Error::from)?
                ));
                Ok(())
            })
        }
        Command::Store {
            action: StoreAction::Copy { from, to, json },
        } => {
            let usage = |m: String| Failure {
                code: 1,
                message: m,
            };
            let from = from
                .strip_prefix("sqlite:")
                .ok_or_else(|| usage(format!("--from {from}: write sqlite:PATH")))?
                .to_string();
            let to = match to.strip_prefix("postgres:") {
                Some(rest)
                    if rest.starts_with("postgres://") || rest.starts_with("postgresql://") =>
                {
                    rest.to_string()
                }
                _ => {
                    return Err(usage(format!(
                        "--to {}: write postgres:postgres://USER@HOST/DATABASE",
                        frontdesk::store::redact_url(&to)
                    )));
                }
            };
            runtime()?.block_on(async move {
                let copied = frontdesk::store::copy::sqlite_to_postgres(
                    std::path::Path::new(&from),
                    &to,
                    None,
                )
                .await
                .map_err(|e| usage(e.to_string()))?;
                if json {
                    emit(&format!(
                        "{}\n",
                        serde_json::to_string_pretty(&copied).map_err(anyhow::Error::from)?
                    ));
                } else {
                    let mut out = String::new();
                    for c in &copied {
                        out +=
                            &format!("{:<22} {:>10} rows  sha256 {}\n", c.table, c.rows, c.sha256);
                    }
                    out += &format!(
                        "copied {} rows into {}; counts and checksums match\n",
                        copied.iter().map(|c| c.rows).sum::<u64>(),
                        frontdesk::store::redact_url(&to)
                    );
                    emit(&out);
                }
                Ok(())
            })
        }
        Command::Manpage => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut buf)
                .map_err(anyhow::Error::from)?;
            emit(&String::from_utf8_lossy(&buf));
            Ok(())
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "frontdesk", &mut buf);
            emit(&String::from_utf8_lossy(&buf));
            Ok(())
        }
        Command::Schema => {
            let schema = config::json_schema();
            emit(&format!(
                "{}\n",
                serde_json::to_string_pretty(&schema).unwrap_or_default()
            ));
            Ok(())
        }
        Command::Auth {
            command:
                AuthCommand::Login {
                    source,
                    channel,
                    device,
                    browser,
                    port,
                },
        } => {
            let path = config::resolve_path(cli.config.as_deref());
            let loaded = load_config(&path)?;
            let target = match (source, channel) {
                (Some(s), _) => config::LoginTarget::Source(s),
                // clap requires one of the two
                (None, c) => config::LoginTarget::Channel(c.unwrap_or_default()),
            };
            let Some(oauth) = oauth_logins(&loaded.config)
                .into_iter()
                .find(|o| o.target == target)
                .cloned()
            else {
                let kind = match target {
                    config::LoginTarget::Source(_) => "an IMAP source",
                    config::LoginTarget::Channel(_) => "an SMTP channel",
                };
                return Err(Failure {
                    code: 64,
                    message: format!(
                        "`{}` is not {kind} with auth.oauth2 in {}",
                        target.name(),
                        path.display()
                    ),
                });
            };
            let flow = if device {
                frontdesk::oauth::login::Flow::Device
            } else if browser {
                frontdesk::oauth::login::Flow::Browser
            } else {
                frontdesk::oauth::login::default_flow(&oauth)
            };
            runtime()?.block_on(async move {
                let mut say = |text: &str| emit(text);
                let done = frontdesk::oauth::login::login(&oauth, flow, port, &mut say)
                    .await
                    .map_err(|e| Failure {
                        code: 1,
                        message: e.to_string(),
                    })?;
                emit(&format!("{done}\n"));
                Ok::<(), Failure>(())
            })
        }
        Command::Run => {
            let path = config::resolve_path(cli.config.as_deref());
            let loaded = load_config(&path)?;
            runtime()?.block_on(frontdesk::daemon::run(loaded.config))?;
            Ok(())
        }
        Command::Digest {
            preview: _,
            send,
            format,
            owner,
            name,
        } => {
            let path = config::resolve_path(cli.config.as_deref());
            let loaded = load_config(&path)?;
            runtime()?.block_on(digest_command(loaded.config, send, format, owner, name))
        }
        Command::Messages {
            json,
            source,
            limit,
        } => {
            let path = config::resolve_path(cli.config.as_deref());
            let loaded = load_config(&path)?;
            runtime()?.block_on(async move {
                let store = open_store(&loaded.config).await?;
                let rows = store
                    .messages(&MessageFilter {
                        source,
                        limit: Some(limit),
                    })
                    .await
                    .map_err(anyhow::Error::from)?;
                if json {
                    emit(&format!(
                        "{}\n",
                        serde_json::to_string_pretty(&rows).map_err(anyhow::Error::from)?
                    ));
                } else {
                    frontdesk::cli_text::print_messages(&rows);
                }
                Ok::<(), Failure>(())
            })
        }
        Command::Conversations { json, state, owner } => {
            if !["all", "idle", "waiting", "at_risk", "breached"].contains(&state.as_str()) {
                return Err(Failure {
                    code: 64,
                    message: format!(
                        "unknown --state '{state}': use idle, waiting, at_risk, breached or all"
                    ),
                });
            }
            let path = config::resolve_path(cli.config.as_deref());
            let loaded = load_config(&path)?;
            runtime()?.block_on(async move {
                let store = open_store(&loaded.config).await?;
                let rows = store
                    .conversations(&frontdesk::store::core::ConversationFilter {
                        state: Some(state),
                        owner,
                    })
                    .await
                    .map_err(anyhow::Error::from)?;
                if json {
                    emit(&format!(
                        "{}\n",
                        serde_json::to_string_pretty(&rows).map_err(anyhow::Error::from)?
                    ));
                } else {
                    let mut out = String::new();
                    for r in &rows {
                        out.push_str(&format!(
                            "{:>6}  {:<9} {:<24} {:<10} due {}\n",
                            r.id,
                            r.state,
                            frontdesk::cli_text::one_line(&r.client, 24),
                            r.owner.as_deref().unwrap_or("-"),
                            r.due_at.map_or("-".to_string(), |t| t.to_rfc3339()),
                        ));
                    }
                    emit(&out);
                }
                Ok::<(), Failure>(())
            })
        }
        Command::Stats {
            json,
            since,
            until,
            by,
        } => {
            let parse = |s: &str| -> Result<chrono::DateTime<chrono::Utc>, Failure> {
                chrono::DateTime::parse_from_rfc3339(s)
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .or_else(|_| {
                        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                            .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
                    })
                    .map_err(|_| Failure {
                        code: 64,
                        message: format!("bad date '{s}': use YYYY-MM-DD or RFC 3339"),
                    })
            };
            let now = chrono::Utc::now();
            let until = until.as_deref().map(parse).transpose()?.unwrap_or(now);
            let since = since
                .as_deref()
                .map(parse)
                .transpose()?
                .unwrap_or(until - chrono::TimeDelta::days(28));
            use frontdesk::sla::stats::GroupBy;
            let group = match by.as_deref() {
                None => GroupBy::All,
                Some("client") => GroupBy::Client,
                Some("owner") => GroupBy::Owner,
                Some("source") => GroupBy::Source,
                Some(other) => {
                    return Err(Failure {
                        code: 64,
                        message: format!("unknown --by '{other}': use client, owner or source"),
                    });
                }
            };
            let path = config::resolve_path(cli.config.as_deref());
            let loaded = load_config(&path)?;
            runtime()?.block_on(async move {
                let store = open_store(&loaded.config).await?;
                let rows = store
                    .fulfilled_targets(since, until)
                    .await
                    .map_err(anyhow::Error::from)?;
                let stats = frontdesk::sla::stats::summarize(&rows, group);
                if json {
                    emit(&format!(
                        "{}\n",
                        serde_json::to_string_pretty(&stats).map_err(anyhow::Error::from)?
                    ));
                } else {
                    let mut out = String::new();
                    for r in &stats {
                        out.push_str(&format!(
                            "{:<24} {:<11} n={:<5} median {}s p90 {}s (business)  median {}s p90 {}s (calendar)  met {:.0}%\n",
                            frontdesk::cli_text::one_line(&r.group, 24),
                            r.metric,
                            r.count,
                            r.median_business_s,
                            r.p90_business_s,
                            r.median_calendar_s,
                            r.p90_calendar_s,
                            r.share_met * 100.0
                        ));
                    }
                    emit(&out);
                }
                Ok::<(), Failure>(())
            })
        }
        Command::Explain { id, conversation } => {
            let path = config::resolve_path(cli.config.as_deref());
            let loaded = load_config(&path)?;
            let routing =
                frontdesk::core::Routing::from_config(&loaded.config).map_err(|e| Failure {
                    code: 78,
                    message: e.to_string(),
                })?;
            runtime()?.block_on(async move {
                let store = open_store(&loaded.config).await?;
                let text = if conversation {
                    frontdesk::core::explain(&store, &routing, id).await
                } else {
                    frontdesk::core::explain_message(&store, &routing, id).await
                }
                .map_err(anyhow::Error::from)?;
                match text {
                    Some(t) => {
                        emit(&format!("{t}\n"));
                        Ok::<(), Failure>(())
                    }
                    None => Err(Failure {
                        code: 1,
                        message: format!(
                            "no {} {id} (or not processed yet)",
                            if conversation {
                                "conversation"
                            } else {
                                "message"
                            }
                        ),
                    }),
                }
            })
        }
        Command::Sync { source } => {
            let path = config::resolve_path(cli.config.as_deref());
            let loaded = load_config(&path)?;
            runtime()?.block_on(sync(&loaded.config, source.as_deref()))
        }
        Command::Sources { json } => {
            let path = config::resolve_path(cli.config.as_deref());
            let loaded = load_config(&path)?;
            runtime()?.block_on(async move {
                let store = open_store(&loaded.config).await?;
                let lines = frontdesk::ingest::imap::ledger(&loaded.config, &store)
                    .await
                    .map_err(anyhow::Error::from)?;
                let hooks = frontdesk::ingest::webhook::sources_report(&loaded.config, &store)
                    .await
                    .map_err(anyhow::Error::from)?;
                if json {
                    // One array: IMAP folder lines, then webhook lines (`"kind": "webhook"`).
                    let mut all = Vec::with_capacity(lines.len() + hooks.len());
                    for l in &lines {
                        all.push(serde_json::to_value(l).map_err(anyhow::Error::from)?);
                    }
                    for h in &hooks {
                        all.push(serde_json::to_value(h).map_err(anyhow::Error::from)?);
                    }
                    emit(&format!(
                        "{}\n",
                        serde_json::to_string_pretty(&all).map_err(anyhow::Error::from)?
                    ));
                } else {
                    emit(&frontdesk::ingest::imap::ledger_text(&lines));
                    if !hooks.is_empty() {
                        emit("\n");
                        emit(&frontdesk::ingest::webhook::sources_text(&hooks));
                    }
                }
                Ok::<(), Failure>(())
            })
        }
    }
}

/// `frontdesk sync`: one pass per IMAP source; a progress bar on a terminal, log lines otherwise.
async fn sync(config: &config::Config, only: Option<&str>) -> Result<(), Failure> {
    use frontdesk::ingest::imap;
    use std::io::IsTerminal;
    // the first source's TLS handshake and login overlap the store's opening
    let mut early = imap::source_configs(config, only)
        .next()
        .map(|(name, cfg)| imap::connect_early(name, cfg));
    let store = open_store(config).await?;
    let sources = imap::sources(config, &store, only);
    if sources.is_empty() {
        return Err(Failure {
            code: 1,
            message: match only {
                Some(name) => format!("no IMAP source named {name}"),
                None => "no IMAP sources configured".into(),
            },
        });
    }
    // Checkpoints run beside the sync, as in the daemon: otherwise every commit that crosses
    // SQLite's 1,000-page mark copies the WAL into the database and fsyncs it while the next
    // batch waits, which writes every raw byte twice on the commit path. Each folder's pass
    // ends with an fsync of the WAL (batches commit atomically with their cursor but unsynced);
    // the WAL left when the checkpointer stops is folded in when the store closes.
    let checkpoints = tokio_util::sync::CancellationToken::new();
    let checkpointer = tokio::spawn({
        let (store, stop) = (store.clone(), checkpoints.clone());
        async move {
            store
                .run_checkpointer(
                    std::time::Duration::from_millis(100),
                    frontdesk::store::WAL_RESTART_FRAMES,
                    stop,
                )
                .await
        }
    });
    let tty = std::io::stderr().is_terminal();
    let mut failed = Vec::new();
    for ctx in &sources {
        let bar = tty.then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        let name = ctx.name.clone();
        let mut progress = |p: imap::Progress| match &bar {
            Some(bar) => {
                bar.set_prefix(format!("{name}/{}", p.folder));
                bar.set_length(p.total);
                bar.set_position(p.done);
            }
            None if p.done == p.total || p.done.is_multiple_of(1000) => {
                tracing::info!(source = %name, folder = %p.folder, done = p.done, total = p.total, "sync progress");
            }
            None => {}
        };
        let mut poison = imap::PoisonTracker::default();
        let result = imap::sync_once_over(ctx, early.take(), &mut poison, &mut progress).await;
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        match result {
            Ok(reports) => {
                for r in &reports {
                    emit(&format!(
                        "{}/{}: {} new, {} already stored, {} accounted without a row{}{}\n",
                        ctx.name,
                        r.folder,
                        r.inserted,
                        r.duplicates,
                        r.accounted,
                        if r.uid_validity_changed {
                            " (UIDVALIDITY changed)"
                        } else {
                            ""
                        },
                        if r.lease_lost {
                            " (stopped: another replica took the folder over)"
                        } else {
                            ""
                        }
                    ));
                }
                for f in &ctx.cfg.folders {
                    if !reports.iter().any(|r| r.folder == f.name) {
                        emit(&format!(
                            "{}/{}: skipped, a running replica syncs it\n",
                            ctx.name, f.name
                        ));
                    }
                }
            }
            Err(e) => failed.push(format!("source {}: {e}", ctx.name)),
        }
    }
    checkpoints.cancel();
    let _ = checkpointer.await;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure {
            code: 1,
            message: failed.join("; "),
        })
    }
}

async fn digest_command(
    config: config::Config,
    send: bool,
    format: DigestFormat,
    owner: Option<String>,
    name: Option<String>,
) -> Result<(), Failure> {
    use frontdesk::notify::Sender;
    let store = open_store(&config).await?;
    let sender = Sender::new(store, std::sync::Arc::new(config)).map_err(anyhow::Error::from)?;
    let now = chrono::Utc::now();
    if send {
        let ids = sender
            .enqueue_digest_now(name.as_deref(), owner.as_deref(), now)
            .await
            .map_err(anyhow::Error::from)?;
        let report = sender
            .send_due_only(now, Some(&ids))
            .await
            .map_err(anyhow::Error::from)?;
        emit(&format!(
            "digest: {} queued, {} sent, {} to retry, {} failed\n",
            ids.len(),
            report.sent,
            report.retried,
            report.failed
        ));
        if report.sent == ids.len() {
            return Ok(());
        }
        return Err(Failure {
            code: 1,
            message: "not every digest was accepted; see the log (retries continue in the daemon)"
                .into(),
        });
    }
    let schedule = sender
        .schedule(name.as_deref())
        .map_err(anyhow::Error::from)?;
    let since =
        frontdesk::notify::sender::previous_occurrence(&schedule.schedule, sender_tz(&sender), now)
            .unwrap_or(now - chrono::TimeDelta::days(1));
    let input = sender
        .digest_input(since, now)
        .await
        .map_err(anyhow::Error::from)?;
    let target = frontdesk::notify::sender::DigestTarget {
        owner,
        recipient: String::new(),
    };
    let rendered = sender
        .render_digest(&input, &target, now)
        .map_err(anyhow::Error::from)?;
    match format {
        DigestFormat::Text => emit(&format!(
            "Subject: {}\n\n{}",
            rendered.subject, rendered.text
        )),
        DigestFormat::Html => emit(&rendered.html),
    }
    Ok(())
}

fn sender_tz(sender: &frontdesk::notify::Sender) -> chrono_tz::Tz {
    sender.timezone()
}

async fn open_store(config: &config::Config) -> Result<Store, Failure> {
    Store::open_storage(&config.storage)
        .await
        .map_err(|e| Failure {
            code: 1,
            message: e.to_string(),
        })
}

/// Prints to stdout; a closed pipe (`frontdesk schema | head`) ends quietly instead of panicking.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Every OAuth2 login in the config: IMAP sources, then SMTP channels.
fn oauth_logins(c: &config::Config) -> Vec<&config::OAuth2> {
    let sources = c.sources.iter().filter_map(|s| match &s.kind {
        config::SourceKind::Imap(i) => i.login.oauth2(),
        _ => None,
    });
    let channels = c.channels.iter().filter_map(|ch| match &ch.kind {
        config::ChannelKind::Email(e) => match &e.transport {
            config::EmailTransport::Smtp(s) => s.login.as_ref().and_then(|l| l.oauth2()),
            config::EmailTransport::File(_) => None,
        },
        _ => None,
    });
    sources.chain(channels).collect()
}
