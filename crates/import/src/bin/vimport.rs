//! `vimport`: runs the image import service.

use std::process::ExitCode;
use std::sync::Arc;

use vconvert_import::{http, Config, Service};

const HELP: &str = "\
vimport: image import service (staged upload -> inspect -> convert -> store)

Usage: vimport [--config FILE]

Configuration comes from FILE (default: ./vimport.toml if it exists) and from
VIMPORT_<KEY> environment variables, which win. Keys and defaults:
  data_dir            vimport-data
  output_format       raw            (raw, qcow2, vdi, vmdk, vhd)
  vmdk_allowed_types  streamOptimized,monolithicSparse
  image_size_cap      1T
  max_workers         2
  workspace_dir       <data_dir>/workspace
  workspace_bytes     64G
  store_dir           <data_dir>/store
  database            <data_dir>/vimport.db
  listen              127.0.0.1:9292
  token               (generated on first start into <data_dir>/token)
  convert_rate_limit  (none; bytes per second, e.g. 200M)
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
    let listen = config.listen.clone();
    let server = match tiny_http::Server::http(&listen) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("vimport: cannot listen on {listen}: {e}");
            return ExitCode::from(1);
        }
    };
    let service = match Service::start(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vimport: {e}");
            return ExitCode::from(1);
        }
    };
    let addr = server
        .server_addr()
        .to_ip()
        .map_or(listen.clone(), |a| a.to_string());
    if service.config.token.is_none() {
        eprintln!(
            "vimport: token in {} (send 'Authorization: Bearer <token>')",
            service.config.data_dir.join("token").display()
        );
    }
    println!("vimport listening on http://{addr}");
    http::serve(service, server, 16);
    ExitCode::SUCCESS
}
