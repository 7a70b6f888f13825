//! Stage 1 of the paper's recipe in miniature: pretraining the Register-Window ViT,
//! CLIP-style, on the generated data (and easy-VQA when present).
//!
//! # Objective
//! Image side: the ViT (Register-Window attention, differentiable candle-op path) over the
//! whole image resized to `vision.image_size` squared; the register token's output (the mean
//! of the patch outputs when the encoder has no register) through `head.image_proj`.
//! Text side: the caption's token embeddings from the *frozen* language model's input table
//! (SmolLM2's, so the space is the one the LM reads), averaged, through `head.text_proj`.
//! Both are L2-normalised; logits are `exp(head.logit_scale) * img . txt` over the batch, and
//! the loss is the symmetric cross-entropy of matching image `i` with caption `i` (InfoNCE).
//! The held-out evaluation reports that loss and image-to-caption top-1 accuracy within each
//! held-out batch.
//!
//! # Data order
//! Example `j` of the run (`j = step * batch_size + i`) is source `j % sources` (scenes,
//! screens, easy-VQA if given) at index `j / sources`: a pure function of the step, so a
//! resumed run sees exactly the examples an uninterrupted one would.
//!
//! # Files (in the output directory)
//! `pretrain.json` (the config, the step reached and the per-epoch history),
//! `checkpoint.safetensors` (parameters and AdamW moments, [`crate::optim`]), and on
//! completion `vision/config.json` + `vision/model.safetensors`, a checkpoint
//! `afm_vision::VisionEncoder::load` reads.

use crate::easy_vqa::EasyVqa;
use crate::optim::{AdamWConfig, OptimError, Params};
use crate::runloop::{io, run_loop, LoopSpec, StepLoss};
use crate::{generate, Sample, Split, SynthKind};
use afm_lm::Tokenizer;
use afm_vision::weights::VisionWeights;
use afm_vision::{AttentionPattern, Preprocess, VisionConfig, VisionEncoder};
use candle_core::{DType, Device, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Errors of a training run; each names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Vision(#[from] afm_vision::VisionError),
    #[error(transparent)]
    Lm(#[from] afm_lm::LmError),
    #[error(transparent)]
    Data(#[from] crate::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Fusion(#[from] afm_fusion::FusionError),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// A stage-1 run's settings (`pretrain.json` keeps them; a resumed run must match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    pub vision: VisionConfig,
    /// Width of the shared image/text space.
    pub embed_dim: usize,
    pub batch_size: usize,
    pub steps_per_epoch: usize,
    pub epochs: usize,
    /// Linear warm-up steps, then cosine decay to 10% of `adamw.lr`.
    pub warmup_steps: usize,
    pub adamw: AdamWConfig,
    /// Held-out batches evaluated after every epoch.
    pub eval_batches: usize,
    /// Save the checkpoint every this many steps (and at every epoch end).
    pub checkpoint_every: usize,
    /// Seed of the parameter initialisation.
    pub seed: u64,
}

impl PretrainConfig {
    /// The `afm-tiny` encoder: ViT with Register-Window attention, 224 px, patch 16 (a 14x14
    /// grid), width 256, 6 blocks of 4 heads, windows of 7x7 patches plus the register, global
    /// blocks 2 and 5 (the ViTDet-style pattern of the paper's device encoder at a depth of 6).
    pub fn afm_tiny() -> Self {
        Self {
            vision: VisionConfig {
                hidden_size: 256,
                intermediate_size: 1024,
                num_hidden_layers: 6,
                num_attention_heads: 4,
                num_channels: 3,
                image_size: 224,
                patch_size: 16,
                layer_norm_eps: 1e-6,
                hidden_act: "gelu_pytorch_tanh".into(),
                attention: AttentionPattern::RegisterWindow {
                    window: 7,
                    global_layers: vec![2, 5],
                    num_registers: 1,
                },
                stem: None,
            },
            embed_dim: 256,
            batch_size: 32,
            // ~8 examples/s on 2 cores: 4 x 225 steps of 32 is about an hour
            steps_per_epoch: 225,
            epochs: 4,
            warmup_steps: 100,
            adamw: AdamWConfig {
                lr: 5e-4,
                weight_decay: 0.05,
                ..Default::default()
            },
            eval_batches: 8,
            checkpoint_every: 100,
            seed: 0,
        }
    }

    /// A very small configuration for tests: 32 px, patch 8 (4x4 grid), width 32, 2 blocks,
    /// windows of 2x2 with block 1 global.
    pub fn test_tiny() -> Self {
        Self {
            vision: VisionConfig {
                hidden_size: 32,
                intermediate_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                num_channels: 3,
                image_size: 32,
                patch_size: 8,
                layer_norm_eps: 1e-6,
                hidden_act: "gelu_pytorch_tanh".into(),
                attention: AttentionPattern::RegisterWindow {
                    window: 2,
                    global_layers: vec![1],
                    num_registers: 1,
                },
                stem: None,
            },
            embed_dim: 16,
            batch_size: 6,
            steps_per_epoch: 3,
            epochs: 2,
            warmup_steps: 3,
            adamw: AdamWConfig {
                lr: 1e-3,
                weight_decay: 0.0,
                ..Default::default()
            },
            eval_batches: 1,
            checkpoint_every: 2,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.vision.validate()?;
        for (k, v) in [
            ("embed_dim", self.embed_dim),
            ("steps_per_epoch", self.steps_per_epoch),
            ("epochs", self.epochs),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if v == 0 {
                return Err(TrainError::Invalid(format!("`{k}` must be at least 1")));
            }
        }
        if self.batch_size < 2 {
            return Err(TrainError::Invalid(
                "`batch_size` must be at least 2 (the contrastive loss needs negatives)".into(),
            ));
        }
        if !(self.adamw.lr > 0.0 && self.adamw.lr.is_finite()) {
            return Err(TrainError::Invalid("`adamw.lr` must be positive".into()));
        }
        Ok(())
    }

    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch * self.epochs
    }

    /// Learning rate at `step` (0-based): linear warm-up, then cosine to 10%
    /// ([`crate::runloop::lr_at`]).
    pub fn lr_at(&self, step: usize) -> f64 {
        crate::runloop::lr_at(self.adamw.lr, self.warmup_steps, self.total_steps(), step)
    }
}

/// The frozen text side: a tokenizer and the language model's input embedding table.
pub struct TextTower {
    tokenizer: Tokenizer,
    /// `(vocab, lm_hidden)`
    table: Tensor,
}

impl TextTower {
    pub fn new(tokenizer: Tokenizer, table: Tensor) -> Result<Self> {
        let (v, _) = table.dims2()?;
        if tokenizer.vocab_size() > v {
            return Err(TrainError::Invalid(format!(
                "the tokenizer has {} tokens, the embedding table {v} rows",
                tokenizer.vocab_size()
            )));
        }
        Ok(Self {
            tokenizer,
            table: table.to_dtype(DType::F32)?,
        })
    }

    /// Tokenizer and embedding table of a GGUF language model (e.g. SmolLM2-135M-Instruct).
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let src = afm_lm::weights::WeightSource::from_gguf(path)?;
        let md = src
            .gguf_metadata()
            .ok_or_else(|| TrainError::Invalid(format!("{}: not a GGUF", path.display())))?;
        let tokenizer = Tokenizer::from_gguf(md)?;
        let cfg = afm_lm::load::config_from_gguf(&src)?;
        let table = src.tensor(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, cfg.hidden_size],
        )?;
        Self::new(tokenizer, table)
    }

    pub fn width(&self) -> usize {
        self.table.dim(1).unwrap_or(0)
    }

    /// Mean token embedding of each caption.
    ///
    /// # Shapes
    /// `captions.len() = b` -> `(b, lm_hidden)`.
    pub fn features(&self, captions: &[&str]) -> Result<Tensor> {
        let rows = captions
            .iter()
            .map(|c| {
                let ids = self.tokenizer.encode(c)?;
                if ids.is_empty() {
                    return Err(TrainError::Invalid(format!("caption `{c}` has no tokens")));
                }
                let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?;
                Ok(self.table.index_select(&ids, 0)?.mean(0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }
}

/// Example `j` of a run (module docs: data order).
pub fn example(j: u64, split: Split, easy: Option<&EasyVqa>) -> Result<Sample> {
    let all = [Source::Scene, Source::Screen, Source::EasyVqa];
    let n = if easy.is_some() { 3 } else { 2 };
    example_from(&all[..n], j, split, easy)
}

/// One of the sources [`example`] takes in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Generated scenes of coloured shapes.
    Scene,
    /// Generated UI screenshots.
    Screen,
    /// easy-VQA's images (needs the data set).
    EasyVqa,
}

/// Sample `idx` of one source (easy-VQA wraps around its images).
pub fn example_of(src: Source, idx: u64, split: Split, easy: Option<&EasyVqa>) -> Result<Sample> {
    Ok(match src {
        Source::Scene => generate(SynthKind::Scene, split, idx),
        Source::Screen => generate(SynthKind::Screen, split, idx),
        Source::EasyVqa => {
            let e = easy.ok_or_else(|| {
                TrainError::Invalid(
                    "the easy-VQA source needs the data set (bash scripts/fetch_easy_vqa.sh)"
                        .into(),
                )
            })?;
            e.get((idx % e.len() as u64) as usize)?
        }
    })
}

/// Example `j` drawn only from `sources`, in turn: source `sources[j % k]` (`k =
/// sources.len()`, at least 1). A source named once takes its sample `j / k`; one named `n`
/// times takes `n` new samples per round (`(j / k) * n` plus its place among its own slots),
/// so `[scene, scene, screen, easy_vqa]` gives half of the examples to scenes, none repeated.
pub fn example_from(
    sources: &[Source],
    j: u64,
    split: Split,
    easy: Option<&EasyVqa>,
) -> Result<Sample> {
    let k = sources.len() as u64;
    if k == 0 {
        return Err(TrainError::Invalid("no training source named".into()));
    }
    let (src, idx) = source_index(sources, j);
    example_of(src, idx, split, easy)
}

/// Which source example `j` of [`example_from`] comes from, and that source's sample index.
/// `sources` is not empty.
fn source_index(sources: &[Source], j: u64) -> (Source, u64) {
    let k = sources.len() as u64;
    let slot = (j % k) as usize;
    let src = sources[slot];
    let per = sources.iter().filter(|s| **s == src).count() as u64;
    let rank = sources[..slot].iter().filter(|s| **s == src).count() as u64;
    (src, (j / k) * per + rank)
}

/// Normalised `(3, s, s)` pixels of a sample (bicubic resize, mean 0.5, std 0.5).
pub fn pixels(sample: &Sample, size: usize) -> Result<Tensor> {
    let pre = Preprocess::from_json(&serde_json::json!({"image_mean": 0.5, "image_std": 0.5}))?;
    Ok(pre.run(&sample.image, size as u32, size as u32)?)
}

/// `N(0, std^2)` samples clamped to +-2 std (Box-Muller over `rng`).
pub(crate) fn normal(rng: &mut ChaCha8Rng, shape: &[usize], std: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(1e-7);
            let u2: f32 = rng.random::<f32>();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()).clamp(-2.0, 2.0)
                * std
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Initial parameters: the ViT under `vision.` (weights N(0, 0.02), LayerNorm 1 / 0, biases
/// 0), `head.image_proj.weight (embed, vision_hidden)`, `head.text_proj.weight (embed,
/// lm_hidden)`, `head.logit_scale (1)` = ln(10).
pub fn init_params(cfg: &PretrainConfig, lm_hidden: usize) -> Result<Params> {
    cfg.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut normal = |shape: &[usize], std: f32| normal(&mut rng, shape, std);
    let v = &cfg.vision;
    let (d, i, c, g) = (v.hidden_size, v.intermediate_size, v.num_channels, v.grid());
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu);
    let zeros = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu);
    let mut m: HashMap<String, Tensor> = HashMap::new();
    // a convolutional stem (He-initialised), then a patch embedding over its output
    let (pc, pp) = v.embed_input();
    let mut c_in = c;
    for (k, &ch) in v.stem.iter().flatten().enumerate() {
        let std = (2.0 / (c_in * 9) as f32).sqrt();
        m.insert(
            format!("vision.embeddings.stem.{k}.weight"),
            normal(&[ch, c_in, 3, 3], std)?,
        );
        m.insert(format!("vision.embeddings.stem.{k}.bias"), zeros(ch)?);
        c_in = ch;
    }
    let patch_std = if v.stem.is_some() {
        (1.0 / (pc * pp * pp) as f32).sqrt()
    } else {
        0.02
    };
    m.insert(
        "vision.embeddings.patch_embedding.weight".into(),
        normal(&[d, pc, pp, pp], patch_std)?,
    );
    m.insert("vision.embeddings.patch_embedding.bias".into(), zeros(d)?);
    m.insert(
        "vision.embeddings.position_embedding.weight".into(),
        normal(&[g * g, d], 0.02)?,
    );
    if v.num_registers() > 0 {
        m.insert(
            "vision.embeddings.register_tokens".into(),
            normal(&[v.num_registers(), d], 0.02)?,
        );
    }
    for l in 0..v.num_hidden_layers {
        let pre = format!("vision.encoder.layers.{l}");
        for ln in ["layer_norm1", "layer_norm2"] {
            m.insert(format!("{pre}.{ln}.weight"), ones(d)?);
            m.insert(format!("{pre}.{ln}.bias"), zeros(d)?);
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            m.insert(
                format!("{pre}.self_attn.{proj}.weight"),
                normal(&[d, d], 0.02)?,
            );
            m.insert(format!("{pre}.self_attn.{proj}.bias"), zeros(d)?);
        }
        m.insert(format!("{pre}.mlp.fc1.weight"), normal(&[i, d], 0.02)?);
        m.insert(format!("{pre}.mlp.fc1.bias"), zeros(i)?);
        m.insert(format!("{pre}.mlp.fc2.weight"), normal(&[d, i], 0.02)?);
        m.insert(format!("{pre}.mlp.fc2.bias"), zeros(d)?);
    }
    m.insert("vision.post_layernorm.weight".into(), ones(d)?);
    m.insert("vision.post_layernorm.bias".into(), zeros(d)?);
    m.insert(
        "head.image_proj.weight".into(),
        normal(&[cfg.embed_dim, d], 0.02)?,
    );
    m.insert(
        "head.text_proj.weight".into(),
        normal(&[cfg.embed_dim, lm_hidden], 0.02)?,
    );
    m.insert(
        "head.logit_scale".into(),
        Tensor::new(&[10f32.ln()], &Device::Cpu)?,
    );
    Ok(Params::from_tensors(m)?)
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&n)?)
}

/// The contrastive loss and the image-to-caption top-1 accuracy of one batch, on the
/// differentiable path (the ViT is rebuilt from the current parameter values).
///
/// # Shapes
/// `pixels: (b, 3, s, s)`, `text: (b, lm_hidden)`.
pub fn contrastive_loss(
    cfg: &PretrainConfig,
    params: &Params,
    pixels: &Tensor,
    text: &Tensor,
) -> Result<(Tensor, f32)> {
    let mut enc = VisionEncoder::new(
        &VisionWeights::from_tensors(params.with_prefix("vision."))?,
        cfg.vision.clone(),
    )?;
    enc.set_fast_kernels(false);
    let out = enc.forward(pixels)?;
    let r = cfg.vision.num_registers();
    let feat = if r > 0 {
        out.narrow(1, 0, 1)?.squeeze(1)?
    } else {
        out.mean(1)?
    };
    let need = |n: &str| {
        params
            .get(n)
            .cloned()
            .ok_or_else(|| TrainError::Invalid(format!("parameter `{n}` is missing")))
    };
    let img = l2_normalize(&feat.matmul(&need("head.image_proj.weight")?.t()?)?)?;
    let txt = l2_normalize(&text.matmul(&need("head.text_proj.weight")?.t()?)?)?;
    let scale = need("head.logit_scale")?.exp()?;
    let logits = img.matmul(&txt.t()?)?.broadcast_mul(&scale)?;
    let b = logits.dim(0)?;
    let target = Tensor::arange(0u32, b as u32, &Device::Cpu)?;
    let loss = ((candle_nn::loss::cross_entropy(&logits, &target)?
        + candle_nn::loss::cross_entropy(&logits.t()?, &target)?)?
        * 0.5)?;
    let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let acc = pred
        .iter()
        .enumerate()
        .filter(|(i, &p)| p as usize == *i)
        .count() as f32
        / b as f32;
    Ok((loss, acc))
}

/// Pixels and caption features of examples `start .. start + n` of `split`.
pub fn batch(
    cfg: &PretrainConfig,
    text: &TextTower,
    split: Split,
    start: u64,
    easy: Option<&EasyVqa>,
) -> Result<(Tensor, Tensor)> {
    let samples = (start..start + cfg.batch_size as u64)
        .map(|j| example(j, split, easy))
        .collect::<Result<Vec<_>>>()?;
    let px = samples
        .iter()
        .map(|s| pixels(s, cfg.vision.image_size))
        .collect::<Result<Vec<_>>>()?;
    let caps: Vec<&str> = samples.iter().map(|s| s.caption.as_str()).collect();
    Ok((Tensor::stack(&px, 0)?, text.features(&caps)?))
}

/// One epoch's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f32,
    pub eval_loss: f32,
    pub eval_top1: f32,
    pub seconds: f64,
}

/// `pretrain.json`.
pub type RunState = crate::runloop::RunState<PretrainConfig, EpochReport>;

/// What a run reports as it goes (the CLI draws its progress bar from these); `Done` names
/// the `vision/` export.
pub type Event = crate::runloop::Event<EpochReport>;

/// Held-out loss and top-1 over `cfg.eval_batches` batches (no gradients kept).
pub fn evaluate(
    cfg: &PretrainConfig,
    params: &Params,
    text: &TextTower,
    easy_eval: Option<&EasyVqa>,
) -> Result<(f32, f32)> {
    let (mut loss, mut acc) = (0f32, 0f32);
    for k in 0..cfg.eval_batches.max(1) {
        let (px, tx) = batch(
            cfg,
            text,
            Split::HeldOut,
            (k * cfg.batch_size) as u64,
            easy_eval,
        )?;
        let (l, a) = contrastive_loss(cfg, params, &px, &tx)?;
        loss += l.detach().to_scalar::<f32>()?;
        acc += a;
    }
    let n = cfg.eval_batches.max(1) as f32;
    Ok((loss / n, acc / n))
}

/// Runs (or resumes, when `dir` holds `pretrain.json` and its checkpoint) a stage-1 run.
/// `easy` / `easy_eval`: the easy-VQA train / test sets, when available (they must be given
/// or left out consistently across resumptions: the data order depends on it). `until`:
/// stop after that many steps in all (a checkpoint is saved there; the run resumes from it);
/// the vision export is written only when the run is complete.
pub fn run(
    cfg: &PretrainConfig,
    text: &TextTower,
    dir: &Path,
    easy: Option<&EasyVqa>,
    easy_eval: Option<&EasyVqa>,
    until: Option<usize>,
    on_event: &mut dyn FnMut(&Event),
) -> Result<RunState> {
    cfg.validate()?;
    let params = init_params(cfg, text.width())?;
    let spec = LoopSpec {
        dir,
        state_file: "pretrain.json",
        steps_per_epoch: cfg.steps_per_epoch,
        epochs: cfg.epochs,
        warmup_steps: cfg.warmup_steps,
        checkpoint_every: cfg.checkpoint_every,
        adamw: cfg.adamw,
        until,
    };
    let st = run_loop(
        cfg,
        &params,
        &spec,
        &mut |step| {
            let t0 = Instant::now();
            let (px, tx) = batch(
                cfg,
                text,
                Split::Train,
                (step * cfg.batch_size) as u64,
                easy,
            )?;
            let data_s = t0.elapsed().as_secs_f64();
            let (loss, _) = contrastive_loss(cfg, &params, &px, &tx)?;
            Ok(StepLoss {
                grads: None,
                loss,
                examples: cfg.batch_size,
                data_s,
            })
        },
        &mut |end| {
            let (eval_loss, eval_top1) = evaluate(cfg, &params, text, easy_eval)?;
            Ok(EpochReport {
                epoch: end.epoch,
                train_loss: end.train_loss,
                eval_loss,
                eval_top1,
                seconds: end.seconds,
            })
        },
        on_event,
    )?;
    if st.step == cfg.total_steps() {
        let dir = export_vision(cfg, &params, dir)?;
        on_event(&Event::Done { dir });
    }
    Ok(st)
}

/// Writes `dir/vision/config.json` and `model.safetensors` (the encoder alone).
pub fn export_vision(cfg: &PretrainConfig, params: &Params, dir: &Path) -> Result<PathBuf> {
    write_vision(&cfg.vision, params, dir)
}

/// `dir/vision/`: the `vision.*` parameters as `vision_model.*` tensors and `vision` as
/// `config.json` (shared by the stages that train the encoder).
pub fn write_vision(vision: &VisionConfig, params: &Params, dir: &Path) -> Result<PathBuf> {
    let out = dir.join("vision");
    std::fs::create_dir_all(&out).map_err(io(&out))?;
    let json =
        serde_json::to_string_pretty(vision).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let cj = out.join("config.json");
    std::fs::write(&cj, json).map_err(io(&cj))?;
    let t: HashMap<String, Tensor> = params
        .with_prefix("vision.")
        .into_iter()
        .map(|(k, v)| (format!("vision_model.{k}"), v))
        .collect();
    candle_core::safetensors::save(&t, out.join("model.safetensors"))?;
    Ok(out)
}

#[cfg(test)]
mod source_tests {
    use super::*;

    #[test]
    fn a_source_named_twice_takes_two_new_samples_per_round() {
        use Source::*;
        let src = [Scene, Scene, Screen, EasyVqa];
        let got: Vec<(Source, u64)> = (0..8).map(|j| source_index(&src, j)).collect();
        assert_eq!(
            got,
            [
                (Scene, 0),
                (Scene, 1),
                (Screen, 0),
                (EasyVqa, 0),
                (Scene, 2),
                (Scene, 3),
                (Screen, 1),
                (EasyVqa, 1)
            ]
        );
        // each source named once: sample j / k, as before
        let src = [Scene, Screen, EasyVqa];
        assert_eq!(source_index(&src, 7), (Screen, 2));
        assert!(example_from(&[], 0, Split::Train, None).is_err());
    }
}
