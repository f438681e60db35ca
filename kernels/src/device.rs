//! Which backend to run on: `--device auto|cpu|cuda`.
//!
//! The CUDA driver is probed at run time (never at build time): a machine without
//! libcuda, or with a driver but no device, gets an error that says so, and
//! `auto` then falls back to the CPU, saying why.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use cudarc::driver::{result, sys};

use crate::cuda::CudaBackend;
use crate::{Backend, CpuBackend, CpuKernels, KernelError};

/// The device asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA when a driver and a device are present and the backend starts, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        })
    }
}

/// A device name that is none of `auto`, `cpu`, `cuda`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device `{0}`: expected auto, cpu or cuda")]
pub struct UnknownDevice(pub String);

impl FromStr for DeviceChoice {
    type Err = UnknownDevice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            _ => Err(UnknownDevice(s.to_string())),
        }
    }
}

/// One CUDA device, as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub memory_bytes: u64,
    pub compute_capability: (u32, u32),
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor) = self.compute_capability;
        write!(
            f,
            "cuda:{} {} (compute capability {major}.{minor}, {:.1} GiB)",
            self.ordinal,
            self.name,
            self.memory_bytes as f64 / f64::from(1u32 << 30)
        )
    }
}

/// Fails with an explanation when the CUDA driver library cannot be loaded, so
/// that no cudarc driver call (which would panic) is made on such a machine.
pub(crate) fn driver_present() -> Result<(), KernelError> {
    // SAFETY: `is_culib_present` only tries to dlopen libcuda under its usual
    // names and closes it again; loading the NVIDIA driver library runs its
    // initialisers, which every CUDA program trusts in the same way.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::CudaUnavailable(
            "no CUDA driver (libcuda.so) on this machine".into(),
        ))
    }
}

/// Initialises the driver: an error when it is missing or sees no device.
pub(crate) fn init_driver() -> Result<(), KernelError> {
    driver_present()?;
    result::init().map_err(|e| {
        KernelError::CudaUnavailable(format!(
            "the CUDA driver is installed but did not start ({e}); is a GPU visible to this \
             process (CUDA_VISIBLE_DEVICES, the container's device plugin)?"
        ))
    })
}

/// The device with this ordinal, as the driver describes it.
pub(crate) fn device_info(ordinal: usize) -> Result<DeviceInfo, KernelError> {
    let driver = |op: &str| {
        let op = format!("{op} of device {ordinal}");
        move |e: result::DriverError| KernelError::Driver {
            op,
            message: e.to_string(),
        }
    };
    let dev = result::device::get(ordinal as i32).map_err(driver("looking up"))?;
    let name = result::device::get_name(dev).map_err(driver("reading the name"))?;
    // SAFETY: `dev` is a device handle the initialised driver just returned.
    let memory = unsafe { result::device::total_mem(dev) }.map_err(driver("reading the memory"))?;
    let attr = |a: sys::CUdevice_attribute| {
        // SAFETY: as above; the attribute is a valid enum value.
        unsafe { result::device::get_attribute(dev, a) }
            .map_err(driver("reading the compute capability"))
            .map(|v| v.max(0) as u32)
    };
    let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    Ok(DeviceInfo {
        ordinal,
        name,
        memory_bytes: memory as u64,
        compute_capability: (major, minor),
    })
}

/// The CUDA devices of this machine; an error with the reason when there is no
/// driver or no device.
pub fn cuda_devices() -> Result<Vec<DeviceInfo>, KernelError> {
    init_driver()?;
    let count = result::device::get_count().map_err(|e| KernelError::Driver {
        op: "counting devices".into(),
        message: e.to_string(),
    })?;
    if count <= 0 {
        return Err(KernelError::CudaUnavailable(
            "the CUDA driver reports no device".into(),
        ));
    }
    (0..count as usize).map(device_info).collect()
}

/// The backend for `choice`, and a sentence saying what was picked and why.
///
/// - `cpu`: the CPU backend.
/// - `cuda`: the CUDA backend on device 0, or the error that prevents it.
/// - `auto`: the CUDA backend on device 0 when there is a driver and a device and
///   the backend starts (kernels compile and load); otherwise the CPU backend, and
///   the sentence gives the reason.
///
/// The CPU backend's ALS solves use `kernels` (`auto`: the fastest set).
pub fn select(
    choice: DeviceChoice,
    kernels: CpuKernels,
) -> Result<(Arc<dyn Backend>, String), KernelError> {
    // the kernel set is checked only where the CPU backend runs
    let cpu = || -> Result<Arc<dyn Backend>, KernelError> {
        Ok(Arc::new(CpuBackend::with_kernels(kernels)?))
    };
    let picked = match choice {
        DeviceChoice::Cpu => (cpu()?, "cpu backend (--device cpu)".to_string()),
        DeviceChoice::Cuda => {
            let backend = CudaBackend::new(0)?;
            let why = format!("cuda backend on {} (--device cuda)", backend.info());
            (Arc::new(backend) as Arc<dyn Backend>, why)
        }
        DeviceChoice::Auto => match cuda_devices() {
            Err(e) => (cpu()?, format!("cpu backend (--device auto): {e}")),
            Ok(devices) => match CudaBackend::new(0) {
                Ok(backend) => {
                    let why = format!(
                        "cuda backend on {} (--device auto; {} CUDA device(s) found)",
                        backend.info(),
                        devices.len()
                    );
                    (Arc::new(backend) as Arc<dyn Backend>, why)
                }
                Err(e) => (
                    cpu()?,
                    format!(
                        "cpu backend (--device auto): {} was found but the cuda backend could \
                         not start: {e}",
                        devices[0]
                    ),
                ),
            },
        },
    };
    let picked = match kernels {
        CpuKernels::Auto => picked,
        forced if picked.0.name() == "cpu" => (
            picked.0,
            format!("{} with the {forced} ALS kernels", picked.1),
        ),
        _ => picked,
    };
    tracing::info!(device = %choice, picked = %picked.1, "compute backend selected");
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_round_trips_through_text() {
        for c in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda] {
            assert_eq!(c.to_string().parse::<DeviceChoice>(), Ok(c));
        }
        assert_eq!(" CUDA ".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda));
        let err = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(err.to_string().contains("auto, cpu or cuda"), "{err}");
    }

    #[test]
    fn cpu_kernel_sets_are_forced_or_refused() {
        assert_eq!("AVX2".parse::<CpuKernels>(), Ok(CpuKernels::Avx2));
        assert!(
            "sse"
                .parse::<CpuKernels>()
                .unwrap_err()
                .contains("portable")
        );
        let (backend, why) = select(DeviceChoice::Cpu, CpuKernels::Portable).unwrap();
        assert_eq!(backend.name(), "cpu");
        assert!(why.contains("with the portable ALS kernels"), "{why}");
        #[cfg(target_arch = "x86_64")]
        {
            let has = std::arch::is_x86_feature_detected!("avx512f");
            match select(DeviceChoice::Cpu, CpuKernels::Avx512) {
                Ok(_) => assert!(has),
                Err(e) => {
                    assert!(!has);
                    assert!(e.to_string().contains("lacks its instructions"), "{e}");
                }
            }
        }
    }

    #[test]
    fn cpu_is_always_available() {
        let (backend, why) = select(DeviceChoice::Cpu, CpuKernels::Auto).unwrap();
        assert_eq!(backend.name(), "cpu");
        assert!(why.contains("cpu"), "{why}");
    }

    #[test]
    fn auto_and_cuda_agree_with_the_probe() {
        let (auto, why) = select(DeviceChoice::Auto, CpuKernels::Auto).unwrap();
        match cuda_devices() {
            Ok(devices) => {
                assert!(!devices.is_empty());
                // A machine with a device must be able to start the backend.
                let cuda = select(DeviceChoice::Cuda, CpuKernels::Auto);
                assert!(cuda.is_ok(), "{:?}", cuda.err());
                assert!(auto.name().starts_with("cuda:"), "{why}");
            }
            Err(reason) => {
                assert_eq!(auto.name(), "cpu");
                assert!(why.contains(&reason.to_string()), "{why} / {reason}");
                assert!(matches!(
                    select(DeviceChoice::Cuda, CpuKernels::Auto),
                    Err(KernelError::CudaUnavailable(_))
                ));
            }
        }
    }
}
