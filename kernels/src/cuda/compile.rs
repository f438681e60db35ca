//! The kernel sources and their one compilation path: NVRTC, at run time, for a
//! given virtual architecture (`compute_XY`). The backend compiles every source
//! for the device's own architecture; `kernels/check-cuda.sh` compiles them for
//! fixed architectures through the same function and checks the result with
//! `ptxas`.

use cudarc::nvrtc::{CompileError, CompileOptions};

use crate::KernelError;

/// Threads (= points) per block of `assign_direct_D`.
pub(crate) const DIRECT_THREADS: u32 = 128;
/// Centroids per shared-memory tile of `assign_direct_D`.
pub(crate) const DIRECT_TILE_CENTROIDS: u32 = 128;
/// Feature counts with a specialised direct kernel; above the last one the
/// expanded (GEMM-style) kernel is used.
pub(crate) const DIRECT_DS: [u32; 6] = [1, 2, 4, 8, 16, 32];
/// Points per block of `assign_expanded` (256 threads).
pub(crate) const EXP_TILE_POINTS: u32 = 64;
pub(crate) const EXP_THREADS: u32 = 256;
/// Points per chunk of the partial sums. Equal to the CPU backend's chunk, so
/// both add in the same order.
pub(crate) const SUM_CHUNK: u64 = 4096;
pub(crate) const SUM_THREADS: u32 = 256;
/// Largest `k * d` handled by `partial_sums_small` (4 elements per thread).
pub(crate) const SUM_SMALL_MAX: usize = SUM_THREADS as usize * 4;
/// Rows per block of the Gram matrix.
pub(crate) const GRAM_ROWS: u64 = 1024;
pub(crate) const GRAM_TILE: u32 = 32;
pub(crate) const GRAM_THREADS: u32 = 256;
/// Stored items per round of the ALS sparse terms.
pub(crate) const ALS_CHUNK: u32 = 32;
/// Items per tile (and threads per block) of `top_n`.
pub(crate) const TOPN_TILE: u32 = 256;
/// Largest `n` of `top_n` on the CUDA backend.
pub const MAX_TOP_N: usize = 128;
pub(crate) const TOPN_FEATURES: u32 = 32;

const SOURCES: [(&str, &str); 6] = [
    ("assign", include_str!("../../cuda/assign.cu")),
    ("reduce", include_str!("../../cuda/reduce.cu")),
    ("gram", include_str!("../../cuda/gram.cu")),
    ("als", include_str!("../../cuda/als.cu")),
    ("topn", include_str!("../../cuda/topn.cu")),
    ("rows", include_str!("../../cuda/rows.cu")),
];

/// Every kernel source: (name, CUDA C++ text). Source `name` is the file
/// `kernels/cuda/<name>.cu`.
pub fn sources() -> &'static [(&'static str, &'static str)] {
    &SOURCES
}

/// The constants the host shares with the kernels, passed to NVRTC as `-D`.
fn defines() -> Vec<String> {
    [
        ("DIRECT_THREADS", u64::from(DIRECT_THREADS)),
        ("DIRECT_TILE_CENTROIDS", u64::from(DIRECT_TILE_CENTROIDS)),
        ("EXP_TILE_POINTS", u64::from(EXP_TILE_POINTS)),
        ("EXP_TILE_CENTROIDS", u64::from(EXP_TILE_POINTS)),
        ("SUM_CHUNK", SUM_CHUNK),
        ("SUM_THREADS", u64::from(SUM_THREADS)),
        ("GRAM_ROWS", GRAM_ROWS),
        ("ALS_CHUNK", u64::from(ALS_CHUNK)),
        ("TOPN_TILE", u64::from(TOPN_TILE)),
        ("TOPN_MAX", MAX_TOP_N as u64),
        ("TOPN_FEATURES", u64::from(TOPN_FEATURES)),
    ]
    .iter()
    .map(|(name, value)| format!("-D{name}={value}"))
    .collect()
}

/// Fails with an explanation when libnvrtc cannot be loaded (instead of the
/// panic cudarc would raise on first use).
pub(crate) fn nvrtc_present() -> Result<(), KernelError> {
    // SAFETY: `is_culib_present` only tries to dlopen libnvrtc under its usual
    // names and closes it again; loading NVIDIA's runtime compiler runs its
    // initialisers, which every CUDA program trusts in the same way.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::CudaUnavailable(
            "NVRTC (libnvrtc.so.12) was not found: install the CUDA 12 runtime compiler \
             (e.g. the nvidia-cuda-nvrtc-cu12 wheel, as kernels/check-cuda.sh does) and add its \
             lib directory to LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// The virtual architectures this NVRTC can compile for, as `XY` numbers (e.g. 80).
pub fn nvrtc_archs() -> Result<Vec<u32>, KernelError> {
    use cudarc::nvrtc::sys;
    nvrtc_present()?;
    let fail = |what: &str, r: sys::nvrtcResult| {
        KernelError::CudaUnavailable(format!(
            "NVRTC could not list its architectures ({what}: {r:?})"
        ))
    };
    let mut count: std::ffi::c_int = 0;
    // SAFETY: libnvrtc is present (checked above); the call writes one int
    // through a pointer to a live local.
    let r = unsafe { sys::nvrtcGetNumSupportedArchs(&mut count) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(fail("nvrtcGetNumSupportedArchs", r));
    }
    let mut archs: Vec<std::ffi::c_int> = vec![0; count.max(0) as usize];
    // SAFETY: `archs` has room for the `count` ints NVRTC reported it would write.
    let r = unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(fail("nvrtcGetSupportedArchs", r));
    }
    Ok(archs
        .into_iter()
        .filter_map(|a| u32::try_from(a).ok())
        .collect())
}

/// The virtual architecture to compile for on a device of compute capability
/// `(major, minor)`: its own, or the newest this NVRTC knows below it (the driver
/// JIT-compiles PTX of an older virtual architecture for a newer device).
pub fn arch_for_device(major: u32, minor: u32) -> Result<String, KernelError> {
    let own = major * 10 + minor;
    let archs = nvrtc_archs()?;
    match archs.iter().copied().filter(|&a| a <= own).max() {
        Some(a) => Ok(format!("compute_{a}")),
        None => Err(KernelError::CudaUnavailable(format!(
            "this NVRTC cannot compile for compute capability {major}.{minor} (it knows {archs:?})"
        ))),
    }
}

/// Compiles kernel source `source_name` (see [`sources`]) to PTX for virtual
/// architecture `arch` (`compute_XY`). A compile error carries NVRTC's log and
/// the source's name.
pub fn compile_ptx(source_name: &str, arch: &str) -> Result<String, KernelError> {
    let file = format!("{source_name}.cu");
    let Some(&(_, source)) = SOURCES.iter().find(|(name, _)| *name == source_name) else {
        return Err(KernelError::Compile {
            kernel: file,
            log: format!(
                "there is no such kernel source; the sources are: {}",
                SOURCES.map(|(name, _)| name).join(", ")
            ),
        });
    };
    let digits = arch.strip_prefix("compute_").unwrap_or("");
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(KernelError::Compile {
            kernel: file,
            log: format!("architecture `{arch}` is not of the form compute_XY (e.g. compute_80)"),
        });
    }
    compile_source(&file, source, arch)
}

/// Compiles `source` (called `file` in messages) to PTX for `arch`.
fn compile_source(file: &str, source: &str, arch: &str) -> Result<String, KernelError> {
    nvrtc_present()?;
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--generate-line-info".to_string(),
    ];
    options.extend(defines());
    let opts = CompileOptions {
        name: Some(file.to_string()),
        options,
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(source, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { nvrtc, log, .. }) => Err(KernelError::Compile {
            kernel: file.to_string(),
            log: format!("{nvrtc:?} (arch {arch})\n{}", log.to_string_lossy()),
        }),
        Err(other) => Err(KernelError::Compile {
            kernel: file.to_string(),
            log: format!("{other:?} (arch {arch})"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC is optional on a developer's machine (kernels/check-cuda.sh provides
    /// it); tests that need it say so and pass without it.
    fn have_nvrtc() -> bool {
        match nvrtc_present() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("NVRTC skipped: {e}");
                false
            }
        }
    }

    #[test]
    fn unknown_sources_and_architectures_are_errors() {
        match compile_ptx("nope", "compute_80") {
            Err(KernelError::Compile { kernel, log }) => {
                assert_eq!(kernel, "nope.cu");
                assert!(log.contains("assign, reduce"), "{log}");
            }
            other => panic!("unexpected {other:?}"),
        }
        for arch in ["sm_80", "compute_", "compute_8x", "80"] {
            assert!(
                matches!(
                    compile_ptx("assign", arch),
                    Err(KernelError::Compile { .. })
                ),
                "{arch}"
            );
        }
    }

    #[test]
    fn missing_nvrtc_is_an_error_not_a_panic() {
        if nvrtc_present().is_err() {
            assert!(matches!(
                compile_ptx("rows", "compute_80"),
                Err(KernelError::CudaUnavailable(_))
            ));
            assert!(matches!(
                nvrtc_archs(),
                Err(KernelError::CudaUnavailable(_))
            ));
        }
    }

    #[test]
    fn compile_errors_carry_the_log_and_the_kernel_name() {
        if !have_nvrtc() {
            return;
        }
        let source = "extern \"C\" __global__ void broken(float* x) { x[0] = undeclared; }";
        match compile_source("broken.cu", source, "compute_80") {
            Err(e @ KernelError::Compile { .. }) => {
                let message = e.to_string();
                assert!(message.contains("broken.cu"), "{message}");
                assert!(message.contains("undeclared"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn every_source_compiles_and_exports_its_kernels() {
        if !have_nvrtc() {
            return;
        }
        let entries: &[(&str, &[&str])] = &[
            (
                "assign",
                &[
                    "assign_direct_1",
                    "assign_direct_2",
                    "assign_direct_4",
                    "assign_direct_8",
                    "assign_direct_16",
                    "assign_direct_32",
                    "assign_expanded",
                ],
            ),
            (
                "reduce",
                &[
                    "partial_sums_small",
                    "partial_sums_wide",
                    "partial_sums_merge",
                ],
            ),
            ("gram", &["gram_partial", "gram_merge"]),
            ("als", &["als_cg"]),
            ("topn", &["top_n"]),
            ("rows", &["gather_rows", "scatter_rows"]),
        ];
        assert_eq!(entries.len(), sources().len());
        for (name, kernels) in entries {
            let ptx = compile_ptx(name, "compute_80").unwrap();
            for kernel in *kernels {
                assert!(
                    ptx.contains(&format!(".entry {kernel}(")),
                    "{name}.cu does not export {kernel}"
                );
            }
        }
        let archs = nvrtc_archs().unwrap();
        assert!(archs.contains(&80) && archs.contains(&90), "{archs:?}");
        assert_eq!(arch_for_device(8, 6).unwrap(), "compute_86");
        // A device newer than this NVRTC gets the newest architecture it knows.
        let newest = archs.iter().max().unwrap();
        assert_eq!(arch_for_device(99, 9).unwrap(), format!("compute_{newest}"));
    }
}
