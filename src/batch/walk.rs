//! Image files under directories, walked lazily in a reproducible order.

use std::path::{Path, PathBuf};

/// File extensions taken as images when walking a directory (compared
/// without regard to case).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff"];

/// Whether `path` has one of [`IMAGE_EXTENSIONS`] (any case).
///
/// ```
/// use facematch::batch::is_image_path;
/// assert!(is_image_path("a/B.JPG".as_ref()));
/// assert!(!is_image_path("notes.txt".as_ref()));
/// ```
pub fn is_image_path(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// The images named by `roots`, in order: a file is yielded as it is
/// (whatever its extension: it was named), a directory is walked
/// recursively, entries sorted by name at every level, keeping files with an
/// image extension. Only one directory listing is held at a time per level,
/// so the walk's memory follows the tree's depth and widest directory, not
/// the number of files. A directory that cannot be read is yielded as a path
/// itself, so that the job reports it as a failed input instead of skipping
/// it silently.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::create_dir(dir.path().join("b")).unwrap();
/// for f in ["b/2.PNG", "a.jpg", "notes.txt"] {
///     std::fs::write(dir.path().join(f), b"").unwrap();
/// }
/// let found: Vec<_> = facematch::batch::walk_images([dir.path().to_path_buf()])
///     .map(|p| p.strip_prefix(dir.path()).unwrap().to_path_buf())
///     .collect();
/// assert_eq!(found, [std::path::Path::new("a.jpg"), "b/2.PNG".as_ref()]);
/// ```
pub fn walk_images<I: IntoIterator<Item = PathBuf>>(roots: I) -> WalkImages<I::IntoIter> {
    WalkImages { roots: roots.into_iter(), stack: Vec::new() }
}

/// Iterator returned by [`walk_images`].
#[derive(Debug)]
pub struct WalkImages<I> {
    roots: I,
    /// Directory listings being walked: remaining entries, reversed (next = last).
    stack: Vec<Vec<(PathBuf, bool)>>,
}

impl<I: Iterator<Item = PathBuf>> WalkImages<I> {
    /// Push the sorted listing of `dir`; `Err` yields the directory itself.
    fn enter(&mut self, dir: PathBuf) -> Option<PathBuf> {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(_) => return Some(dir),
        };
        let mut entries: Vec<(PathBuf, bool)> = Vec::new();
        for e in rd {
            let Ok(e) = e else { continue };
            let path = e.path();
            // Follow symbolic links like a user naming the target would.
            let is_dir = std::fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
            if is_dir || is_image_path(&path) {
                entries.push((path, is_dir));
            }
        }
        entries.sort_by(|a, b| b.0.cmp(&a.0));
        self.stack.push(entries);
        None
    }
}

impl<I: Iterator<Item = PathBuf>> Iterator for WalkImages<I> {
    type Item = PathBuf;

    fn next(&mut self) -> Option<PathBuf> {
        loop {
            if let Some(top) = self.stack.last_mut() {
                match top.pop() {
                    Some((p, true)) => {
                        if self.stack.len() > 256 {
                            return Some(p); // a symlink loop: report it as an input that fails
                        }
                        if let Some(bad) = self.enter(p) {
                            return Some(bad);
                        }
                    }
                    Some((p, false)) => return Some(p),
                    None => {
                        self.stack.pop();
                    }
                }
                continue;
            }
            let root = self.roots.next()?;
            if root.is_dir() {
                if let Some(bad) = self.enter(root) {
                    return Some(bad);
                }
            } else {
                return Some(root);
            }
        }
    }
}
