//! The training loop shared by the stages ([`crate::pretrain`], [`crate::adapter_train`]):
//! learning-rate schedule, the run-state JSON, resuming from a checkpoint, the step / epoch /
//! save cycle and the events a front end draws its progress from.
//!
//! A run directory holds `<state>.json` ([`RunState`]: the stage's settings, the step reached,
//! the per-epoch history) and `checkpoint.safetensors` (parameters and AdamW moments,
//! [`crate::optim`]). Both are written atomically at every epoch end, every
//! `checkpoint_every` steps and where the run stops (`until`). A stage makes each step's batch
//! a pure function of the step index, so a resumed run repeats exactly what an uninterrupted
//! one would have done.

use crate::optim::{load_checkpoint, save_checkpoint, AdamW, AdamWConfig, Params};
use crate::pretrain::{Result, TrainError};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Learning rate at `step` (0-based): linear warm-up over `warmup` steps to `lr`, then cosine
/// decay to 10% of `lr` at `total` steps.
pub fn lr_at(lr: f64, warmup: usize, total: usize, step: usize) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let rest = (total.saturating_sub(warmup)).max(1) as f64;
    let t = ((step - warmup) as f64 / rest).min(1.0);
    lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

/// The run-state file of a stage (`pretrain.json`, `adapter.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState<C, R> {
    pub config: C,
    /// Steps completed (the checkpoint holds the parameters after them).
    pub step: usize,
    pub history: Vec<R>,
    /// Wall-clock seconds of training so far (over resumptions).
    pub seconds: f64,
    /// Sum and count of the training losses of the epoch in progress (so a resumed epoch
    /// reports the same mean as an uninterrupted one).
    #[serde(default)]
    pub epoch_loss: (f32, usize),
}

/// What a run reports as it goes (the CLI draws its progress bar from these). `R` is the
/// stage's per-epoch report.
#[derive(Debug, Clone)]
pub enum Event<R> {
    Resumed {
        step: usize,
    },
    Step {
        step: usize,
        total: usize,
        loss: f32,
        lr: f64,
        examples_per_s: f64,
        /// Seconds of the step spent making the batch (generation, decoding, resizing).
        data_s: f64,
    },
    Epoch(R),
    Saved {
        step: usize,
    },
    /// The run is complete and its export written to `dir`.
    Done {
        dir: PathBuf,
    },
}

/// Figures the loop hands to the stage's evaluation at an epoch end.
#[derive(Debug, Clone, Copy)]
pub struct EpochEnd {
    /// 1-based.
    pub epoch: usize,
    pub train_loss: f32,
    /// Training seconds so far.
    pub seconds: f64,
}

/// One training step's loss (scalar, with its graph) and batch facts.
pub struct StepLoss {
    pub loss: Tensor,
    /// The step's gradients when the step computed them itself (micro-batches accumulated
    /// by [`crate::optim::Params::accumulate`]; `loss` is then their weighted loss, without
    /// a graph). `None`: the loop runs `loss.backward()`.
    pub grads: Option<GradStore>,
    pub examples: usize,
    /// Seconds spent making the batch.
    pub data_s: f64,
}

/// The shape of a run.
pub struct LoopSpec<'a> {
    pub dir: &'a Path,
    /// File name of the run state, e.g. `pretrain.json`.
    pub state_file: &'a str,
    pub steps_per_epoch: usize,
    pub epochs: usize,
    pub warmup_steps: usize,
    pub checkpoint_every: usize,
    pub adamw: AdamWConfig,
    /// Stop after this many steps in all (the run resumes from there).
    pub until: Option<usize>,
}

impl LoopSpec<'_> {
    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch * self.epochs
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `value` as pretty JSON to `path` through a temporary file renamed into place.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let json =
        serde_json::to_string_pretty(value).map_err(|e| TrainError::Invalid(e.to_string()))?;
    std::fs::write(&tmp, json).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Runs (or resumes, when `spec.dir` holds the state file and its checkpoint) the loop over
/// `params`: `step_loss(step)` builds the loss of batch `step` from the current parameter
/// values, `evaluate` runs after every epoch. The optimizer's step count and the state's must
/// agree, and the state's `config` must equal `config` (else the run is refused, naming the
/// file). Returns the state where the loop stopped; exporting is the caller's.
pub fn run_loop<C, R>(
    config: &C,
    params: &Params,
    spec: &LoopSpec,
    step_loss: &mut dyn FnMut(usize) -> Result<StepLoss>,
    evaluate: &mut dyn FnMut(EpochEnd) -> Result<R>,
    on_event: &mut dyn FnMut(&Event<R>),
) -> Result<RunState<C, R>>
where
    C: Clone + PartialEq + Serialize + DeserializeOwned,
    R: Clone + Serialize + DeserializeOwned,
{
    let dir = spec.dir;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let state_path = dir.join(spec.state_file);
    let ck = dir.join("checkpoint.safetensors");
    let (mut st, mut opt) = if state_path.exists() && ck.exists() {
        let text_json = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
        let st: RunState<C, R> = serde_json::from_str(&text_json)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", state_path.display())))?;
        if st.config != *config {
            return Err(TrainError::Invalid(format!(
                "{} was started with another configuration; use a new directory (or the same settings) to resume",
                state_path.display()
            )));
        }
        let opt = load_checkpoint(&ck, params, spec.adamw)?;
        if opt.step as usize != st.step {
            return Err(TrainError::Invalid(format!(
                "{} is at step {} but {} at step {}",
                ck.display(),
                opt.step,
                state_path.display(),
                st.step
            )));
        }
        on_event(&Event::Resumed { step: st.step });
        (st, opt)
    } else {
        (
            RunState {
                config: config.clone(),
                step: 0,
                history: vec![],
                seconds: 0.0,
                epoch_loss: (0.0, 0),
            },
            AdamW::new(params, spec.adamw)?,
        )
    };
    let total = spec.total_steps();
    let stop = spec.until.unwrap_or(total).min(total);
    while st.step < stop {
        let t0 = Instant::now();
        let StepLoss {
            loss,
            grads,
            examples,
            data_s,
        } = step_loss(st.step)?;
        let l = loss.to_scalar::<f32>()?;
        if !l.is_finite() {
            return Err(TrainError::Invalid(format!(
                "the loss became {l} at step {}; lower adamw.lr",
                st.step
            )));
        }
        let grads = match grads {
            Some(g) => g,
            None => loss.backward()?,
        };
        let lr = lr_at(spec.adamw.lr, spec.warmup_steps, total, st.step);
        opt.step(params, &grads, lr)?;
        drop(grads);
        st.step += 1;
        let secs = t0.elapsed().as_secs_f64();
        st.seconds += secs;
        st.epoch_loss = (st.epoch_loss.0 + l, st.epoch_loss.1 + 1);
        on_event(&Event::Step {
            step: st.step,
            total,
            loss: l,
            lr,
            examples_per_s: examples as f64 / secs,
            data_s,
        });
        let epoch_end = st.step.is_multiple_of(spec.steps_per_epoch);
        if epoch_end {
            let t1 = Instant::now();
            let rep = evaluate(EpochEnd {
                epoch: st.step / spec.steps_per_epoch,
                train_loss: st.epoch_loss.0 / st.epoch_loss.1.max(1) as f32,
                seconds: st.seconds,
            })?;
            st.seconds += t1.elapsed().as_secs_f64();
            st.epoch_loss = (0.0, 0);
            on_event(&Event::Epoch(rep.clone()));
            st.history.push(rep);
        }
        if epoch_end || st.step.is_multiple_of(spec.checkpoint_every) || st.step == stop {
            save_checkpoint(&ck, params, &opt)?;
            write_json_atomic(&state_path, &st)?;
            on_event(&Event::Saved { step: st.step });
        }
    }
    Ok(st)
}
