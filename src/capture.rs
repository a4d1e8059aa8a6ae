//! Key capture for calibration: while a [`Capture`] is alive, every backend in this process
//! records the post-RoPE keys its store op receives, per layer and position. `hcattn
//! calibrate` runs a text through an exact hc context with a capture open and fits codebooks
//! on what it collected.
//!
//! Process-wide because llama.cpp creates the backend inside the context, out of the tool's
//! reach; a flag read with one relaxed load keeps the store op's cost nil when nobody captures.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::calibration::Identity;
use crate::error::{Error, Result};

static ACTIVE: AtomicBool = AtomicBool::new(false);

/// layer -> (position, keys of every KV head)
type Sink = BTreeMap<usize, Vec<(i32, Vec<f32>)>>;
static SINK: Mutex<Sink> = Mutex::new(BTreeMap::new());
/// the identity of the model of the last backend created during the capture
static MODEL: Mutex<Option<std::result::Result<Identity, String>>> = Mutex::new(None);

/// What a capture collected.
pub struct Captured {
    /// per layer: the keys of every KV head, one row per token, by position
    pub keys: BTreeMap<usize, Vec<Vec<f32>>>,
    /// the model whose backend recorded them (None: no backend was created)
    pub model: Option<std::result::Result<Identity, String>>,
}

/// An open capture; at most one per process.
pub struct Capture(());

impl Capture {
    pub fn start() -> Result<Capture> {
        if ACTIVE.swap(true, Ordering::SeqCst) {
            return Err(Error::Request("a key capture is already open in this process".into()));
        }
        sink().clear();
        *lock(&MODEL) = None;
        Ok(Capture(()))
    }

    /// Stop capturing and return each layer's keys ordered by position (ties, which only
    /// several sequences sharing positions produce, by value), so the result does not depend
    /// on how the store op split its work between threads.
    pub fn finish(self) -> Captured {
        ACTIVE.store(false, Ordering::SeqCst);
        let all = std::mem::take(&mut *sink());
        let keys = all
            .into_iter()
            .map(|(il, mut rows)| {
                rows.sort_by(|a, b| {
                    a.0.cmp(&b.0).then_with(|| a.1.iter().map(|x| x.to_bits()).cmp(b.1.iter().map(|x| x.to_bits())))
                });
                (il, rows.into_iter().map(|r| r.1).collect())
            })
            .collect();
        Captured { keys, model: lock(&MODEL).take() }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        ACTIVE.store(false, Ordering::SeqCst);
    }
}

fn lock<T>(m: &'static Mutex<T>) -> std::sync::MutexGuard<'static, T> {
    // a panic while holding the lock leaves plain data behind; keep using it
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn sink() -> std::sync::MutexGuard<'static, Sink> {
    lock(&SINK)
}

#[inline]
pub(crate) fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

pub(crate) fn record(il: usize, pos: i32, keys: &[f32]) {
    if active() {
        sink().entry(il).or_default().push((pos, keys.to_vec()));
    }
}

/// Called by a backend at creation while a capture is open.
pub(crate) fn record_model(id: std::result::Result<Identity, String>) {
    if active() {
        *lock(&MODEL) = Some(id);
    }
}
