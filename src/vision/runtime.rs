//! Loading ONNX Runtime once per process, and finding the files the spine needs.
//!
//! ONNX Runtime is loaded dynamically (`ort` with `load-dynamic`): nothing is
//! downloaded at build time. [`environment`] resolves the shared library, loads
//! it and builds the one `ort` environment of the process (ORT allows only one,
//! ever; tests run in threads, so it lives in a `OnceLock`).
//!
//! Library resolution order (first that exists wins):
//! 1. an explicit path (from [`RuntimeConfig::ort_library`]);
//! 2. the environment variable `ORT_DYLIB_PATH`;
//! 3. `.ort/libonnxruntime.so` under the current directory;
//! 4. `.ort/libonnxruntime.so` next to the executable or in any of its ancestors
//!    (so `target/release/facematch` finds the repository's copy from anywhere);
//! 5. `.ort/libonnxruntime.so` under the crate directory known at compile time.
//!
//! Model files named by a relative path are found the same way, by [`resolve_asset`].

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// File name of the ONNX Runtime shared library on this platform.
#[cfg(target_os = "windows")]
pub const ORT_LIBRARY_NAME: &str = "onnxruntime.dll";
/// File name of the ONNX Runtime shared library on this platform.
#[cfg(target_os = "macos")]
pub const ORT_LIBRARY_NAME: &str = "libonnxruntime.dylib";
/// File name of the ONNX Runtime shared library on this platform.
#[cfg(not(any(target_os = "windows", target_os = "macos")))]
pub const ORT_LIBRARY_NAME: &str = "libonnxruntime.so";

/// Directory (relative to a search root) where set-up puts the ORT library.
pub const ORT_DIR: &str = ".ort";

/// How to find ONNX Runtime.
///
/// ```
/// let cfg = facematch::runtime::RuntimeConfig::default();
/// assert!(cfg.ort_library.is_none());
/// cfg.validate().unwrap();
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Explicit path to `libonnxruntime.so`; `None` = search (see the module docs).
    pub ort_library: Option<PathBuf>,
}

impl RuntimeConfig {
    /// Check the configuration (an explicit library path must not be empty).
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = &self.ort_library {
            if p.as_os_str().is_empty() {
                return Err(Error::config("runtime.ort_library", "empty path"));
            }
        }
        Ok(())
    }
}

/// The process-wide ONNX Runtime: the loaded library and its one environment.
pub struct Runtime {
    library: PathBuf,
    env: ort::environment::Environment,
}

impl Runtime {
    /// Path of the shared library that was loaded.
    pub fn library(&self) -> &Path {
        &self.library
    }
    /// The `ort` environment every session of the process is built in.
    pub fn env(&self) -> &ort::environment::Environment {
        &self.env
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("library", &self.library).finish_non_exhaustive()
    }
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Roots searched for relative assets, in order: current directory, the
/// executable's directory and its ancestors, the crate directory at compile time.
pub fn search_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        let exe = exe.canonicalize().unwrap_or(exe);
        let mut dir = exe.parent();
        while let Some(d) = dir {
            roots.push(d.to_path_buf());
            dir = d.parent();
        }
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let mut seen = std::collections::HashSet::new();
    roots.retain(|r| seen.insert(r.clone()));
    roots
}

/// Find an asset: an absolute path is returned if it exists; a relative path is
/// tried against each of [`search_roots`]. `None` if nothing exists.
///
/// ```
/// use std::path::Path;
/// // Cargo.toml exists under the crate directory, found whatever the current directory.
/// assert!(facematch::runtime::resolve_asset(Path::new("Cargo.toml")).is_some());
/// assert!(facematch::runtime::resolve_asset(Path::new("no/such/file.onnx")).is_none());
/// ```
pub fn resolve_asset(path: &Path) -> Option<PathBuf> {
    if path.is_absolute() {
        return path.is_file().then(|| path.to_path_buf());
    }
    search_roots().into_iter().map(|r| r.join(path)).find(|p| p.is_file())
}

/// The candidate library paths in resolution order (module docs), without checking existence.
pub fn library_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        if !p.is_empty() {
            out.push(PathBuf::from(p));
        }
    }
    for root in search_roots() {
        out.push(root.join(ORT_DIR).join(ORT_LIBRARY_NAME));
    }
    out
}

/// Resolve the ONNX Runtime library path (see the module docs for the order).
///
/// An explicit path that does not exist is an error (it is not silently
/// replaced by another copy).
pub fn resolve_library(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(Error::Model {
                model: "onnxruntime".into(),
                reason: format!("configured ONNX Runtime library {} does not exist", p.display()),
            })
        };
    }
    let candidates = library_candidates(None);
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| Error::Model {
        model: "onnxruntime".into(),
        reason: format!(
            "ONNX Runtime library not found (run scripts/setup.sh, set ORT_DYLIB_PATH, or set runtime.ort_library); looked in: {}",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    })
}

/// The process-wide runtime, loading ONNX Runtime on first use.
///
/// Only one environment can exist per process: the first successful call wins,
/// later calls return it (a different explicit path is then ignored with a warning).
pub fn runtime(config: &RuntimeConfig) -> Result<&'static Runtime> {
    if let Some(rt) = RUNTIME.get() {
        warn_if_different(rt, config);
        return Ok(rt);
    }
    let _guard = INIT_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(rt) = RUNTIME.get() {
        warn_if_different(rt, config);
        return Ok(rt);
    }
    let library = resolve_library(config.ort_library.as_deref())?;
    let model_err = |reason: String| Error::Model { model: "onnxruntime".into(), reason };
    let builder = ort::init_from(&library).map_err(|e| model_err(format!("cannot load {}: {e}", library.display())))?;
    let env = builder
        .with_name("facematch")
        .with_telemetry(false)
        .build()
        .map_err(|e| model_err(format!("cannot create the ONNX Runtime environment: {e}")))?;
    tracing::info!(library = %library.display(), "ONNX Runtime loaded");
    Ok(RUNTIME.get_or_init(|| Runtime { library, env }))
}

/// Shorthand for [`runtime`] with the default search.
pub fn environment() -> Result<&'static ort::environment::Environment> {
    runtime(&RuntimeConfig::default()).map(Runtime::env)
}

fn warn_if_different(rt: &Runtime, config: &RuntimeConfig) {
    if let Some(p) = &config.ort_library {
        let same = p.canonicalize().ok() == rt.library.canonicalize().ok();
        if !same {
            tracing::warn!(
                requested = %p.display(),
                loaded = %rt.library.display(),
                "ONNX Runtime is already loaded in this process; the requested library is ignored"
            );
        }
    }
}

/// Pixel channel order a model expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    /// Red, green, blue.
    Rgb,
    /// Blue, green, red (OpenCV's native order).
    Bgr,
}

/// Numeric precision of a model file: the f32 file set-up prepares, or the
/// int8 (QDQ, per-channel weights) one it quantises from it, calibrated on
/// faces (`scripts/quantize_models.py`, figures in `docs/MODELS.md`).
///
/// ```
/// use facematch::runtime::Precision;
/// assert_eq!(serde_json::to_string(&Precision::Int8).unwrap(), "\"int8\"");
/// assert_eq!("f32".parse::<Precision>().unwrap(), Precision::F32);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floating point (the reference).
    #[default]
    F32,
    /// 8-bit integer weights and activations (about twice as fast on CPUs with VNNI).
    Int8,
}

impl Precision {
    /// `"f32"` or `"int8"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "int8" => Ok(Precision::Int8),
            other => Err(Error::config("precision", format!("{other:?} is not f32 or int8"))),
        }
    }
}

/// Memory layout of an image input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `[N, C, H, W]`.
    Nchw,
    /// `[N, H, W, C]`.
    Nhwc,
}

/// How an image becomes a model's input tensor: name, size, layout, channel
/// order and scaling `value = (pixel - mean[c]) / std[c]` with pixels in 0..255.
///
/// ```
/// use facematch::runtime::{ChannelOrder, ImageInput, Layout};
/// let spec = ImageInput { name: "data".into(), width: 112, height: 112, layout: Layout::Nchw,
///     channels: ChannelOrder::Rgb, mean: [127.5; 3], std: [127.5; 3] };
/// spec.validate("recognizer.input").unwrap();
/// assert_eq!(spec.scale(2, 255), 1.0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInput {
    /// Input tensor name.
    pub name: String,
    /// Input width in pixels.
    pub width: u32,
    /// Input height in pixels.
    pub height: u32,
    /// Tensor layout.
    pub layout: Layout,
    /// Channel order.
    pub channels: ChannelOrder,
    /// Per-channel mean subtracted, in the model's channel order.
    pub mean: [f32; 3],
    /// Per-channel divisor, in the model's channel order.
    pub std: [f32; 3],
}

impl ImageInput {
    /// Check names, sizes and scaling.
    pub fn validate(&self, field: &str) -> Result<()> {
        if self.name.is_empty() {
            return Err(Error::config(format!("{field}.name"), "empty"));
        }
        if self.width == 0 || self.height == 0 || self.width > 8192 || self.height > 8192 {
            return Err(Error::config(format!("{field}.width/height"), "must be in 1..=8192"));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s == 0.0) || self.mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::config(format!("{field}.mean/std"), "must be finite, std non-zero"));
        }
        Ok(())
    }

    /// Scaled value of an 8-bit pixel component for model channel `c` (0..3).
    #[inline]
    pub fn scale(&self, c: usize, v: u8) -> f32 {
        (f32::from(v) - self.mean[c]) / self.std[c]
    }

    /// Index of the model's channel `c` in an RGB pixel.
    #[inline]
    pub fn rgb_index(&self, c: usize) -> usize {
        match self.channels {
            ChannelOrder::Rgb => c,
            ChannelOrder::Bgr => 2 - c,
        }
    }

    /// Number of f32 values in one image of the tensor.
    pub fn plane_len(&self) -> usize {
        self.width as usize * self.height as usize * 3
    }

    /// Tensor shape for a batch of `n` images.
    pub fn shape(&self, n: usize) -> [usize; 4] {
        let (h, w) = (self.height as usize, self.width as usize);
        match self.layout {
            Layout::Nchw => [n, 3, h, w],
            Layout::Nhwc => [n, h, w, 3],
        }
    }

    /// Offset of (channel `c`, row `y`, column `x`) within one image of the tensor.
    #[inline]
    pub fn offset(&self, c: usize, y: usize, x: usize) -> usize {
        let (h, w) = (self.height as usize, self.width as usize);
        match self.layout {
            Layout::Nchw => (c * h + y) * w + x,
            Layout::Nhwc => (y * w + x) * 3 + c,
        }
    }
}

/// Settings for the ONNX Runtime sessions of one model.
///
/// ```
/// let s = facematch::runtime::SessionSettings::default();
/// assert_eq!(s.intra_threads, 1);
/// s.validate("detector.session").unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    /// Threads ORT uses inside one inference. On small machines 1 is fastest:
    /// the pipeline parallelises across images and faces instead.
    pub intra_threads: usize,
    /// Number of sessions kept (ORT's `run` needs exclusive access); 0 = one
    /// per available core.
    pub pool_size: usize,
    /// ONNX Runtime graph optimisation level.
    pub optimization: GraphOptimization,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings { intra_threads: 1, pool_size: 0, optimization: GraphOptimization::All }
    }
}

/// ONNX Runtime graph optimisation levels (see ORT's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GraphOptimization {
    /// No graph rewrites.
    Disable,
    /// Constant folding, redundant node elimination.
    Basic,
    /// Plus node fusions.
    Extended,
    /// Plus memory-layout (NCHWc) rewrites.
    Layout,
    /// Everything.
    All,
}

impl From<GraphOptimization> for ort::session::builder::GraphOptimizationLevel {
    fn from(g: GraphOptimization) -> Self {
        use ort::session::builder::GraphOptimizationLevel as L;
        match g {
            GraphOptimization::Disable => L::Disable,
            GraphOptimization::Basic => L::Level1,
            GraphOptimization::Extended => L::Level2,
            GraphOptimization::Layout => L::Level3,
            GraphOptimization::All => L::All,
        }
    }
}

impl SessionSettings {
    /// `intra_threads` in 1..=256, `pool_size` <= 256.
    pub fn validate(&self, field: &str) -> Result<()> {
        if self.intra_threads == 0 || self.intra_threads > 256 {
            return Err(Error::config(format!("{field}.intra_threads"), "must be in 1..=256"));
        }
        if self.pool_size > 256 {
            return Err(Error::config(format!("{field}.pool_size"), "must be <= 256"));
        }
        Ok(())
    }

    /// The pool size to use (`pool_size`, or the number of cores when 0).
    pub fn effective_pool_size(&self) -> usize {
        if self.pool_size > 0 {
            self.pool_size
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }
}

/// A few sessions of one model, each behind a mutex: `ort`'s `Session::run`
/// takes `&mut self`, so a pool makes the model usable from many threads
/// (`Send + Sync`) without serialising every call.
pub struct SessionPool {
    model: String,
    sessions: Vec<parking_lot::Mutex<ort::session::Session>>,
    next: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for SessionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPool").field("model", &self.model).field("sessions", &self.sessions.len()).finish()
    }
}

impl SessionPool {
    /// Resolve a model file (`what` = "detector" / "recognizer", the config section that names it),
    /// load it, and check that it has an input called `input`.
    pub fn load_model(rt: &Runtime, model: &Path, what: &str, settings: &SessionSettings, input: &str) -> Result<Self> {
        let path = resolve_asset(model).ok_or_else(|| Error::Model {
            model: model.display().to_string(),
            reason: format!("{what} model not found (run scripts/setup.sh or set {what}.model)"),
        })?;
        let pool = SessionPool::load(rt, &path, settings)?;
        let inputs = pool.input_names();
        if !inputs.iter().any(|n| n == input) {
            return Err(Error::Model {
                model: pool.model().to_string(),
                reason: format!("no input named {input:?} (model inputs: {inputs:?})"),
            });
        }
        Ok(pool)
    }

    /// Load `path` into `settings.effective_pool_size()` sessions, created
    /// in parallel (each one parses and optimises the graph: ~0.1 s apiece,
    /// most of a one-image command's start-up when done one after another).
    pub fn load(rt: &Runtime, path: &Path, settings: &SessionSettings) -> Result<Self> {
        let model = path.display().to_string();
        let n = settings.effective_pool_size().max(1);
        let one = || -> Result<ort::session::Session> {
            let err = |reason: String| Error::Model { model: model.clone(), reason };
            let opts = |e: ort::Error| err(format!("session options: {e}"));
            let builder = ort::session::Session::builder(rt.env()).map_err(|e| err(e.to_string()))?;
            let builder = builder.with_intra_threads(settings.intra_threads).map_err(|e| opts(e.into()))?;
            let builder = builder.with_inter_threads(1).map_err(|e| opts(e.into()))?;
            let mut builder = builder.with_optimization_level(settings.optimization.into()).map_err(|e| opts(e.into()))?;
            builder.commit_from_file(path).map_err(|e| err(format!("cannot load model: {e}")))
        };
        let sessions = std::thread::scope(|s| {
            let others: Vec<_> = (1..n).map(|_| s.spawn(one)).collect();
            let first = one();
            std::iter::once(first)
                .chain(others.into_iter().map(|h| {
                    h.join().unwrap_or_else(|_| Err(Error::Model { model: model.clone(), reason: "session creation panicked".into() }))
                }))
                .map(|r| r.map(parking_lot::Mutex::new))
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(SessionPool { model, sessions, next: std::sync::atomic::AtomicUsize::new(0) })
    }

    /// Number of sessions in the pool (at least 1).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Never true: a pool holds at least one session.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Model file this pool was loaded from (for error messages).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Names of the model's inputs.
    pub fn input_names(&self) -> Vec<String> {
        self.sessions[0].lock().inputs().iter().map(|o| o.name().to_string()).collect()
    }

    /// Names of the model's outputs.
    pub fn output_names(&self) -> Vec<String> {
        self.sessions[0].lock().outputs().iter().map(|o| o.name().to_string()).collect()
    }

    /// Run `f` with exclusive use of one session: a free one if any, else wait.
    pub fn with<R>(&self, f: impl FnOnce(&mut ort::session::Session) -> Result<R>) -> Result<R> {
        let n = self.sessions.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
        for i in 0..n {
            if let Some(mut s) = self.sessions[(start + i) % n].try_lock() {
                return f(&mut s);
            }
        }
        let mut s = self.sessions[start].lock();
        f(&mut s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_missing_library_is_a_clear_error() {
        let err = resolve_library(Some(Path::new("/definitely/not/here/libonnxruntime.so"))).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Model { .. }), "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");
    }

    #[test]
    fn candidates_put_explicit_first_and_include_manifest_dir() {
        let c = library_candidates(Some(Path::new("/x/lib.so")));
        assert_eq!(c[0], PathBuf::from("/x/lib.so"));
        let in_crate = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(ORT_DIR).join(ORT_LIBRARY_NAME);
        assert!(c.contains(&in_crate), "{c:?}");
    }

    #[test]
    fn empty_explicit_path_is_invalid() {
        let cfg = RuntimeConfig { ort_library: Some(PathBuf::new()) };
        assert!(cfg.validate().is_err());
    }
}
