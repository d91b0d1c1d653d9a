//! virtio-vsock (virtio 1.2 §5.10).
