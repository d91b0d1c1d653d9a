use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::test_utils::{irq, mem, CountingIrq, TestQueue, MEM_SIZE};

const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x6000;
const BUF: u64 = 0x1_0000;
const MAC: [u8; 6] = [0x02, 0x53, 0x42, 0x00, 0x00, 0x01];

struct Fixture {
    dev: Net<GuestMemoryMmap>,
    m: GuestMemoryMmap,
    rx: TestQueue,
    tx: TestQueue,
    line: Arc<CountingIrq>,
    /// The host end of the fake tap.
    peer: UnixDatagram,
}

fn fixture(queue_size: u16) -> Fixture {
    let m = mem();
    let (dev_end, peer) = UnixDatagram::pair().expect("pair");
    peer.set_nonblocking(true).expect("nonblocking");
    let backend = FdBackend::frames(OwnedFd::from(dev_end)).expect("backend");
    let mut dev = Net::new(Box::new(backend), &NetConfig::new(MAC)).expect("device");
    let rx = TestQueue::new(&m, RX_RING, queue_size);
    let tx = TestQueue::new(&m, TX_RING, queue_size);
    let line = irq();
    dev.activate(
        m.clone(),
        feature(VIRTIO_F_VERSION_1),
        vec![rx.queue(), tx.queue()],
        Arc::new(VirtioInterrupt::new(line.clone())),
    )
    .expect("activate");
    Fixture {
        dev,
        m,
        rx,
        tx,
        line,
        peer,
    }
}

/// A frame as the tap sends it: a header with garbage in the offload fields, then `payload`.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xffu8; VNET_HDR_LEN];
    f.extend_from_slice(payload);
    f
}

/// Whether the device's epoll fd reports readiness right now.
fn backend_ready(dev: &Net<GuestMemoryMmap>) -> bool {
    // Watch the device's epoll fd the way the VMM's event loop does.
    let outer = Epoll::new().expect("epoll");
    outer
        .ctl(
            ControlOperation::Add,
            dev.backend_fd(),
            EpollEvent::new(EventSet::IN, 7),
        )
        .expect("add");
    let mut events = [EpollEvent::default(); 1];
    outer.wait(0, &mut events).expect("wait") == 1
}

#[test]
fn config_space_and_features() {
    let f = fixture(16);
    let mut mac = [0u8; 6];
    f.dev.read_config(0, &mut mac);
    assert_eq!(mac, MAC);
    let mut status = [0u8; 2];
    f.dev.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), 1, "link up");
    let feats = f.dev.avail_features();
    assert_ne!(feats & feature(VIRTIO_NET_F_MAC), 0);
    assert_ne!(feats & feature(VIRTIO_NET_F_STATUS), 0);
    // No offload and no mergeable buffers: frames and headers stay simple.
    for bit in [0u32, 1, 7, 11, 15] {
        assert_eq!(
            feats & feature(bit),
            0,
            "feature bit {bit} must not be offered"
        );
    }
    assert_eq!(f.dev.device_type(), 1);
    assert_eq!(f.dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
}

#[test]
fn transmitted_frames_reach_the_backend_with_the_offload_fields_cleared() {
    let mut f = fixture(16);
    let payload: Vec<u8> = (0..100u8).collect();
    let bytes = frame(&payload);
    f.m.write_slice(&bytes[..20], GuestAddress(BUF))
        .expect("write");
    f.m.write_slice(&bytes[20..], GuestAddress(BUF + 0x1000))
        .expect("write");
    // Header and frame split across two descriptors at an odd boundary.
    f.tx.add_chain(
        &f.m,
        &[
            (BUF, 20, false),
            (BUF + 0x1000, (bytes.len() - 20) as u32, false),
        ],
    );
    f.dev.process_queue(1).expect("tx");
    let mut got = vec![0u8; MAX_FRAME];
    let n = f.peer.recv(&mut got).expect("frame on the tap");
    assert_eq!(n, bytes.len());
    assert_eq!(
        &got[..10],
        &[0u8; 10],
        "flags, gso fields, csum fields cleared"
    );
    assert_eq!(&got[10..12], &[0xff, 0xff], "num_buffers passes through");
    assert_eq!(&got[VNET_HDR_LEN..n], &payload[..]);
    assert_eq!(f.tx.used_idx(&f.m), 1);
    assert_eq!(f.line.count(), 1);
    assert_eq!(f.dev.stats().tx_frames, 1);
}

#[test]
fn bad_transmit_chains_are_dropped_counted_and_completed() {
    let mut f = fixture(16);
    // A device-writable buffer.
    f.tx.add_chain(&f.m, &[(BUF, 64, true)]);
    // Shorter than a header plus an Ethernet header.
    f.tx.add_chain(&f.m, &[(BUF, (MIN_TX_FRAME - 1) as u32, false)]);
    // Longer than MAX_FRAME, in two buffers.
    f.tx.add_chain(&f.m, &[(BUF, 40_000, false), (BUF, 40_000, false)]);
    // Outside guest memory.
    f.tx.add_chain(&f.m, &[(MEM_SIZE - 16, 64, false)]);
    // An overflowing address.
    f.tx.add_chain(&f.m, &[(u64::MAX - 8, 64, false)]);
    f.dev.process_queue(1).expect("tx");
    assert_eq!(f.tx.used_idx(&f.m), 5, "every chain completed");
    assert_eq!(f.dev.stats().tx_bad_chains, 5);
    assert_eq!(f.dev.stats().tx_frames, 0);
    let mut got = [0u8; 16];
    assert!(f.peer.recv(&mut got).is_err(), "nothing reached the tap");
}

#[test]
fn received_frames_land_in_the_guest_buffer() {
    let mut f = fixture(16);
    let head = f.rx.add_chain(&f.m, &[(BUF, 1526, true)]);
    f.dev.process_queue(0).expect("rx notify");
    let payload = vec![0x5au8; 1500];
    f.peer.send(&frame(&payload)).expect("send");
    f.dev.handle_backend_event().expect("rx");
    assert_eq!(f.rx.used_idx(&f.m), 1);
    assert_eq!(f.rx.used_elem(&f.m, 0), (u32::from(head), 1512));
    let mut got = vec![0u8; 1512];
    f.m.read_slice(&mut got, GuestAddress(BUF)).expect("read");
    assert_eq!(&got[..10], &[0u8; 10], "no offload fields reach the guest");
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[12..], &payload[..]);
    assert!(f.line.count() >= 1);
    assert_eq!(f.dev.stats().rx_frames, 1);
}

#[test]
fn a_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept() {
    let mut f = fixture(16);
    let head = f.rx.add_chain(&f.m, &[(BUF, 100, true)]);
    f.m.write_slice(&[0xeeu8; 100], GuestAddress(BUF))
        .expect("fill");
    f.peer.send(&frame(&[1u8; 200])).expect("big");
    f.peer.send(&frame(&[2u8; 50])).expect("small");
    f.dev.handle_backend_event().expect("rx");
    assert_eq!(f.dev.stats().rx_too_big, 1);
    assert_eq!(
        f.rx.used_idx(&f.m),
        1,
        "the small frame used the same buffer"
    );
    assert_eq!(f.rx.used_elem(&f.m, 0), (u32::from(head), 62));
    let mut got = [0u8; 100];
    f.m.read_slice(&mut got, GuestAddress(BUF)).expect("read");
    assert!(got[12..62].iter().all(|&b| b == 2));
    assert!(
        got[62..].iter().all(|&b| b == 0xee),
        "nothing written past the frame"
    );
}

#[test]
fn rx_resumes_after_the_guest_ran_out_of_buffers() {
    let mut f = fixture(16);
    f.peer.send(&frame(&[7u8; 60])).expect("send");
    f.peer.send(&frame(&[8u8; 60])).expect("send");
    assert!(backend_ready(&f.dev), "the tap is watched after activation");
    f.dev.handle_backend_event().expect("rx");
    assert_eq!(f.rx.used_idx(&f.m), 0, "no buffer yet");
    assert!(
        !backend_ready(&f.dev),
        "while a frame waits for a buffer, the fd is not watched (no busy loop)"
    );
    f.rx.add_chain(&f.m, &[(BUF, 2048, true)]);
    f.rx.add_chain(&f.m, &[(BUF + 0x1000, 2048, true)]);
    f.dev.process_queue(0).expect("rx notify");
    assert_eq!(f.rx.used_idx(&f.m), 2, "the waiting frame and the next one");
    let mut b = [0u8; 1];
    f.m.read_slice(&mut b, GuestAddress(BUF + 12))
        .expect("read");
    assert_eq!(b[0], 7, "frames keep their order");
    f.m.read_slice(&mut b, GuestAddress(BUF + 0x1000 + 12))
        .expect("read");
    assert_eq!(b[0], 8);
    f.peer.send(&frame(&[9u8; 60])).expect("send");
    assert!(backend_ready(&f.dev), "watched again");
}

#[test]
fn one_call_moves_a_bounded_number_of_frames() {
    let mut f = fixture(128);
    for i in 0..100u16 {
        f.rx.add_chain(&f.m, &[(BUF + u64::from(i) * 0x100, 0x100, true)]);
    }
    for _ in 0..100 {
        f.peer.send(&frame(&[3u8; 64])).expect("send");
    }
    f.dev.handle_backend_event().expect("rx");
    assert_eq!(usize::from(f.rx.used_idx(&f.m)), RX_FRAMES_PER_TURN);
    f.dev.handle_backend_event().expect("rx");
    assert_eq!(f.rx.used_idx(&f.m), 100);
}

#[test]
fn unusable_receive_chains_are_completed_empty() {
    let mut f = fixture(16);
    f.rx.add_chain(&f.m, &[(BUF, 2048, false)]); // not device-writable
    f.rx.add_chain(&f.m, &[(MEM_SIZE - 8, 2048, true)]); // outside memory
    let good = f.rx.add_chain(&f.m, &[(BUF, 2048, true)]);
    f.peer.send(&frame(&[4u8; 60])).expect("send");
    f.dev.handle_backend_event().expect("rx");
    assert_eq!(f.rx.used_idx(&f.m), 3);
    assert_eq!(f.rx.used_elem(&f.m, 0).1, 0);
    assert_eq!(f.rx.used_elem(&f.m, 1).1, 0);
    assert_eq!(f.rx.used_elem(&f.m, 2), (u32::from(good), 72));
    assert_eq!(f.dev.stats().rx_bad_chains, 2);
}

#[test]
fn nothing_moves_before_activation_or_after_reset() {
    let m = mem();
    let (dev_end, peer) = UnixDatagram::pair().expect("pair");
    let backend = FdBackend::frames(OwnedFd::from(dev_end)).expect("backend");
    let mut dev: Net<GuestMemoryMmap> =
        Net::new(Box::new(backend), &NetConfig::new(MAC)).expect("device");
    peer.send(&frame(&[1u8; 60])).expect("send");
    assert!(
        !backend_ready(&dev),
        "not watched before the driver is ready"
    );
    dev.handle_backend_event().expect("no-op");
    dev.process_queue(1).expect("no-op");
    let rx = TestQueue::new(&m, RX_RING, 16);
    let tx = TestQueue::new(&m, TX_RING, 16);
    dev.activate(
        m.clone(),
        feature(VIRTIO_F_VERSION_1),
        vec![rx.queue(), tx.queue()],
        Arc::new(VirtioInterrupt::new(irq())),
    )
    .expect("activate");
    assert!(backend_ready(&dev));
    dev.reset();
    assert!(!backend_ready(&dev), "not watched after a reset");
    let err = dev
        .activate(
            m,
            0,
            vec![rx.queue()],
            Arc::new(VirtioInterrupt::new(irq())),
        )
        .expect_err("two queues");
    assert!(matches!(
        err,
        VirtioError::QueueCount {
            expected: 2,
            got: 1
        }
    ));
}

fn arb_desc() -> impl Strategy<Value = (u64, u32, bool)> {
    (
        prop_oneof![
            (0u64..MEM_SIZE),
            Just(MEM_SIZE - 1),
            (u64::MAX - 0x1000..=u64::MAX)
        ],
        prop_oneof![0u32..4096, Just(u32::MAX), 65_000u32..70_000],
        any::<bool>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn arbitrary_chains_never_panic_and_are_completed(
        tx_chains in proptest::collection::vec(proptest::collection::vec(arb_desc(), 1..5), 1..6),
        rx_chains in proptest::collection::vec(proptest::collection::vec(arb_desc(), 1..5), 1..6),
        frames in proptest::collection::vec(0usize..3000, 0..6),
    ) {
        let mut f = fixture(16);
        for c in &tx_chains {
            f.tx.add_chain(&f.m, c);
        }
        f.dev.process_queue(1).expect("tx");
        prop_assert_eq!(usize::from(f.tx.used_idx(&f.m)), tx_chains.len());
        for c in &rx_chains {
            f.rx.add_chain(&f.m, c);
        }
        for len in &frames {
            f.peer.send(&vec![0u8; *len]).expect("send");
        }
        f.dev.handle_backend_event().expect("rx");
        f.dev.process_queue(0).expect("rx");
        prop_assert!(usize::from(f.rx.used_idx(&f.m)) <= rx_chains.len());
        let s = f.dev.stats();
        prop_assert!(s.rx_frames as usize <= frames.len());
    }
}
