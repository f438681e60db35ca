//! Compiles every CUDA kernel source through the backend's own NVRTC path and
//! writes `<out>/<source>.<arch>.ptx`, for `kernels/check-cuda.sh` (which runs
//! ptxas on the results). Needs libnvrtc on `LD_LIBRARY_PATH`, no GPU.
//!
//! Usage: compile_ptx OUT_DIR ARCH... (e.g. compute_80 compute_90)

use std::process::ExitCode;

use shoal_kernels::cuda;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(out), archs) = (args.next(), args.collect::<Vec<_>>()) else {
        eprintln!("usage: compile_ptx OUT_DIR ARCH... (e.g. compute_80 compute_90)");
        return ExitCode::from(2);
    };
    if archs.is_empty() {
        eprintln!("usage: compile_ptx OUT_DIR ARCH... (e.g. compute_80 compute_90)");
        return ExitCode::from(2);
    }
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("cannot create {out}: {e}");
        return ExitCode::FAILURE;
    }
    let mut failed = false;
    for arch in &archs {
        for (name, _) in cuda::sources() {
            match cuda::compile_ptx(name, arch) {
                Ok(ptx) => {
                    let path = format!("{out}/{name}.{arch}.ptx");
                    if let Err(e) = std::fs::write(&path, ptx) {
                        eprintln!("cannot write {path}: {e}");
                        failed = true;
                    } else {
                        println!("{path}");
                    }
                }
                Err(e) => {
                    eprintln!("{e}");
                    failed = true;
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
