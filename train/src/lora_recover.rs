//! Quality recovery of a quantized language model with a LoRA adapter: the paper's recovery
//! step after 2-bit compression, done here briefly and after the fact (post-training
//! quantization, then LoRA), by distillation. The frozen quantized model (its matrices
//! dequantized: the function it computes, up to the kernels' 8-bit activation rounding) gets
//! a rank-`r` adapter on q/k/v/o and gate/up/down, trained to match the next-token
//! distribution of the unquantized teacher on a text:
//! `loss = mean over positions of KL(teacher || student)`, AdamW.
//!
//! The result is an ordinary afm LoRA file bound (by sha256) to the quantized checkpoint;
//! `afm generate --lora` / `afm bench quant` apply it unmerged beside the 2-bit kernels.

use crate::optim::{AdamW, AdamWConfig, Params};
use afm_lm::diff_model::DiffLm;
use afm_lm::load::config_from_gguf;
use afm_lm::lora::{LoraAdapter, LoraConfig};
use afm_lm::weights::WeightSource;
use afm_lm::{DeviceModel, LanguageModel, LmError, LogitsFor, Result};
use candle_core::{Device, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// How the adapter is trained.
#[derive(Debug, Clone)]
pub struct RecoverConfig {
    pub lora: LoraConfig,
    /// Optimizer steps.
    pub steps: usize,
    /// Tokens per step (one window at a random offset of the text).
    pub seq: usize,
    /// Peak learning rate (linear warm-up over the first 10% of the steps, then cosine).
    pub lr: f64,
    pub seed: u64,
    /// Where the run keeps its state (adapter, optimizer, step) every `checkpoint_every`
    /// steps, beside a `.json` of its settings; a run that finds its checkpoint there goes
    /// on from it (the same windows as an uninterrupted run), and refuses one made with
    /// other settings, another student or another text. `None`: not resumable.
    pub checkpoint: Option<std::path::PathBuf>,
    pub checkpoint_every: usize,
    /// Stop after this step (counted from 0 over the whole run), leaving the checkpoint for a
    /// later run to go on from (`--max-steps`); the returned adapter is the one so far.
    pub max_steps: Option<usize>,
    /// Start from this adapter (an earlier recovery's output for the same student, with this
    /// run's rank and alpha) instead of a zero-initialised one: a new schedule on top of a
    /// finished run (`--init`).
    pub init: Option<std::path::PathBuf>,
}

impl Default for RecoverConfig {
    fn default() -> Self {
        Self {
            lora: LoraConfig::default(),
            steps: 100,
            seq: 256,
            lr: 1e-3,
            seed: 0,
            checkpoint: None,
            checkpoint_every: 10,
            max_steps: None,
            init: None,
        }
    }
}

/// What a checkpoint must match to be resumed (`{checkpoint}.json`).
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct RunKey {
    student_sha256: String,
    /// sha256 of the text's token ids (little-endian u32s).
    text_sha256: String,
    steps: usize,
    seq: usize,
    lr: f64,
    seed: u64,
    rank: usize,
    alpha: f32,
    /// sha256 of the `--init` adapter file, if any.
    #[serde(default)]
    init_sha256: Option<String>,
}

fn ids_sha256(ids: &[u32]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for i in ids {
        h.update(i.to_le_bytes());
    }
    format!("{:x}", h.finalize())
}

fn opt_err(e: crate::optim::OptimError) -> LmError {
    LmError::Invalid(e.to_string())
}

/// Trains the recovery adapter of the quantized GGUF `student` against `teacher` (any
/// checkpoint of the same model) on `ids`; `log(step, loss)` after every step.
pub fn recover(
    student: &Path,
    teacher: &Path,
    ids: &[u32],
    cfg: &RecoverConfig,
    mut log: impl FnMut(usize, f64),
) -> Result<LoraAdapter> {
    if ids.len() <= cfg.seq + 1 || cfg.seq < 2 || cfg.steps == 0 {
        return Err(LmError::Invalid(format!(
            "recovery needs steps >= 1 and more than seq + 1 = {} text tokens (got {})",
            cfg.seq + 1,
            ids.len()
        )));
    }
    let src = WeightSource::from_gguf(student)?;
    let scfg = config_from_gguf(&src)?;
    let mut dlm = DiffLm::from_source(&src, scfg)?;
    let teacher = DeviceModel::load(teacher)?;
    if teacher.info().vocab_size != dlm.config().vocab_size {
        return Err(LmError::Invalid(format!(
            "teacher vocabulary {} and student {} differ",
            teacher.info().vocab_size,
            dlm.config().vocab_size
        )));
    }
    let sha = afm_lm::lora::checkpoint_sha256(student)?;
    let (init, init_sha256) = match &cfg.init {
        None => (
            LoraAdapter::random(&dlm.lora_sites(), cfg.lora.clone(), &sha, cfg.seed, 0.0)?,
            None,
        ),
        Some(p) => {
            let a = LoraAdapter::load(p)?;
            // bound to this student (the same check as loading it for inference)
            a.check_base(&sha)?;
            let (r, al) = (a.config().rank, a.config().alpha);
            if r != cfg.lora.rank || al != cfg.lora.alpha {
                return Err(LmError::Invalid(format!(
                    "--init {}: rank {r} and alpha {al}, but this run asks for rank {} and alpha {}",
                    p.display(),
                    cfg.lora.rank,
                    cfg.lora.alpha
                )));
            }
            (a, Some(afm_lm::lora::file_sha256(p)?))
        }
    };
    dlm.attach_lora(&init)?;
    let mut params = Params::default();
    params
        .add_vars(
            dlm.lora_vars()
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("lora.{i:05}"), v)),
        )
        .map_err(opt_err)?;
    let mut opt = AdamW::new(
        &params,
        AdamWConfig {
            lr: cfg.lr,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            ..Default::default()
        },
    )
    .map_err(opt_err)?;
    let key = RunKey {
        student_sha256: sha.clone(),
        text_sha256: ids_sha256(ids),
        steps: cfg.steps,
        seq: cfg.seq,
        lr: cfg.lr,
        seed: cfg.seed,
        rank: cfg.lora.rank,
        alpha: cfg.lora.alpha,
        init_sha256,
    };
    let mut start = 0;
    if let Some(ck) = cfg.checkpoint.as_deref().filter(|p| p.exists()) {
        let kp = ck.with_extension("json");
        let bad =
            |why: String| LmError::Invalid(format!("cannot resume from {}: {why}", ck.display()));
        let stored: RunKey = serde_json::from_slice(
            &std::fs::read(&kp).map_err(|e| bad(format!("{} ({e})", kp.display())))?,
        )
        .map_err(|e| {
            bad(format!(
                "{} is not a recovery run's settings ({e})",
                kp.display()
            ))
        })?;
        if stored != key {
            return Err(bad(format!(
                "it was made with other settings, student or text ({stored:?}; this run: {key:?}); \
                 delete it to start again"
            )));
        }
        opt = crate::optim::load_checkpoint(ck, &params, opt.cfg).map_err(opt_err)?;
        start = (opt.step as usize).min(cfg.steps);
    }
    let save = |params: &Params, opt: &AdamW| -> Result<()> {
        if let Some(ck) = &cfg.checkpoint {
            let json =
                serde_json::to_vec_pretty(&key).map_err(|e| LmError::Invalid(e.to_string()))?;
            std::fs::write(ck.with_extension("json"), json).map_err(|source| LmError::Io {
                path: ck.with_extension("json"),
                source,
            })?;
            crate::optim::save_checkpoint(ck, params, opt).map_err(opt_err)?;
        }
        Ok(())
    };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    // the windows of the steps already done, so that a resumed run sees what an
    // uninterrupted one would
    for _ in 0..start {
        rng.random_range(0..ids.len() - cfg.seq);
    }
    let v = dlm.config().vocab_size;
    let warm = (cfg.steps / 10).max(1);
    let end = cfg.max_steps.map_or(cfg.steps, |m| m.min(cfg.steps));
    for step in start..end {
        let at = rng.random_range(0..ids.len() - cfg.seq);
        let w = &ids[at..at + cfg.seq];
        // teacher distribution of positions 0..seq-1 (each predicts the next token)
        let mut cache = teacher.new_cache();
        let rows: Vec<usize> = (0..cfg.seq).collect();
        let tl = teacher.forward_tokens(w, &mut cache, &LogitsFor::Rows(rows))?;
        let tp = candle_nn::ops::softmax_last_dim(&tl)?;
        let tlogp = candle_nn::ops::log_softmax(&tl, D::Minus1)?;
        let x = dlm.embed(&Tensor::new(w, &Device::Cpu)?.unsqueeze(0)?)?;
        let sl = dlm.forward(&x)?.reshape((cfg.seq, v))?;
        let slogp = candle_nn::ops::log_softmax(&sl, D::Minus1)?;
        let kl = (&tp * (&tlogp - &slogp)?)?
            .sum_all()?
            .affine(1.0 / cfg.seq as f64, 0.0)?;
        let loss = kl.to_scalar::<f32>()? as f64;
        let grads = kl.backward()?;
        let lr = if step < warm {
            cfg.lr * (step + 1) as f64 / warm as f64
        } else {
            let p = (step - warm) as f64 / (cfg.steps - warm).max(1) as f64;
            cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        };
        opt.step(&params, &grads, lr).map_err(opt_err)?;
        log(step, loss);
        if (step + 1) % cfg.checkpoint_every.max(1) == 0 || step + 1 == end {
            save(&params, &opt)?;
        }
    }
    dlm.lora_adapter()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a tiny random model quantized to 2 bits, a few steps of recovery lower the
    /// distillation loss, and the adapter loads onto the quantized file (bound to it).
    #[test]
    fn recovery_lowers_the_loss_and_binds_to_the_quantized_file() {
        let dir = std::env::temp_dir().join(format!("afm-recover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = afm_lm::LmConfig::from_json(serde_json::json!({
            "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_interleaved": true, "tie_word_embeddings": true,
            "max_position_embeddings": 64
        }))
        .unwrap();
        let mut t = afm_lm::random::random_tensors(&cfg, 5).unwrap();
        // small embeddings, so that the layers (which get quantized) shape the logits
        // rather than each token's own embedding row
        let e = "model.embed_tokens.weight".to_string();
        t.insert(e.clone(), (&t[&e] * 0.1).unwrap());
        afm_lm::random::write_safetensors(&dir, &cfg, &t).unwrap();
        let q = dir.join("q2.gguf");
        let spec = afm_lm::quantize::QuantizeSpec {
            weights: 2,
            embeddings: 32,
            kv: 16,
            group: 32,
            importance: false,
            q4_projections: 0,
        };
        afm_lm::quantize::quantize_checkpoint(&dir, &q, &spec, &[]).unwrap();
        let ids: Vec<u32> = (0..400).map(|i| ((i * 37 + i / 7) % 96) as u32).collect();
        let rc = RecoverConfig {
            lora: LoraConfig {
                rank: 8,
                ..Default::default()
            },
            steps: 40,
            seq: 32,
            lr: 3e-3,
            seed: 1,
            ..Default::default()
        };
        let mut losses = vec![];
        let ad = recover(&q, &dir, &ids, &rc, |_, l| losses.push(l)).unwrap();
        let lp = dir.join("lora.safetensors");
        ad.save(&lp).unwrap();
        let with = DeviceModel::load_with(
            &q,
            &afm_lm::LoadOptions {
                lora: Some(lp.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        // the inference model with the adapter is nearer the teacher on text it saw
        let teacher = DeviceModel::load(&dir).unwrap();
        let without = DeviceModel::load(&q).unwrap();
        let kl = |m: &DeviceModel| -> f64 {
            let w = &ids[..64];
            let lg = |m: &DeviceModel| -> Vec<f32> {
                m.forward_tokens(w, &mut m.new_cache(), &LogitsFor::All)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let (t, s) = (lg(&teacher), lg(m));
            let lsm = |r: &[f32]| -> Vec<f64> {
                let mx = r.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
                let z = r.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln() + mx;
                r.iter().map(|&x| x as f64 - z).collect()
            };
            t.chunks(96)
                .zip(s.chunks(96))
                .map(|(a, b)| {
                    let (la, lb) = (lsm(a), lsm(b));
                    la.iter()
                        .zip(&lb)
                        .map(|(x, y)| x.exp() * (x - y))
                        .sum::<f64>()
                })
                .sum::<f64>()
                / 64.0
        };
        let (k0, k1) = (kl(&without), kl(&with));
        assert!(
            k1 < 0.7 * k0,
            "KL to the teacher {k0} -> {k1} (losses {losses:?})"
        );
        // --init: a new run starts where the finished one ended, not from zero; an adapter
        // of another rank is refused by name
        let mut first = vec![];
        recover(
            &q,
            &dir,
            &ids,
            &RecoverConfig {
                init: Some(lp.clone()),
                steps: 1,
                ..rc.clone()
            },
            |_, l| first.push(l),
        )
        .unwrap();
        assert!(
            first[0] < 0.7 * losses[0],
            "initialised run starts at {} (zero adapter: {})",
            first[0],
            losses[0]
        );
        let e = recover(
            &q,
            &dir,
            &ids,
            &RecoverConfig {
                init: Some(lp.clone()),
                lora: LoraConfig {
                    rank: 4,
                    ..Default::default()
                },
                ..rc.clone()
            },
            |_, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--init") && e.contains("rank 8"), "{e}");
        // bound to the quantized file, refused on the f32 one
        let other = DeviceModel::load_with(
            &dir,
            &afm_lm::LoadOptions {
                lora: Some(lp),
                ..Default::default()
            },
        );
        assert!(other.is_err());
        // resumable: stopped after 15 steps and run again, the adapter equals the
        // uninterrupted run's; a checkpoint of other settings is refused
        let ck = dir.join("ck.safetensors");
        let resumable = RecoverConfig {
            checkpoint: Some(ck.clone()),
            checkpoint_every: 4,
            ..rc.clone()
        };
        recover(
            &q,
            &dir,
            &ids,
            &RecoverConfig {
                max_steps: Some(15),
                ..resumable.clone()
            },
            |_, _| {},
        )
        .unwrap();
        let mut steps_run = vec![];
        let resumed = recover(&q, &dir, &ids, &resumable, |s, _| steps_run.push(s)).unwrap();
        assert_eq!(steps_run, (15..40).collect::<Vec<_>>());
        let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
        ad.save(&a).unwrap();
        resumed.save(&b).unwrap();
        let (ta, tb) = (
            candle_core::safetensors::load(&a, &Device::Cpu).unwrap(),
            candle_core::safetensors::load(&b, &Device::Cpu).unwrap(),
        );
        assert_eq!(ta.len(), tb.len());
        let worst = ta
            .iter()
            .map(|(k, x)| {
                let d = (x - &tb[k]).unwrap().abs().unwrap().max_all().unwrap();
                let m = x.abs().unwrap().max_all().unwrap();
                d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1e-12)
            })
            .fold(0f32, f32::max);
        // the same steps on the same windows: equal up to the threads' summation order
        assert!(
            worst < 1e-4,
            "resumed adapter differs by {worst} of a tensor's max"
        );
        let other = RecoverConfig {
            lr: 1e-3,
            ..resumable
        };
        let e = recover(&q, &dir, &ids, &other, |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot resume") && e.contains("other settings"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
