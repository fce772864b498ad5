//! The chain script (`qemu_img_chain.sh`: create, snapshot, resize, overlay, rebase,
//! commit, snapshot apply and delete, shrink, preallocated grow, amend to compat=0.10,
//! check, convert) run unchanged with `qemu-img` and
//! with `vconvert` as the program: every image reads the same through qemu-img, the
//! final raw images are byte-identical, and `qemu-img check` finds ours clean.

use std::path::Path;
use std::process::Command;

use vconvert_testkit::{qemu, tempdir};

fn run_script(program: &str, dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qemu_img_chain.sh");
    let out = Command::new("sh")
        .arg(&script)
        .arg(dir)
        .env("IMG", program)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "the chain script with {program} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_chain_script_runs_unchanged_with_vconvert() {
    let Some(q) = qemu() else { return };
    let theirs = tempdir();
    let ours = tempdir();
    run_script("qemu-img", theirs.path());
    run_script(env!("CARGO_BIN_EXE_vconvert"), ours.path());
    for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        let (a, b) = (ours.path().join(f), theirs.path().join(f));
        q.assert_same("qcow2", &a, "qcow2", &b);
        assert_eq!(q.check("qcow2", &a).0, 0, "{f}: qemu-img check");
        let size = |p| q.info_json(Some("qcow2"), p)["virtual-size"].clone();
        assert_eq!(size(&a), size(&b), "{f}: size");
    }
    for f in ["top.raw", "base.raw", "map-before.json"] {
        assert!(
            std::fs::read(ours.path().join(f)).unwrap()
                == std::fs::read(theirs.path().join(f)).unwrap(),
            "{f} differs"
        );
    }
}
