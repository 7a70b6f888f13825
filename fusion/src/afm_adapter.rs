//! The paper's vision-language adapter (AFM 2025 report): a transformer layer over the
//! encoder's output, a linear projection into the language model's width, a 3x3
//! convolution, and average pooling to a fixed grid of image tokens per tile (12x12 = 144 in
//! the paper). Our decisions where the report says no more:
//!
//! * the transformer layer is a pre-norm encoder block with global attention at the vision
//!   width (the encoder's own block type), run over registers and patches alike; the register
//!   tokens are then dropped, so the image tokens are the pooled patch grid;
//! * the convolution keeps the width (`text_hidden_size` in and out), padding 1, with bias;
//! * pooling is adaptive average pooling as `torch.nn.AdaptiveAvgPool2d`: output cell `i`
//!   averages input rows `floor(i*H/h) .. ceil((i+1)*H/h)` (and the same for columns), so any
//!   patch grid pools to the configured grid (42x42 -> 12x12 at 672 px with patch 16);
//! * optionally (`output_norm_eps` set), an RMSNorm with a learned gain over each pooled image
//!   token, as in the LM's own layers: `y = x / sqrt(mean(x^2) + eps) * out_norm.weight`. It
//!   pins the image tokens' scale near the LM's token embeddings (the shipped `afm-tiny`,
//!   trained without it, has image tokens of norm ~177 against ~3.2 for SmolLM2's word
//!   embeddings). Off in `afm-tiny`; the trained variant with it is described in `docs/afm-tiny-training.md`.
//!
//! Checkpoint layout (`adapter` object in `config.json`, tensors under `adapter.`):
//! `adapter.layer.{layer_norm1,layer_norm2}.{weight,bias}`,
//! `adapter.layer.self_attn.{q_proj,k_proj,v_proj,out_proj}.{weight,bias}`,
//! `adapter.layer.mlp.{fc1,fc2}.{weight,bias}` (SigLIP encoder-layer names),
//! `adapter.proj.weight (text_hidden, vision_hidden)`, `adapter.proj.bias (text_hidden)`,
//! `adapter.conv.weight (text_hidden, text_hidden, 3, 3)`, `adapter.conv.bias (text_hidden)`,
//! and with `output_norm_eps`, `adapter.out_norm.weight (text_hidden)`.

use crate::adapter::VisionAdapter;
use crate::error::{FusionError, Result};
use afm_vision::attention::Dense;
use afm_vision::vit::Block;
use afm_vision::weights::VisionWeights;
use afm_vision::{AttentionPattern, VisionConfig};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;

/// `adapter` in `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AfmAdapterConfig {
    pub vision_hidden_size: usize,
    pub text_hidden_size: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "act")]
    pub hidden_act: String,
    /// Output grid `[rows, cols]` of image tokens per tile (`[12, 12]` in the paper).
    pub pool: [usize; 2],
    /// RMSNorm epsilon of the optional output norm (module docs); absent: no output norm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_norm_eps: Option<f64>,
}

fn eps() -> f64 {
    1e-6
}
fn act() -> String {
    "gelu_pytorch_tanh".into()
}

impl AfmAdapterConfig {
    fn layer_config(&self) -> VisionConfig {
        VisionConfig {
            hidden_size: self.vision_hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: 1,
            num_attention_heads: self.num_attention_heads,
            num_channels: 3,
            image_size: 1,
            patch_size: 1,
            layer_norm_eps: self.layer_norm_eps,
            hidden_act: self.hidden_act.clone(),
            attention: AttentionPattern::Global,
            stem: None,
        }
    }
}

/// The paper's adapter (module docs).
pub struct AfmAdapter {
    cfg: AfmAdapterConfig,
    layer: Block,
    proj: Dense,
    conv_w: Tensor,
    conv_b: Tensor,
    /// `(eps, gain (text_hidden))` of the output RMSNorm.
    out_norm: Option<(f64, Tensor)>,
    /// Pooling matrices `(pool_h * pool_w, gh * gw)` per input grid.
    pools: Mutex<HashMap<(usize, usize), Tensor>>,
    fast: bool,
}

/// Row `i` of the result averages the inputs of output cell `i` of adaptive average pooling
/// from an `h x w` grid to `oh x ow`.
pub fn adaptive_pool_matrix(h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let bins = |n: usize, o: usize| -> Vec<(usize, usize)> {
        (0..o)
            .map(|i| (i * n / o, ((i + 1) * n).div_ceil(o)))
            .collect()
    };
    let (by, bx) = (bins(h, oh), bins(w, ow));
    let mut m = vec![0f32; oh * ow * h * w];
    for (i, &(y0, y1)) in by.iter().enumerate() {
        for (j, &(x0, x1)) in bx.iter().enumerate() {
            let wgt = 1.0 / ((y1 - y0) * (x1 - x0)) as f32;
            let row = &mut m[(i * ow + j) * h * w..(i * ow + j + 1) * h * w];
            for y in y0..y1 {
                for x in x0..x1 {
                    row[y * w + x] = wgt;
                }
            }
        }
    }
    m
}

impl AfmAdapter {
    /// Loads the adapter from tensors named as in the module docs.
    pub fn load(tensors: HashMap<String, Tensor>, cfg: AfmAdapterConfig) -> Result<Self> {
        if cfg.pool[0] == 0 || cfg.pool[1] == 0 {
            return Err(FusionError::config("adapter.pool", "must be > 0"));
        }
        let lc = cfg.layer_config();
        lc.validate()?;
        let w = VisionWeights::with_prefix(tensors, "adapter.");
        let (dv, dl) = (cfg.vision_hidden_size, cfg.text_hidden_size);
        Ok(Self {
            layer: Block::load(&w, "layer", &lc, None)?,
            proj: Dense::load(&w, "proj", dl, dv)?,
            conv_w: w.get("conv.weight", &[dl, dl, 3, 3])?,
            conv_b: w.get("conv.bias", &[dl])?.reshape((1, dl, 1, 1))?,
            out_norm: match cfg.output_norm_eps {
                Some(eps) if !(eps > 0.0 && eps.is_finite()) => {
                    return Err(FusionError::config(
                        "adapter.output_norm_eps",
                        "must be a positive number",
                    ))
                }
                Some(eps) => Some((eps, w.get("out_norm.weight", &[dl])?)),
                None => None,
            },
            pools: Mutex::new(HashMap::new()),
            fast: true,
            cfg,
        })
    }

    pub fn config(&self) -> &AfmAdapterConfig {
        &self.cfg
    }

    /// Fused inference kernels in the transformer layer (default) or differentiable ops.
    pub fn set_fast_kernels(&mut self, on: bool) {
        self.fast = on;
    }

    /// [`VisionAdapter::forward`], keeping every stage's output (diagnostics: where does an
    /// image's per-position variation go?): `layer` (the transformer layer's patch tokens),
    /// `linear`, `conv`, `pool`, and `norm` when the adapter has an output norm. The last entry
    /// is the adapter's output.
    ///
    /// # Shapes
    /// `x: (b, registers + gh*gw, vision)` -> `layer: (b, gh*gw, vision)`, `linear` and
    /// `conv: (b, gh*gw, text)`, `pool` and `norm: (b, oh*ow, text)`.
    pub fn forward_stages(
        &self,
        x: &Tensor,
        grid: (usize, usize),
        registers: usize,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let (b, t, dv) = x.dims3()?;
        let (gh, gw) = grid;
        if t != registers + gh * gw || dv != self.cfg.vision_hidden_size {
            return Err(FusionError::Invalid(format!(
                "adapter input {:?} does not match {registers} registers + a {gh}x{gw} grid of width {}",
                x.dims(),
                self.cfg.vision_hidden_size
            )));
        }
        self.tokens_per_tile(grid)?;
        let dl = self.cfg.text_hidden_size;
        let x = x.to_dtype(DType::F32)?;
        let h = self.layer.forward(&x, registers, grid, self.fast)?;
        let patches = h.narrow(1, registers, gh * gw)?;
        let lin = self.proj.forward(&patches)?; // (b, gh*gw, dl)
        let conv = lin
            .reshape((b, gh, gw, dl))?
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .conv2d(&self.conv_w, 1, 1, 1, 1)?
            .broadcast_add(&self.conv_b)?; // (b, dl, gh, gw)
        let conv = conv
            .reshape((b, dl, gh * gw))?
            .transpose(1, 2)?
            .contiguous()?;
        let p = self.pool_matrix(gh, gw)?;
        let y = p.unsqueeze(0)?.repeat((b, 1, 1))?.matmul(&conv)?; // (b, oh*ow, dl)
        let mut out = vec![
            ("layer", patches),
            ("linear", lin),
            ("conv", conv),
            ("pool", y.clone()),
        ];
        if let Some((eps, g)) = &self.out_norm {
            // plain ops: differentiable, and only oh*ow rows per image
            let n = y
                .broadcast_div(&(y.sqr()?.mean_keepdim(2)? + *eps)?.sqrt()?)?
                .broadcast_mul(g)?;
            out.push(("norm", n));
        }
        Ok(out)
    }

    fn pool_matrix(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = pools.get(&(gh, gw)) {
            return Ok(t.clone());
        }
        let [oh, ow] = self.cfg.pool;
        let t = Tensor::from_vec(
            adaptive_pool_matrix(gh, gw, oh, ow),
            (oh * ow, gh * gw),
            &Device::Cpu,
        )?;
        pools.insert((gh, gw), t.clone());
        Ok(t)
    }
}

impl VisionAdapter for AfmAdapter {
    fn tokens_per_tile(&self, grid: (usize, usize)) -> Result<usize> {
        let [oh, ow] = self.cfg.pool;
        if grid.0 < oh || grid.1 < ow {
            return Err(FusionError::Invalid(format!(
                "a {}x{} patch grid is smaller than the adapter's {oh}x{ow} output grid",
                grid.0, grid.1
            )));
        }
        Ok(oh * ow)
    }

    fn forward(&self, x: &Tensor, grid: (usize, usize), registers: usize) -> Result<Tensor> {
        let mut stages = self.forward_stages(x, grid, registers)?;
        Ok(stages.pop().expect("at least one stage").1)
    }
}
