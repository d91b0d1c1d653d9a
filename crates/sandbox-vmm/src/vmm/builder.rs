//! Building a VM: a linear recipe of small steps that ends in a paused [`VmHandle`].
//!
//! [`build`] runs the steps in the only order that works; each step's doc says what it needs
//! before it. The builder is a different type from the running handle, so a running VM cannot be
//! "set up" again and a half-built one cannot be started.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::{VmResources, BASE_CMDLINE};
use super::exit::ExitState;
use super::handle::VmHandle;
use crate::boot::{self, acpi, cpuid, regs, BootParamsInput, LoadedInitrd, LoadedKernel};
use crate::bus::{Bus, BusRange, SharedDevice};
use crate::devices::console::{CappedWriter, LineSink, Tee};
use crate::devices::i8042::I8042;
use crate::devices::power::{AcpiPower, PowerEventSink};
use crate::devices::rtc::Rtc;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::block::{Block, BlockConfig};
use crate::devices::virtio::block::{BlockBackend, RawFile};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{FdBackend, Net, NetConfig};
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::virtio::{VirtioDevice, MMIO_REGION_SIZE, NOTIFY_REG_OFFSET};
use crate::event_loop::{EventLoop, EventLoopError};
use crate::kvm::{self, KvmError};
use crate::layout;
use crate::memory::GuestRam;
use crate::vcpu::Vcpu;
use crate::vmm::config::{DiskFormat, FileSource};
use sandbox_fs::{Qcow2Config, Qcow2Disk};

/// Errors from building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `/dev/kvm` is unusable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// A KVM ioctl failed.
    #[error("{op} failed")]
    KvmIoctl {
        /// The ioctl or operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM could not be allocated.
    #[error("cannot allocate {bytes} bytes of guest RAM")]
    Memory {
        /// Requested bytes.
        bytes: u64,
        /// The cause.
        #[source]
        source: crate::memory::MemoryError,
    },
    /// Kernel, initrd, boot params or ACPI tables.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// A device range collided on a bus.
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    /// The device event loop.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// A host file or thread operation failed.
    #[error("{what} failed")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A virtio transport could not be created.
    #[error("cannot create a virtio-mmio transport: {0}")]
    Virtio(String),
    /// The vsock device could not be set up.
    #[error("cannot attach vsock at {path}: {message}")]
    Vsock {
        /// The Unix socket path.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The network device could not be set up.
    #[error("cannot attach the network device on tap fd {fd}.")]
    Net {
        /// The inherited tap fd's number.
        fd: i32,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A disk could not be set up.
    #[error("cannot attach disk {path}: {message}")]
    Disk {
        /// The image path.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// All virtio-mmio slots (GSIs) are taken.
    #[error(
        "no free virtio-mmio slot: at most {} devices",
        layout::VIRTIO_MMIO_MAX_DEVICES
    )]
    NoMmioSlot,
    /// A step ran before one it depends on.
    #[error("build step {step} needs {needs} first")]
    Order {
        /// The step that was called.
        step: &'static str,
        /// The step it needs.
        needs: &'static str,
    },
    /// The vCPU threads did not reach the paused state.
    #[error("vCPU {0} did not report ready")]
    VcpuNotReady(u8),
}

/// A local `Result` for this module.
pub type Result<T> = std::result::Result<T, BuildError>;

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::KvmIoctl { op, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

/// A virtio-mmio transport shared by the MMIO bus (vCPU threads) and the event loop.
pub type SharedTransport<D> = Arc<Mutex<MmioTransport<GuestMemoryMmap, D>>>;

/// A window in the MMIO gap with its GSI, for one virtio-mmio device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// The register window.
    pub range: BusRange,
    /// The interrupt line (IOAPIC pin).
    pub gsi: u32,
}

/// A VM under construction. Field order matters for drop: the fds that KVM ties to guest RAM
/// (vCPUs, VM) go before the RAM mapping.
pub struct VmBuilder {
    resources: VmResources,
    vcpu_fds: Vec<VcpuFd>,
    vm: VmFd,
    kvm: Kvm,
    memory: GuestMemoryMmap,
    pio: Bus,
    mmio: Bus,
    exit: Arc<ExitState>,
    event_loop: EventLoop,
    cmdline_devices: Vec<String>,
    mmio_devices: Vec<acpi::MmioDeviceDesc>,
    next_mmio_slot: u32,
    kernel: Option<LoadedKernel>,
    initrd: Option<LoadedInitrd>,
    rsdp: Option<u64>,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    irqchip: bool,
    boot_params: bool,
    /// Owns the guest RAM mappings behind `memory`: the last field, dropped after everything
    /// else (no thread runs before `into_paused`, which hands it to the `VmHandle`).
    ram: GuestRam,
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("resources", &self.resources)
            .finish_non_exhaustive()
    }
}

/// Runs the whole recipe: a VM with every device attached, vCPU threads started and paused.
/// Call [`VmHandle::start`] to boot it.
///
/// # Errors
/// [`BuildError`] from the first step that fails.
pub fn build(resources: VmResources) -> Result<VmHandle> {
    let mut b = VmBuilder::new(resources)?; // /dev/kvm, VM fd, guest RAM
    b.setup_irqchip()?; // IOAPIC/PIC/LAPIC + PIT: before any vCPU exists
    b.load_kernel()?;
    b.load_initrd()?; // after the kernel: placed above its end
    b.attach_serial()?;
    b.attach_i8042()?;
    b.attach_rtc()?;
    b.attach_acpi_power()?;
    b.attach_disks()?; // virtio-mmio: adds command-line and DSDT entries
    b.attach_vsock()?;
    b.attach_net()?;
    b.setup_acpi_tables()?;
    b.setup_boot_params()?; // after every device: the command line lists them
    b.setup_vcpus()?; // after the irqchip (LAPIC state) and boot params
    b.into_paused()
}

/// Whether the kernel command line words `extra` turn ACPI off (an `acpi=off` word).
fn acpi_off(extra: &str) -> bool {
    extra.split_ascii_whitespace().any(|w| w == "acpi=off")
}

impl VmBuilder {
    /// Opens and checks `/dev/kvm`, creates the VM, sets the TSS address and maps guest RAM
    /// ([`layout::ram_ranges`]) into KVM memory slots.
    ///
    /// # Errors
    /// [`BuildError::Kvm`], [`BuildError::KvmIoctl`], [`BuildError::Memory`].
    pub fn new(resources: VmResources) -> Result<Self> {
        let kvm = match &resources.kvm {
            None => kvm::open_kvm()?,
            Some(FileSource::Path(p)) => kvm::open_kvm_at(p)?,
            Some(FileSource::Fd(f)) => {
                // SAFETY: see `open_source`: validation refused configs naming one fd twice,
                // and this step runs once per VM.
                let fd = unsafe { crate::sys::claim_inherited_fd(f.fd) }
                    .map_err(|e| BuildError::Kvm(KvmError::Open(e)))?;
                kvm::kvm_from_fd(fd)?
            }
        };
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        // Intel VMX needs three pages for the real-mode TSS; harmless elsewhere.
        vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;

        let bytes = resources.memory_bytes;
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(bytes)
            .into_iter()
            .map(|(a, len)| (a, len as usize)) // <= 64 GiB, validated
            .collect();
        // 2 MiB-aligned in the host with MADV_HUGEPAGE, so KVM can map guest RAM with huge pages.
        let (memory, ram) =
            GuestRam::map(&ranges).map_err(|source| BuildError::Memory { bytes, source })?;
        for (slot, region) in memory.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `memory`, which
            // outlives the VM fd (field order of VmBuilder and VmHandle; every vCPU thread holds a
            // clone). Slots do not overlap: the regions are disjoint by construction.
            unsafe { vm.set_user_memory_region(region_desc) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        tracing::info!(ram_bytes = bytes, vcpus = resources.vcpus, "VM created");
        Ok(Self {
            resources,
            vcpu_fds: Vec::new(),
            vm,
            kvm,
            memory,
            pio: Bus::new("pio"),
            mmio: Bus::new("mmio"),
            exit: Arc::new(ExitState::default()),
            event_loop: EventLoop::new()?,
            cmdline_devices: Vec::new(),
            mmio_devices: Vec::new(),
            next_mmio_slot: 0,
            kernel: None,
            initrd: None,
            rsdp: None,
            serial: None,
            irqchip: false,
            boot_params: false,
            ram,
        })
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The VM fd (for device wiring: irqfds, ioeventfds).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Creates the in-kernel irqchip (PIC, IOAPIC, per-vCPU LAPICs) and the PIT. KVM requires
    /// both before the first vCPU is created.
    ///
    /// # Errors
    /// [`BuildError::KvmIoctl`], [`BuildError::Order`] after vCPUs exist.
    pub fn setup_irqchip(&mut self) -> Result<()> {
        if !self.vcpu_fds.is_empty() {
            return Err(BuildError::Order {
                step: "setup_irqchip",
                needs: "no vCPUs",
            });
        }
        self.vm
            .create_irq_chip()
            .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.vm.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        self.irqchip = true;
        Ok(())
    }

    /// Loads the kernel (vmlinux ELF or bzImage).
    ///
    /// # Errors
    /// [`BuildError::Boot`].
    pub fn load_kernel(&mut self) -> Result<()> {
        let source = &self.resources.kernel;
        let kernel = match source {
            FileSource::Path(p) => boot::load_kernel(&self.memory, p)?,
            FileSource::Fd(_) => {
                let file = open_source(source, &read_only()).map_err(|e| {
                    BuildError::Boot(boot::BootError::OpenKernel {
                        path: source.label(),
                        source: e,
                    })
                })?;
                boot::load_kernel_file(&self.memory, file, &source.label())?
            }
        };
        tracing::debug!(
            entry = format_args!("{:#x}", kernel.entry.0),
            end = format_args!("{:#x}", kernel.end),
            "kernel loaded"
        );
        self.kernel = Some(kernel);
        Ok(())
    }

    /// Loads the initrd, if configured, at the top of low RAM. Needs [`Self::load_kernel`].
    ///
    /// # Errors
    /// [`BuildError::Boot`], [`BuildError::Order`].
    pub fn load_initrd(&mut self) -> Result<()> {
        let Some(source) = self.resources.initrd.clone() else {
            return Ok(());
        };
        let kernel = self.kernel.ok_or(BuildError::Order {
            step: "load_initrd",
            needs: "load_kernel",
        })?;
        let file = open_source(&source, &read_only()).map_err(|e| {
            BuildError::Boot(boot::BootError::ReadInitrd {
                path: source.label(),
                source: e,
            })
        })?;
        self.initrd = Some(boot::load_initrd_file(
            &self.memory,
            file,
            &source.label(),
            &kernel,
            self.resources.memory_bytes,
        )?);
        Ok(())
    }

    /// An eventfd registered as an irqfd for `gsi`: writing it raises the interrupt.
    ///
    /// # Errors
    /// [`BuildError::Io`], [`BuildError::KvmIoctl`], [`BuildError::Order`] before the irqchip.
    pub fn irqfd(&self, gsi: u32) -> Result<Arc<EventFd>> {
        if !self.irqchip {
            return Err(BuildError::Order {
                step: "irqfd",
                needs: "setup_irqchip",
            });
        }
        let evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        self.vm
            .register_irqfd(&evt, gsi)
            .map_err(ioctl("KVM_IRQFD"))?;
        Ok(Arc::new(evt))
    }

    /// Maps a device on the PIO bus at `port`, spanning `count` ports.
    ///
    /// # Errors
    /// [`BuildError::Bus`].
    pub fn attach_pio(&mut self, port: u16, count: u64, device: SharedDevice) -> Result<()> {
        self.pio
            .insert(BusRange::new(u64::from(port), count)?, device)?;
        Ok(())
    }

    fn console_sink(&self) -> Result<Box<dyn LineSink>> {
        let console = &self.resources.console;
        let mut sinks: Vec<Box<dyn LineSink>> = Vec::new();
        match &console.path {
            Some(source) => {
                let mut create = std::fs::OpenOptions::new();
                create.write(true).create(true).truncate(true);
                let file = open_source(source, &create)
                    .map_err(io_err(format!("creating console log {source}")))?;
                sinks.push(Box::new(CappedWriter::new(file, console.cap_bytes)));
            }
            None => sinks.push(Box::new(CappedWriter::new(StdoutWriter, console.cap_bytes))),
        }
        if let Some(ring) = &self.resources.console_ring {
            sinks.push(Box::new(ring.clone()));
        }
        Ok(Box::new(Tee(sinks)))
    }

    /// The 16550 console on COM1, IRQ 4, writing to the configured bounded sink.
    /// Needs [`Self::setup_irqchip`].
    ///
    /// # Errors
    /// [`BuildError::Io`], [`BuildError::KvmIoctl`], [`BuildError::Bus`].
    pub fn attach_serial(&mut self) -> Result<()> {
        let irq = self.irqfd(layout::SERIAL_GSI)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq, self.console_sink()?)));
        self.attach_pio(layout::COM1_PORT, SerialDevice::PORTS, serial.clone())?;
        self.serial = Some(serial);
        Ok(())
    }

    fn power_sink(&self) -> Arc<dyn PowerEventSink> {
        self.exit.clone()
    }

    /// The i8042 reset line on ports 0x60..=0x64.
    ///
    /// # Errors
    /// [`BuildError::Bus`].
    pub fn attach_i8042(&mut self) -> Result<()> {
        let dev = Arc::new(Mutex::new(I8042::new(self.power_sink())));
        self.attach_pio(layout::I8042_PORT, I8042::PORTS, dev)
    }

    /// The CMOS RTC on ports 0x70/0x71.
    ///
    /// # Errors
    /// [`BuildError::Bus`].
    pub fn attach_rtc(&mut self) -> Result<()> {
        self.attach_pio(
            layout::RTC_PORT,
            Rtc::PORTS,
            Arc::new(Mutex::new(Rtc::default())),
        )
    }

    /// The ACPI sleep/reset registers the FADT points at.
    ///
    /// # Errors
    /// [`BuildError::Bus`].
    pub fn attach_acpi_power(&mut self) -> Result<()> {
        let dev = Arc::new(Mutex::new(AcpiPower::new(self.power_sink())));
        self.attach_pio(layout::ACPI_SLEEP_CONTROL_PORT, AcpiPower::PORTS, dev)
    }

    /// Reserves the next virtio-mmio window and GSI.
    ///
    /// # Errors
    /// [`BuildError::NoMmioSlot`].
    pub fn allocate_mmio_slot(&mut self) -> Result<MmioSlot> {
        let n = self.next_mmio_slot;
        if n >= layout::VIRTIO_MMIO_MAX_DEVICES {
            return Err(BuildError::NoMmioSlot);
        }
        self.next_mmio_slot += 1;
        let base = layout::VIRTIO_MMIO_BASE + u64::from(n) * layout::VIRTIO_MMIO_WINDOW;
        Ok(MmioSlot {
            range: BusRange::new(base, layout::VIRTIO_MMIO_WINDOW)?,
            gsi: layout::VIRTIO_FIRST_GSI + n,
        })
    }

    /// Puts a virtio-mmio device on the MMIO bus at `slot` and declares it in the DSDT (which is
    /// what makes its GSI usable under hardware-reduced ACPI; see [`acpi`]). The command-line
    /// form (`virtio_mmio.device=<size>@<addr>:<irq>`, drivers/virtio/virtio_mmio.c) is kept for
    /// a guest booted with `acpi=off` (see [`Self::cmdline`]).
    ///
    /// # Errors
    /// [`BuildError::Bus`], [`BuildError::Order`] after the ACPI tables are written.
    pub fn attach_mmio(&mut self, slot: MmioSlot, device: SharedDevice) -> Result<()> {
        if self.boot_params || self.rsdp.is_some() {
            return Err(BuildError::Order {
                step: "attach_mmio",
                needs: "to run before setup_acpi_tables",
            });
        }
        // Slots come from allocate_mmio_slot: 4 KiB windows inside the 32-bit MMIO gap.
        let (Ok(base), Ok(size)) = (
            u32::try_from(slot.range.base().0),
            u32::try_from(slot.range.size().get()),
        ) else {
            return Err(BuildError::NoMmioSlot);
        };
        self.mmio.insert(slot.range, device)?;
        self.mmio_devices.push(acpi::MmioDeviceDesc {
            base,
            size,
            gsi: slot.gsi,
        });
        self.cmdline_devices.push(format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            slot.range.size().get() / 1024,
            slot.range.base().0,
            slot.gsi
        ));
        Ok(())
    }

    /// Registers `evt` as an ioeventfd: KVM signals it on a 4-byte guest write of `datamatch` to
    /// MMIO address `addr`, without a vCPU exit; `handler` then runs on the event-loop thread.
    ///
    /// # Errors
    /// [`BuildError::KvmIoctl`], [`BuildError::EventLoop`].
    pub fn register_ioeventfd(
        &mut self,
        evt: EventFd,
        addr: u64,
        datamatch: u32,
        mut handler: crate::event_loop::Handler,
    ) -> Result<()> {
        self.vm
            .register_ioevent(&evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(ioctl("KVM_IOEVENTFD"))?;
        let fd = evt.as_raw_fd();
        // The closure owns `evt`, so the fd stays open as long as the loop may poll it.
        self.event_loop.add(
            fd,
            Box::new(move || {
                let _registered = &evt;
                handler();
            }),
        )?;
        Ok(())
    }

    /// Attaches a virtio device over virtio-mmio, the whole recipe for one device: a slot (4 KiB
    /// window + GSI), the transport with its interrupt as an irqfd, one ioeventfd per queue served
    /// by the event loop, the bus entry, and the command-line/DSDT declarations. Returns the
    /// slot and the shared transport (for extra event-loop wiring, like vsock's backend fd).
    ///
    /// # Errors
    /// [`BuildError::NoMmioSlot`], [`BuildError::Virtio`], ioctl, bus and event-loop errors.
    pub fn attach_virtio<D>(&mut self, device: D) -> Result<(MmioSlot, SharedTransport<D>)>
    where
        D: VirtioDevice<GuestMemoryMmap> + 'static,
    {
        let slot = self.allocate_mmio_slot()?;
        let irq = self.irqfd(slot.gsi)?;
        let transport = MmioTransport::new(self.memory.clone(), device, irq)
            .map_err(|e| BuildError::Virtio(e.to_string()))?;
        let transport = Arc::new(Mutex::new(transport));
        let events: Vec<EventFd> = crate::bus::lock(&transport)
            .queue_events()
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<_>>()
            .map_err(io_err("eventfd dup"))?;
        let notify_addr = slot.range.base().0 + NOTIFY_REG_OFFSET;
        for (q, evt) in events.into_iter().enumerate() {
            let t = transport.clone();
            // `handle_queue_event` reads the transport's eventfd, which shares its counter with
            // this dup.
            self.register_ioeventfd(
                evt,
                notify_addr,
                q as u32, // a handful of queues
                Box::new(move || crate::bus::lock(&t).handle_queue_event(q)),
            )?;
        }
        debug_assert_eq!(slot.range.size().get(), MMIO_REGION_SIZE);
        self.attach_mmio(slot, transport.clone())?;
        Ok((slot, transport))
    }

    /// One virtio-blk device per configured disk (/dev/vda, /dev/vdb, ... in order).
    ///
    /// # Errors
    /// [`BuildError::Disk`] and the errors of [`Self::attach_virtio`].
    pub fn attach_disks(&mut self) -> Result<()> {
        for (i, disk) in self.resources.disks.clone().iter().enumerate() {
            let fail = |message: String| BuildError::Disk {
                path: disk.path.label(),
                message,
            };
            let mut open = std::fs::OpenOptions::new();
            open.read(true).write(!disk.read_only);
            let mut config = BlockConfig::new(disk.read_only).with_id(format!("sandbox-disk{i}"));
            let backend: Box<dyn BlockBackend> = match (disk.format, &disk.path, &disk.backing) {
                (DiskFormat::Raw, FileSource::Path(p), _) => {
                    Box::new(RawFile::open(p, disk.read_only).map_err(|e| fail(e.to_string()))?)
                }
                (DiskFormat::Raw, source, _) => {
                    let file = open_source(source, &open).map_err(|e| fail(e.to_string()))?;
                    Box::new(
                        RawFile::from_file(file, &source.label())
                            .map_err(|e| fail(e.to_string()))?,
                    )
                }
                (DiskFormat::Qcow2, path, Some(backing)) => {
                    let opts = Qcow2Config::new().host_bytes_cap(disk.host_bytes_cap);
                    let image = match (path, backing) {
                        (FileSource::Path(p), FileSource::Path(b)) => Qcow2Disk::open(p, b, &opts),
                        _ => {
                            let overlay =
                                open_source(path, &open).map_err(|e| fail(e.to_string()))?;
                            let base = open_source(backing, &read_only())
                                .map_err(|e| fail(e.to_string()))?;
                            // A base given by path keeps its name check.
                            let name = backing
                                .as_path()
                                .and_then(|b| b.file_name())
                                .and_then(|n| n.to_str());
                            Qcow2Disk::open_files(
                                (overlay, &path.label()),
                                (base, &backing.label()),
                                name,
                                &opts,
                            )
                        }
                    }
                    .map_err(|e| fail(format!("{e}: {}", error_chain(&e))))?;
                    // Space comes back to the host a whole cluster at a time (at most 2 MiB,
                    // which the header parser enforces).
                    let cluster = u32::try_from(image.cluster_size()).unwrap_or(u32::MAX);
                    config = config.with_discard_alignment(cluster);
                    Box::new(image)
                }
                (DiskFormat::Qcow2, _, None) => {
                    return Err(fail("a qcow2 disk needs its backing file".into()))
                }
            };
            let mut block: Block<GuestMemoryMmap> = Block::new(backend, &config);
            if let Some(path) = &disk.full_report {
                let file = full_report_file(path)
                    .map_err(|e| fail(format!("cannot create the report file {path}: {e}")))?;
                block = block.with_full_report(Box::new(move |count| {
                    use std::os::unix::fs::FileExt;
                    if let Err(err) = file.write_all_at(&count.to_le_bytes(), 0) {
                        tracing::warn!(%err, "cannot update the disk-full count");
                    }
                }));
            }
            let (slot, _) = self.attach_virtio(block)?;
            tracing::info!(
                path = %disk.path,
                format = ?disk.format,
                read_only = disk.read_only,
                cap = ?disk.host_bytes_cap,
                gsi = slot.gsi,
                "disk attached"
            );
        }
        Ok(())
    }

    /// virtio-vsock, if configured: the guest's CID and a host Unix socket at `uds_path` where
    /// host processes connect with `CONNECT <port>\n` (docs/virtio.md). The device's host-side
    /// epoll fd is served by the event loop.
    ///
    /// # Errors
    /// [`BuildError::Vsock`] and the errors of [`Self::attach_virtio`].
    pub fn attach_vsock(&mut self) -> Result<()> {
        let Some(cfg) = self.resources.vsock.clone() else {
            return Ok(());
        };
        let fail = |message: String| BuildError::Vsock {
            path: cfg.uds_path.label(),
            message,
        };
        let config = VsockConfig::new(cfg.guest_cid, cfg.uds_path.label());
        let vsock: Vsock<GuestMemoryMmap> = match &cfg.uds_path {
            FileSource::Path(_) => Vsock::new(&config),
            FileSource::Fd(f) => {
                // SAFETY: see `open_source`.
                let fd = unsafe { crate::sys::claim_inherited_fd(f.fd) }
                    .map_err(|e| fail(e.to_string()))?;
                Vsock::with_listener(&config, std::os::unix::net::UnixListener::from(fd))
            }
        }
        .map_err(|e| fail(e.to_string()))?;
        let backend_fd = vsock.backend_fd();
        let (slot, transport) = self.attach_virtio(vsock)?;
        // The fd belongs to the device inside `transport`, which the handler keeps alive.
        self.event_loop.add(
            backend_fd,
            Box::new(move || {
                if let Err(err) = crate::bus::lock(&transport)
                    .device_mut()
                    .handle_backend_event()
                {
                    tracing::warn!(%err, "vsock backend event failed");
                }
            }),
        )?;
        tracing::info!(cid = cfg.guest_cid, uds = %cfg.uds_path, gsi = slot.gsi, "vsock attached");
        Ok(())
    }

    /// virtio-net, if configured: takes ownership of the inherited tap fd, checks it is a tap
    /// with a 12-byte virtio-net header, and serves it from the event loop.
    ///
    /// # Errors
    /// [`BuildError::Net`] and the errors of [`Self::attach_virtio`].
    pub fn attach_net(&mut self) -> Result<()> {
        let Some(cfg) = self.resources.net else {
            return Ok(());
        };
        let fd = cfg.tap_fd;
        let net_err =
            |source: Box<dyn std::error::Error + Send + Sync>| BuildError::Net { fd, source };
        // SAFETY: `net.tap_fd` names an fd the VMM process inherited for this device (the
        // config's fd map); no other code in the VMM opens or owns fds by number, and a VM is
        // built once, so the fd is claimed once.
        let tap =
            unsafe { crate::sys::claim_inherited_fd(fd) }.map_err(|e| net_err(Box::new(e)))?;
        let backend = FdBackend::tap(tap).map_err(|e| net_err(Box::new(e)))?;
        let net: Net<GuestMemoryMmap> = Net::new(Box::new(backend), &NetConfig::new(cfg.mac))
            .map_err(|e| net_err(Box::new(e)))?;
        let backend_fd = net.backend_fd();
        let (slot, transport) = self.attach_virtio(net)?;
        // The fd belongs to the device inside `transport`, which the handler keeps alive.
        self.event_loop.add(
            backend_fd,
            Box::new(move || {
                if let Err(err) = crate::bus::lock(&transport)
                    .device_mut()
                    .handle_backend_event()
                {
                    tracing::warn!(%err, "virtio-net backend event failed");
                }
            }),
        )?;
        tracing::info!(tap_fd = fd, gsi = slot.gsi, "network device attached");
        Ok(())
    }

    /// Writes the ACPI tables (RSDP, XSDT, FADT, DSDT, MADT) for the configured vCPU count.
    ///
    /// # Errors
    /// [`BuildError::Boot`].
    pub fn setup_acpi_tables(&mut self) -> Result<()> {
        self.rsdp = Some(acpi::write_tables(
            &self.memory,
            self.resources.vcpus,
            &self.mmio_devices,
        )?);
        Ok(())
    }

    /// The full kernel command line: base, then the user's extra words.
    ///
    /// The virtio-mmio devices are declared in the DSDT only. Declaring them on the command line
    /// as well made the guest register each window twice and refuse the second registration
    /// with an error line on the console (`can't request region for resource`, 90 bytes, two
    /// port exits per byte at every boot). If the extra words turn ACPI off (`acpi=off`), the
    /// guest cannot see the DSDT, so the devices go on the command line instead.
    ///
    /// # Errors
    /// [`BuildError::Boot`] if it is too long.
    pub fn cmdline(&self) -> Result<String> {
        let mut parts: Vec<&str> = vec![BASE_CMDLINE];
        if acpi_off(&self.resources.cmdline_extra) {
            parts.extend(self.cmdline_devices.iter().map(String::as_str));
        }
        parts.push(&self.resources.cmdline_extra);
        Ok(boot::build_cmdline(&parts)?)
    }

    /// Writes the command line, `boot_params` (e820, initrd, RSDP), GDT, IDT and page tables.
    /// Needs [`Self::load_kernel`] and [`Self::setup_acpi_tables`]; devices attached after this
    /// would be missing from the command line.
    ///
    /// # Errors
    /// [`BuildError::Boot`], [`BuildError::Order`].
    pub fn setup_boot_params(&mut self) -> Result<()> {
        let kernel = self.kernel.ok_or(BuildError::Order {
            step: "setup_boot_params",
            needs: "load_kernel",
        })?;
        let rsdp_addr = self.rsdp.ok_or(BuildError::Order {
            step: "setup_boot_params",
            needs: "setup_acpi_tables",
        })?;
        let cmdline = self.cmdline()?;
        tracing::debug!(%cmdline, "kernel command line");
        let input = BootParamsInput {
            cmdline_addr: layout::CMDLINE_ADDR,
            cmdline_len: cmdline.len(),
            initrd: self.initrd,
            setup_header: kernel.setup_header,
            e820: boot::e820_map(self.resources.memory_bytes),
            rsdp_addr,
        };
        boot::write_boot_params(&self.memory, &cmdline, input)?;
        regs::write_boot_tables(&self.memory)?;
        self.boot_params = true;
        Ok(())
    }

    /// Creates the vCPUs and sets their CPUID (filtered per vCPU), MSRs, FPU, LAPIC LINT pins,
    /// and, on vCPU 0, the 64-bit boot registers; the others wait for INIT/SIPI from vCPU 0.
    ///
    /// # Errors
    /// [`BuildError::KvmIoctl`], [`BuildError::Order`].
    pub fn setup_vcpus(&mut self) -> Result<()> {
        if !self.irqchip {
            return Err(BuildError::Order {
                step: "setup_vcpus",
                needs: "setup_irqchip",
            });
        }
        if !self.boot_params {
            return Err(BuildError::Order {
                step: "setup_vcpus",
                needs: "setup_boot_params",
            });
        }
        let kernel = self.kernel.ok_or(BuildError::Order {
            step: "setup_vcpus",
            needs: "load_kernel",
        })?;
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let count = self.resources.vcpus;
        for index in 0..count {
            let fd = self
                .vm
                .create_vcpu(u64::from(index))
                .map_err(ioctl("KVM_CREATE_VCPU"))?;
            let cpuid =
                cpuid::vcpu_cpuid(&supported, index, count).map_err(|_| BuildError::KvmIoctl {
                    op: "building CPUID",
                    source: kvm_ioctls::Error::new(libc::E2BIG),
                })?;
            if index == 0 {
                for e in cpuid
                    .as_slice()
                    .iter()
                    .filter(|e| matches!(e.function, 0x1 | 0x7 | 0xd))
                {
                    tracing::debug!(
                        leaf = format_args!("{:#x}.{}", e.function, e.index),
                        eax = format_args!("{:#x}", e.eax),
                        ebx = format_args!("{:#x}", e.ebx),
                        ecx = format_args!("{:#x}", e.ecx),
                        edx = format_args!("{:#x}", e.edx),
                        "guest CPUID"
                    );
                }
            }
            fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
            let msrs = regs::boot_msrs();
            let set = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
            if set != msrs.as_slice().len() {
                tracing::warn!(
                    vcpu = index,
                    set,
                    wanted = msrs.as_slice().len(),
                    "KVM accepted only some boot MSRs"
                );
            }
            fd.set_fpu(&regs::boot_fpu())
                .map_err(ioctl("KVM_SET_FPU"))?;
            let mut lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
            regs::configure_lint(&mut lapic);
            fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
            if index == 0 {
                let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
                fd.set_sregs(&regs::long_mode_sregs(sregs))
                    .map_err(ioctl("KVM_SET_SREGS"))?;
                fd.set_regs(&regs::boot_regs(kernel.entry))
                    .map_err(ioctl("KVM_SET_REGS"))?;
            }
            self.vcpu_fds.push(fd);
        }
        Ok(())
    }

    /// Starts the vCPU threads (paused) and the device event loop; returns the handle.
    ///
    /// # Errors
    /// [`BuildError::Io`], [`BuildError::EventLoop`], [`BuildError::VcpuNotReady`],
    /// [`BuildError::Order`] if no vCPU was set up.
    pub fn into_paused(self) -> Result<VmHandle> {
        if self.vcpu_fds.is_empty() {
            return Err(BuildError::Order {
                step: "into_paused",
                needs: "setup_vcpus",
            });
        }
        let pio = Arc::new(self.pio);
        let mmio = Arc::new(self.mmio);
        let mut vcpus = Vec::with_capacity(self.vcpu_fds.len());
        for (index, fd) in self.vcpu_fds.into_iter().enumerate() {
            let index = index as u8; // < MAX_VCPUS
            let vcpu = Vcpu::new(
                index,
                fd,
                pio.clone(),
                mmio.clone(),
                self.exit.clone(),
                self.memory.clone(),
            )
            .with_seccomp(self.resources.seccomp);
            let handle = vcpu.spawn().map_err(io_err("starting a vCPU thread"))?;
            if handle
                .wait_for(
                    crate::vcpu::VcpuState::Paused,
                    std::time::Duration::from_secs(10),
                )
                .is_none()
            {
                return Err(BuildError::VcpuNotReady(index));
            }
            vcpus.push(handle);
        }
        let event_loop = self.event_loop.spawn_filtered(
            self.resources.seccomp,
            self.resources.debug_forbidden_syscall,
        )?;
        Ok(VmHandle::new(
            vcpus,
            event_loop,
            self.exit,
            self.serial,
            pio,
            mmio,
            self.vm,
            self.memory,
            self.ram,
        ))
    }
}

/// Creates (or truncates) the disk-full count file, or takes the inherited one, and writes a
/// count of 0.
fn full_report_file(source: &FileSource) -> io::Result<std::fs::File> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let mut create = std::fs::OpenOptions::new();
    create
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW);
    let file = open_source(source, &create)?;
    file.write_all_at(&0u64.to_le_bytes(), 0)?;
    Ok(file)
}

/// Options that open a file read-only.
fn read_only() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    o
}

/// Opens `source` with `options` (a path), or takes ownership of the inherited fd it names
/// (`options` unused: the fd is as its opener made it, which validation checked).
fn open_source(source: &FileSource, options: &std::fs::OpenOptions) -> io::Result<File> {
    match source {
        FileSource::Path(p) => options.open(p),
        FileSource::Fd(f) => {
            // SAFETY: validation (`VmResources::try_from`) refused configs that name one fd in
            // two entries, and each entry is opened by exactly one build step, once per VM (a
            // `VmResources` naming fds is built once: documented on `FileSource::Fd`); nothing
            // else in the VMM owns fds by number.
            let fd = unsafe { crate::sys::claim_inherited_fd(f.fd) }?;
            Ok(File::from(fd))
        }
    }
}

/// `err`'s sources, `: `-separated (the disk error is a string in [`BuildError::Disk`]).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut next = err.source();
    while let Some(e) = next {
        out.push(e.to_string());
        next = e.source();
    }
    out.join(": ")
}

/// Standard output as a `Write + Send` for the capped console (locks per line).
struct StdoutWriter;

impl Write for StdoutWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stdout().lock().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::acpi_off;

    #[test]
    fn acpi_off_is_an_exact_word() {
        assert!(acpi_off("root=/dev/vda acpi=off quiet"));
        assert!(acpi_off("acpi=off"));
        assert!(!acpi_off(""));
        assert!(!acpi_off("root=/dev/vda quiet"));
        assert!(!acpi_off("acpi=noirq"));
        assert!(!acpi_off("xacpi=off"));
        assert!(!acpi_off("sandbox_run=\"echo acpi=offline\""));
    }
}
