//! The GPU fast tier (`device=cuda[:N]`, with the `cuda` feature): each layer's PQ key codes and
//! codebooks live in GPU memory; for every one-token decode step the GPU builds the query
//! tables, scores the codes, takes the softmax and selects the tokens (kernels/hc.cu), and only
//! the selected indices and probabilities come back to the host, where the values (host tier)
//! are summed by the op's threads, as the paper does.
//!
//! The host keeps its own copy of the codes (the CPU tier's store): keys are encoded there,
//! the new codes are copied to the GPU once per ubatch ([`Tier::sync_layer`]), and state
//! save/load and prompt processing (several tokens a step) run on the host as without a GPU.
//!
//! Without the feature, or without a driver or device at run time, [`open`] says why in one
//! log line and the CPU tier serves. [`layout`] and [`select`] are the host-side twins of the
//! kernels: they run everywhere and are what the tests and the GPU check compare against.

pub mod layout;
pub mod select;

#[cfg(feature = "cuda")]
mod cuda;

use crate::attention::Scale;
#[cfg(feature = "cuda")]
use crate::error::Error;
use crate::error::Result;
use crate::keys::KeyStore;
use crate::options::{Device, KeyCodec, Options};
use layout::Layout;
use select::Selection;

/// The kernels' source, compiled by NVRTC when a GPU tier opens.
pub const KERNELS: &str = include_str!("../../kernels/hc.cu");

/// What one layer's GPU tier holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    pub layout: Layout,
    pub dk: usize,
    pub pq_dim: usize,
    pub centroids: usize,
    /// codebooks of the layer: 1 (layer or model scope) or dk / pq_dim (group scope)
    pub books: usize,
    pub n_head: usize,
}

/// One decode step of one layer, as the GPU tier needs it.
pub struct Step<'a> {
    /// every query head's query, n_head rows of dk, rounded to f16 as the CPU tier does
    pub q: &'a [f32],
    /// the visible cells, in order; logits and selections index this list
    pub cells: &'a [(i32, u32)],
    /// (head * n + j, logit) for visible cells whose keys are exact
    pub overrides: &'a [(u32, f32)],
    /// one more logit per head that takes mass but has no value
    pub sinks: Option<&'a [f32]>,
    pub scale: Scale,
    pub tau: f32,
    pub layer_k: bool,
}

/// Why `device=cuda` cannot be served by a GPU tier for these options, if it cannot.
fn unsupported(o: &Options) -> Option<String> {
    match o.keys {
        KeyCodec::Pq { .. } if o.tau > 0.0 => None,
        KeyCodec::Pq { .. } => Some("tau must be above 0".into()),
        KeyCodec::F16 => Some("keys=f16 has no codes to keep on the GPU (the GPU tier serves keys=pq)".into()),
        KeyCodec::Int { .. } => Some("the GPU tier serves keys=pq, not int8/int4".into()),
    }
}

/// The GPU tier that `options.device` asks for, or None (with one log line saying why) when
/// the CPU tier serves instead. An error only when a GPU tier was possible but does not fit.
pub fn open(o: &Options, shapes: &[Option<LayerShape>]) -> Result<Option<Tier>> {
    let Device::Cuda(ordinal) = o.device else { return Ok(None) };
    if let Some(why) = unsupported(o) {
        eprintln!("hc: device=cuda:{ordinal}: {why}; the CPU tier is used");
        return Ok(None);
    }
    open_cuda(ordinal, shapes)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize, _: &[Option<LayerShape>]) -> Result<Option<Tier>> {
    eprintln!("hc: device=cuda:{ordinal}: this build has no GPU tier (build with --features cuda); the CPU tier is used");
    Ok(None)
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize, shapes: &[Option<LayerShape>]) -> Result<Option<Tier>> {
    match cuda::Tier::open(ordinal, shapes)? {
        Ok(t) => {
            eprintln!("hc: GPU tier on {}", t.describe());
            Ok(Some(Tier(t)))
        }
        Err(why) => {
            eprintln!("hc: device=cuda:{ordinal}: {why}; the CPU tier is used");
            Ok(None)
        }
    }
}

/// Whether this build can open a GPU tier at all (the `cuda` feature).
pub const BUILT: bool = cfg!(feature = "cuda");

#[cfg(not(feature = "cuda"))]
enum Never {}

/// An open GPU tier: one per backend (context), with its own stream and buffers.
pub struct Tier(
    #[cfg(feature = "cuda")] cuda::Tier,
    #[cfg(not(feature = "cuda"))] Never,
);

impl Tier {
    /// Bytes of GPU memory held: codes, codebooks and the decode scratch.
    pub fn bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        return self.0.bytes();
        #[cfg(not(feature = "cuda"))]
        match self.0 {}
    }

    /// Copies layer `layer`'s new codes (and its codebooks, when new) to the GPU.
    pub fn sync_layer(&mut self, layer: usize, keys: &mut KeyStore) -> Result<()> {
        #[cfg(feature = "cuda")]
        return self.0.sync_layer(layer, keys).map_err(|e| Error::Request(format!("GPU tier, layer {layer}: {e}")));
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (layer, keys);
            match self.0 {}
        }
    }

    /// Whether layer `layer` can be decoded on the GPU now (its codebooks are there).
    pub fn ready(&self, layer: usize) -> bool {
        #[cfg(feature = "cuda")]
        return self.0.ready(layer);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = layer;
            match self.0 {}
        }
    }

    /// Scores, softmax and selection of one decode step of layer `layer` on the GPU; `out`
    /// receives what came back, checked.
    pub fn decode(&self, layer: usize, step: &Step, out: &mut Selection) -> Result<()> {
        #[cfg(feature = "cuda")]
        return self.0.decode(layer, step, out).map_err(|e| Error::Request(format!("GPU tier, layer {layer}: {e}")));
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (layer, step, out);
            match self.0 {}
        }
    }

    /// Runs the kernels on generated inputs and compares them with the host references (the
    /// GPU check, `hcattn gpu-check`).
    #[cfg(feature = "cuda")]
    pub fn self_check(ordinal: usize) -> std::result::Result<Vec<String>, String> {
        cuda::self_check(ordinal)
    }
}

/// The shape of each layer's GPU tier (None for layers without PQ codes).
pub fn shapes(o: &Options, layers: &[crate::backend::LayerDesc], n_cells: usize) -> Vec<Option<LayerShape>> {
    layers
        .iter()
        .map(|d| match o.keys {
            KeyCodec::Pq { dim, centroids, scope } if d.dk % dim == 0 => Some(LayerShape {
                layout: Layout::new(centroids, n_cells, d.n_head_kv, d.dk / dim),
                dk: d.dk,
                pq_dim: dim,
                centroids,
                books: scope.books_per_layer(d.dk, dim),
                n_head: d.n_head,
            }),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_cuda_without_a_gpu_tier_falls_back_for_the_reasons_it_gives() {
        let o = Options::parse("preset=cpu12.5,device=cuda:1").unwrap();
        assert_eq!(o.device, Device::Cuda(1));
        assert!(unsupported(&o).is_none());
        let o = Options::parse("preset=50,device=cuda").unwrap();
        assert!(unsupported(&o).unwrap().contains("keys=pq"));
        let o = Options::parse("keys=int4,tau=0.9,device=cuda").unwrap();
        assert!(unsupported(&o).unwrap().contains("int8/int4"));
        // device=cpu never opens one
        assert!(open(&Options::parse("preset=cpu12.5").unwrap(), &[]).unwrap().is_none());
    }

    #[test]
    fn shapes_follow_the_options() {
        let d = crate::backend::LayerDesc { il: 0, n_head: 9, n_head_kv: 3, dk: 64, dv: 64, window: crate::attention::Window::None };
        let s = shapes(&Options::parse("preset=cpu12.5").unwrap(), std::slice::from_ref(&d), 100);
        let s = s[0].unwrap();
        assert_eq!((s.layout.bits, s.layout.per_head, s.books, s.pq_dim), (4, 64, 64, 1));
        assert_eq!(s.layout.bytes(), 100 * 3 * 32);
        let s = shapes(&Options::parse("preset=12.5").unwrap(), std::slice::from_ref(&d), 100)[0].unwrap();
        assert_eq!((s.layout.bits, s.layout.per_head, s.books), (16, 16, 1));
        assert!(shapes(&Options::parse("preset=50").unwrap(), &[d], 100)[0].is_none());
    }

    #[test]
    fn the_kernels_name_every_function_the_tier_launches() {
        for f in ["hc_pack", "hc_encode", "hc_tables", "hc_score", "hc_override", "hc_softmax", "hc_cut", "hc_layer_k", "hc_compact"] {
            assert!(KERNELS.contains(&format!("extern \"C\" __global__ void {f}(")), "{f}");
        }
    }
}
