//! Every file operation of a gallery, in one place.
//!
//! A gallery directory may be writable by people who must not be able to
//! make facematch destroy or leak files elsewhere (a planted symlink at a
//! temporary name, a hard link to a file outside, a FIFO where a file is
//! expected). So, for everything inside a gallery:
//!
//! - files are opened relative to the directory's descriptor (`Dir`) with
//!   `O_NOFOLLOW`, and anything that is not a regular file (symlink,
//!   directory, FIFO, device, socket) is refused with [`Error::UnsafePath`]
//!   naming it;
//! - a file with more than one hard link is never written, truncated or
//!   shredded (its other name may be outside the gallery);
//! - directories are created 0700 and files 0600 whatever the umask, and
//!   `Dir::tighten` takes looser modes of existing entries down to those;
//! - a replacement is written to a temporary name, fsynced, renamed over
//!   the target and the directory fsynced (`Dir::write_atomic`).
//!
//! For input the user names (images, key files, manifests, configs, `.npy`
//! files), [`read_bounded`] and [`open_input`] refuse non-regular files
//! before anything can block (`O_NONBLOCK` + `fstat`) and cap the size.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Mode of every directory facematch creates.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of every file facematch creates.
pub(crate) const FILE_MODE: u32 = 0o600;

/// What kind of entry a name is (not following symlinks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A FIFO, device, socket or anything else.
    Other,
}

impl Kind {
    fn of(mode: libc::mode_t) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        }
    }
    /// "a regular file", "a symbolic link", ...: for messages.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Kind::File => "a regular file",
            Kind::Dir => "a directory",
            Kind::Symlink => "a symbolic link",
            Kind::Other => "a FIFO, device or socket",
        }
    }
}

/// `lstat`-like facts about an entry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    /// Its kind.
    pub kind: Kind,
    /// Hard links to it.
    pub nlink: u64,
    /// Permission bits.
    pub mode: u32,
}

fn cstr(name: &OsStr) -> std::io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a file name"))
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fstat_fd(fd: RawFd) -> std::io::Result<libc::stat> {
    // SAFETY: `st` is written by fstat before it is read; fd is a live descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

// st_nlink is u64 on x86_64 and u32 elsewhere.
#[allow(clippy::unnecessary_cast)]
fn entry_of(st: &libc::stat) -> Entry {
    Entry { kind: Kind::of(st.st_mode), nlink: st.st_nlink as u64, mode: st.st_mode & 0o7777 }
}

fn unsafe_path(path: PathBuf, reason: impl Into<String>) -> Error {
    Error::UnsafePath { path, reason: reason.into() }
}

/// An open directory: every operation on its entries goes through its
/// descriptor, never through a path that could be re-pointed meanwhile.
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Open an existing directory. `path` itself may be reached through
    /// symlinks (the operator named it), but must be a directory.
    pub(crate) fn open(path: &Path) -> Result<Dir> {
        let c = cstr(path.as_os_str()).map_err(|e| Error::io(path, e))?;
        // SAFETY: c is a valid NUL-terminated string; the returned fd is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        let fd = cvt(fd).map_err(|e| Error::io(path, e))?;
        // SAFETY: fd was just returned by open and is owned by nobody else.
        Ok(Dir { fd: unsafe { OwnedFd::from_raw_fd(fd) }, path: path.to_path_buf() })
    }

    /// Open `path`, creating it (mode 0700, parents too) if it is missing.
    pub(crate) fn create_or_open(path: &Path) -> Result<Dir> {
        if !path.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(path).map_err(|e| Error::io(path, e))?;
            let d = Dir::open(path)?;
            d.chmod_self(DIR_MODE)?;
            return Ok(d);
        }
        Dir::open(path)
    }

    /// The directory's path (for messages).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The path of an entry (for messages and for APIs that need a path).
    pub(crate) fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn chmod_self(&self, mode: u32) -> Result<()> {
        // SAFETY: fchmod on our own descriptor.
        cvt(unsafe { libc::fchmod(self.raw(), mode as libc::mode_t) }).map_err(|e| Error::io(&self.path, e))?;
        Ok(())
    }

    /// Facts about `name` without following a symlink; `None` if it does not exist.
    pub(crate) fn stat(&self, name: &str) -> Result<Option<Entry>> {
        let c = cstr(OsStr::new(name)).map_err(|e| Error::io(self.join(name), e))?;
        // SAFETY: st is written before read; c is NUL-terminated.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::fstatat(self.raw(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        match cvt(r) {
            Ok(_) => Ok(Some(entry_of(&st))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(self.join(name), e)),
        }
    }

    /// Whether `name` exists (as anything, symlinks included).
    pub(crate) fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.stat(name)?.is_some())
    }

    fn openat(&self, name: &str, flags: libc::c_int, mode: u32) -> std::io::Result<File> {
        let c = cstr(OsStr::new(name))?;
        // SAFETY: c is NUL-terminated; the fd is owned by the File below.
        let fd = unsafe {
            libc::openat(self.raw(), c.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY, mode as libc::c_uint)
        };
        let fd = cvt(fd)?;
        // SAFETY: fd was just returned by openat.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Explain why `name` could not be opened as a regular file.
    fn refuse(&self, name: &str, e: std::io::Error) -> Error {
        if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::EMLINK) {
            return unsafe_path(self.join(name), "is a symbolic link; facematch never follows links inside a gallery");
        }
        if e.raw_os_error() == Some(libc::ENXIO) {
            return unsafe_path(self.join(name), "is a FIFO or socket, not a regular file");
        }
        Error::io(self.join(name), e)
    }

    fn check_regular(&self, name: &str, f: &File, writable: bool) -> Result<Entry> {
        let e = entry_of(&fstat_fd(f.as_raw_fd()).map_err(|e| Error::io(self.join(name), e))?);
        if e.kind != Kind::File {
            return Err(unsafe_path(self.join(name), format!("is {}, not a regular file", e.kind.describe())));
        }
        if writable && e.nlink > 1 {
            return Err(unsafe_path(
                self.join(name),
                format!("has {} hard links; facematch never writes a file that has another name", e.nlink),
            ));
        }
        Ok(e)
    }

    /// Open a regular file for reading; `None` if it does not exist.
    pub(crate) fn open_read(&self, name: &str) -> Result<Option<File>> {
        match self.openat(name, libc::O_RDONLY | libc::O_NONBLOCK, 0) {
            Ok(f) => {
                self.check_regular(name, &f, false)?;
                clear_nonblock(&f).map_err(|e| Error::io(self.join(name), e))?;
                Ok(Some(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.refuse(name, e)),
        }
    }

    /// Read a whole regular file of at most `max` bytes; `None` if missing.
    pub(crate) fn read_bounded(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let Some(f) = self.open_read(name)? else { return Ok(None) };
        read_all_bounded(f, &self.join(name), max).map(Some)
    }

    /// Open an existing regular file with a single link for reading and writing.
    pub(crate) fn open_write(&self, name: &str) -> Result<File> {
        let f = self.openat(name, libc::O_RDWR | libc::O_NONBLOCK, 0).map_err(|e| self.refuse(name, e))?;
        self.check_regular(name, &f, true)?;
        clear_nonblock(&f).map_err(|e| Error::io(self.join(name), e))?;
        Ok(f)
    }

    /// Create a new regular file (mode 0600); fails if anything has the name.
    pub(crate) fn create_new(&self, name: &str) -> Result<File> {
        let f = self.openat(name, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, FILE_MODE).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => unsafe_path(
                self.join(name),
                "already exists (a leftover facematch could not prove its own); move it away or run `facematch repair`",
            ),
            _ => self.refuse(name, e),
        })?;
        // SAFETY: fchmod on the descriptor just created (the umask may have narrowed it further; make it exact).
        cvt(unsafe { libc::fchmod(f.as_raw_fd(), FILE_MODE as libc::mode_t) }).map_err(|e| Error::io(self.join(name), e))?;
        Ok(f)
    }

    /// Open or create (0600) a lock file and take its exclusive lock.
    pub(crate) fn lock(&self, name: &str) -> Result<File> {
        let f = match self.openat(name, libc::O_RDWR | libc::O_CREAT | libc::O_NONBLOCK, FILE_MODE) {
            Ok(f) => f,
            Err(e) => return Err(self.refuse(name, e)),
        };
        self.check_regular(name, &f, true)?;
        // A lock this process just released can look held for a moment: a child
        // between fork and exec still has a copy of the descriptor. Another
        // process holding it for real is still refused, a quarter second later.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(250);
        loop {
            #[allow(clippy::incompatible_msrv)]
            match f.try_lock() {
                Ok(()) => return Ok(f),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Locked(self.path.clone())),
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(self.join(name), e)),
            }
        }
    }

    /// Write `bytes` as `name`, atomically: `name.tmp` (a leftover there is
    /// removed first if it is a plain file of ours or a link, which
    /// `unlinkat` removes without following), fsync, rename, fsync the directory.
    pub(crate) fn write_atomic(&self, name: &str, bytes: &[u8], sync: bool) -> Result<()> {
        let tmp = format!("{name}.tmp");
        self.remove_stale(&tmp)?;
        let mut f = self.create_new(&tmp)?;
        f.write_all(bytes).map_err(|e| Error::io(self.join(&tmp), e))?;
        if crate::failpoints::hit("fs/write-atomic") {
            return Err(Error::io(self.join(&tmp), std::io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        if sync {
            f.sync_all().map_err(|e| Error::io(self.join(&tmp), e))?;
        }
        drop(f);
        self.rename(&tmp, name)?;
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// Remove a stale temporary name before reusing it. Unlinking never
    /// follows a link and never touches another name of a hard-linked
    /// file, so it harms nothing outside; directories are refused.
    fn remove_stale(&self, name: &str) -> Result<()> {
        match self.stat(name)? {
            None => Ok(()),
            Some(e) if e.kind == Kind::Dir => Err(unsafe_path(self.join(name), "is a directory where facematch writes a temporary file")),
            Some(_) => self.remove_file(name),
        }
    }

    /// Rename an entry within this directory.
    pub(crate) fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.rename_to(from, self, to)
    }

    /// Rename an entry of this directory into `to_dir`.
    pub(crate) fn rename_to(&self, from: &str, to_dir: &Dir, to: &str) -> Result<()> {
        if crate::failpoints::hit("fs/rename") {
            return Err(Error::io(self.join(from), std::io::Error::from_raw_os_error(libc::EIO)));
        }
        let (a, b) = (cstr(OsStr::new(from)), cstr(OsStr::new(to)));
        let (a, b) = (a.map_err(|e| Error::io(self.join(from), e))?, b.map_err(|e| Error::io(to_dir.join(to), e))?);
        // SAFETY: both names are NUL-terminated; both fds are live directories.
        cvt(unsafe { libc::renameat(self.raw(), a.as_ptr(), to_dir.raw(), b.as_ptr()) }).map_err(|e| Error::io(self.join(from), e))?;
        Ok(())
    }

    /// Unlink `name` (a link itself, never its target); missing is fine.
    pub(crate) fn remove_file(&self, name: &str) -> Result<()> {
        let c = cstr(OsStr::new(name)).map_err(|e| Error::io(self.join(name), e))?;
        // SAFETY: c is NUL-terminated.
        match cvt(unsafe { libc::unlinkat(self.raw(), c.as_ptr(), 0) }) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(self.join(name), e)),
        }
    }

    /// Remove an empty subdirectory.
    pub(crate) fn remove_dir(&self, name: &str) -> Result<()> {
        let c = cstr(OsStr::new(name)).map_err(|e| Error::io(self.join(name), e))?;
        // SAFETY: c is NUL-terminated.
        match cvt(unsafe { libc::unlinkat(self.raw(), c.as_ptr(), libc::AT_REMOVEDIR) }) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(self.join(name), e)),
        }
    }

    /// fsync the directory (makes renames and unlinks in it durable).
    pub(crate) fn sync(&self) -> Result<()> {
        // SAFETY: fsync on our own descriptor.
        cvt(unsafe { libc::fsync(self.raw()) }).map_err(|e| Error::io(&self.path, e))?;
        Ok(())
    }

    /// Open the subdirectory `name` without following a link; `None` if missing.
    pub(crate) fn subdir(&self, name: &str) -> Result<Option<Dir>> {
        let c = cstr(OsStr::new(name)).map_err(|e| Error::io(self.join(name), e))?;
        // SAFETY: c is NUL-terminated; the fd is owned below.
        let fd = unsafe { libc::openat(self.raw(), c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
        match cvt(fd) {
            // SAFETY: fd was just returned by openat.
            Ok(fd) => Ok(Some(Dir { fd: unsafe { OwnedFd::from_raw_fd(fd) }, path: self.join(name) })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                let what = self.stat(name)?.map(|e| e.kind.describe()).unwrap_or("not a directory");
                Err(unsafe_path(self.join(name), format!("is {what}, not a directory")))
            }
            Err(e) => Err(Error::io(self.join(name), e)),
        }
    }

    /// Create the subdirectory `name` (mode 0700) if missing, and open it.
    pub(crate) fn create_subdir(&self, name: &str) -> Result<Dir> {
        let c = cstr(OsStr::new(name)).map_err(|e| Error::io(self.join(name), e))?;
        // SAFETY: c is NUL-terminated.
        match cvt(unsafe { libc::mkdirat(self.raw(), c.as_ptr(), DIR_MODE as libc::mode_t) }) {
            Ok(_) => {
                let d = self.subdir(name)?.ok_or_else(|| unsafe_path(self.join(name), "vanished after it was created"))?;
                d.chmod_self(DIR_MODE)?;
                Ok(d)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                self.subdir(name)?.ok_or_else(|| unsafe_path(self.join(name), "vanished while it was opened"))
            }
            Err(e) => Err(Error::io(self.join(name), e)),
        }
    }

    /// The names in this directory (not `.` and `..`), sorted.
    pub(crate) fn list(&self) -> Result<Vec<String>> {
        // SAFETY: dup gives fdopendir its own descriptor, closed by closedir.
        let dupfd = cvt(unsafe { libc::fcntl(self.raw(), libc::F_DUPFD_CLOEXEC, 0) }).map_err(|e| Error::io(&self.path, e))?;
        let dirp = unsafe { libc::fdopendir(dupfd) };
        if dirp.is_null() {
            let e = std::io::Error::last_os_error();
            // SAFETY: fdopendir failed, so the dup is still ours to close.
            unsafe { libc::close(dupfd) };
            return Err(Error::io(&self.path, e));
        }
        // SAFETY: a fresh stream from the start.
        unsafe { libc::rewinddir(dirp) };
        let mut out = Vec::new();
        loop {
            // SAFETY: dirp is a live stream; the entry is copied before the next call.
            let ent = unsafe { libc::readdir(dirp) };
            if ent.is_null() {
                break;
            }
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
            let name = OsString::from_vec(name.to_bytes().to_vec());
            if name == "." || name == ".." {
                continue;
            }
            out.push(name.to_string_lossy().into_owned());
        }
        // SAFETY: closes the stream and the dup'ed descriptor.
        unsafe { libc::closedir(dirp) };
        out.sort();
        Ok(out)
    }

    /// Overwrite a regular, single-link file with zeros, sync it, then unlink it.
    /// Anything else at the name is refused (and left alone).
    pub(crate) fn shred_remove(&self, name: &str) -> Result<()> {
        if self.stat(name)?.is_none() {
            return Ok(());
        }
        let mut f = self.open_write(name)?;
        shred_open(&mut f, &self.join(name))?;
        drop(f);
        self.remove_file(name)
    }

    /// Take the modes of this directory and its entries (one level, and the
    /// subdirectories named in `subdirs`) down to 0700 / 0600. Returns the
    /// entries that were looser. Links and other non-regular entries are
    /// left alone (they are refused wherever they are used).
    pub(crate) fn tighten(&self, subdirs: &[&str]) -> Result<Vec<PathBuf>> {
        let mut loosened = Vec::new();
        let st = entry_of(&fstat_fd(self.raw()).map_err(|e| Error::io(&self.path, e))?);
        if st.mode & 0o077 != 0 {
            self.chmod_self(st.mode & 0o700)?;
            loosened.push(self.path.clone());
        }
        for name in self.list()? {
            let Some(e) = self.stat(&name)? else { continue };
            if e.mode & 0o077 == 0 && e.kind != Kind::Dir {
                continue;
            }
            match e.kind {
                Kind::File if e.nlink == 1 => {
                    let f = self.openat(&name, libc::O_RDONLY | libc::O_NONBLOCK, 0).map_err(|err| self.refuse(&name, err))?;
                    // SAFETY: fchmod on a descriptor of a regular file we just opened without following links.
                    cvt(unsafe { libc::fchmod(f.as_raw_fd(), (e.mode & 0o600) as libc::mode_t) })
                        .map_err(|err| Error::io(self.join(&name), err))?;
                    loosened.push(self.join(&name));
                }
                Kind::Dir if subdirs.contains(&name.as_str()) => {
                    if let Some(d) = self.subdir(&name)? {
                        loosened.extend(d.tighten(&[])?);
                    }
                }
                _ => {}
            }
        }
        Ok(loosened)
    }
}

fn clear_nonblock(f: &File) -> std::io::Result<()> {
    // SAFETY: fcntl on a live descriptor.
    let flags = cvt(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) })?;
    cvt(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) })?;
    Ok(())
}

/// Overwrite an open file with zeros from the start and sync it (before it
/// is replaced or unlinked), so template ciphertext does not linger in
/// freed blocks. `path` only names it in errors.
pub(crate) fn shred_open(f: &mut File, path: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    f.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n]).map_err(|e| Error::io(path, e))?;
        left -= n as u64;
    }
    f.sync_all().map_err(|e| Error::io(path, e))
}

fn read_all_bounded(f: File, path: &Path, max: u64) -> Result<Vec<u8>> {
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > max {
        return Err(Error::InputTooLarge { path: path.to_path_buf(), limit: max });
    }
    let mut out = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut out).map_err(|e| Error::io(path, e))?;
    if out.len() as u64 > max {
        return Err(Error::InputTooLarge { path: path.to_path_buf(), limit: max });
    }
    Ok(out)
}

/// Open a file the user named for reading: symlinks are followed (the user
/// chose the path) but the result must be a regular file; a FIFO, device,
/// socket or directory is refused before anything can block.
pub fn open_input(path: &Path) -> Result<File> {
    let c = cstr(path.as_os_str()).map_err(|e| Error::io(path, e))?;
    // SAFETY: c is NUL-terminated; the fd is owned by the File below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY) };
    let fd = cvt(fd).map_err(|e| Error::io(path, e))?;
    // SAFETY: fd was just returned by open.
    let f = unsafe { File::from_raw_fd(fd) };
    let e = entry_of(&fstat_fd(f.as_raw_fd()).map_err(|e| Error::io(path, e))?);
    if e.kind != Kind::File {
        return Err(unsafe_path(path.to_path_buf(), format!("is {}, not a regular file", e.kind.describe())));
    }
    clear_nonblock(&f).map_err(|e| Error::io(path, e))?;
    Ok(f)
}

/// Open a file inside a gallery by path for reading (the last component is
/// never followed if it is a link; it must be a regular file). For code that
/// holds paths of files in a directory already checked with [`Dir`].
pub(crate) fn open_read_nofollow(path: &Path) -> std::io::Result<File> {
    open_nofollow(path, false)
}

/// [`open_read_nofollow`] for writing: also refuses a file with several links.
pub(crate) fn open_write_nofollow(path: &Path) -> std::io::Result<File> {
    open_nofollow(path, true)
}

fn open_nofollow(path: &Path, write: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let e = entry_of(&fstat_fd(f.as_raw_fd())?);
    if e.kind != Kind::File {
        return Err(std::io::Error::other(format!("is {}, not a regular file", e.kind.describe())));
    }
    if write && e.nlink > 1 {
        return Err(std::io::Error::other(format!("has {} hard links; facematch never writes such a file", e.nlink)));
    }
    clear_nonblock(&f)?;
    Ok(f)
}

/// Read a whole file the user named, refusing non-regular files (see
/// [`open_input`]) and files larger than `max` bytes.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    read_all_bounded(open_input(path)?, path, max)
}

/// Create a new file the user named for output, mode 0600, failing if
/// anything (a link included) already has the name.
pub fn create_output(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    // SAFETY: fchmod on the descriptor just created.
    cvt(unsafe { libc::fchmod(f.as_raw_fd(), FILE_MODE as libc::mode_t) }).map_err(|e| Error::io(path, e))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn links_and_non_regular_files_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("victim");
        std::fs::write(&outside, b"precious").unwrap();
        let g = t.path().join("g");
        let d = Dir::create_or_open(&g).unwrap();
        std::os::unix::fs::symlink(&outside, g.join("link")).unwrap();
        std::fs::hard_link(&outside, g.join("hard")).unwrap();
        assert!(matches!(d.open_write("link"), Err(Error::UnsafePath { .. })));
        assert!(matches!(d.open_read("link"), Err(Error::UnsafePath { .. })));
        assert!(matches!(d.open_write("hard"), Err(Error::UnsafePath { .. })));
        assert!(matches!(d.shred_remove("hard"), Err(Error::UnsafePath { .. })));
        assert!(matches!(d.create_new("link"), Err(Error::UnsafePath { .. })));
        // A link at the temporary name is unlinked, not followed.
        std::os::unix::fs::symlink(&outside, g.join("x.tmp")).unwrap();
        d.write_atomic("x", b"new", true).unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        assert_eq!(std::fs::read(g.join("x")).unwrap(), b"new");
        assert_eq!(std::fs::metadata(g.join("x")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&g).unwrap().permissions().mode() & 0o777, 0o700);
        // A link in place of a subdirectory.
        std::os::unix::fs::symlink(t.path(), g.join("sub")).unwrap();
        assert!(matches!(d.subdir("sub"), Err(Error::UnsafePath { .. })));
        assert_eq!(d.list().unwrap(), vec!["hard", "link", "sub", "x"]);
    }

    #[test]
    fn fifo_and_devices_are_refused_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: c is NUL-terminated.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(read_bounded(&fifo, 100), Err(Error::UnsafePath { .. })));
        assert!(matches!(read_bounded(Path::new("/dev/zero"), 100), Err(Error::UnsafePath { .. })));
        let d = Dir::open(t.path()).unwrap();
        assert!(matches!(d.open_read("fifo"), Err(Error::UnsafePath { .. })));
        let big = t.path().join("big");
        std::fs::write(&big, vec![1u8; 101]).unwrap();
        assert!(matches!(read_bounded(&big, 100), Err(Error::InputTooLarge { .. })));
        assert_eq!(read_bounded(&big, 101).unwrap().len(), 101);
    }

    #[test]
    fn tighten_takes_loose_modes_down() {
        let t = tempfile::tempdir().unwrap();
        let g = t.path().join("g");
        std::fs::create_dir(&g).unwrap();
        std::fs::set_permissions(&g, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(g.join("f"), b"x").unwrap();
        std::fs::set_permissions(g.join("f"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::create_dir(g.join("audit")).unwrap();
        std::fs::write(g.join("audit/seg"), b"x").unwrap();
        std::fs::set_permissions(g.join("audit/seg"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let d = Dir::open(&g).unwrap();
        let changed = d.tighten(&["audit"]).unwrap();
        assert_eq!(changed.len(), 4);
        for p in [g.clone(), g.join("audit")] {
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o700, "{p:?}");
        }
        for p in [g.join("f"), g.join("audit/seg")] {
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600, "{p:?}");
        }
    }
}
