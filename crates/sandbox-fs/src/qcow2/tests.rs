//! Overlay tests: our own round trips, interop with QEMU's tools (`qemu-img`, `qemu-io` from the
//! `qemu-utils` package, which these tests require), hostile headers, the cap, flatten.

use super::header::{HeaderError, Table};
use super::*;
use crate::quota::QUOTA_SLACK_CLUSTERS;
use proptest::prelude::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const CS: u64 = OVERLAY_CLUSTER_SIZE;

/// Runs a QEMU tool and returns (exit code, stdout + stderr). Fails the test, saying what to
/// install, when the tool is missing.
fn qemu(tool: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run {tool} ({err}): these tests need QEMU's disk tools; install them with \
             `apt-get install qemu-utils`"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn qemu_ok(tool: &str, args: &[&str]) -> String {
    let (code, text) = qemu(tool, args);
    assert_eq!(code, 0, "{tool} {args:?} failed: {text}");
    text
}

fn check_clean(path: &Path) {
    let p = path.to_str().expect("utf-8 path");
    qemu_ok("qemu-img", &["check", "-f", "qcow2", p]);
}

/// A temp dir with a raw base `base.raw` of `len` bytes filled with a position pattern.
struct Fixture {
    dir: tempfile::TempDir,
    base_bytes: Vec<u8>,
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed | 1)
        .collect()
}

impl Fixture {
    fn new(base_len: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let base_bytes = pattern(base_len, 0x5a);
        std::fs::write(dir.path().join("base.raw"), &base_bytes).expect("write base");
        Self { dir, base_bytes }
    }
    fn base(&self) -> PathBuf {
        self.dir.path().join("base.raw")
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn overlay(&self, virtual_size: u64) -> PathBuf {
        let ov = self.path("ov.qcow2");
        create_overlay(&ov, &self.base(), virtual_size).expect("create overlay");
        ov
    }
    fn open(&self, ov: &Path) -> Qcow2Disk {
        Qcow2Disk::open(ov, &self.base(), &Qcow2Config::new()).expect("open overlay")
    }
    /// The model: the base, zero-extended to `size`.
    fn model(&self, size: u64) -> Vec<u8> {
        let mut m = self.base_bytes.clone();
        m.resize(size as usize, 0);
        m
    }
}

fn read_all(disk: &mut Qcow2Disk) -> Vec<u8> {
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(0, &mut buf).expect("read");
    buf
}

/// Writes `model` to a raw file and asks qemu-img whether the overlay has the same content.
fn compare_with_qemu(fx: &Fixture, ov: &Path, model: &[u8]) {
    let expected = fx.path("expected.raw");
    std::fs::write(&expected, model).expect("write expected");
    let text = qemu_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            ov.to_str().expect("utf-8"),
            expected.to_str().expect("utf-8"),
        ],
    );
    assert!(text.contains("Images are identical"), "{text}");
}

#[test]
fn create_is_constant_size_and_time_and_never_reads_the_base() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut lens = Vec::new();
    for (name, size) in [("small.raw", 64 * MIB), ("big.raw", 8 << 30)] {
        let base = dir.path().join(name);
        let f = File::create(&base).expect("base");
        f.set_len(size).expect("sparse base");
        // Unreadable (for a non-root test run): a stat is all create needs.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o000)).expect("chmod");
        let ov = dir.path().join(format!("{name}.qcow2"));
        let start = Instant::now();
        create_overlay(&ov, &base, size).expect("create");
        let took = start.elapsed();
        assert!(took < Duration::from_millis(500), "create took {took:?}");
        let meta = std::fs::metadata(&ov).expect("meta");
        assert_eq!(meta.mode() & 0o777, 0o600, "created with mode 0600");
        lens.push(meta.len());
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        check_clean(&ov);
        let info = qemu_ok("qemu-img", &["info", ov.to_str().expect("utf-8")]);
        assert!(info.contains(&format!("backing file: {name}")), "{info}");
        assert!(info.contains("backing file format: raw"), "{info}");
        assert!(info.contains("cluster_size: 65536"), "{info}");
        assert!(info.contains("refcount bits: 16"), "{info}");
    }
    assert_eq!(
        lens[0], lens[1],
        "the overlay size does not depend on the base size"
    );
    assert!(lens[0] <= 4 * CS, "a few clusters: {}", lens[0]);
}

#[test]
fn create_refuses_small_sizes_existing_files_and_bad_names() {
    let fx = Fixture::new(MIB as usize);
    let ov = fx.path("ov.qcow2");
    assert!(matches!(
        create_overlay(&ov, &fx.base(), MIB - 512),
        Err(Qcow2Error::TooSmall { virtual_size, base_size }) if virtual_size == MIB - 512 && base_size == MIB
    ));
    assert!(matches!(
        create_overlay(&ov, &fx.base(), MIB + 1),
        Err(Qcow2Error::VirtualSize { .. })
    ));
    assert!(!ov.exists(), "nothing is left behind on refusal");
    create_overlay(&ov, &fx.base(), 2 * MIB).expect("create");
    let before = std::fs::read(&ov).expect("read");
    assert!(matches!(
        create_overlay(&ov, &fx.base(), 2 * MIB),
        Err(Qcow2Error::Exists { .. })
    ));
    assert_eq!(
        std::fs::read(&ov).expect("read"),
        before,
        "never overwritten"
    );
    let colon = fx.path("a:b.raw");
    std::fs::write(&colon, b"").expect("write");
    assert!(matches!(
        create_overlay(&fx.path("c.qcow2"), &colon, MIB),
        Err(Qcow2Error::BaseName { .. })
    ));
}

#[test]
fn reads_come_from_the_base_and_zeroes_past_its_end() {
    let fx = Fixture::new(MIB as usize + 4096);
    let ov = fx.overlay(3 * MIB);
    let mut disk = fx.open(&ov);
    assert_eq!(disk.size(), 3 * MIB);
    assert_eq!(read_all(&mut disk), fx.model(3 * MIB));
    // What the VMM holds: a boxed backend, moved to its device thread.
    let boxed: Box<dyn BlockBackend> = Box::new(fx.open(&ov));
    std::thread::spawn(move || boxed.size())
        .join()
        .expect("thread");
    // A write straddling the base's end: copy-on-write of the base part, zeroes after it.
    let at = MIB + 2048;
    disk.write_at(at, &[7u8; 4096]).expect("write");
    let mut model = fx.model(3 * MIB);
    model[at as usize..at as usize + 4096].fill(7);
    assert_eq!(read_all(&mut disk), model);
    disk.flush().expect("flush");
    drop(disk);
    check_clean(&ov);
    compare_with_qemu(&fx, &ov, &model);
}

#[test]
fn opening_and_closing_without_writes_changes_nothing() {
    let fx = Fixture::new(MIB as usize);
    let ov = fx.overlay(MIB);
    let before = std::fs::read(&ov).expect("read");
    let base_before = std::fs::read(fx.base()).expect("read");
    let mut disk = fx.open(&ov);
    let _ = read_all(&mut disk);
    disk.flush().expect("flush");
    drop(disk);
    assert_eq!(std::fs::read(&ov).expect("read"), before);
    assert_eq!(std::fs::read(fx.base()).expect("read"), base_before);
}

#[test]
fn writes_discards_and_zeroes_match_qemu() {
    let fx = Fixture::new(2 * MIB as usize);
    let ov = fx.overlay(4 * MIB);
    let mut disk = fx.open(&ov);
    let mut model = fx.model(4 * MIB);
    let mut write = |disk: &mut Qcow2Disk, at: u64, len: usize, byte: u8| {
        disk.write_at(at, &vec![byte; len]).expect("write");
        model[at as usize..at as usize + len].fill(byte);
    };
    write(&mut disk, 0, 3 * CS as usize, 1);
    write(&mut disk, 5 * CS + 512, 1024, 2);
    write(&mut disk, 3 * MIB, 2 * CS as usize, 3);
    // Write-zeroes over written and base-only clusters, with partial ends: zeroes, not the base.
    disk.write_zeroes(CS / 2, 6 * CS, true)
        .expect("write zeroes");
    model[(CS / 2) as usize..(CS / 2 + 6 * CS) as usize].fill(0);
    disk.write_zeroes(20 * CS, 3 * CS, false)
        .expect("write zeroes keep");
    model[(20 * CS) as usize..(23 * CS) as usize].fill(0);
    // Discard of whole clusters we wrote reads zeroes (our choice).
    disk.discard(3 * MIB, 2 * CS).expect("discard");
    model[(3 * MIB) as usize..(3 * MIB + 2 * CS) as usize].fill(0);
    assert_eq!(read_all(&mut disk), model);
    disk.flush().expect("flush");
    drop(disk);
    check_clean(&ov);
    compare_with_qemu(&fx, &ov, &model);
    // qemu-img convert reads our writes the same way.
    let out = fx.path("converted.raw");
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            ov.to_str().expect("utf-8"),
            out.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(std::fs::read(&out).expect("read"), model);
}

#[test]
fn discard_gives_host_blocks_back_and_space_is_reused() {
    let fx = Fixture::new(MIB as usize);
    let ov = fx.overlay(16 * MIB);
    let mut disk = fx.open(&ov);
    disk.write_at(2 * MIB, &vec![9u8; 4 * MIB as usize])
        .expect("write");
    disk.flush().expect("flush");
    let blocks_full = std::fs::metadata(&ov).expect("meta").blocks();
    let len_full = disk.file_len().expect("len");
    disk.discard(2 * MIB, 4 * MIB).expect("discard");
    disk.flush().expect("flush");
    let blocks_after = std::fs::metadata(&ov).expect("meta").blocks();
    assert!(
        blocks_after * 512 + 3 * MIB < blocks_full * 512,
        "punched: {blocks_full} -> {blocks_after} blocks"
    );
    // New data reuses the freed clusters instead of growing the file.
    disk.write_at(8 * MIB, &vec![4u8; 4 * MIB as usize])
        .expect("write");
    disk.flush().expect("flush");
    assert_eq!(
        disk.file_len().expect("len"),
        len_full,
        "freed clusters are reused"
    );
    drop(disk);
    check_clean(&ov);
}

#[test]
fn opens_what_qemu_created_and_wrote() {
    let fx = Fixture::new(MIB as usize);
    let ov = fx.path("q.qcow2");
    let ovs = ov.to_str().expect("utf-8");
    qemu_ok(
        "qemu-img",
        &[
            "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", ovs, "2M",
        ],
    );
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 4096 8192",
            "-c",
            "write -z 65536 65536",
            "-c",
            "write -P 0x44 1536k 4096",
            ovs,
        ],
    );
    let mut model = fx.model(2 * MIB);
    model[4096..4096 + 8192].fill(0x33);
    model[65536..2 * 65536].fill(0);
    model[1536 * 1024..1536 * 1024 + 4096].fill(0x44);
    let mut disk = fx.open(&ov);
    assert_eq!(read_all(&mut disk), model);
    disk.write_at(100 * 512, &[0x55; 512]).expect("write");
    model[100 * 512..101 * 512].fill(0x55);
    disk.flush().expect("flush");
    drop(disk);
    check_clean(&ov);
    compare_with_qemu(&fx, &ov, &model);
}

#[test]
fn backing_name_must_be_the_base_file_name() {
    let fx = Fixture::new(MIB as usize);
    let ov = fx.overlay(MIB);
    let other = fx.path("other.raw");
    std::fs::write(&other, vec![0u8; MIB as usize]).expect("write");
    let err = Qcow2Disk::open(&ov, &other, &Qcow2Config::new()).expect_err("mismatch");
    assert!(
        matches!(&err, Qcow2Error::Header { source: HeaderError::BackingMismatch { found: Some(f), expected }, .. } if f == "base.raw" && expected == "other.raw"),
        "{err:?}"
    );
    // A differently named directory holding a file of the same name is fine: only the name
    // is compared, the path given is what we open.
    let sub = fx.path("store");
    std::fs::create_dir(&sub).expect("mkdir");
    std::fs::copy(fx.base(), sub.join("base.raw")).expect("copy");
    Qcow2Disk::open(&ov, &sub.join("base.raw"), &Qcow2Config::new()).expect("same name");
}

#[test]
fn open_files_takes_open_files_and_checks_the_name_only_when_given() {
    let fx = Fixture::new(MIB as usize);
    let ov = fx.overlay(MIB);
    let files = || {
        let overlay = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&ov)
            .expect("overlay");
        let base = std::fs::File::open(fx.base()).expect("base");
        (overlay, base)
    };
    let label = std::path::Path::new("fd 5");
    // An inherited base has no name to compare: any valid backing name goes.
    let (o, b) = files();
    let mut disk = Qcow2Disk::open_files((o, label), (b, label), None, &Qcow2Config::new())
        .expect("open from files");
    disk.write_at(0, &[0x77; 512]).expect("write");
    let mut buf = [0u8; 512];
    disk.read_at(0, &mut buf).expect("read");
    assert_eq!(buf, [0x77; 512]);
    drop(disk);
    // Given a name, it must match, as with paths.
    let (o, b) = files();
    let err = Qcow2Disk::open_files(
        (o, label),
        (b, label),
        Some("other.raw"),
        &Qcow2Config::new(),
    )
    .expect_err("mismatch");
    assert!(
        matches!(&err, Qcow2Error::Header { source: HeaderError::BackingMismatch { .. }, path } if path == label),
        "{err:?}"
    );
}

/// Patches bytes of a freshly created overlay, then expects `open` to refuse it.
fn refused_after(patch: impl FnOnce(&mut Vec<u8>)) -> HeaderError {
    let fx = Fixture::new(MIB as usize);
    let ov = fx.overlay(4 * MIB);
    let mut bytes = std::fs::read(&ov).expect("read");
    patch(&mut bytes);
    std::fs::write(&ov, &bytes).expect("write");
    match Qcow2Disk::open(&ov, &fx.base(), &Qcow2Config::new()) {
        Err(Qcow2Error::Header { source, .. }) => source,
        other => panic!("expected a header error, got {other:?}"),
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Points the backing file name at `name`, written at offset 0x1000 of the header cluster.
fn set_backing_name(b: &mut [u8], name: &[u8]) {
    b[0x1000..0x1000 + name.len()].copy_from_slice(name);
    put64(b, 8, 0x1000);
    put32(b, 16, name.len() as u32);
}

#[test]
fn hostile_headers_get_specific_errors() {
    assert!(matches!(
        refused_after(|b| put32(b, 20, 8)),
        HeaderError::ClusterBits { bits: 8 }
    ));
    assert!(matches!(
        refused_after(|b| put32(b, 20, 40)),
        HeaderError::ClusterBits { bits: 40 }
    ));
    assert!(matches!(
        refused_after(|b| put32(b, 36, u32::MAX)),
        HeaderError::TableSize {
            table: Table::L1,
            ..
        }
    ));
    assert!(matches!(
        refused_after(|b| put32(b, 36, 0)),
        HeaderError::L1TooSmall {
            entries: 0,
            needed: 1
        }
    ));
    assert!(matches!(
        refused_after(|b| put64(b, 48, 1 << 40)),
        HeaderError::PastEnd {
            table: Table::RefcountTable,
            ..
        }
    ));
    assert!(matches!(
        refused_after(|b| put32(b, 56, 100)),
        HeaderError::PastEnd {
            table: Table::RefcountTable,
            ..
        }
    ));
    assert!(matches!(
        refused_after(|b| set_backing_name(b, b"/etc/shadow")),
        HeaderError::BackingName { .. }
    ));
    assert!(matches!(
        refused_after(|b| set_backing_name(b, b"../x")),
        HeaderError::BackingName { .. }
    ));
    assert!(matches!(
        refused_after(|b| set_backing_name(b, b"json:{}")),
        HeaderError::BackingName { .. }
    ));
    assert!(matches!(
        refused_after(|b| set_backing_name(b, b"shadow")),
        HeaderError::BackingMismatch { .. }
    ));
    assert!(matches!(
        refused_after(|b| put64(b, 72, 1 << 40)),
        HeaderError::IncompatibleFeatures { bits } if bits == 1 << 40
    ));
    assert!(matches!(
        refused_after(|b| put64(b, 72, 1)),
        HeaderError::IncompatibleFeatures { bits: 1 }
    ));
    assert!(matches!(
        refused_after(|b| put64(b, 72, 1 << 2)),
        HeaderError::ExternalDataFile
    ));
    assert!(matches!(
        refused_after(|b| put32(b, 32, 1)),
        HeaderError::Encrypted
    ));
    assert!(matches!(
        refused_after(|b| put32(b, 60, 1)),
        HeaderError::Snapshots { count: 1 }
    ));
    assert!(matches!(
        refused_after(|b| put32(b, 4, 2)),
        HeaderError::Version { version: 2 }
    ));
    assert!(matches!(
        refused_after(|b| put32(b, 0, 0x7f45_4c46)),
        HeaderError::Magic { .. }
    ));
    // The L1 table pointing at the header cluster.
    assert!(matches!(
        refused_after(|b| put64(b, 40, 0)),
        HeaderError::InHeader {
            table: Table::L1,
            offset: 0
        }
    ));
}

/// Header extensions: replaces the extension area after the 104-byte header.
fn with_extension(b: &mut [u8], ext_type: u32, data: &[u8]) {
    let mut at = get_header_length(b);
    put32(b, at, ext_type);
    put32(b, at + 4, data.len() as u32);
    b[at + 8..at + 8 + data.len()].copy_from_slice(data);
    at += 8 + data.len().next_multiple_of(8);
    // A backing format extension, then the end marker.
    put32(b, at, 0xe279_2aca);
    put32(b, at + 4, 3);
    b[at + 8..at + 11].copy_from_slice(b"raw");
    put64(b, at + 16, 0);
}

fn get_header_length(b: &[u8]) -> usize {
    u32::from_be_bytes(b[100..104].try_into().expect("4 bytes")) as usize
}

#[test]
fn hostile_extensions_get_specific_errors() {
    assert!(matches!(
        refused_after(|b| with_extension(b, 0x0537_be77, &[0u8; 16])),
        HeaderError::Encrypted
    ));
    assert!(matches!(
        refused_after(|b| with_extension(b, 0x4441_5441, b"/dev/sda")),
        HeaderError::ExternalDataFile
    ));
    assert!(matches!(
        refused_after(|b| with_extension(b, 0xe279_2aca, b"qcow2")),
        HeaderError::DuplicateExtension { .. }
    ));
    assert!(matches!(
        refused_after(|b| {
            let at = get_header_length(b);
            put32(b, at, 0x1234_5678);
            put32(b, at + 4, u32::MAX);
        }),
        HeaderError::Extension { .. }
    ));
}

/// Writes one cluster of data so the overlay has an L2 table and a data cluster, and returns
/// the overlay bytes and the L1 table offset.
fn overlay_with_data() -> (Fixture, PathBuf) {
    let fx = Fixture::new(MIB as usize);
    let ov = fx.overlay(4 * MIB);
    let mut disk = fx.open(&ov);
    disk.write_at(0, &[1u8; 4096]).expect("write");
    disk.flush().expect("flush");
    drop(disk);
    (fx, ov)
}

fn refused_table(patch: impl FnOnce(&mut Vec<u8>)) -> HeaderError {
    let (fx, ov) = overlay_with_data();
    let mut bytes = std::fs::read(&ov).expect("read");
    patch(&mut bytes);
    std::fs::write(&ov, &bytes).expect("write");
    match Qcow2Disk::open(&ov, &fx.base(), &Qcow2Config::new()) {
        Err(Qcow2Error::Header { source, .. }) => source,
        other => panic!("expected a header error, got {other:?}"),
    }
}

#[test]
fn table_entries_pointing_into_the_header_are_refused() {
    // L1[0] -> inside the header cluster (COPIED flag kept). Offset 0 would mean "unallocated".
    assert!(matches!(
        refused_table(|b| {
            let l1 = get64(b, 40) as usize;
            put64(b, l1, 1 << 63 | 0x200);
        }),
        HeaderError::InHeader {
            table: Table::L2,
            offset: 0x200
        }
    ));
    // L2[0] -> inside the header cluster.
    assert!(matches!(
        refused_table(|b| {
            let l1 = get64(b, 40) as usize;
            let l2 = (get64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
            put64(b, l2, 1 << 63 | 0x200);
        }),
        HeaderError::InHeader {
            table: Table::DataCluster,
            offset: 0x200
        }
    ));
    // L2[0] -> an unaligned data cluster.
    assert!(matches!(
        refused_table(|b| {
            let l1 = get64(b, 40) as usize;
            let l2 = (get64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
            put64(b, l2, 1 << 63 | (3 * CS + 0x200));
        }),
        HeaderError::Unaligned {
            table: Table::DataCluster,
            ..
        }
    ));
    // L2[0] -> past the end of the file.
    assert!(matches!(
        refused_table(|b| {
            let l1 = get64(b, 40) as usize;
            let l2 = (get64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
            put64(b, l2, 1 << 63 | (1 << 40));
        }),
        HeaderError::PastEnd {
            table: Table::DataCluster,
            ..
        }
    ));
    // L2[0] -> the L1 table.
    assert!(matches!(
        refused_table(|b| {
            let l1 = get64(b, 40);
            let l2 = (get64(b, l1 as usize) & 0x00ff_ffff_ffff_fe00) as usize;
            put64(b, l2, 1 << 63 | l1);
        }),
        HeaderError::Overlap {
            table: Table::DataCluster,
            ..
        }
    ));
    // Refcount table entry -> the header cluster.
    assert!(matches!(
        refused_table(|b| {
            let rt = get64(b, 48) as usize;
            put64(b, rt + 8, 0x200);
        }),
        HeaderError::InHeader {
            table: Table::RefcountBlock,
            offset: 0x200
        }
    ));
    // A compressed L2 entry.
    assert!(matches!(
        refused_table(|b| {
            let l1 = get64(b, 40) as usize;
            let l2 = (get64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
            put64(b, l2 + 8, 1 << 62 | 0x20000);
        }),
        HeaderError::Compressed { guest_offset } if guest_offset == CS
    ));
}

#[test]
fn the_cap_refuses_growth_keeps_data_and_the_image_clean() {
    let fx = Fixture::new(MIB as usize);
    let ov = fx.overlay(64 * MIB);
    let cap = 2 * MIB;
    let mut disk = Qcow2Disk::open(
        &ov,
        &fx.base(),
        &Qcow2Config::new().host_bytes_cap(Some(cap)),
    )
    .expect("open");
    let handle = disk.quota_handle();
    let mut model = fx.model(64 * MIB);
    // Whole clusters, so a refused write writes nothing (a failed write's range is undefined).
    let chunk = vec![0xc3u8; CS as usize];
    let mut at = 0u64;
    let err = loop {
        match disk.write_at(at, &chunk) {
            Ok(()) => {
                model[at as usize..at as usize + chunk.len()].copy_from_slice(&chunk);
                at += chunk.len() as u64;
                assert!(at < 64 * MIB, "the cap never triggered");
            }
            Err(err) => break err,
        }
    };
    assert_eq!(err.kind(), io::ErrorKind::StorageFull);
    assert_eq!(handle.hits(), 1);
    // A small write into a new cluster is refused too; rewriting held clusters is not.
    let err = disk
        .write_at(40 * MIB, &[1u8; 512])
        .expect_err("still full");
    assert_eq!(err.kind(), io::ErrorKind::StorageFull);
    assert_eq!(disk.quota_hits(), 2);
    disk.write_at(0, &[0xaa; 512]).expect("overwrite in place");
    model[..512].fill(0xaa);
    disk.flush().expect("flush");
    let len = disk.file_len().expect("len");
    assert!(
        len <= cap + QUOTA_SLACK_CLUSTERS * CS,
        "file {len} bytes, cap {cap} + {} clusters",
        QUOTA_SLACK_CLUSTERS
    );
    // The data written before the cap reads back, the refused range reads as before.
    assert_eq!(read_all(&mut disk), model);
    // Discarding frees room for new writes.
    disk.discard(0, MIB).expect("discard");
    model[..MIB as usize].fill(0);
    disk.write_at(40 * MIB, &[2u8; 4096])
        .expect("room again after discard");
    model[40 * MIB as usize..40 * MIB as usize + 4096].fill(2);
    disk.flush().expect("flush");
    assert!(disk.file_len().expect("len") <= cap + QUOTA_SLACK_CLUSTERS * CS);
    assert_eq!(read_all(&mut disk), model);
    drop(disk);
    check_clean(&ov);
    compare_with_qemu(&fx, &ov, &model);
}

/// Refused partial-cluster writes must not ratchet the file past the cap: each one makes imago
/// copy a cluster of backing data to the end of the file before we refuse and free it, and the
/// next write must not be let into that freed cluster just because the file is now that long
/// (found by a guest `dd` that took a 40 MiB cap to 43.6 MiB, one cluster per refused write).
#[test]
fn refused_copy_on_write_does_not_ratchet_the_file_past_the_cap() {
    let fx = Fixture::new(MIB as usize);
    let ov = fx.overlay(64 * MIB);
    let cap = 2 * MIB;
    let mut disk = Qcow2Disk::open(
        &ov,
        &fx.base(),
        &Qcow2Config::new().host_bytes_cap(Some(cap)),
    )
    .expect("open");
    let mut model = fx.model(64 * MIB);
    // Fill to the cap with whole clusters past the base.
    let chunk = vec![0x5au8; CS as usize];
    let mut at = 8 * MIB;
    while disk.write_at(at, &chunk).is_ok() {
        model[at as usize..at as usize + chunk.len()].copy_from_slice(&chunk);
        at += CS;
        assert!(at < 64 * MIB, "the cap never triggered");
    }
    // Then many small writes into clusters the base holds (copy-on-write) and into empty ones:
    // every one needs a new cluster, so every one is refused.
    let mut refused = 0;
    for round in 0..3u64 {
        for i in 0..(MIB / CS) {
            for off in [i * CS + 512 * (round + 1), 16 * MIB + i * CS + 512] {
                match disk.write_at(off, &[0xeeu8; 512]) {
                    Ok(()) => model[off as usize..off as usize + 512].fill(0xee),
                    Err(e) => {
                        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
                        refused += 1;
                    }
                }
            }
        }
    }
    assert!(refused > 0, "nothing was refused");
    disk.flush().expect("flush");
    let len = disk.file_len().expect("len");
    assert!(
        len <= cap + QUOTA_SLACK_CLUSTERS * CS,
        "file {len} bytes after {refused} refused writes, cap {cap} + {QUOTA_SLACK_CLUSTERS} clusters"
    );
    assert_eq!(read_all(&mut disk), model);
    drop(disk);
    check_clean(&ov);
}

#[test]
fn flatten_writes_the_merged_bytes_sparsely() {
    let fx = Fixture::new(MIB as usize);
    let ov = fx.overlay(8 * MIB);
    let mut disk = fx.open(&ov);
    let mut model = fx.model(8 * MIB);
    disk.write_at(4096, &[7u8; 8192]).expect("write");
    model[4096..4096 + 8192].fill(7);
    disk.write_at(5 * MIB, &[8u8; 4096]).expect("write");
    model[5 * MIB as usize..5 * MIB as usize + 4096].fill(8);
    disk.write_zeroes(512 * 1024, 128 * 1024, true)
        .expect("zeroes");
    model[512 * 1024..640 * 1024].fill(0);
    disk.flush().expect("flush");
    drop(disk);
    let dest = fx.path("flat.raw");
    flatten(&ov, &fx.base(), &dest).expect("flatten");
    assert_eq!(std::fs::read(&dest).expect("read"), model);
    let meta = std::fs::metadata(&dest).expect("meta");
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert!(
        meta.blocks() * 512 < 2 * MIB,
        "zero ranges are holes: {} bytes allocated",
        meta.blocks() * 512
    );
    assert!(matches!(
        flatten(&ov, &fx.base(), &dest),
        Err(Qcow2Error::Exists { .. })
    ));
}

#[test]
fn a_killed_writer_leaves_at_most_leaks_and_keeps_flushed_data() {
    let fx = Fixture::new(MIB as usize);
    let ov = fx.overlay(16 * MIB);
    let mut disk = fx.open(&ov);
    let mut model = fx.model(16 * MIB);
    disk.write_at(0, &[1u8; 65536]).expect("write");
    model[..65536].fill(1);
    disk.flush().expect("flush");
    // Unflushed allocations, then the process "dies": no flush, no drop (kill -9 keeps what
    // reached the page cache, which is what the file holds here).
    for i in 0..40u64 {
        disk.write_at(MIB + i * 3 * CS, &[2u8; 4096])
            .expect("write");
    }
    disk.discard(0, CS).expect("discard");
    std::mem::forget(disk);
    let (code, text) = qemu(
        "qemu-img",
        &["check", "-f", "qcow2", ov.to_str().expect("utf-8")],
    );
    // 0: clean, 3: leaked clusters only; 2 would be corruption.
    assert!(code == 0 || code == 3, "qemu-img check: {code}: {text}");
    let mut disk = fx.open(&ov);
    let got = read_all(&mut disk);
    // The flushed cluster reads either as written or, if the discard's metadata reached the
    // file, as zeroes; never as anything else.
    assert!(got[..65536].iter().all(|&b| b == 1) || got[..65536].iter().all(|&b| b == 0));
    assert_eq!(got[65536..MIB as usize], model[65536..MIB as usize]);
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        byte: u8,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    Zeroes {
        sector: u64,
        sectors: u64,
        unmap: bool,
    },
    Flush,
}

const PROP_SIZE: u64 = 1536 * 1024;
const PROP_SECTORS: u64 = PROP_SIZE / 512;

fn op() -> impl Strategy<Value = Op> {
    let range = (0..PROP_SECTORS).prop_flat_map(|s| (Just(s), 1..=(PROP_SECTORS - s).min(400)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((sector, sectors), byte)| Op::Write { sector, sectors, byte }),
        2 => range.clone().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        2 => (range, any::<bool>()).prop_map(|((sector, sectors), unmap)| Op::Zeroes { sector, sectors, unmap }),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random writes, discards and write-zeroes against a byte-vector model. Discard is
    /// modelled as: whole clusters read zeroes, partial clusters keep their bytes.
    #[test]
    fn random_ops_match_a_byte_model(ops in proptest::collection::vec(op(), 1..12)) {
        let fx = Fixture::new(MIB as usize);
        let ov = fx.overlay(PROP_SIZE);
        let mut disk = fx.open(&ov);
        let mut model = fx.model(PROP_SIZE);
        for op in &ops {
            match *op {
                Op::Write { sector, sectors, byte } => {
                    let (at, len) = ((sector * 512) as usize, (sectors * 512) as usize);
                    disk.write_at(at as u64, &vec![byte; len]).expect("write");
                    model[at..at + len].fill(byte);
                }
                Op::Discard { sector, sectors } => {
                    let (at, end) = (sector * 512, (sector + sectors) * 512);
                    disk.discard(at, end - at).expect("discard");
                    let first = at.div_ceil(CS) * CS;
                    let last = if end == PROP_SIZE { end } else { end / CS * CS };
                    if first < last {
                        model[first as usize..last as usize].fill(0);
                    }
                }
                Op::Zeroes { sector, sectors, unmap } => {
                    let (at, len) = (sector * 512, sectors * 512);
                    disk.write_zeroes(at, len, unmap).expect("write zeroes");
                    model[at as usize..(at + len) as usize].fill(0);
                }
                Op::Flush => disk.flush().expect("flush"),
            }
        }
        prop_assert_eq!(read_all(&mut disk), model.clone());
        disk.flush().expect("flush");
        drop(disk);
        check_clean(&ov);
        compare_with_qemu(&fx, &ov, &model);
    }
}

/// The child half of [`a_writer_killed_mid_write_leaves_at_most_leaks`]: writes, discards and
/// flushes in a loop until killed (or 20 s pass).
fn killed_child(dir: &Path) {
    let base = dir.join("base.raw");
    let ov = dir.join("ov.qcow2");
    let mut disk = Qcow2Disk::open(&ov, &base, &Qcow2Config::new()).expect("open");
    disk.write_at(0, &[0x77; CS as usize])
        .expect("write marker");
    disk.flush().expect("flush");
    println!("sandbox-fs-child-ready");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let start = Instant::now();
    let sectors = disk.size() / 512;
    while start.elapsed() < Duration::from_secs(20) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Never touch the first cluster (the flushed marker).
        let sector = 128 + x % (sectors - 128 - 256);
        let len = 512 * (1 + (x >> 40) % 255);
        match x % 11 {
            0 => disk.discard(sector * 512, len).expect("discard"),
            1 => disk
                .write_zeroes(sector * 512, len, x & 1 == 0)
                .expect("zeroes"),
            2 => disk.flush().expect("flush"),
            _ => disk
                .write_at(sector * 512, &vec![(x >> 8) as u8; len as usize])
                .expect("write"),
        }
    }
}

#[test]
fn a_writer_killed_mid_write_leaves_at_most_leaks() {
    const CHILD_ENV: &str = "SANDBOX_FS_KILLED_CHILD_DIR";
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        killed_child(Path::new(&dir));
        return;
    }
    let fx = Fixture::new(MIB as usize);
    let ov = fx.overlay(8 * MIB);
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "qcow2::tests::a_writer_killed_mid_write_leaves_at_most_leaks",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, fx.dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the child writer");
    let stdout = child.stdout.take().expect("stdout");
    let ready = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .map_while(|line| line.ok())
        .any(|line| line.contains("sandbox-fs-child-ready"));
    assert!(ready, "the child writer did not start");
    std::thread::sleep(Duration::from_millis(300));
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("wait");
    assert!(
        !status.success(),
        "the child was killed, not finished: {status:?}"
    );
    let (code, text) = qemu(
        "qemu-img",
        &["check", "-f", "qcow2", ov.to_str().expect("utf-8")],
    );
    // 0: clean, 3: leaked clusters only; 2 would be corruption.
    assert!(code == 0 || code == 3, "qemu-img check: {code}: {text}");
    // Our parser accepts the image, and the flushed marker reads back.
    let mut disk = fx.open(&ov);
    let mut marker = vec![0u8; CS as usize];
    disk.read_at(0, &mut marker).expect("read");
    assert!(
        marker.iter().all(|&b| b == 0x77),
        "the flushed marker survives"
    );
}

#[test]
fn discard_across_an_l2_table_boundary() {
    // One L2 table maps 512 MiB with 64 KiB clusters.
    let fx = Fixture::new(MIB as usize);
    let ov = fx.overlay(1 << 30);
    let mut disk = fx.open(&ov);
    let boundary = 512 * MIB;
    disk.write_at(boundary - 4 * CS, &vec![5u8; 4 * CS as usize])
        .expect("write before the boundary");
    disk.flush().expect("flush");
    // The second L2 table does not exist yet: the discard creates it after freeing clusters of
    // the first, and must not punch it.
    disk.write_zeroes(boundary - 4 * CS, 8 * CS, true)
        .expect("zeroes across");
    disk.write_at(boundary + CS, &[6u8; 4096])
        .expect("write after");
    let mut buf = vec![1u8; 8 * CS as usize];
    disk.read_at(boundary - 4 * CS, &mut buf).expect("read");
    let mut expected = vec![0u8; 8 * CS as usize];
    expected[5 * CS as usize..5 * CS as usize + 4096].fill(6);
    assert_eq!(buf, expected);
    disk.flush().expect("flush");
    drop(disk);
    check_clean(&ov);
    let mut disk = fx.open(&ov);
    let mut again = vec![1u8; 8 * CS as usize];
    disk.read_at(boundary - 4 * CS, &mut again).expect("read");
    assert_eq!(again, expected);
}
