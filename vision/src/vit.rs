//! The ViT encoder: embeddings, pre-norm blocks (LayerNorm, attention, LayerNorm, GELU MLP),
//! post-LayerNorm. One config switches between SigLIP's global attention and the paper's
//! Register-Window attention.

use crate::attention::{Attention, Dense};
use crate::config::{AttentionPattern, VisionConfig};
use crate::embeddings::Embeddings;
use crate::error::{Result, VisionError};
use crate::kernels::Act;
use crate::weights::VisionWeights;
use candle_core::{DType, Tensor};
use candle_nn::{LayerNorm, Module};
use std::path::Path;

fn layer_norm(w: &VisionWeights, name: &str, d: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        w.get(&format!("{name}.weight"), &[d])?,
        w.get(&format!("{name}.bias"), &[d])?,
        eps,
    ))
}

/// LayerNorm over the last dim: candle-nn's fused kernel for inference (`fast`), otherwise
/// composed of differentiable ops (the fused kernel has no backward, so a training graph
/// would silently stop at it).
pub fn apply_layer_norm(ln: &LayerNorm, x: &Tensor, fast: bool) -> Result<Tensor> {
    if fast {
        return Ok(ln.forward(x)?);
    }
    let mean = x.mean_keepdim(candle_core::D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    let y = xc.broadcast_div(&(var + ln.eps())?.sqrt()?)?;
    let y = y.broadcast_mul(ln.weight())?;
    Ok(match ln.bias() {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// One pre-norm encoder block: LayerNorm, attention (global or Register-Window), residual,
/// LayerNorm, GELU MLP, residual. Public so adapters can reuse it as their transformer layer.
pub struct Block {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    /// Window side, or `None` for a global block.
    window: Option<usize>,
    act: String,
}

impl Block {
    /// Loads `{p}.layer_norm1`, `{p}.self_attn.{q,k,v,out}_proj`, `{p}.layer_norm2`,
    /// `{p}.mlp.fc1`, `{p}.mlp.fc2` (weight and bias each) at the widths of `cfg`.
    pub fn load(
        w: &VisionWeights,
        p: &str,
        cfg: &VisionConfig,
        window: Option<usize>,
    ) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Block {
            ln1: layer_norm(w, &format!("{p}.layer_norm1"), d, eps)?,
            attn: Attention::load(w, &format!("{p}.self_attn"), d, cfg.num_attention_heads)?,
            ln2: layer_norm(w, &format!("{p}.layer_norm2"), d, eps)?,
            fc1: Dense::load(w, &format!("{p}.mlp.fc1"), cfg.intermediate_size, d)?,
            fc2: Dense::load(w, &format!("{p}.mlp.fc2"), d, cfg.intermediate_size)?,
            window,
            act: cfg.hidden_act.clone(),
        })
    }

    /// See [`Dense::set_int8`]: the block's four projections and two MLP layers.
    pub fn set_int8(&mut self, on: bool) -> Result<()> {
        self.attn.set_int8(on)?;
        self.fc1.set_int8(on)?;
        self.fc2.set_int8(on)
    }

    fn act(&self, x: &Tensor, fast: bool) -> Result<Tensor> {
        let fast = fast && x.dtype() == DType::F32;
        Ok(match self.act.as_str() {
            "gelu" => x.gelu_erf()?,
            "quick_gelu" if fast => x.contiguous()?.apply_op1_no_bwd(&Act::QuickGelu)?,
            "quick_gelu" => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            _ if fast => x.contiguous()?.apply_op1_no_bwd(&Act::GeluTanh)?,
            _ => x.gelu()?,
        })
    }

    /// `fast` picks the fused inference kernels; `false` runs differentiable candle ops.
    ///
    /// # Shapes
    /// `x: (b, registers + gh*gw, hidden) -> (b, registers + gh*gw, hidden)`.
    pub fn forward(
        &self,
        x: &Tensor,
        registers: usize,
        grid: (usize, usize),
        fast: bool,
    ) -> Result<Tensor> {
        let hn = apply_layer_norm(&self.ln1, x, fast)?;
        let a = match self.window {
            None => self.attn.forward_global(&hn, fast)?,
            Some(win) => self
                .attn
                .forward_windowed(&hn, registers, grid.0, grid.1, win, fast)?,
        };
        let x = (x + a)?;
        let hn = apply_layer_norm(&self.ln2, &x, fast)?;
        let fast_act = match self.act.as_str() {
            "gelu_pytorch_tanh" => Some(Act::GeluTanh),
            "quick_gelu" => Some(Act::QuickGelu),
            _ => None,
        };
        let m = match fast_act {
            Some(a) if fast => self
                .fc2
                .forward_fast(&self.fc1.forward_fast(&hn, Some(a))?, None)?,
            _ => self
                .fc2
                .forward(&self.act(&self.fc1.forward(&hn)?, fast)?)?,
        };
        Ok((x + m)?)
    }
}

/// Tiles per forward pass inside [`VisionEncoder::forward`].
const TILE_CHUNK: usize = 4;

/// The vision encoder.
pub struct VisionEncoder {
    cfg: VisionConfig,
    emb: Embeddings,
    /// `(num_registers, hidden)` for Register-Window checkpoints.
    registers: Option<Tensor>,
    blocks: Vec<Block>,
    post_ln: LayerNorm,
    /// Fused kernels (inference) instead of differentiable candle ops.
    fast: bool,
    /// Projections in int8 on the fused path.
    int8: bool,
}

impl VisionEncoder {
    /// Tensor names (after the checkpoint's prefix, e.g. `vision_model.`):
    /// `embeddings.{patch_embedding,position_embedding}.*`, `embeddings.register_tokens`
    /// `(num_registers, hidden)` (Register-Window only),
    /// `encoder.layers.{i}.{layer_norm1,layer_norm2}.{weight,bias}`,
    /// `encoder.layers.{i}.self_attn.{q_proj,k_proj,v_proj,out_proj}.{weight,bias}`,
    /// `encoder.layers.{i}.mlp.{fc1,fc2}.{weight,bias}`, `post_layernorm.{weight,bias}`.
    pub fn new(w: &VisionWeights, cfg: VisionConfig) -> Result<Self> {
        cfg.validate()?;
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let registers = match cfg.num_registers() {
            0 => None,
            r => Some(w.get("embeddings.register_tokens", &[r, d])?),
        };
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let window = match &cfg.attention {
                    AttentionPattern::Global => None,
                    AttentionPattern::RegisterWindow {
                        window,
                        global_layers,
                        ..
                    } => (!global_layers.contains(&i)).then_some(*window),
                };
                Block::load(w, &format!("encoder.layers.{i}"), &cfg, window)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            emb: Embeddings::load(w, &cfg)?,
            registers,
            blocks,
            post_ln: layer_norm(w, "post_layernorm", d, eps)?,
            fast: true,
            int8: false,
            cfg,
        })
    }

    /// Loads `config.json` and `*.safetensors` from a directory (a SiglipVisionModel, a
    /// SmolVLM/Idefics3 checkpoint whose vision tower is nested, or our own layout).
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = VisionConfig::from_file(&dir.join("config.json"))?;
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|source| VisionError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(VisionError::BadFile {
                path: dir.to_path_buf(),
                format: "model directory",
                reason: "no .safetensors file".into(),
            });
        }
        let refs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
        Self::new(&VisionWeights::from_files(&refs)?, cfg)
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Fused inference kernels (default) or plain candle ops, which are differentiable
    /// (training) and serve as the reference the fused kernels are tested against.
    pub fn set_fast_kernels(&mut self, on: bool) {
        self.fast = on;
    }

    /// Runs every block's projections, MLP and attention scores in int8 (weights and keys
    /// quantised per output channel, activations and queries per row; `crate::int8`,
    /// `crate::kernels::FusedAttention::int8`) on the fused inference path, or back in f32.
    /// Softmax, the weighted sum of values, layer norms, embeddings and activations stay
    /// f32. With AVX-512 VNNI it is about twice as fast as f32 in the encoder (AVX-VNNI,
    /// the same instruction at 256 bits, is unmeasured), with AVX2 alone about 1.2x
    /// ([`crate::int8::int8_kernel_is_fast`], in an AVX2 proxy); without AVX2 its
    /// portable loop is slower than f32, so leave it off there. The
    /// differentiable path (`set_fast_kernels(false)`) always runs f32.
    pub fn set_int8(&mut self, on: bool) -> Result<()> {
        for b in &mut self.blocks {
            b.set_int8(on)?;
        }
        self.int8 = on;
        Ok(())
    }

    /// Whether [`VisionEncoder::set_int8`] is on.
    pub fn int8(&self) -> bool {
        self.int8
    }

    /// Encodes a batch of tiles (all the same size).
    ///
    /// # Shapes
    /// `pixels: (b, c, h, w)` -> `(b, registers + (h/p)*(w/p), hidden)`, registers first.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        if b > TILE_CHUNK {
            // Many tiles at once make activations of hundreds of MB that stream through
            // memory on every op (measured 0.72 s per tile at 17 tiles vs 0.65 at 1-4):
            // run them a few at a time.
            let parts = (0..b)
                .step_by(TILE_CHUNK)
                .map(|i| self.forward_chunk(&pixels.narrow(0, i, TILE_CHUNK.min(b - i))?))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&parts, 0)?);
        }
        self.forward_chunk(pixels)
    }

    fn forward_chunk(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let mut x = self.emb.forward(pixels)?;
        let r = self.cfg.num_registers();
        if let Some(regs) = &self.registers {
            let regs = regs.unsqueeze(0)?.repeat((b, 1, 1))?;
            x = Tensor::cat(&[&regs, &x], 1)?;
        }
        for blk in &self.blocks {
            x = blk.forward(&x, r, (gh, gw), self.fast)?;
        }
        apply_layer_norm(&self.post_ln, &x, self.fast)
    }
}
