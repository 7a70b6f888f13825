//! Trainable parameters and the AdamW optimizer, with their whole state saved to and resumed
//! from one safetensors file (candle-nn's `AdamW` keeps its moments private, so a run could not
//! resume exactly).
//!
//! AdamW (Loshchilov & Hutter, decoupled weight decay), per parameter `p` with gradient `g` at
//! step `t` (1-based):
//! `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//! `p = p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) - lr wd p`.
//! Gradients are first clipped to a global L2 norm of `max_grad_norm` (when > 0).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Errors of the optimizer and of checkpoint files.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("{path}: {reason}")]
    Checkpoint { path: String, reason: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, OptimError>;

/// Named trainable tensors (f32), in a fixed (sorted) order.
#[derive(Default)]
pub struct Params {
    vars: BTreeMap<String, Var>,
}

impl Params {
    /// Every tensor becomes a trainable f32 variable.
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Result<Self> {
        let vars = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, Var::from_tensor(&t.to_dtype(DType::F32)?)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Self { vars })
    }

    /// The current values (sharing storage with the variables, so a graph built on them
    /// reaches the variables).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// The variables whose names start with `prefix`, the prefix removed.
    pub fn with_prefix(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.as_tensor().clone())))
            .collect()
    }

    /// Adds `weight` times the variables' gradients in `part` (one micro-batch's backward
    /// pass) into `sum`: gradient accumulation, so that a batch too large for memory runs as
    /// micro-batches whose weighted gradients sum to the whole batch's. `sum` is `None`
    /// before the first part, which then becomes it (scaled).
    pub fn accumulate(
        &self,
        sum: &mut Option<GradStore>,
        mut part: GradStore,
        weight: f64,
    ) -> Result<()> {
        match sum {
            None => {
                for v in self.vars.values() {
                    if let Some(g) = part.remove(v.as_tensor()) {
                        part.insert(v.as_tensor(), (g * weight)?);
                    }
                }
                *sum = Some(part);
            }
            Some(s) => {
                for v in self.vars.values() {
                    if let Some(g) = part.get(v.as_tensor()) {
                        let g = (g * weight)?;
                        let total = match s.remove(v.as_tensor()) {
                            Some(a) => (a + g)?,
                            None => g,
                        };
                        s.insert(v.as_tensor(), total);
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds variables that live elsewhere too (a [`afm_lm::DiffLm`]'s LoRA factors): the
    /// optimizer then updates the very storage the model reads. A name already present is
    /// an error.
    pub fn add_vars(&mut self, vars: impl IntoIterator<Item = (String, Var)>) -> Result<()> {
        for (k, v) in vars {
            if self.vars.contains_key(&k) {
                return Err(OptimError::Checkpoint {
                    path: String::new(),
                    reason: format!("parameter `{k}` is defined twice"),
                });
            }
            self.vars.insert(k, v);
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.vars.get(name).map(|v| v.as_tensor())
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Total number of scalars.
    pub fn num_params(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.vars.keys()
    }
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 = off.
    pub max_grad_norm: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
        }
    }
}

/// AdamW over a [`Params`] set (see the module docs for the update).
pub struct AdamW {
    pub cfg: AdamWConfig,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
    /// Updates done so far.
    pub step: u64,
}

impl AdamW {
    pub fn new(params: &Params, cfg: AdamWConfig) -> Result<Self> {
        let zeros = |p: &Var| Tensor::zeros(p.shape(), DType::F32, &Device::Cpu);
        Ok(Self {
            cfg,
            m: params
                .vars
                .iter()
                .map(|(k, p)| Ok((k.clone(), zeros(p)?)))
                .collect::<Result<_>>()?,
            v: params
                .vars
                .iter()
                .map(|(k, p)| Ok((k.clone(), zeros(p)?)))
                .collect::<Result<_>>()?,
            step: 0,
        })
    }

    /// One update with learning rate `lr` (the schedule is the caller's). Parameters without a
    /// gradient (not reached by the loss) are left alone. Returns the gradient norm before
    /// clipping.
    pub fn step(&mut self, params: &Params, grads: &GradStore, lr: f64) -> Result<f64> {
        let gs: Vec<(&String, &Var, Tensor)> = params
            .vars
            .iter()
            .filter_map(|(k, p)| grads.get(p.as_tensor()).map(|g| (k, p, g.clone())))
            .collect();
        let mut sq = 0f64;
        for (_, _, g) in &gs {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        let norm = sq.sqrt();
        let clip = if self.cfg.max_grad_norm > 0.0 && norm > self.cfg.max_grad_norm {
            self.cfg.max_grad_norm / norm
        } else {
            1.0
        };
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (k, p, g) in gs {
            let g = (g * clip)?;
            let m = ((&self.m[k] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[k] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let upd = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.cfg.eps)?)?;
            let w = p.as_tensor();
            let new = ((w * (1.0 - lr * self.cfg.weight_decay))? - (upd * lr)?)?;
            p.set(&new.detach())?;
            self.m.insert(k.clone(), m.detach());
            self.v.insert(k.clone(), v.detach());
        }
        Ok(norm)
    }
}

/// Writes parameters and optimizer moments to one safetensors file (`param.{name}`,
/// `adam_m.{name}`, `adam_v.{name}`, and the step as `adam_step`), atomically (a temporary
/// file renamed into place, so an interrupted save never leaves a broken checkpoint).
pub fn save_checkpoint(path: &Path, params: &Params, opt: &AdamW) -> Result<()> {
    let mut all: HashMap<String, Tensor> = HashMap::new();
    for (k, v) in &params.vars {
        all.insert(format!("param.{k}"), v.as_tensor().clone());
        all.insert(format!("adam_m.{k}"), opt.m[k].clone());
        all.insert(format!("adam_v.{k}"), opt.v[k].clone());
    }
    all.insert(
        "adam_step".into(),
        Tensor::new(&[opt.step as f64], &Device::Cpu)?,
    );
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&all, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| OptimError::Checkpoint {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Reads a checkpoint written by [`save_checkpoint`] into `params` (which must have exactly
/// the same names and shapes) and returns the optimizer state.
pub fn load_checkpoint(path: &Path, params: &Params, cfg: AdamWConfig) -> Result<AdamW> {
    let bad = |reason: String| OptimError::Checkpoint {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let mut opt = AdamW::new(params, cfg)?;
    for (k, p) in &params.vars {
        let get = |prefix: &str| -> Result<Tensor> {
            let name = format!("{prefix}.{k}");
            let x = t
                .get(&name)
                .ok_or_else(|| bad(format!("tensor `{name}` is missing")))?;
            if x.dims() != p.dims() {
                return Err(bad(format!(
                    "tensor `{name}` has shape {:?}, the model expects {:?}",
                    x.dims(),
                    p.dims()
                )));
            }
            Ok(x.to_dtype(DType::F32)?)
        };
        p.set(&get("param")?)?;
        opt.m.insert(k.clone(), get("adam_m")?);
        opt.v.insert(k.clone(), get("adam_v")?);
    }
    let extra: Vec<&String> = t
        .keys()
        .filter(|n| {
            n.strip_prefix("param.")
                .is_some_and(|k| !params.vars.contains_key(k))
        })
        .collect();
    if let Some(n) = extra.first() {
        return Err(bad(format!(
            "tensor `{n}` is not a parameter of this model ({} such)",
            extra.len()
        )));
    }
    let step = t
        .get("adam_step")
        .ok_or_else(|| bad("`adam_step` is missing".into()))?
        .to_vec1::<f64>()?;
    opt.step = step.first().copied().unwrap_or(0.0) as u64;
    Ok(opt)
}
