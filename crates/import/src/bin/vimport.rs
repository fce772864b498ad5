//! `vimport`: runs the image import service.

use std::process::ExitCode;
use std::time::Duration;

use vconvert_import::{http, Config, Service};

const HELP: &str = "\
vimport: image import service speaking Glance's Image API v2
(create -> stage/upload/web-download -> inspect -> convert -> store)

Usage: vimport [--config FILE]

Configuration comes from FILE (default: ./vimport.toml if it exists) and from
VIMPORT_<KEY> environment variables, which win. Keys and defaults:
  data_dir            vimport-data
  output_format       raw            (raw, qcow2, vdi, vmdk, vhd, vhdx)
  vmdk_allowed_types  streamOptimized,monolithicSparse
  image_size_cap      1T
  max_workers         2
  convert_threads     <cores>        (worker threads shared by all running
                                      conversions; one import alone uses all)
  workspace_dir       <data_dir>/workspace
  workspace_bytes     64G
  store               fs             (fs: files in store_dir; rbd: a Ceph pool,
                                      needs vimport built with --features rbd)
  store_dir           <data_dir>/store
  rbd_pool            images         (rbd store: the pool; must exist)
  rbd_user            admin          (rbd store: the Ceph user, without 'client.')
  ceph_conf           $CEPH_CONF or /etc/ceph/ceph.conf (monitors, keyring)
  rbd_chunk_size      8M             (rbd store: object size, 4K..32M, power of 2)
  rbd_snapshot        true           (rbd store: protected snapshot 'snap' to clone)
  database            <data_dir>/vimport.db  (a SQLite file: one host), or
                      postgres://user:password@host:port/db  (several hosts)
  host_id             <hostname>:<workspace_dir>  (unique per host, stable)
  task_lease          30   (seconds; a silent host's tasks fail after it)
  listen              127.0.0.1:9292
  token               an admin token (project 'admin'); with no token and no
                      tokens, one is generated into <data_dir>/token
  tokens              token:project[:admin],...  (more tokens, with projects)
  convert_rate_limit  (none; bytes per second, e.g. 200M)
  shutdown_grace      30   (seconds running imports may finish after SIGTERM)
  request_timeout     60   (seconds, metadata calls; not uploads/downloads)
  web_download_allowed_schemes     http,https
  web_download_disallowed_schemes  (none)
  web_download_allowed_hosts       (none: any host not disallowed)
  web_download_disallowed_hosts    (none)
  web_download_allowed_ports       80,443  (empty: any port not disallowed)
  web_download_disallowed_ports    (none)

[keystone] (in the file; VIMPORT_KEYSTONE_<KEY> in the environment): validate
tokens with Keystone v3 instead of token/tokens, under Glance's default policy
  auth_url            (none: static tokens)  e.g. http://keystone:5000/v3
  username, password, project_name  vimport's user (needs the service role)
  user_domain_name, project_domain_name  Default
  application_credential_id, application_credential_secret  (instead of a user)
  cache_seconds       300  (a revoked token is refused at the latest after this)
  cache_size          10000
  timeout             10   (seconds per call to Keystone)

Logs go to stderr (RUST_LOG filters them, default info): one line per request.
";

fn main() -> ExitCode {
    vconvert_engine::raise_open_file_limit();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut config_file = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => match it.next() {
                Some(f) => config_file = Some(std::path::PathBuf::from(f)),
                None => {
                    eprintln!("vimport: --config needs a file");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                print!("{HELP}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("vimport: unknown argument '{other}'\n\n{HELP}");
                return ExitCode::from(2);
            }
        }
    }
    let env = std::env::vars().collect();
    let config = match Config::load(config_file.as_deref(), &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vimport: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vimport-http")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vimport: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(run(config));
    // Blocking calls still running (an upload cut off by the shutdown) are not waited
    // for: their images were returned to queued and their files removed.
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn run(config: Config) -> ExitCode {
    let listen = config.listen.clone();
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vimport: cannot listen on {listen}: {e}");
            return ExitCode::from(1);
        }
    };
    let grace = Duration::from_secs(config.shutdown_grace);
    let keystone = config.keystone.as_ref().map(|k| k.auth_url.clone());
    let generated = keystone.is_none() && config.token.is_none() && config.tokens.is_empty();
    let service = match tokio::task::spawn_blocking(move || Service::start(config)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            eprintln!("vimport: {e}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("vimport: {e}");
            return ExitCode::from(1);
        }
    };
    let addr = listener
        .local_addr()
        .map_or(listen.clone(), |a| a.to_string());
    if let Some(url) = keystone {
        eprintln!("vimport: tokens are validated by Keystone at {url}");
    }
    if generated {
        eprintln!(
            "vimport: admin token in {} (send 'X-Auth-Token: <token>')",
            service.config.data_dir.join("token").display()
        );
    }
    println!("vimport listening on http://{addr}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, service.clone(), async move {
        let _ = stop_rx.await;
    }));
    let signal = wait_for_signal().await;
    tracing::info!(
        signal,
        busy = service.busy(),
        grace_s = grace.as_secs(),
        "stopping: no new requests; running imports may finish within the grace period"
    );
    let _ = stop_tx.send(());
    let svc = service.clone();
    let _ = tokio::task::spawn_blocking(move || svc.shutdown(grace)).await;
    if tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .is_err()
    {
        tracing::warn!("requests still open after the imports ended; closing them");
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Waits for SIGTERM or SIGINT; returns its name.
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
