//! Disk-fill files without path re-resolution: every directory on the way is opened with
//! `O_DIRECTORY|O_NOFOLLOW`, and the fill file is created and removed relative to the directory's fd
//! (`openat`/`unlinkat`), so nobody can redirect the agent with a symlink or a renamed directory between the
//! check and the act. Only root-owned regular files named `.lymph-chaos-fill-<id>` are ever removed.

use std::{
    ffi::{CString, OsStr},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Component, Path},
};

use crate::paths::FILL_FILE_PREFIX;

/// tmpfs and ramfs: filling them takes memory, not disk.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// Opens `name` under `dir` (or an absolute path when `dir` is `None`) as a directory, never following a symlink
/// in the last component.
fn open_dir_at(dir: Option<&OwnedFd>, name: &OsStr) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    let at = dir.map_or(libc::AT_FDCWD, AsRawFd::as_raw_fd);
    // SAFETY: a valid NUL-terminated path and flags; the fd returned is ours.
    let fd = unsafe {
        libc::openat(at, c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens an absolute directory path, component by component from `/`, refusing symlinks anywhere and `..`.
///
/// # Errors
/// A relative path, `..`, a symlink or a missing directory on the way.
pub(crate) fn open_dir_nofollow(path: &Path) -> io::Result<OwnedFd> {
    if !path.is_absolute() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not absolute", path.display())));
    }
    let mut fd = open_dir_at(None, OsStr::new("/"))?;
    for comp in path.components() {
        match comp {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => fd = open_dir_at(Some(&fd), name)?,
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("`..` in {}", path.display())));
            }
        }
    }
    Ok(fd)
}

/// Whether the directory is on tmpfs or ramfs.
pub(crate) fn is_memory_backed(dir: &OwnedFd) -> io::Result<bool> {
    // SAFETY: fstatfs into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out pointer.
    if unsafe { libc::fstatfs(dir.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let magic = st.f_type as i64;
    Ok(magic == TMPFS_MAGIC || magic == RAMFS_MAGIC)
}

/// Free and total bytes of the filesystem holding `dir` (for unprivileged users, as `df` shows).
pub(crate) fn space(dir: &OwnedFd) -> io::Result<(u64, u64)> {
    // SAFETY: fstatvfs into a zeroed struct we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out pointer.
    if unsafe { libc::fstatvfs(dir.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let block = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * block, st.f_blocks as u64 * block))
}

/// Creates `name` in `dir`: a new file (never an existing one, never through a symlink), owned by root, mode 0600.
pub(crate) fn create_file(dir: &OwnedFd, name: &str) -> io::Result<std::fs::File> {
    let c = cstr(OsStr::new(name))?;
    // SAFETY: valid dir fd, NUL-terminated name, mode as the third argument.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    // The umask may have cleared bits, never added: make it exactly 0600 and root's.
    // SAFETY: valid fd.
    unsafe {
        libc::fchmod(file.as_raw_fd(), 0o600);
        libc::fchown(file.as_raw_fd(), 0, 0);
    }
    Ok(file)
}

/// `(dev, ino, uid, mode)` of `name` in `dir`, without following a symlink.
fn stat_at(dir: &OwnedFd, name: &str) -> io::Result<libc::stat> {
    let c = cstr(OsStr::new(name))?;
    // SAFETY: zeroed out struct, valid pointers.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Removes our fill file `name` from `dir`: only a root-owned regular file whose name is a fill file's (and, when
/// given, with the device and inode the agent created). Returns whether something was removed.
pub(crate) fn remove_file(dir: &OwnedFd, name: &str, expect: Option<(u64, u64)>) -> io::Result<bool> {
    if !name.starts_with(FILL_FILE_PREFIX) || name.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is not a fill file")));
    }
    let st = match stat_at(dir, name) {
        Ok(st) => st,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
    let same = expect.is_none_or(|(dev, ino)| st.st_dev == dev && st.st_ino == ino);
    // SAFETY: geteuid has no arguments.
    let me = unsafe { libc::geteuid() };
    if !regular || (st.st_uid != 0 && st.st_uid != me) || !same {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{name} is no longer the file the agent created; left alone"),
        ));
    }
    let c = cstr(OsStr::new(name))?;
    // SAFETY: valid dir fd and name; flags 0 = unlink a non-directory.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::NotFound { Ok(false) } else { Err(e) };
    }
    Ok(true)
}

/// `(dev, ino)` of an open file.
pub(crate) fn identity(file: &std::fs::File) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// Removes a fill file named by its absolute path (journal leftovers: after a restart, or by the guardian), opening
/// every directory on the way without following symlinks.
pub(crate) fn remove_path(path: &Path) -> io::Result<bool> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(OsStr::to_str)) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a fill file", path.display())));
    };
    let dir = match open_dir_nofollow(parent) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    remove_file(&dir, name, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("link")).unwrap();
        assert!(open_dir_nofollow(&tmp.path().join("link")).is_err());
        assert!(open_dir_nofollow(&tmp.path().join("real/../real")).is_err());
        let dir = open_dir_nofollow(&real).unwrap();
        let keep = real.join("keep");
        std::fs::write(&keep, b"x").unwrap();
        let name = format!("{FILL_FILE_PREFIX}-a");
        std::os::unix::fs::symlink(&keep, real.join(&name)).unwrap();
        // A symlink in place of the fill file: neither created through nor removed.
        assert!(create_file(&dir, &name).is_err());
        assert!(remove_file(&dir, &name, None).is_err());
        assert!(keep.exists());
        std::fs::remove_file(real.join(&name)).unwrap();
        let f = create_file(&dir, &name).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        let id = identity(&f).unwrap();
        assert!(remove_file(&dir, &name, Some(id)).unwrap());
        assert!(!remove_file(&dir, &name, Some(id)).unwrap());
        assert!(remove_file(&dir, "keep", None).is_err());
    }
}
