//! The memory a worker may use: `shoal worker --memory-limit`, or by default its
//! container's limit (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`), or the
//! machine's memory.

use std::path::Path;

/// The cgroup's memory limit, if this process runs under one that sets it.
fn cgroup_limit(root: &Path) -> Option<u64> {
    let v2 = std::fs::read_to_string(root.join("memory.max")).ok();
    let v1 = std::fs::read_to_string(root.join("memory/memory.limit_in_bytes")).ok();
    v2.into_iter()
        .chain(v1)
        .filter_map(|text| text.trim().parse::<u64>().ok())
        // v1 says "no limit" with a huge number near i64::MAX
        .find(|&bytes| bytes > 0 && bytes < (1u64 << 60))
}

/// The machine's memory (`MemTotal` of `/proc/meminfo`).
fn machine_memory(meminfo: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(meminfo).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The default memory limit of a worker: the container's, else the machine's,
/// else 4 GiB (a machine that tells neither).
pub fn detected_limit() -> (u64, &'static str) {
    if let Some(b) = cgroup_limit(Path::new("/sys/fs/cgroup")) {
        return (b, "the container's memory limit (cgroup)");
    }
    if let Some(b) = machine_memory(Path::new("/proc/meminfo")) {
        return (b, "the machine's memory");
    }
    (4 << 30, "a default of 4 GiB (the memory could not be read)")
}

/// Gives the memory the allocator holds free back to the system (glibc's
/// `malloc_trim`): a step's large temporary buffers otherwise leave the heap
/// fragmented and the process's resident memory at its high-water mark. Called
/// after each step; a few milliseconds.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator to the
    // system; it touches no memory the program uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A size as people write it: `12G`, `12GiB`, `512M`, `1.5g`, `1073741824`
/// (bytes). K, M, G, T are powers of 1024, with or without `i`/`B`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 12G, 512M, 1073741824)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use K, M, G or T)"
            ));
        }
    };
    let bytes = value * (1u64 << shift) as f64;
    if !(bytes >= 1.0 && bytes < 2f64.powi(63)) {
        return Err(format!("`{text}` is not a usable memory size"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_the_usual_units() {
        assert_eq!(parse_size("1073741824").unwrap(), 1 << 30);
        assert_eq!(parse_size("12G").unwrap(), 12 << 30);
        assert_eq!(parse_size("12GiB").unwrap(), 12 << 30);
        assert_eq!(parse_size(" 512 MB ").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        for bad in ["", "G", "twelve", "12X", "0", "-3G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_come_from_the_cgroup_then_the_machine() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(cgroup_limit(dir.path()), None);
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_limit(dir.path()), None, "v2 without a limit");
        std::fs::write(dir.path().join("memory.max"), "3221225472\n").unwrap();
        assert_eq!(cgroup_limit(dir.path()), Some(3 << 30));
        let v1 = tempfile::tempdir().unwrap();
        std::fs::create_dir(v1.path().join("memory")).unwrap();
        std::fs::write(
            v1.path().join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert_eq!(cgroup_limit(v1.path()), None, "v1 without a limit");
        let info = dir.path().join("meminfo");
        std::fs::write(&info, "MemTotal:       24601180 kB\nMemFree: 1 kB\n").unwrap();
        assert_eq!(machine_memory(&info), Some(24_601_180 * 1024));
        assert!(detected_limit().0 > 0);
    }
}
