//! vimport's `rbd` store against a real Ceph cluster (vimport built with the cargo
//! feature `rbd`).
//!
//! `cargo xtask test` starts a single-node cluster (`scripts/ceph-dev.sh`), builds with
//! `--features vconvert-import/rbd` and exports `VIMPORT_TEST_CEPH_CONF`; without it
//! these tests are reported skipped, unless `VIMPORT_REQUIRE_CEPH=1` or `CI` is set,
//! when they fail. Each test works
//! in a pool of its own (vimport's startup reconciliation removes every image of its
//! pool that its catalogue does not know), removed at the end.
//!
//! What they prove: uploads of every format imported into RBD read back (`rbd export`,
//! and our own download with `Range`) equal to the upload under `qemu-img compare`,
//! with the protected snapshot `snap` whose clone reads the same; a protected image
//! with a clone refuses deletion with 409; only data reaches the pool (`rbd du`); an
//! import that fails, is cancelled, or is killed leaves no RBD image; two hosts over one
//! PostgreSQL catalogue (`VIMPORT_TEST_POSTGRES_URL`) share one pool.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Vimport;
use serde_json::Value;
use vconvert_testkit::{qemu, tempdir, Layout, Qemu};

/// The test cluster's configuration file, or `None` (skipped) when there is none.
fn ceph() -> Option<PathBuf> {
    match std::env::var_os("VIMPORT_TEST_CEPH_CONF") {
        Some(c) if Path::new(&c).is_file() => Some(PathBuf::from(c)),
        _ if required() => panic!(
            "a Ceph cluster is required (VIMPORT_REQUIRE_CEPH=1 or CI) but \
             VIMPORT_TEST_CEPH_CONF names no configuration file: run the tests with \
             `cargo xtask test`, which starts one"
        ),
        _ => {
            eprintln!(
                "skipped: no Ceph cluster (VIMPORT_TEST_CEPH_CONF; `cargo xtask test` starts one)"
            );
            None
        }
    }
}

/// Whether the RBD tests must run: `VIMPORT_REQUIRE_CEPH=1`, or in CI (`CI` set).
fn required() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    set("VIMPORT_REQUIRE_CEPH") || set("CI")
}

/// A pool of its own for one test, removed when dropped.
struct TestPool {
    conf: PathBuf,
    name: String,
}

impl TestPool {
    fn new(conf: &Path, name: &str) -> TestPool {
        let p = TestPool {
            conf: conf.to_path_buf(),
            name: format!("vimport-test-{name}"),
        };
        // A pool left by an interrupted run is removed first.
        let _ = p.ceph_status(&[
            "osd",
            "pool",
            "rm",
            &p.name,
            &p.name,
            "--yes-i-really-really-mean-it",
        ]);
        p.ceph(&["osd", "pool", "create", &p.name, "8", "8"]);
        p.rbd(&["pool", "init", &p.name]);
        p
    }

    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        Command::new(program)
            .arg("--conf")
            .arg(&self.conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    fn ceph_status(&self, args: &[&str]) -> bool {
        self.run("ceph", args).status.success()
    }

    /// `program ARGS` (`ceph` or `rbd`); panics unless it succeeds; returns stdout.
    fn checked(&self, program: &str, args: &[&str]) -> String {
        let o = self.run(program, args);
        assert!(
            o.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn ceph(&self, args: &[&str]) -> String {
        self.checked("ceph", args)
    }

    fn rbd(&self, args: &[&str]) -> String {
        self.checked("rbd", args)
    }

    fn rbd_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        serde_json::from_str(&self.rbd(&a)).expect("rbd json")
    }

    /// The images in the pool.
    fn images(&self) -> Vec<String> {
        let v = self.rbd_json(&["ls", &self.name]);
        let mut names: Vec<String> = v
            .as_array()
            .expect("list")
            .iter()
            .map(|n| n.as_str().expect("name").to_string())
            .collect();
        names.sort();
        names
    }

    fn spec(&self, image: &str) -> String {
        format!("{}/{image}", self.name)
    }

    /// `rbd export` of `image` (or `image@snap`) to `path`.
    fn export(&self, image: &str, path: &Path) {
        let _ = std::fs::remove_file(path);
        self.rbd(&[
            "export",
            "--no-progress",
            &self.spec(image),
            path.to_str().unwrap(),
        ]);
    }

    /// The vimport settings of the rbd store on this pool.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("VIMPORT_STORE", "rbd".into()),
            ("VIMPORT_RBD_POOL", self.name.clone()),
            ("VIMPORT_CEPH_CONF", self.conf.display().to_string()),
        ]
    }

    /// Waits until the pool holds no image.
    fn wait_empty(&self, limit: Duration) {
        let start = Instant::now();
        while !self.images().is_empty() {
            assert!(
                start.elapsed() < limit,
                "images left in the pool after {limit:?}: {:?}",
                self.images()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        let _ = self.ceph_status(&[
            "osd",
            "pool",
            "rm",
            &self.name,
            &self.name,
            "--yes-i-really-really-mean-it",
        ]);
    }
}

fn start(data: &Path, pool: &TestPool, extra: &[(&str, &str)]) -> Vimport {
    let env = pool.env();
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    Vimport::start(data, &all)
}

/// A compressed qcow2 `name` in `dir` (qemu-img convert -c) of `size` bytes of
/// compressible raw data made from `seed`.
fn compressed_qcow2(q: &Qemu, dir: &Path, name: &str, size: u64, seed: u64) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    vconvert_testkit::write_compressible_raw(&raw, size, seed);
    let qcow = dir.join(name);
    q.img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        qcow.to_str().unwrap(),
    ]);
    qcow
}

/// A qemu-made image of `format` (qemu-img's name) with `options` from `layout`.
fn qemu_image(
    q: &Qemu,
    dir: &Path,
    layout: &Layout,
    format: &str,
    options: &str,
    n: usize,
) -> PathBuf {
    let raw = dir.join(format!("layout-{n}.raw"));
    q.build(layout, "raw", "", &raw);
    let out = dir.join(format!("src-{n}.{format}"));
    let mut args = vec!["convert", "-f", "raw", "-O", format];
    if format == "qcow2" {
        args.push("-c");
    }
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    let (r, o) = (raw.display().to_string(), out.display().to_string());
    args.extend([r.as_str(), o.as_str()]);
    q.img(&args);
    out
}

/// Stages `path` as a new image declared `disk_format` and imports it; returns the
/// image id once the import succeeded.
fn import(v: &Vimport, path: &Path, disk_format: &str) -> String {
    let id = v.create(disk_format, disk_format);
    assert_eq!(v.stage(&id, &std::fs::read(path).unwrap()), 204);
    assert_eq!(v.import(&id).0, 202);
    let task = v.wait_import(&id, Duration::from_secs(180));
    assert_eq!(task["status"], "success", "{disk_format}: {task}");
    id
}

#[test]
fn every_format_imports_into_rbd_with_a_protected_snapshot_that_clones() {
    let Some(conf) = ceph() else { return };
    let Some(q) = qemu() else { return };
    let pool = TestPool::new(&conf, "formats");
    let dir = tempdir();
    let v = start(&dir.path().join("data"), &pool, &[]);
    let cases = [
        ("raw", "raw", ""),
        ("qcow2", "qcow2", ""),
        ("vdi", "vdi", ""),
        ("vmdk", "vmdk", "subformat=streamOptimized"),
        ("vhd", "vpc", ""),
        ("vhdx", "vhdx", ""),
    ];
    let mut ids = Vec::new();
    for (i, (glance, qfmt, opts)) in cases.into_iter().enumerate() {
        let layout = Layout::random(24 << 20, 6, i as u64 + 11);
        let src = qemu_image(&q, dir.path(), &layout, qfmt, opts, i);
        let id = import(&v, &src, glance);
        let img = v.image(&id);
        assert_eq!(img["disk_format"], "raw", "{glance}");
        // The RBD image: named by the id, the virtual size, content equal.
        let info = pool.rbd_json(&["info", &pool.spec(&id)]);
        let vsize = q.info_json(Some(qfmt), &src)["virtual-size"]
            .as_u64()
            .unwrap();
        assert_eq!(info["size"], vsize, "{glance}: {info}");
        assert_eq!(img["virtual_size"], vsize, "{glance}");
        let exported = dir.path().join(format!("export-{i}.raw"));
        pool.export(&id, &exported);
        q.assert_same(qfmt, &src, "raw", &exported);
        // The snapshot `snap`, protected, with the same content.
        let snaps = pool.rbd_json(&["snap", "ls", &pool.spec(&id)]);
        let names: Vec<&str> = snaps
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["snap"], "{glance}: {snaps}");
        let snap_info = pool.rbd_json(&["info", &format!("{}@snap", pool.spec(&id))]);
        assert_eq!(snap_info["protected"], "true", "{glance}: {snap_info}");
        // Our download (whole, and a Range) reads the same bytes.
        let (s, body) = v.call("GET", &format!("/v2/images/{id}/file"), None);
        assert_eq!(s, 200);
        let exported_bytes = std::fs::read(&exported).unwrap();
        assert!(
            body == exported_bytes,
            "{glance}: download differs from rbd export"
        );
        assert_eq!(img["checksum"], md5_hex(&exported_bytes), "{glance}");
        ids.push(id);
    }
    // Only complete images, each named by its id, are in the pool.
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(pool.images(), sorted);
    // A clone of the first image's snapshot (as Nova or Cinder makes) reads the image.
    let id = &ids[1];
    let clone = "clone-of-qcow2";
    pool.rbd(&[
        "clone",
        &format!("{}@snap", pool.spec(id)),
        &pool.spec(clone),
    ]);
    let from_clone = dir.path().join("clone.raw");
    pool.export(clone, &from_clone);
    let original = dir.path().join("original.raw");
    pool.export(id, &original);
    q.assert_same("raw", &original, "raw", &from_clone);
    // An image with a clone cannot be deleted: 409 naming the clone, image intact.
    let (s, body) = v.call("DELETE", &format!("/v2/images/{id}"), None);
    assert_eq!(s, 409, "{}", String::from_utf8_lossy(&body));
    let msg = String::from_utf8_lossy(&body);
    assert!(msg.contains(clone), "the 409 names the clone: {msg}");
    assert_eq!(v.image(id)["status"], "active");
    assert!(pool.images().contains(id));
    // Once the clone is gone, deletion removes the snapshot and the image.
    pool.rbd(&["rm", "--no-progress", &pool.spec(clone)]);
    for id in &ids {
        let (s, body) = v.call("DELETE", &format!("/v2/images/{id}"), None);
        assert_eq!(s, 204, "{}", String::from_utf8_lossy(&body));
    }
    assert_eq!(pool.images(), Vec::<String>::new());
    let (ws, _) = v.files();
    assert!(ws.is_empty(), "workspace not empty: {ws:?}");
}

fn md5_hex(b: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// `GET /v2/images/{id}/file` with a `Range` header.
fn get_range(v: &Vimport, id: &str, range: &str) -> (u16, Vec<u8>) {
    let r = ureq::get(&format!("{}/v2/images/{id}/file", v.base))
        .set("Authorization", &format!("Bearer {}", common::TOKEN))
        .set("Range", range)
        .call()
        .expect("range request");
    let status = r.status();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut body).unwrap();
    (status, body)
}

#[test]
fn a_range_download_reads_from_rbd() {
    let Some(conf) = ceph() else { return };
    let pool = TestPool::new(&conf, "range");
    let dir = tempdir();
    let v = start(&dir.path().join("data"), &pool, &[]);
    let mut bytes = vec![0u8; 5 << 20];
    vconvert_testkit::Rng::new(7).fill(&mut bytes[..3 << 20]);
    let src = dir.path().join("src.raw");
    std::fs::write(&src, &bytes).unwrap();
    let id = import(&v, &src, "raw");
    let (s, body) = get_range(&v, &id, "bytes=3145700-3145799");
    assert_eq!(s, 206);
    assert_eq!(body, &bytes[3145700..3145800]);
    let (s, body) = get_range(&v, &id, "bytes=-10");
    assert_eq!(s, 206);
    assert_eq!(body, &bytes[bytes.len() - 10..]);
}

#[test]
fn only_data_is_written_to_the_pool() {
    let Some(conf) = ceph() else { return };
    let pool = TestPool::new(&conf, "data-only");
    let dir = tempdir();
    // 4 MiB objects: the data below touches exactly 2 of the 64.
    let v = start(
        &dir.path().join("data"),
        &pool,
        &[("VIMPORT_RBD_CHUNK_SIZE", "4M")],
    );
    let size = 256u64 << 20;
    let src = dir.path().join("src.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(size).unwrap();
    let mut data = vec![0u8; 1 << 20];
    vconvert_testkit::Rng::new(3).fill(&mut data);
    use std::os::unix::fs::FileExt;
    f.write_all_at(&data, 0).unwrap();
    f.write_all_at(&data, 100 << 20).unwrap();
    // 16 MiB of zeros written as data in the upload: nothing of it reaches the pool.
    f.write_all_at(&vec![0u8; 16 << 20], 200 << 20).unwrap();
    drop(f);
    let id = import(&v, &src, "raw");
    let du = pool.rbd_json(&["du", &pool.spec(&id)]);
    let head = du["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i.get("snapshot").is_none())
        .unwrap_or_else(|| panic!("no head in {du}"));
    assert_eq!(head["provisioned_size"], size, "{du}");
    // The data written before the snapshot is counted under the snapshot, anything
    // written after it under the head: the sum is what the image holds.
    let used: u64 = du["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["used_size"]
                .as_u64()
                .unwrap_or_else(|| panic!("no used_size in {du}"))
        })
        .sum();
    // Data-only: at most the two objects the data touches (fast-diff counts whole
    // objects), at least the data itself; a copy of the whole raw would be 256 MiB and
    // one of the zeros would add 16 MiB.
    assert!(
        (2 << 20..=8 << 20).contains(&used),
        "bytes used in the pool: {used} ({du})"
    );
    let exported = dir.path().join("export.raw");
    pool.export(&id, &exported);
    assert!(std::fs::read(&exported).unwrap() == std::fs::read(&src).unwrap());
}

/// The host offsets of the compressed clusters of the qcow2 `path`, in guest order
/// (qemu-img's map does not give them): read from its L1 and L2 tables (qcow2 spec,
/// "Host cluster management"; offsets big-endian).
fn compressed_clusters(path: &Path) -> Vec<u64> {
    let f = std::fs::read(path).unwrap();
    let be = |at: usize| u64::from_be_bytes(f[at..at + 8].try_into().unwrap());
    let cluster_bits = u32::from_be_bytes(f[20..24].try_into().unwrap());
    let l1_size = u32::from_be_bytes(f[36..40].try_into().unwrap()) as usize;
    let l1_offset = be(40) as usize;
    let cluster = 1usize << cluster_bits;
    // Compressed descriptor: bits 0..x-1 are the host offset, x = 62 - (cluster_bits - 8).
    let x = 62 - (cluster_bits - 8);
    let mut out = Vec::new();
    for i in 0..l1_size {
        let l2 = (be(l1_offset + 8 * i) & 0x00ff_ffff_ffff_fe00) as usize;
        if l2 == 0 {
            continue;
        }
        for j in 0..cluster / 8 {
            let e = be(l2 + 8 * j);
            if e & (1 << 62) != 0 {
                out.push(e & ((1 << x) - 1));
            }
        }
    }
    out
}

/// The name of image `id`'s RBD image while it is written.
fn partial(id: &str) -> String {
    format!("{id}.partial")
}

/// Waits until the task of image `id` says it is converting.
fn wait_converting(v: &Vimport, id: &str) {
    let start = Instant::now();
    loop {
        let t = v.last_task(id);
        if t["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("converting"))
        {
            return;
        }
        assert!(t["status"] != "success" && t["status"] != "failure", "{t}");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not converting: {t}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn failed_cancelled_or_killed_imports_leave_no_rbd_image() {
    let Some(conf) = ceph() else { return };
    let Some(q) = qemu() else { return };
    let pool = TestPool::new(&conf, "failures");
    let dir = tempdir();
    let data = dir.path().join("data");

    // 1. A compressed qcow2 whose last compressed cluster is corrupt: inspection
    // passes, the conversion fails after the RBD image was made and partly written.
    let qcow = compressed_qcow2(&q, dir.path(), "corrupt.qcow2", 32 << 20, 5);
    let at = *compressed_clusters(&qcow)
        .last()
        .expect("a compressed cluster");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&qcow).unwrap();
        f.write_all_at(&[0xff; 512], at).unwrap();
    }
    let v = start(&data, &pool, &[]);
    let id = v.create("corrupt", "qcow2");
    assert_eq!(v.stage(&id, &std::fs::read(&qcow).unwrap()), 204);
    assert_eq!(v.import(&id).0, 202);
    let task = v.wait_import(&id, Duration::from_secs(120));
    assert_eq!(task["status"], "failure", "{task}");
    assert!(
        task["message"]
            .as_str()
            .unwrap()
            .contains("conversion of the qcow2 upload failed"),
        "{task}"
    );
    assert_eq!(
        pool.images(),
        Vec::<String>::new(),
        "the partial image is removed"
    );

    // 2. Deleted mid-conversion (a rate-limited import): cancelled, image removed.
    drop(v);
    let v = start(&data, &pool, &[("VIMPORT_CONVERT_RATE_LIMIT", "4M")]);
    let mut full = vec![0u8; 40 << 20];
    vconvert_testkit::Rng::new(9).fill(&mut full);
    let id = v.create("slow", "raw");
    assert_eq!(v.stage(&id, &full), 204);
    assert_eq!(v.import(&id).0, 202);
    wait_converting(&v, &id);
    let start_wait = Instant::now();
    while !pool.images().contains(&partial(&id)) {
        assert!(
            start_wait.elapsed() < Duration::from_secs(30),
            "no RBD image made"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Being written, it is not published under the image's id.
    assert_eq!(pool.images(), vec![partial(&id)]);
    assert_eq!(v.call("DELETE", &format!("/v2/images/{id}"), None).0, 204);
    pool.wait_empty(Duration::from_secs(30));

    // 3. Killed mid-conversion: the next start removes the orphan RBD image.
    drop(v);
    let mut v = start(&data, &pool, &[("VIMPORT_CONVERT_RATE_LIMIT", "4M")]);
    let id = v.create("killed", "raw");
    assert_eq!(v.stage(&id, &full), 204);
    assert_eq!(v.import(&id).0, 202);
    wait_converting(&v, &id);
    let start_wait = Instant::now();
    while !pool.images().contains(&partial(&id)) {
        assert!(
            start_wait.elapsed() < Duration::from_secs(30),
            "no RBD image made"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    v.kill();
    assert_eq!(
        pool.images(),
        vec![partial(&id)],
        "the killed import's partial image is left"
    );
    // The next start removes the orphan RBD image: at once, or (while Ceph still
    // holds the killed client's watch on it, up to osd_client_watch_timeout) from the
    // background retry.
    let v = start(&data, &pool, &[]);
    pool.wait_empty(Duration::from_secs(110));
    assert_eq!(v.image(&id)["status"], "queued");
}

#[test]
fn non_raw_output_goes_through_the_workspace_into_rbd() {
    let Some(conf) = ceph() else { return };
    let Some(q) = qemu() else { return };
    let pool = TestPool::new(&conf, "qcow2-out");
    let dir = tempdir();
    let v = start(
        &dir.path().join("data"),
        &pool,
        &[
            ("VIMPORT_OUTPUT_FORMAT", "qcow2"),
            ("VIMPORT_RBD_SNAPSHOT", "false"),
        ],
    );
    let layout = Layout::random(16 << 20, 5, 21);
    let src = qemu_image(&q, dir.path(), &layout, "vdi", "", 0);
    let id = import(&v, &src, "vdi");
    assert_eq!(v.image(&id)["disk_format"], "qcow2");
    let exported = dir.path().join("export.qcow2");
    pool.export(&id, &exported);
    q.assert_same("vdi", &src, "qcow2", &exported);
    assert_eq!(q.check("qcow2", &exported).0, 0);
    // No snapshot when rbd_snapshot is off.
    assert_eq!(
        pool.rbd_json(&["snap", "ls", &pool.spec(&id)]),
        Value::Array(vec![])
    );
    assert_eq!(v.call("DELETE", &format!("/v2/images/{id}"), None).0, 204);
    assert_eq!(pool.images(), Vec::<String>::new());
}

#[test]
fn a_raw_import_into_rbd_reserves_only_the_staged_upload() {
    let Some(conf) = ceph() else { return };
    let Some(q) = qemu() else { return };
    let pool = TestPool::new(&conf, "workspace");
    let dir = tempdir();
    // A compressed qcow2 whose raw data is about three times its size.
    let qcow = compressed_qcow2(&q, dir.path(), "src.qcow2", 48 << 20, 8);
    let staged = std::fs::metadata(&qcow).unwrap().len();
    let data = vconvert_engine::measure(
        Some(
            vconvert_engine::open(&qcow, None, &Default::default())
                .unwrap()
                .as_ref(),
        ),
        0,
        vconvert_core::Format::Raw,
        &vconvert_core::Options::new(),
    )
    .unwrap()
    .required;
    let quota = staged + (1 << 20);
    assert!(
        data > quota,
        "the raw output ({data}) must not fit in {quota}"
    );
    let quota_s = quota.to_string();
    let bytes = std::fs::read(&qcow).unwrap();

    // Control: into the directory store, the raw output needs the workspace.
    let fs = Vimport::start(
        &dir.path().join("fs"),
        &[("VIMPORT_WORKSPACE_BYTES", quota_s.as_str())],
    );
    let id = fs.create("fs", "qcow2");
    assert_eq!(fs.stage(&id, &bytes), 204);
    assert_eq!(fs.import(&id).0, 202);
    let task = fs.wait_import(&id, Duration::from_secs(60));
    assert_eq!(task["status"], "failure", "{task}");
    assert!(
        task["message"].as_str().unwrap().contains("workspace full"),
        "{task}"
    );
    drop(fs);

    // Into RBD the raw output never touches the workspace: only the upload counts.
    let v = start(
        &dir.path().join("rbd"),
        &pool,
        &[("VIMPORT_WORKSPACE_BYTES", quota_s.as_str())],
    );
    let id = import(&v, &qcow, "qcow2");
    let exported = dir.path().join("export.raw");
    pool.export(&id, &exported);
    q.assert_same("qcow2", &qcow, "raw", &exported);
    let (ws, _) = v.files();
    assert!(ws.is_empty(), "workspace not empty: {ws:?}");
}

/// Waits (bounded) until the pool holds exactly `want` (sorted).
fn wait_pool(pool: &TestPool, want: &[String], limit: Duration) {
    let start = Instant::now();
    while pool.images() != want {
        assert!(
            start.elapsed() < limit,
            "the pool holds {:?} after {limit:?}, not {want:?}",
            pool.images()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 20 on RBD: two vimport processes on different ports over one PostgreSQL
/// catalogue and one pool. An image created on one is listed and imported through
/// the other and downloaded through the first equal to the guest data; a host killed
/// (SIGKILL) mid-conversion has its task failed by the other after the lease, and the
/// killed import's RBD image is removed, leaving only the active image in the pool.
#[test]
fn two_hosts_over_one_catalogue_share_one_pool() {
    let Some(conf) = ceph() else { return };
    let Some(url) = common::postgres_database() else {
        return;
    };
    let Some(q) = qemu() else { return };
    let pool = TestPool::new(&conf, "hosts");
    let dir = tempdir();
    let qcow2 = |len: usize, seed: u64| -> (Vec<u8>, Vec<u8>) {
        let mut guest = vec![0u8; len];
        vconvert_testkit::Rng::new(seed).fill(&mut guest[..len / 2]);
        let raw = dir.path().join(format!("guest-{seed}.raw"));
        std::fs::write(&raw, &guest).unwrap();
        let out = dir.path().join(format!("upload-{seed}.qcow2"));
        q.img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        (std::fs::read(&out).unwrap(), guest)
    };
    let common = [
        ("VIMPORT_DATABASE", url.as_str()),
        // Short, so the dead host is noticed soon (renewed every third of it).
        ("VIMPORT_TASK_LEASE", "6"),
    ];
    // A converts at 1 MiB/s, so its 16 MiB conversion is still running when it is
    // killed (the test waits for the conversion to start, not for a time).
    let mut a_env = common.to_vec();
    a_env.extend([
        ("VIMPORT_HOST_ID", "host-a"),
        ("VIMPORT_CONVERT_RATE_LIMIT", "1M"),
    ]);
    let mut b_env = common.to_vec();
    b_env.push(("VIMPORT_HOST_ID", "host-b"));
    let mut a = start(&dir.path().join("host-a"), &pool, &a_env);
    let b = start(&dir.path().join("host-b"), &pool, &b_env);
    assert_ne!(a.base, b.base, "two hosts on two ports");

    // Created on A, listed by B, staged on B and imported through A: it runs on B
    // (which holds the upload); downloaded through A, it is the guest data.
    let (upload, guest) = qcow2(8 << 20, 21);
    let id = a.create("made-on-a", "qcow2");
    let (s, list) = b.json("GET", "/v2/images", None);
    assert_eq!(s, 200, "{list}");
    assert!(
        list["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == id.as_str()),
        "B lists what A created: {list}"
    );
    assert_eq!(b.stage(&id, &upload), 204);
    let (s, v) = a.import(&id);
    assert_eq!(s, 202, "{v}");
    let task = a.wait_import(&id, Duration::from_secs(120));
    assert_eq!(task["status"], "success", "{task}");
    assert_eq!(b.image(&id)["status"], "active");
    let (s, file) = a.call("GET", &format!("/v2/images/{id}/file"), None);
    assert_eq!(s, 200);
    assert!(file == guest, "A serves from the pool what B imported");
    assert_eq!(pool.images(), vec![id.clone()]);

    // Staged on A, import requested through B: A runs it and is killed mid-conversion
    // once its RBD image is being written.
    let (upload2, _) = qcow2(16 << 20, 22);
    let id2 = b.create("dies-on-a", "qcow2");
    assert_eq!(a.stage(&id2, &upload2), 204);
    assert_eq!(b.import(&id2).0, 202);
    wait_converting(&b, &id2);
    let task_id = b.last_task(&id2)["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    while !pool.images().contains(&partial(&id2)) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no RBD image made: {:?}",
            pool.images()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill();
    assert!(pool.images().contains(&partial(&id2)));

    // B fails the task once A's lease is over, naming A; the image is queued again,
    // and the abandoned RBD image is removed (at once, or, while Ceph still holds the
    // killed client's watch on it, by the background retry).
    let started = Instant::now();
    while b.image(&id2)["status"] != "queued" {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "B did not give up the dead host's import: {}",
            b.image(&id2)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let task = b.task(&task_id);
    assert_eq!(task["status"], "failure", "{task}");
    assert!(
        task["message"].as_str().unwrap().contains("host host-a"),
        "{task}"
    );
    wait_pool(&pool, std::slice::from_ref(&id), Duration::from_secs(110));
    assert_eq!(b.image(&id)["status"], "active");
    let (s, file) = b.call("GET", &format!("/v2/images/{id}/file"), None);
    assert_eq!(s, 200);
    assert!(file == guest, "the active image is intact");
}
