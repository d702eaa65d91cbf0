//! Thin wrappers over the `*at` system calls that std does not expose.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

fn c_name(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

/// Opens `name` relative to the folder `dir`.
pub(crate) fn open_at(dir: &File, name: &[u8], flags: libc::c_int, mode: u32) -> io::Result<File> {
    let name = c_name(name)?;
    // SAFETY: `name` is a valid NUL-terminated string and `dir` is an open
    // descriptor for the duration of the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Opens the folder `name` in `dir` without following a symlink.
pub(crate) fn open_dir_at(dir: &File, name: &[u8]) -> io::Result<File> {
    open_at(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

/// Creates the folder `name` in `dir`.
pub(crate) fn mkdir_at(dir: &File, name: &[u8], mode: u32) -> io::Result<()> {
    let name = c_name(name)?;
    // SAFETY: valid NUL-terminated name and open descriptor.
    let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates the symlink `name` in `dir`, pointing to `target`.
pub(crate) fn symlink_at(target: &[u8], dir: &File, name: &[u8]) -> io::Result<()> {
    let target = c_name(target)?;
    let name = c_name(name)?;
    // SAFETY: valid NUL-terminated strings and open descriptor.
    let rc = unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the modification time of the symlink `name` in `dir` itself, not of
/// its target. The access time is set to the same value.
pub(crate) fn set_symlink_mtime_at(dir: &File, name: &[u8], mtime_ms: i64) -> io::Result<()> {
    let name = c_name(name)?;
    let time = libc::timespec {
        tv_sec: mtime_ms.div_euclid(1000) as libc::time_t,
        tv_nsec: (mtime_ms.rem_euclid(1000) * 1_000_000) as libc::c_long,
    };
    let times = [time, time];
    // SAFETY: valid NUL-terminated name, open descriptor and a two-element array.
    let rc = unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
