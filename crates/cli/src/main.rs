//! `vconvert`: a thin command-line layer over the vconvert engine, compatible with
//! `qemu-img` for the commands it implements.

mod check;
mod info;
mod map;
mod out;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use vconvert_core::{parse_size, Error, Format, Options, Result};
use vconvert_engine::{CancelToken, ConvertOptions, DeclaredFormat, OpenOptions, Policy};

/// Convert virtual disk images between raw, qcow2, vdi, vmdk, vpc (VHD) and vhdx.
///
/// Command-line compatible with qemu-img: scripts that call `qemu-img convert` or
/// `qemu-img info` work with `vconvert` instead.
#[derive(Parser, Debug)]
#[command(name = "vconvert", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Convert an image to another format (or copy it sparsely).
    Convert(ConvertArgs),
    /// Show an image's format, sizes and format-specific details.
    Info(InfoArgs),
    /// Create a new empty image.
    Create(CreateArgs),
    /// Compare the contents of two images (exit 0 identical, 1 different, 2 error).
    Compare(CompareArgs),
    /// How much space converting an image (or a new disk of --size) to -O needs.
    Measure(MeasureArgs),
    /// Check an image's metadata (exit 0 clean, 2 corrupt, 3 leaks, 63 not supported).
    Check(CheckArgs),
    /// Show how the guest disk maps to the image and its backing chain (qemu-img map).
    Map(MapArgs),
    /// Change an image's virtual size in place (raw, qcow2), crash-safe.
    Resize(ResizeArgs),
    /// List, create, apply or delete internal snapshots (qcow2).
    Snapshot(SnapshotArgs),
    /// Change an image's options in place (qcow2 compat, lazy_refcounts).
    Amend(AmendArgs),
    /// Change an image's backing file (qcow2), keeping its content unless -u.
    Rebase(RebaseArgs),
    /// Write an overlay's data into its backing file (qcow2 overlays).
    Commit(CommitArgs),
    /// Copy a range of an image into a new one (qemu-img dd: if= of= bs= count= skip=).
    Dd(DdArgs),
}

/// `dd`: qemu-img's subset of dd(1). The output (format `-O`, raw by default) is a
/// new image holding the input from `skip` blocks up to `count` blocks from the input's
/// start (qemu-img counts `count` from the start, not from `skip`), copied sparsely.
#[derive(Args, Debug)]
struct DdArgs {
    /// Input format; probed when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format (raw, qcow2, vdi, vmdk, vpc).
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    output_format: String,
    /// Accepted for qemu-img compatibility (shared locking is not used).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Operands: if=INPUT of=OUTPUT [bs=SIZE] [count=N] [skip=N].
    #[arg(value_name = "OPERAND", required = true)]
    operands: Vec<String>,
}

/// `commit`: writes what the image (and, with `-b`, the images between it and BASE)
/// stores into its backing file (or BASE, raw or qcow2), then empties the image unless
/// `-d` (`-b` implies `-d`, as in qemu-img). The image's own view does not change
/// while the base is written, so a crash midway leaves the chain reading as before.
#[derive(Args, Debug)]
struct CommitArgs {
    /// Image format; probed from the content when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// The image of the backing chain to commit into (default: the backing file).
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<PathBuf>,
    /// Keep the image as it is (do not empty it).
    #[arg(short = 'd')]
    drop: bool,
    /// Accepted for qemu-img compatibility (progress is not shown).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for qemu-img compatibility: cache mode (ignored).
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    /// Image file.
    file: PathBuf,
}

/// `rebase`: makes BACKING the image's backing file. Safe mode (the default) first
/// copies into the image every cluster it leaves to its backing file whose content
/// differs between the old and the new backing file, so the guest sees the same disk;
/// `-u` only changes the name (the new file must then hold the same data).
#[derive(Args, Debug)]
struct RebaseArgs {
    /// Image format; probed from the content when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// The new backing file ("" for none); relative names resolve against the image's
    /// directory.
    #[arg(short = 'b', value_name = "BACKING", required = true)]
    backing: String,
    /// Format of the new backing file (required unless -b "").
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Unsafe: change the name only, compare nothing.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Accepted for qemu-img compatibility (progress is not shown).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for qemu-img compatibility: cache modes (ignored).
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    /// Accepted for qemu-img compatibility: source cache mode (ignored).
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// Image file.
    file: PathBuf,
}

/// `amend`: qcow2 `-o compat=0.10|1.1,lazy_refcounts=on|off` in place. Going down to
/// 0.10 expands zero clusters as qemu-img does and is refused, as qemu-img refuses it,
/// for refcount widths other than 16, extended L2, zstd-compressed clusters, bitmaps
/// and data files.
#[derive(Args, Debug)]
struct AmendArgs {
    /// Image format; probed from the content when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Options to change, `key=value,...` (compat, lazy_refcounts).
    #[arg(short = 'o', value_name = "OPTIONS", required = true)]
    options: Vec<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    file: PathBuf,
}

/// `snapshot`: qcow2 internal snapshots, as qemu-img manages them.
///
/// `-l` prints qemu-img's table; `-c` snapshots the current state (the new snapshot
/// shares every cluster with it); `-a` reverts the current state to a snapshot
/// (resizing the image first when the snapshot was taken at another size); `-d`
/// deletes one. Reference counts and COPIED flags are kept exact, so the image
/// stays `qemu-img check`-clean.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("op").required(true).args(["list", "create", "apply", "delete"])))]
struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot of the current state named NAME.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Apply (revert to) the snapshot with this id or name.
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Delete the snapshot with this id or name.
    #[arg(short = 'd', value_name = "SNAPSHOT")]
    delete: Option<String>,
    /// Image format; probed from the content when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for qemu-img compatibility (shared locking is not used).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Image file.
    file: PathBuf,
}

/// `resize`: grows (or, with `--shrink`, shrinks) the guest disk in place.
///
/// raw: the file's length (`--preallocation=falloc|full` reserves or writes the new
/// space). qcow2: the header and, when needed, a larger L1 table, written in an order
/// that leaves a consistent image at every step (a crash at worst leaks clusters,
/// which `check -r leaks` reclaims); shrinking frees the clusters past the new end;
/// `--preallocation=metadata|falloc|full` gives every new guest cluster a host
/// cluster (sparse, reserved or written with zeros), as qemu-img does. Other formats are refused, as qemu-img refuses them.
#[derive(Args, Debug)]
struct ResizeArgs {
    /// Image format; probed from the content when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Allow the image to shrink (deleting what lies past the new end).
    #[arg(long)]
    shrink: bool,
    /// How the new space is reserved: off (default); metadata (qcow2: tables and
    /// host clusters, the file extended sparsely); falloc (reserved on the file
    /// system); full (written with zeros). Growing only.
    #[arg(long, value_name = "MODE")]
    preallocation: Option<String>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for qemu-img compatibility (shared locking is not used).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Image file.
    file: PathBuf,
    /// New size (e.g. 10G), or a change of size (+1G, -512M).
    #[arg(allow_hyphen_values = true)]
    size: String,
}

/// `map`: each guest range's status through the backing chain, as qemu-img prints it.
///
/// JSON lists every range with `start`, `length`, `depth` (how far down the backing
/// chain it comes from), `present` (allocated there), `zero` (reads as zeros), `data`,
/// `compressed` and `offset` (host offset, when the data lies plainly in a file); the
/// human output lists the plain data ranges with their host offset and file.
#[derive(Args, Debug)]
struct MapArgs {
    /// Image format; probed from the content when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format: human or json (qemu-img's layout).
    #[arg(long = "output", value_name = "FMT", default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// First guest byte to map (e.g. 1M).
    #[arg(short = 's', long = "start-offset", value_name = "OFFSET")]
    start_offset: Option<String>,
    /// Map at most this many bytes (e.g. 1G).
    #[arg(short = 'l', long = "max-length", value_name = "LENGTH")]
    max_length: Option<String>,
    /// Read an image whose qcow2 corrupt bit is set (qemu-img's shared locking is not used).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Image file.
    file: PathBuf,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// Image format; probed from the content when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Repair: `leaks` lowers the refcounts of leaked clusters (qcow2); `all` also
    /// repairs leaks (other corruptions are reported, not repaired).
    #[arg(short = 'r', value_name = "leaks|all", value_parser = ["leaks", "all"])]
    repair: Option<String>,
    /// Output format: human or json (qemu-img's keys).
    #[arg(long = "output", value_name = "FMT", default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// Treat the image as hostile: inspect it first and open no other file.
    #[arg(long)]
    untrusted: bool,
    /// Accepted for qemu-img compatibility (shared locking is not used).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    file: PathBuf,
}

#[derive(Args, Debug)]
struct MeasureArgs {
    /// Source format; probed when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Target format (raw, qcow2, vdi, vmdk, vpc, vhdx).
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    output_format: String,
    /// Target creation options (qcow2: cluster_size, refcount_bits, extended_l2).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Output: human or json (qemu-img's keys).
    #[arg(long = "output", value_name = "FMT", default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// Measure a new empty disk of this size instead of a file.
    #[arg(long, value_name = "SIZE", conflicts_with = "file")]
    size: Option<String>,
    /// Accepted for qemu-img compatibility (shared locking is not used).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source image.
    #[arg(required_unless_present = "size")]
    file: Option<PathBuf>,
}

fn measure(args: MeasureArgs) -> Result<()> {
    let target = parse_format(&args.output_format)?;
    let options = parse_options(&args.options)?;
    let _ = args.force_share;
    let m = match (&args.file, &args.size) {
        (Some(file), _) => {
            let format = args.format.as_deref().map(parse_format).transpose()?;
            let src = vconvert_engine::open(
                file,
                format,
                &OpenOptions {
                    allow_external_files: true,
                    allow_corrupt: true,
                    snapshot: None,
                },
            )?;
            vconvert_engine::measure(Some(src.as_ref()), 0, target, &options)?
        }
        (None, Some(size)) => vconvert_engine::measure(None, parse_size(size)?, target, &options)?,
        (None, None) => return Err(Error::invalid("measure needs a FILE or --size")),
    };
    if args.output == "json" {
        out::println(&format!(
            "{{\n    \"required\": {},\n    \"fully-allocated\": {}\n}}",
            m.required, m.fully_allocated
        ))?;
    } else {
        out::println(&format!(
            "required size: {}\nfully allocated size: {}",
            m.required, m.fully_allocated
        ))?;
    }
    Ok(())
}

#[derive(Args, Debug)]
struct ConvertArgs {
    /// Source format (raw, qcow2, vdi, vmdk, vpc, vhdx); probed from the content when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    source_format: Option<String>,
    /// Convert this internal snapshot (qcow2) instead of the current state: an id or a
    /// name, or qemu-img's `snapshot.id=ID` / `snapshot.name=NAME`.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Output format (raw, qcow2, vdi, vmdk, vpc, vhdx).
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    output_format: String,
    /// Output creation options, `key=value,...` (`-o help` is not needed: a wrong key
    /// lists the valid ones).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Compress the output (qcow2, vmdk).
    #[arg(short = 'c')]
    compress: bool,
    /// Show a progress bar.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: no progress bar.
    #[arg(short = 'q')]
    quiet: bool,
    /// Consecutive zero bytes that become a hole in the output (default 4k); 0 turns zero
    /// detection off and makes the output fully allocated.
    #[arg(short = 'S', value_name = "SIZE", default_value = "4k")]
    sparse_size: String,
    /// Worker threads that compress and write (default: every core); as many again read
    /// and decompress the source.
    #[arg(short = 'm', long = "threads", value_name = "N")]
    threads: Option<usize>,
    /// Limit the conversion to this many bytes per second (e.g. 100M).
    #[arg(short = 'r', value_name = "RATE")]
    rate_limit: Option<String>,
    /// Do not create the target: write into an existing image of the right size.
    #[arg(short = 'n')]
    no_create: bool,
    /// With -n: the existing target already reads as zeros, so zeros are not written.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Accepted for qemu-img compatibility: vconvert always writes in parallel with a
    /// deterministic layout.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Accepted for qemu-img compatibility (shared locking is not used).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Treat the source as hostile: inspect it first and refuse backing files, extent or
    /// data files, format mismatches, multi-format content and insane sizes; open no
    /// file but the one named; inspect the output again.
    #[arg(long)]
    untrusted: bool,
    /// Target cache mode, as qemu-img: `none` (the default here) and `directsync` write
    /// the data around the page cache (O_DIRECT) and flush the target before renaming it
    /// into place; `writeback` and `writethrough` write through the page cache and
    /// flush; `unsafe` writes through the page cache and renames the target into place
    /// without flushing it (a crash soon after may lose it).
    #[arg(short = 't', value_name = "CACHE", value_parser = ["writeback", "unsafe", "none", "directsync", "writethrough"])]
    cache: Option<String>,
    /// Accepted for qemu-img compatibility: source cache mode (ignored).
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// Make the target an overlay of this backing file (qcow2), as qemu-img does: only
    /// what the source's own layer stores is written (data, and zeros as zeros); what
    /// it leaves to its backing image stays unallocated in the target, so BACKING must
    /// hold the same content as the source's backing image.
    #[arg(short = 'B', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the -B backing file.
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Source image.
    source: PathBuf,
    /// Target image.
    target: PathBuf,
}

#[derive(Args, Debug)]
struct InfoArgs {
    /// Image format; probed from the content when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format: human or json (qemu-img's JSON schema).
    #[arg(long = "output", value_name = "FMT", default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// Accepted for qemu-img compatibility (shared locking is not used).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Treat the image as hostile: inspect it and refuse it (exit 1, with the reasons)
    /// instead of following its references.
    #[arg(long)]
    untrusted: bool,
    /// Show every image of the backing chain, top first.
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Image file.
    file: PathBuf,
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Image format (raw, qcow2, vdi, vmdk, vpc, vhdx).
    #[arg(short = 'f', value_name = "FMT", default_value = "raw")]
    format: String,
    /// Creation options, `key=value,...`.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// Backing file (qcow2): the new image reads what it does not store from it. A
    /// relative name is resolved against the new image's directory, as qemu does.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the backing file (required with -b, as in qemu-img).
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Unsafe: do not open the backing file (a SIZE is then required).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Image file.
    file: PathBuf,
    /// Virtual size, e.g. 10G; with -b it defaults to the backing file's.
    size: Option<String>,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Format of the first image; probed when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format_a: Option<String>,
    /// Format of the second image; probed when omitted.
    #[arg(short = 'F', value_name = "FMT")]
    format_b: Option<String>,
    /// Strict: also fail on different sizes or allocation status.
    #[arg(short = 's')]
    strict: bool,
    /// Quiet: print nothing, only set the exit status.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for qemu-img compatibility (the comparison is fast enough to need none).
    #[arg(short = 'p')]
    progress: bool,
    /// Accepted for qemu-img compatibility (shared locking is not used).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Accepted for qemu-img compatibility: source cache mode (ignored).
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// Worker threads (default: every core).
    #[arg(short = 'm', long = "threads", value_name = "N")]
    threads: Option<usize>,
    /// First image.
    a: PathBuf,
    /// Second image.
    b: PathBuf,
}

/// `compare`: qemu-img's messages and exit codes (0 identical, 1 different, 2 error).
fn compare(args: CompareArgs) -> Result<u8> {
    use vconvert_engine::Comparison;
    let _ = (args.progress, args.src_cache);
    let trusted = OpenOptions {
        allow_external_files: true,
        allow_corrupt: args.force_share,
        snapshot: None,
    };
    let fa = args.format_a.as_deref().map(parse_format).transpose()?;
    let fb = args.format_b.as_deref().map(parse_format).transpose()?;
    let a = vconvert_engine::open(&args.a, fa, &trusted)?;
    let b = vconvert_engine::open(&args.b, fb, &trusted)?;
    let opts = vconvert_engine::CompareOptions {
        strict: args.strict,
        threads: args.threads.unwrap_or(0),
    };
    let result = vconvert_engine::compare(a.as_ref(), b.as_ref(), &opts)?;
    let say = |s: &str| -> Result<()> {
        if !args.quiet {
            out::println(s)?;
        }
        Ok(())
    };
    let mismatch_warning = |m: bool| -> Result<()> {
        if m {
            say("Warning: Image size mismatch!")?;
        }
        Ok(())
    };
    Ok(match result {
        Comparison::Identical { size_mismatch } => {
            mismatch_warning(size_mismatch)?;
            say("Images are identical.")?;
            0
        }
        Comparison::ContentMismatch {
            offset,
            size_mismatch,
        } => {
            mismatch_warning(size_mismatch)?;
            say(&format!("Content mismatch at offset {offset}!"))?;
            1
        }
        Comparison::StrictSizeMismatch => {
            say("Strict mode: Image size mismatch!")?;
            1
        }
        Comparison::StrictAllocationMismatch { offset } => {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ))?;
            1
        }
    })
}

fn parse_format(s: &str) -> Result<Format> {
    s.parse()
}

/// `VCONVERT_IDENTITY_SEED`: makes stored identifiers (UUIDs, CIDs, timestamps)
/// reproducible, for tests and reproducible builds.
fn identity_seed() -> Result<Option<u64>> {
    match std::env::var("VCONVERT_IDENTITY_SEED") {
        Ok(v) => v.parse().map(Some).map_err(|_| {
            Error::invalid(format!(
                "VCONVERT_IDENTITY_SEED must be a number, not '{v}'"
            ))
        }),
        Err(_) => Ok(None),
    }
}

fn parse_options(list: &[String]) -> Result<Options> {
    Options::parse(&list.join(","))
}

fn convert(args: ConvertArgs) -> Result<()> {
    let source_format = args
        .source_format
        .as_deref()
        .map(parse_format)
        .transpose()?;
    let output_format = parse_format(&args.output_format)?;
    let options = with_backing(
        parse_options(&args.options)?,
        args.backing.as_deref(),
        args.backing_format.as_deref(),
    )?;
    // The backing file must open (and a format be given), as for `create -b`.
    let target_backing_size = match vconvert_engine::backing_of(&options).0 {
        Some(_) => Some(vconvert_engine::overlay_size(
            &args.target,
            output_format,
            None,
            &options,
            true,
        )?),
        None => None,
    };
    let sparse_size = parse_size(&args.sparse_size)?;
    if sparse_size % 512 != 0 || sparse_size > 16 << 20 {
        return Err(Error::invalid(format!(
            "invalid -S {}: it must be a multiple of 512 and at most 16M",
            args.sparse_size
        )));
    }
    if args.target_is_zero && !args.no_create {
        return Err(Error::invalid("--target-is-zero requires -n"));
    }
    let threads = match args.threads {
        Some(0) => return Err(Error::invalid("-m must be at least 1")),
        Some(n) => n,
        None => 0,
    };
    let _ = (args.out_of_order, args.force_share, &args.src_cache);

    let mut source_is_iso = false;
    if args.untrusted {
        let report = vconvert_engine::inspect(&args.source, source_format, &Policy::untrusted())?;
        report.ensure_safe(&args.source.display().to_string())?;
        source_is_iso = report.signatures.contains(&"iso");
    }
    let src = vconvert_engine::open(
        &args.source,
        source_format,
        &OpenOptions {
            allow_external_files: !args.untrusted,
            allow_corrupt: args.force_share && !args.untrusted,
            snapshot: args.snapshot.as_deref().map(snapshot_name),
        },
    )?;
    let cancel = CancelToken::new();
    {
        let cancel = cancel.clone();
        // A second Ctrl-C while cleaning up falls back to the default (ignored error:
        // a handler may already be set when embedded).
        let _ = ctrlc::set_handler(move || cancel.cancel());
    }
    let bar = (args.progress && !args.quiet).then(|| {
        let bar = ProgressBar::new(src.virtual_size());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{wide_bar}] {percent:>3}% {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    });
    let progress = |done: u64, _total: u64| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    };
    let opts = ConvertOptions {
        threads,
        sparse_size,
        existing: args.no_create,
        target_is_zero: args.target_is_zero,
        compress: args.compress,
        cancel,
        progress: Some(&progress),
        identity_seed: identity_seed()?,
        no_sync: args.cache.as_deref() == Some("unsafe"),
        direct: matches!(args.cache.as_deref(), None | Some("none" | "directsync")),
        rate_limit: args.rate_limit.as_deref().map(parse_size).transpose()?,
        target_backing_size,
        ..ConvertOptions::default()
    };
    let mut result =
        vconvert_engine::convert(src.as_ref(), &args.target, output_format, options, &opts);
    if let Some(b) = bar {
        if result.is_ok() {
            b.finish();
        } else {
            b.abandon();
        }
    }
    if result.is_ok() && args.untrusted {
        // An ISO copied to raw is still an ISO, and is inspected as one.
        let declared = match output_format {
            Format::Raw if source_is_iso => DeclaredFormat::Iso,
            f => DeclaredFormat::Image(f),
        };
        result = inspect_output(&args.target, declared);
    }
    result
}

/// The snapshot id or name in qemu-img's `-l` syntax (`snapshot.name=X`, `snapshot.id=X`
/// or plain `X`).
fn snapshot_name(s: &str) -> String {
    s.split(',')
        .find_map(|kv| {
            kv.strip_prefix("snapshot.name=")
                .or_else(|| kv.strip_prefix("snapshot.id="))
        })
        .unwrap_or(s)
        .to_string()
}

/// Under `--untrusted`, the converted image is inspected again: its content must be the
/// target format and nothing else (a raw disk whose first bytes are a qcow2 header with a
/// backing file would be a trap for the next program that probes it). The output's own
/// extent files are allowed; a refused output is removed.
fn inspect_output(target: &Path, format: DeclaredFormat) -> Result<()> {
    let policy = Policy {
        allow_external_files: true,
        vmdk_allowed_types: Vec::new(),
        ..Policy::untrusted()
    };
    let report = vconvert_engine::inspect_as(target, Some(format), &policy)?;
    if let Err(e) = report.ensure_safe(&target.display().to_string()) {
        let _ = std::fs::remove_file(target);
        return Err(Error::Refused {
            file: target.display().to_string(),
            reason: format!("the converted image was removed: {e}"),
        });
    }
    Ok(())
}

/// Adds `-b`/`-B` and `-F` to the creation options as qemu-img's `backing_file` and
/// `backing_fmt`.
fn with_backing(
    mut options: Options,
    backing: Option<&str>,
    backing_format: Option<&str>,
) -> Result<Options> {
    let (file, fmt) = vconvert_engine::backing_of(&options);
    if let Some(b) = backing {
        if file.as_deref().is_some_and(|f| f != b) {
            return Err(Error::invalid(
                "-b and -o backing_file name different backing files",
            ));
        }
        options.set("backing_file", b);
    }
    if let Some(f) = backing_format {
        if fmt.as_deref().is_some_and(|x| x != f) {
            return Err(Error::invalid(
                "-F and -o backing_fmt name different backing formats",
            ));
        }
        options.set("backing_fmt", f);
    }
    Ok(options)
}

fn create(args: CreateArgs) -> Result<()> {
    let format = parse_format(&args.format)?;
    let options = with_backing(
        parse_options(&args.options)?,
        args.backing.as_deref(),
        args.backing_format.as_deref(),
    )?;
    let size = args.size.as_deref().map(parse_size).transpose()?;
    let size =
        vconvert_engine::overlay_size(&args.file, format, size, &options, !args.unsafe_backing)?;
    if !args.quiet {
        let mut line = format!(
            "Formatting '{}', fmt={} size={}",
            args.file.display(),
            format,
            size
        );
        if let (Some(b), f) = vconvert_engine::backing_of(&options) {
            line += &format!(" backing_file={b}");
            if let Some(f) = f {
                line += &format!(" backing_fmt={f}");
            }
        }
        out::println(&line)?;
    }
    vconvert_engine::create(&args.file, format, size, options, identity_seed()?)
}

/// Runs a command; returns its exit status on success.
fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Convert(a) => convert(a).map(|()| 0),
        Command::Info(a) => {
            let format = a.format.as_deref().map(parse_format).transpose()?;
            let _ = a.force_share;
            if a.untrusted {
                let report = vconvert_engine::inspect(&a.file, format, &Policy::untrusted())?;
                report.ensure_safe(&a.file.display().to_string())?;
            }
            info::info(&a.file, format, &a.output, !a.untrusted, a.backing_chain).map(|()| 0)
        }
        Command::Create(a) => create(a).map(|()| 0),
        Command::Compare(a) => compare(a),
        Command::Measure(a) => measure(a).map(|()| 0),
        Command::Check(a) => {
            let format = a.format.as_deref().map(parse_format).transpose()?;
            let _ = (a.force_share, a.quiet);
            if a.untrusted {
                let report = vconvert_engine::inspect(&a.file, format, &Policy::untrusted())?;
                report.ensure_safe(&a.file.display().to_string())?;
            }
            let fixed = match a.repair {
                Some(_) => Some(vconvert_engine::repair_leaks(&a.file, format)?),
                None => None,
            };
            check::check(&a.file, format, &a.output, !a.untrusted, fixed)
        }
        Command::Dd(a) => {
            let _ = a.force_share;
            let mut opts = vconvert_engine::DdOptions::default();
            let (mut input, mut output) = (None, None);
            for op in &a.operands {
                let (k, v) = op.split_once('=').ok_or_else(|| {
                    Error::invalid(format!("unrecognized operand '{op}': use key=value"))
                })?;
                let number = |v: &str| -> Result<u64> {
                    v.parse()
                        .map_err(|_| Error::invalid(format!("invalid number for {k}: '{v}'")))
                };
                match k {
                    "if" => input = Some(PathBuf::from(v)),
                    "of" => output = Some(PathBuf::from(v)),
                    "bs" => opts.block_size = parse_size(v)?,
                    "count" => opts.count = Some(number(v)?),
                    "skip" => opts.skip = number(v)?,
                    _ => return Err(Error::invalid(format!("unrecognized operand '{op}'"))),
                }
            }
            let input =
                input.ok_or_else(|| Error::invalid("Must specify both input and output files"))?;
            let output =
                output.ok_or_else(|| Error::invalid("Must specify both input and output files"))?;
            let format = a.format.as_deref().map(parse_format).transpose()?;
            let out_format = parse_format(&a.output_format)?;
            vconvert_engine::dd(&input, format, &output, out_format, &opts).map(|_| 0)
        }
        Command::Commit(a) => {
            let format = a.format.as_deref().map(parse_format).transpose()?;
            let _ = (a.progress, &a.cache);
            vconvert_engine::commit(&a.file, format, a.base.as_deref(), a.drop)?;
            if !a.quiet {
                out::println("Image committed.")?;
            }
            Ok(0)
        }
        Command::Rebase(a) => {
            let format = a.format.as_deref().map(parse_format).transpose()?;
            let _ = (a.progress, a.quiet, &a.cache, &a.src_cache);
            vconvert_engine::rebase(
                &a.file,
                format,
                &a.backing,
                a.backing_format.as_deref(),
                a.unsafe_mode,
            )
            .map(|()| 0)
        }
        Command::Amend(a) => {
            let format = a.format.as_deref().map(parse_format).transpose()?;
            let _ = a.quiet;
            vconvert_engine::amend(&a.file, format, parse_options(&a.options)?).map(|()| 0)
        }
        Command::Snapshot(a) => {
            use vconvert_engine::SnapshotOp;
            let format = a.format.as_deref().map(parse_format).transpose()?;
            let _ = (a.force_share, a.quiet);
            let op = match (a.create, a.apply, a.delete) {
                (Some(n), _, _) => SnapshotOp::Create(n),
                (_, Some(n), _) => SnapshotOp::Apply(n),
                (_, _, Some(n)) => SnapshotOp::Delete(n),
                _ => SnapshotOp::List,
            };
            let list = vconvert_engine::snapshot(&a.file, format, &op)?;
            if op == SnapshotOp::List && !list.is_empty() {
                out::print(&info::snapshot_table(&list))?;
            }
            Ok(0)
        }
        Command::Resize(a) => {
            let format = a.format.as_deref().map(parse_format).transpose()?;
            let _ = a.force_share;
            vconvert_engine::resize(
                &a.file,
                format,
                &a.size,
                &vconvert_engine::ResizeOptions {
                    shrink: a.shrink,
                    preallocation: a.preallocation.clone(),
                },
            )?;
            if !a.quiet {
                out::println("Image resized.")?;
            }
            Ok(0)
        }
        Command::Map(a) => {
            let format = a.format.as_deref().map(parse_format).transpose()?;
            map::map(
                &a.file,
                format,
                &a.output,
                a.start_offset.as_deref(),
                a.max_length.as_deref(),
                a.force_share,
            )
            .map(|()| 0)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vconvert_engine::raise_open_file_limit();
    // qemu-img compare exits 2 on errors (1 means "different"); other commands exit 1.
    let error_status = if matches!(cli.command, Command::Compare(_)) {
        2
    } else {
        1
    };
    match run(cli) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            out::eprintln(&format!("vconvert: {e}"));
            ExitCode::from(error_status)
        }
    }
}
