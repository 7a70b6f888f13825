//! Stage 2 of the paper's recipe in miniature: training the vision-language adapter (and,
//! unless frozen, fine-tuning the ViT) with the language model FROZEN, so that its answers
//! stay fluent.
//!
//! # Model
//! Image: one tile, the whole image resized to `vision.image_size` squared (bicubic, mean 0.5,
//! std 0.5: [`crate::pretrain::pixels`]); training does not tile yet. Inference tiles an
//! export whose config has a `tiling` section (overview + tiles, [`afm_fusion::afm_tiny`]);
//! a run that trains on tiles builds its sequences with [`afm_fusion::afm_prompt`]'s
//! `view_order` / `image_expansion` and the views of `afm_fusion::TileProcessor`. The Register-Window ViT (parameters `vision.*`,
//! initialised from a stage-1 export `vision/` when given, else freshly as in
//! [`crate::pretrain::init_params`]) encodes it; the paper's adapter
//! ([`afm_fusion::AfmAdapter`], parameters `adapter.*`, fresh init, see [`init_adapter`])
//! turns the register + patch outputs into `pool[0] * pool[1]` image embeddings of the LM's
//! width (36 for the 6x6 pool of `afm-tiny` over a 14x14 patch grid). These replace the
//! placeholder tokens of the prompt ([`crate::prompt`]) in the input embeddings of
//! [`afm_lm::diff_model::DiffLm`], whose weights are plain tensors: gradients flow through it
//! to the image embeddings, never into it. With `train_vit = false` the ViT is frozen too (run
//! with its fast inference kernels, no graph) and only the adapter trains.
//!
//! # Objective
//! Every example is one sequence (prompt format in [`crate::prompt`]): example `j` of the run
//! (`j = step * batch_size + i`) is sample [`crate::pretrain::example`]`(j)` (scenes, screens,
//! easy-VQA when given, in turn) and up to `qa_per_sequence` of its caption (question
//! [`CAPTION_PROMPT`]) and question/answer pairs as a multi-turn chat ([`pick_turns`]: the
//! first is the one numbered `mix(j) % (pairs + 1)`, `mix` being SplitMix64, the rest in a
//! shuffled order; the caption is left out when empty). Sequences are right-padded to the
//! longest of the batch (the causal mask keeps padding out of the real positions). The loss
//! is the mean cross-entropy over all answer and end-of-turn tokens of the batch.
//!
//! Two options (off in the `afm-tiny` preset, which is the shipped model's recipe; on in
//! `train/configs/afm-tiny-norm-packed.json`):
//!
//! * `qa_per_sequence` > 1 packs several questions per image: the frozen LM's forward and
//!   backward dominate a step, and a step of 8 sequences of up to four turns takes ~10.5 s
//!   against ~6 s for one turn each (~1.8x the time for up to 4x the answers);
//! * `output_norm_gain` ends the adapter in an RMSNorm whose gain starts at the LM's
//!   token-embedding RMS ([`SMOLLM2_EMBEDDING_RMS`]). The shipped run, without it, let the
//!   image tokens drift to ~55x the norm of SmolLM2's word embeddings
//!   (`train/examples/diag_image.rs` measures that, and the held-out loss with the right
//!   image vs another image per question kind).
//!
//! Neither made greedy answers use the image on the 2-core budget (README, "Training and
//! evaluating"): both runs mostly answer with each question type's most common answer.
//!
//! * `isolate_turns` packs the same turns so that none sees another
//!   ([`crate::prompt::PromptFormat::isolated_turns`], [`batch_packing`]): in a multi-turn
//!   chat a caption after "What colour is the circle? red" can copy "red", and a colour answer
//!   after the caption can copy it from there, while inference asks each alone. Isolated,
//!   every turn's loss is the loss of its single-question sequence, and the batch still pays
//!   for the image prefix once per sequence.
//!
//! * `common_token_weight` adds [`common_token_share`] to the loss: the share of the image
//!   tokens' energy that every view of the batch has in common. The shipped model's tokens are
//!   ~97% one vector whatever the image, and its LM gives the same loss with another image's
//!   tokens (`train/examples/diag_image.rs`), although linear probes read colour from them at
//!   99% once standardised: the LM has little image-dependent signal to learn from.
//!
//! A third option is another objective: `caption_slots` adds the caption-slot loss
//! ([`crate::caption_slots`]: image token `i` should be the LM's embedding of the caption's
//! token `i`), and `lm_loss = false` trains on it alone, without the LM's forward
//! (`train/configs/afm-tiny-slots.json`; then `afm-tiny-slots-answers.json` continues from
//! that export with both losses, `--vision <export>/vision --init-adapter
//! <export>/adapter.safetensors`, [`Trainable::init_from`]).
//!
//! # Held-out evaluation (after every epoch)
//! `eval_questions` held-out questions: example `j` of the held-out split, question
//! `mix(j) % pairs` (no captions). Reported: their teacher-forced loss, and the exact-match
//! accuracy (trimmed text equality) of GREEDY answers of at most `eval_max_new_tokens` tokens,
//! overall and per [`crate::QaCategory`]. Decoding re-runs the whole sequence for every new
//! token (no cache: fine for short answers), batched over `batch_size` questions.
//!
//! # Files (in the run directory)
//! `adapter.json` (the configuration, the LM it trains against, the step reached, the
//! per-epoch history), `checkpoint.safetensors` (trainable parameters and AdamW moments), as
//! in [`crate::runloop`]; on completion the export `afm-tiny/`:
//!
//! * `afm-tiny/config.json` ([`AfmTinyConfig`], defined in [`afm_fusion::afm_tiny`], whose
//!   docs describe the export and its inference): `model_type` = `"afm-tiny"`, `vision` (the
//!   ViT's [`VisionConfig`]), `adapter` ([`AfmAdapterConfig`]), `lm` ([`LmInfo`]: file name,
//!   sha256, hidden size and vocabulary size of the GGUF it was trained against),
//!   `image_placeholder` (token text) and `image_placeholder_id`, `tokens_per_image`,
//!   `image_size`, `image_mean` / `image_std` (0.5 / 0.5, bicubic resize), `caption_prompt`
//!   (no `tiling` section: training uses one view per image);
//! * `afm-tiny/vision/config.json` + `model.safetensors` (tensors `vision_model.*`), what
//!   [`VisionEncoder::load`] reads (and what `--vision` of a next run accepts);
//! * `afm-tiny/adapter.safetensors`: tensors `adapter.*` as [`afm_fusion::AfmAdapter::load`]
//!   reads them.
//!
//! [`load_export`] reads the three back; `afm_fusion::Vlm::load_afm_tiny` runs them (`afm
//! caption --model <run>/afm-tiny`).

use crate::caption_slots::{self, CaptionSlots, SlotHead};
use crate::easy_vqa::EasyVqa;
use crate::optim::AdamWConfig;
use crate::optim::Params;
use crate::pretrain::{
    example, example_from, init_params, pixels, PretrainConfig, Result, Source, TrainError,
};
use crate::prompt::{Example, PromptFormat, CAPTION_PROMPT, IMAGE_PLACEHOLDER};
use crate::runloop::{io, run_loop, write_json_atomic, EpochEnd, LoopSpec, StepLoss};
use crate::{QaCategory, Sample, Split};
/// The export's config, its reader and the LM record live in afm-fusion (inference reads what
/// training writes: one definition).
pub use afm_fusion::afm_tiny::{load_export, sha256_file, AfmTinyConfig, LmInfo};
use afm_fusion::{
    AfmAdapter, AfmAdapterConfig, ImageProcessor, TileProcessor, TilingSettings, VisionAdapter,
};
use afm_lm::diff_model::{DiffLm, Packing};
use afm_lm::Tokenizer;
use afm_lm::{LoraAdapter, LoraConfig, LoraTarget};
use afm_vision::weights::VisionWeights;
use afm_vision::{Preprocess, VisionConfig, VisionEncoder};
use candle_core::{DType, Device, Tensor, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// A stage-2 run's settings (`adapter.json` keeps them; a resumed run must match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterTrainConfig {
    /// The ViT (must equal the stage-1 export's config when one is given).
    pub vision: VisionConfig,
    /// Output grid of the adapter: `pool[0] * pool[1]` image tokens per image.
    pub pool: [usize; 2],
    /// Fine-tune the ViT (`false`: frozen, only the adapter trains).
    pub train_vit: bool,
    /// The image placeholder token (module docs of [`crate::prompt`]).
    pub image_placeholder: String,
    pub batch_size: usize,
    pub steps_per_epoch: usize,
    pub epochs: usize,
    /// Linear warm-up steps, then cosine decay to 10% of `adamw.lr`.
    pub warmup_steps: usize,
    pub adamw: AdamWConfig,
    /// Held-out questions evaluated after every epoch.
    pub eval_questions: usize,
    /// Greedy answers stop after this many tokens.
    pub eval_max_new_tokens: usize,
    /// Save the checkpoint every this many steps (and at every epoch end).
    pub checkpoint_every: usize,
    /// Seed of the parameter initialisation.
    pub seed: u64,
    /// Initial gain of the adapter's output RMSNorm ([`afm_fusion::afm_adapter`] docs);
    /// `None`: no output norm (runs before this field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_norm_gain: Option<f32>,
    /// Up to this many of a training image's questions (and caption) share one sequence as a
    /// multi-turn chat ([`crate::prompt::PromptFormat::conversation`]); held-out questions
    /// are always asked alone.
    #[serde(default = "one")]
    pub qa_per_sequence: usize,
    /// Pack a sequence's turns so that none sees another
    /// ([`crate::prompt::PromptFormat::isolated_turns`]): each answer, the caption included,
    /// is trained exactly as if asked alone, as inference asks it. `false`: a multi-turn chat,
    /// where later turns can copy from earlier answers (runs before this field existed).
    #[serde(default)]
    pub isolate_turns: bool,
    /// The training loss is the mean over turns of each turn's mean token loss
    /// ([`sequence_loss_weighted`]), so a one-word colour answer weighs as much as a long
    /// caption. `false`: the mean over all answer tokens of the batch (runs before this field
    /// existed).
    #[serde(default)]
    pub loss_per_turn: bool,
    /// Weight of [`common_token_share`] in the training loss: the share of the image
    /// tokens' energy that all views of the batch have in common. The shipped model's tokens
    /// are ~97% one vector whatever the image (`train/examples/diag_image.rs`), and the LM
    /// gives the same loss with another image's tokens; this term pushes that common part
    /// out. `None`: off (runs before this field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub common_token_weight: Option<f32>,
    /// Training turns only of these kinds of question (snake_case names of
    /// [`crate::QaCategory`], e.g. `["colour", "shape", "count", "title"]`), and no captions:
    /// a curriculum stage of answers that need the image. A training image with none of them
    /// keeps all its questions. Held-out batches are not filtered. `None`: every kind and the
    /// caption (runs before this field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_categories: Option<Vec<QaCategory>>,
    /// Training images only from these sources, taken in turn (snake_case names of
    /// [`crate::pretrain::Source`]: `["easy_vqa"]`, `["scene", "easy_vqa"]`): a curriculum
    /// stage on one kind of image. Held-out batches are not filtered. `None`: every source
    /// ([`crate::pretrain::example`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_sources: Option<Vec<Source>>,
    /// The share of training sequences (0-1) whose first turn is the image's caption (a
    /// screenshot's caption is its description, what `afm screen` answers); the rest pick
    /// their first turn among the caption and the questions as before ([`pick_turns`]),
    /// where a screen's caption is one of a dozen candidates. Decided per example by a hash
    /// of its number. `None`: no extra captions (runs before this field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_share: Option<f32>,
    /// Training step `s` takes images `data_offset + s * batch_size ..`: a continued stage
    /// starts past the images its parent saw instead of repeating them. Held-out batches do
    /// not move. `0` (runs before this field existed): from the first image.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub data_offset: u64,
    /// The caption-slot loss ([`crate::caption_slots`]) added to the answer loss; `None`: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_slots: Option<CaptionSlots>,
    /// Train through the frozen LM's answer loss. `false` (with `caption_slots` set): the
    /// caption-slot loss alone, no LM forward in training steps.
    #[serde(default = "yes")]
    pub lm_loss: bool,
    /// The paper's high-resolution input ([`afm_fusion::TileProcessor`]): every image becomes
    /// an overview plus native-resolution tiles under `max_tokens`, each view `pool` tokens,
    /// in [`afm_fusion::afm_prompt::view_order`]'s order, exactly as at inference. `None`:
    /// one squashed view per image (the shipped model's recipe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiling: Option<TilingSettings>,
    /// A LoRA adapter on the language model, trained with the adapter (the paper ships
    /// features this way: rank 32, alpha 16 on the frozen base). [`prepare_lora`] attaches it
    /// before [`run`]; the export writes it as `lora.safetensors`, bound to the GGUF's sha256.
    /// `None`: the language model stays as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraTrain>,
    /// A text reader (`afm train reader`'s `reader/`): every image's text is found and read
    /// and put in the prompt after the image, exactly as the pipeline does at inference when
    /// the export holds a reader ([`afm_fusion::vlm::text_block`]). `None`: no text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_text: Option<PathBuf>,
    /// Run each step's batch as micro-batches of at most this many examples and sum their
    /// gradients, each weighted by its share of the batch's answer tokens (of its turns with
    /// `loss_per_turn`) ([`step_grads`]): the same update as the whole batch at once, in the
    /// memory of a micro-batch. Screens with their read text are long sequences: a batch of 8
    /// at once outgrew 24 GiB. `None`: the whole batch at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<usize>,
}

/// The text readers of runs, loaded once per directory.
fn screen_reader(dir: &Path) -> Result<Arc<afm_fusion::vlm::ScreenReader>> {
    static READERS: OnceLock<Mutex<HashMap<PathBuf, Arc<afm_fusion::vlm::ScreenReader>>>> =
        OnceLock::new();
    let mut m = READERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(r) = m.get(dir) {
        return Ok(r.clone());
    }
    let r = Arc::new(afm_fusion::vlm::ScreenReader::from_dir(dir)?);
    m.insert(dir.to_path_buf(), r.clone());
    Ok(r)
}

/// LoRA settings of a stage-2 run (`lora` in its JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraTrain {
    pub rank: usize,
    pub alpha: f32,
    /// Short names (`q`, `k`, `v`, `o`, `gate`, `up`, `down`) or projection names.
    pub targets: Vec<String>,
}

impl LoraTrain {
    /// The paper's: rank 32, alpha 16, all seven projections.
    pub fn paper() -> Self {
        Self {
            rank: 32,
            alpha: 16.0,
            targets: ["q", "k", "v", "o", "gate", "up", "down"]
                .map(String::from)
                .to_vec(),
        }
    }

    pub fn config(&self) -> Result<LoraConfig> {
        if self.rank == 0 || !self.alpha.is_finite() {
            return Err(TrainError::Invalid(format!(
                "lora: rank {} / alpha {} (rank must be >= 1, alpha finite)",
                self.rank, self.alpha
            )));
        }
        let mut targets = self
            .targets
            .iter()
            .map(|t| {
                LoraTarget::parse(t)
                    .ok_or_else(|| TrainError::Invalid(format!("lora: unknown target `{t}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return Err(TrainError::Invalid("lora: no target".into()));
        }
        Ok(LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            targets,
        })
    }
}

/// Name of the `k`-th LoRA variable in a run's parameters and checkpoint.
fn lora_var_name(k: usize) -> String {
    format!("lora.{k:05}")
}

/// Attaches the run's LoRA adapter (`cfg.lora`) to the frozen LM's differentiable model:
/// factors A random, B zero (the LM is unchanged at step 0), bound to the LM file's sha256.
/// Call once, before [`run`]; a run with `lora` refuses an LM without it.
pub fn prepare_lora(cfg: &AdapterTrainConfig, lm: &mut FrozenLm) -> Result<()> {
    prepare_lora_from(cfg, lm, None)
}

/// [`prepare_lora`], the factors read from `init` (an afm LoRA file, e.g. an export's
/// `lora.safetensors`) when given: it must belong to this LM (its base sha256) and have the
/// run's rank, alpha and targets, else this errors naming the difference.
pub fn prepare_lora_from(
    cfg: &AdapterTrainConfig,
    lm: &mut FrozenLm,
    init: Option<&Path>,
) -> Result<()> {
    let Some(l) = &cfg.lora else {
        return match init {
            Some(f) => Err(TrainError::Invalid(format!(
                "a LoRA adapter to start from ({}) was given, but the run's config has no `lora` section",
                f.display()
            ))),
            None => Ok(()),
        };
    };
    let want = l.config()?;
    let adapter = match init {
        None => LoraAdapter::random(
            &lm.model.lora_sites(),
            want,
            &lm.info.sha256,
            cfg.seed + 17,
            0.0,
        )?,
        Some(f) => {
            let a = LoraAdapter::load(f)?;
            a.check_base(&lm.info.sha256)?;
            if *a.config() != want {
                return Err(TrainError::Invalid(format!(
                    "the LoRA adapter {} has rank {}, alpha {}, targets {:?}; the run's config asks for rank {}, alpha {}, targets {:?}",
                    f.display(),
                    a.config().rank,
                    a.config().alpha,
                    a.config().targets,
                    want.rank,
                    want.alpha,
                    want.targets
                )));
            }
            a
        }
    };
    lm.model.attach_lora(&adapter)?;
    Ok(())
}

fn one() -> usize {
    1
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn yes() -> bool {
    true
}

/// RMS of SmolLM2-135M-Instruct's token embeddings (median over its vocabulary, 0.131;
/// [`FrozenLm::token_embedding_rms`]): where `afm-tiny`'s output norm starts, so the image
/// tokens start at the scale of the words around them.
pub const SMOLLM2_EMBEDDING_RMS: f32 = 0.131;

impl AdapterTrainConfig {
    /// `afm-tiny`: the stage-1 encoder (224 px, 14x14 patches), a 6x6 pool = 36 image tokens,
    /// SmolLM2's `<empty_output>` as placeholder, ViT fine-tuned.
    pub fn afm_tiny() -> Self {
        Self {
            vision: PretrainConfig::afm_tiny().vision,
            pool: [6, 6],
            train_vit: true,
            image_placeholder: IMAGE_PLACEHOLDER.into(),
            batch_size: 8,
            steps_per_epoch: 300,
            epochs: 3,
            warmup_steps: 50,
            adamw: AdamWConfig {
                lr: 3e-4,
                weight_decay: 0.01,
                ..Default::default()
            },
            eval_questions: 96,
            eval_max_new_tokens: 12,
            checkpoint_every: 50,
            seed: 0,
            // the shipped afm-tiny's recipe; `train/configs/afm-tiny-norm-packed.json` is
            // the output-norm + four-turn variant (not better on `afm eval`: README)
            output_norm_gain: None,
            qa_per_sequence: 1,
            isolate_turns: false,
            loss_per_turn: false,
            common_token_weight: None,
            train_categories: None,
            train_sources: None,
            caption_share: None,
            data_offset: 0,
            caption_slots: None,
            lm_loss: true,
            tiling: None,
            lora: None,
            read_text: None,
            micro_batch: None,
        }
    }

    /// Test sizes: the 32 px test ViT (4x4 grid), a 2x2 pool, the tiny fixture tokenizer's
    /// `<image>` token as placeholder.
    pub fn test_tiny() -> Self {
        Self {
            vision: PretrainConfig::test_tiny().vision,
            pool: [2, 2],
            train_vit: true,
            image_placeholder: "<image>".into(),
            batch_size: 3,
            steps_per_epoch: 2,
            epochs: 2,
            warmup_steps: 1,
            adamw: AdamWConfig {
                lr: 3e-3,
                weight_decay: 0.0,
                ..Default::default()
            },
            eval_questions: 4,
            eval_max_new_tokens: 3,
            checkpoint_every: 1,
            seed: 0,
            output_norm_gain: Some(1.0),
            qa_per_sequence: 2,
            isolate_turns: false,
            loss_per_turn: false,
            common_token_weight: None,
            train_categories: None,
            train_sources: None,
            caption_share: None,
            data_offset: 0,
            caption_slots: None,
            lm_loss: true,
            tiling: None,
            lora: None,
            read_text: None,
            micro_batch: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.vision.validate()?;
        for (k, v) in [
            ("batch_size", self.batch_size),
            ("steps_per_epoch", self.steps_per_epoch),
            ("epochs", self.epochs),
            ("checkpoint_every", self.checkpoint_every),
            ("eval_max_new_tokens", self.eval_max_new_tokens),
            ("pool[0]", self.pool[0]),
            ("pool[1]", self.pool[1]),
            ("qa_per_sequence", self.qa_per_sequence),
        ] {
            if v == 0 {
                return Err(TrainError::Invalid(format!("`{k}` must be at least 1")));
            }
        }
        let g = self.vision.grid();
        if self.pool[0] > g || self.pool[1] > g {
            return Err(TrainError::Invalid(format!(
                "the adapter pool {:?} is larger than the ViT's {g}x{g} patch grid",
                self.pool
            )));
        }
        if !(self.adamw.lr > 0.0 && self.adamw.lr.is_finite()) {
            return Err(TrainError::Invalid("`adamw.lr` must be positive".into()));
        }
        if let Some(g) = self.output_norm_gain {
            if !(g > 0.0 && g.is_finite()) {
                return Err(TrainError::Invalid(
                    "`output_norm_gain` must be positive".into(),
                ));
            }
        }
        if let Some(w) = self.common_token_weight {
            if !(w >= 0.0 && w.is_finite()) {
                return Err(TrainError::Invalid(format!(
                    "`common_token_weight` must be a finite number >= 0, got {w}"
                )));
            }
        }
        if self.train_sources.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(TrainError::Invalid(
                "`train_sources` is empty: name at least one of scene, screen, easy_vqa".into(),
            ));
        }
        // sample seeds hold the index mod 2^56 (`crate::seed`): past that, images repeat
        let last = (self.total_steps() as u64).saturating_mul(self.batch_size as u64);
        if self
            .data_offset
            .checked_add(last)
            .is_none_or(|end| end > 1 << 56)
        {
            return Err(TrainError::Invalid(format!(
                "`data_offset` {} plus this run's {last} training examples passes 2^56, the generator's image index space",
                self.data_offset
            )));
        }
        if let Some(p) = self.caption_share {
            if !(0.0..=1.0).contains(&p) {
                return Err(TrainError::Invalid(format!(
                    "`caption_share` is {p}: it is a share of the training sequences, from 0 to 1"
                )));
            }
        }
        if self.train_categories.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(TrainError::Invalid(
                "`train_categories` is empty: name at least one kind of question".into(),
            ));
        }
        if self.tiling.is_some() && self.caption_slots.is_some() {
            return Err(TrainError::Invalid(
                "`tiling` and `caption_slots` do not go together (the slot targets are per image, the tokens per view)".into(),
            ));
        }
        if let Some(m) = self.micro_batch {
            if m == 0 {
                return Err(TrainError::Invalid(
                    "`micro_batch` must be at least 1".into(),
                ));
            }
            if m < self.batch_size
                && (self.caption_slots.is_some()
                    || self.common_token_weight.is_some_and(|w| w > 0.0))
            {
                return Err(TrainError::Invalid(
                    "`micro_batch` splits the batch, but `caption_slots` and `common_token_weight` are losses over the whole batch: unset them or `micro_batch`".into(),
                ));
            }
        }
        self.processor()?;
        if let Some(c) = &self.caption_slots {
            c.validate()?;
        } else if !self.lm_loss {
            return Err(TrainError::Invalid(
                "`lm_loss` is false and `caption_slots` is not set: nothing to train".into(),
            ));
        }
        Ok(())
    }

    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch * self.epochs
    }

    /// Image tokens of one view (of one image without tiling).
    pub fn tokens_per_image(&self) -> usize {
        self.pool[0] * self.pool[1]
    }

    /// The image processor inference uses for this model ([`afm_fusion::TileProcessor`]).
    pub fn processor(&self) -> Result<TileProcessor> {
        let pre = Preprocess::from_json(&serde_json::json!({"image_mean": 0.5, "image_std": 0.5}))?;
        Ok(TileProcessor::new(
            self.vision.image_size as u32,
            self.tokens_per_image(),
            self.tiling,
            pre,
            &self.image_placeholder,
        )?)
    }

    pub fn lr_at(&self, step: usize) -> f64 {
        crate::runloop::lr_at(self.adamw.lr, self.warmup_steps, self.total_steps(), step)
    }

    /// The adapter over this ViT into an LM of width `lm_hidden`: its transformer layer has
    /// the ViT's width, heads and MLP size.
    pub fn adapter_config(&self, lm_hidden: usize) -> AfmAdapterConfig {
        let v = &self.vision;
        AfmAdapterConfig {
            vision_hidden_size: v.hidden_size,
            text_hidden_size: lm_hidden,
            num_attention_heads: v.num_attention_heads,
            intermediate_size: v.intermediate_size,
            layer_norm_eps: v.layer_norm_eps,
            hidden_act: v.hidden_act.clone(),
            pool: self.pool,
            output_norm_eps: self.output_norm_gain.map(|_| ADAPTER_OUTPUT_NORM_EPS),
        }
    }
}

/// Epsilon of the adapter's output RMSNorm (SmolLM2's own RMSNorm epsilon).
pub const ADAPTER_OUTPUT_NORM_EPS: f64 = 1e-5;

/// The frozen language model: the differentiable decoder and its tokenizer.
pub struct FrozenLm {
    pub model: DiffLm,
    pub tokenizer: Tokenizer,
    pub info: LmInfo,
}

impl FrozenLm {
    pub fn new(model: DiffLm, tokenizer: Tokenizer, file: &str, sha256: &str) -> Self {
        let c = model.config();
        let info = LmInfo {
            file: file.to_string(),
            sha256: sha256.to_string(),
            hidden_size: c.hidden_size,
            vocab_size: c.vocab_size,
        };
        Self {
            model,
            tokenizer,
            info,
        }
    }

    /// A GGUF language model (e.g. SmolLM2-135M-Instruct), dequantized to f32.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let src = afm_lm::weights::WeightSource::from_gguf(path)?.with_dequantize(true);
        let md = src
            .gguf_metadata()
            .ok_or_else(|| TrainError::Invalid(format!("{}: not a GGUF", path.display())))?;
        let tokenizer = Tokenizer::from_gguf(md)?;
        let cfg = afm_lm::load::config_from_gguf(&src)?;
        let model = DiffLm::from_source(&src, cfg)?;
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self::new(model, tokenizer, &file, &sha256_file(path)?))
    }

    pub fn hidden_size(&self) -> usize {
        self.info.hidden_size
    }

    /// Median over the vocabulary of the token embeddings' RMS (what
    /// [`SMOLLM2_EMBEDDING_RMS`] records for SmolLM2-135M).
    pub fn token_embedding_rms(&self) -> Result<f32> {
        let e = caption_slots::embedding_table(&self.model)?;
        let mut r: Vec<f32> = e.sqr()?.mean(D::Minus1)?.sqrt()?.to_vec1()?;
        r.sort_by(f32::total_cmp);
        Ok(r[r.len() / 2])
    }
}

fn normal(rng: &mut ChaCha8Rng, shape: &[usize], std: f32) -> Result<Tensor> {
    crate::pretrain::normal(rng, shape, std)
}

/// Fresh adapter parameters (names in [`afm_fusion::afm_adapter`]'s docs, under `adapter.`):
/// matrices of the transformer layer and the projection N(0, 0.02), LayerNorms 1 / 0, biases
/// 0; the 3x3 convolution starts as the identity (centre tap) plus N(0, 0.002) noise; the
/// output norm's gain (when `out_gain` is given) is `out_gain` everywhere.
pub fn init_adapter(
    cfg: &AfmAdapterConfig,
    seed: u64,
    out_gain: Option<f32>,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xada9_7e55);
    let (d, i, dl) = (
        cfg.vision_hidden_size,
        cfg.intermediate_size,
        cfg.text_hidden_size,
    );
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu);
    let zeros = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu);
    let mut m: HashMap<String, Tensor> = HashMap::new();
    for ln in ["layer_norm1", "layer_norm2"] {
        m.insert(format!("adapter.layer.{ln}.weight"), ones(d)?);
        m.insert(format!("adapter.layer.{ln}.bias"), zeros(d)?);
    }
    for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        m.insert(
            format!("adapter.layer.self_attn.{p}.weight"),
            normal(&mut rng, &[d, d], 0.02)?,
        );
        m.insert(format!("adapter.layer.self_attn.{p}.bias"), zeros(d)?);
    }
    m.insert(
        "adapter.layer.mlp.fc1.weight".into(),
        normal(&mut rng, &[i, d], 0.02)?,
    );
    m.insert("adapter.layer.mlp.fc1.bias".into(), zeros(i)?);
    m.insert(
        "adapter.layer.mlp.fc2.weight".into(),
        normal(&mut rng, &[d, i], 0.02)?,
    );
    m.insert("adapter.layer.mlp.fc2.bias".into(), zeros(d)?);
    m.insert(
        "adapter.proj.weight".into(),
        normal(&mut rng, &[dl, d], 0.02)?,
    );
    m.insert("adapter.proj.bias".into(), zeros(dl)?);
    let mut centre = vec![0f32; dl * dl * 9];
    for c in 0..dl {
        centre[(c * dl + c) * 9 + 4] = 1.0;
    }
    let centre = Tensor::from_vec(centre, (dl, dl, 3, 3), &Device::Cpu)?;
    m.insert(
        "adapter.conv.weight".into(),
        (centre + normal(&mut rng, &[dl, dl, 3, 3], 0.002)?)?,
    );
    m.insert("adapter.conv.bias".into(), zeros(dl)?);
    if let Some(g) = out_gain {
        m.insert("adapter.out_norm.weight".into(), (ones(dl)? * g as f64)?);
    }
    Ok(m)
}

/// The ViT tensors of a stage-1 export directory (`config.json` + `model.safetensors` with
/// `vision_model.*` tensors), without prefix; its config must equal `expected`.
pub fn read_vision_export(dir: &Path, expected: &VisionConfig) -> Result<HashMap<String, Tensor>> {
    let cj = dir.join("config.json");
    let got = VisionConfig::from_file(&cj)?;
    if got != *expected {
        return Err(TrainError::Invalid(format!(
            "{}: the encoder's configuration differs from the run's `vision` settings",
            cj.display()
        )));
    }
    let mf = dir.join("model.safetensors");
    let t = read_safetensors(&mf)?;
    let out: HashMap<String, Tensor> = t
        .into_iter()
        .filter_map(|(k, v)| {
            let k = k.strip_prefix("vision_model.")?.to_string();
            Some(v.to_dtype(DType::F32).map(|v| (k, v)))
        })
        .collect::<std::result::Result<_, _>>()?;
    if out.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{}: no `vision_model.*` tensors",
            mf.display()
        )));
    }
    // fails here, naming the tensor, when one is missing or mis-shaped
    VisionEncoder::new(&VisionWeights::from_tensors(out.clone())?, expected.clone())?;
    Ok(out)
}

/// The tensors of a safetensors file; an unreadable or malformed file is an error naming it.
fn read_safetensors(f: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(f).map_err(io(f))?;
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", f.display())))
}

/// Replaces the fresh adapter tensors in `fresh` by those of the file `f`, which must hold
/// every one of them with the same shape and nothing else.
fn read_adapter_init(f: &Path, fresh: &mut HashMap<String, Tensor>) -> Result<()> {
    let got = read_safetensors(f)?;
    for (k, v) in fresh.iter_mut().filter(|(k, _)| k.starts_with("adapter.")) {
        let t = got.get(k).ok_or_else(|| {
            TrainError::Invalid(format!(
                "{}: no tensor `{k}` (is it an adapter of this run's settings?)",
                f.display()
            ))
        })?;
        if t.dims() != v.dims() {
            return Err(TrainError::Invalid(format!(
                "{}: `{k}` has shape {:?}, the run's adapter needs {:?}",
                f.display(),
                t.dims(),
                v.dims()
            )));
        }
        *v = t.to_dtype(DType::F32)?;
    }
    if let Some(k) = got.keys().find(|k| !fresh.contains_key(*k)) {
        return Err(TrainError::Invalid(format!(
            "{}: tensor `{k}` is not part of the run's adapter",
            f.display()
        )));
    }
    Ok(())
}

/// The trainable side: parameters (`adapter.*`, and `vision.*` when the ViT trains) and the
/// frozen ViT's tensors otherwise.
pub struct Trainable {
    pub params: Params,
    /// ViT tensors (no prefix) when `train_vit` is false.
    pub frozen_vit: Option<HashMap<String, Tensor>>,
}

impl Trainable {
    /// Initial state (module docs): the ViT from `vision_init` (a stage-1 `vision/` export)
    /// or fresh, a fresh adapter.
    pub fn init(
        cfg: &AdapterTrainConfig,
        lm_hidden: usize,
        vision_init: Option<&Path>,
    ) -> Result<Self> {
        Self::init_from(cfg, lm_hidden, vision_init, None)
    }

    /// As [`Trainable::init`], the adapter read from `adapter_init` (an export's
    /// `adapter.safetensors`, tensors `adapter.*` of exactly the run's shapes) when given.
    pub fn init_from(
        cfg: &AdapterTrainConfig,
        lm_hidden: usize,
        vision_init: Option<&Path>,
        adapter_init: Option<&Path>,
    ) -> Result<Self> {
        cfg.validate()?;
        let vit: HashMap<String, Tensor> = match vision_init {
            Some(dir) => read_vision_export(dir, &cfg.vision)?,
            None => {
                let pc = PretrainConfig {
                    vision: cfg.vision.clone(),
                    seed: cfg.seed,
                    ..PretrainConfig::test_tiny()
                };
                init_params(&pc, 1)?.with_prefix("vision.")
            }
        };
        let mut tensors = init_adapter(
            &cfg.adapter_config(lm_hidden),
            cfg.seed,
            cfg.output_norm_gain,
        )?;
        if let Some(f) = adapter_init {
            read_adapter_init(f, &mut tensors)?;
        }
        let frozen_vit = if cfg.train_vit {
            tensors.extend(vit.into_iter().map(|(k, v)| (format!("vision.{k}"), v)));
            None
        } else {
            Some(vit)
        };
        Ok(Self {
            params: Params::from_tensors(tensors)?,
            frozen_vit,
        })
    }

    /// The ViT's current tensors (no prefix).
    pub fn vit_tensors(&self) -> HashMap<String, Tensor> {
        match &self.frozen_vit {
            Some(t) => t.clone(),
            None => self.params.with_prefix("vision."),
        }
    }

    /// Adds the LM's LoRA factors ([`prepare_lora_from`]) to the trained parameters, under
    /// the names the checkpoint uses.
    pub fn add_lora(&mut self, lm: &FrozenLm) -> Result<()> {
        self.params.add_vars(
            lm.model
                .lora_vars()
                .into_iter()
                .enumerate()
                .map(|(k, v)| (lora_var_name(k), v)),
        )?;
        Ok(())
    }

    /// ViT and adapter built from the current values: the differentiable path for what
    /// trains, the fast kernels (no graph) for a frozen ViT.
    pub fn build(&self, cfg: &AdapterTrainConfig, lm_hidden: usize) -> Result<ImageSide> {
        let mut vit = VisionEncoder::new(
            &VisionWeights::from_tensors(self.vit_tensors())?,
            cfg.vision.clone(),
        )?;
        vit.set_fast_kernels(!cfg.train_vit);
        let adapter_t: HashMap<String, Tensor> = self
            .params
            .tensors()
            .into_iter()
            .filter(|(k, _)| k.starts_with("adapter."))
            .collect();
        let mut adapter = AfmAdapter::load(adapter_t, cfg.adapter_config(lm_hidden))
            .map_err(|e| TrainError::Invalid(format!("adapter: {e}")))?;
        adapter.set_fast_kernels(false);
        Ok(ImageSide {
            vit,
            adapter,
            frozen_vit: !cfg.train_vit,
        })
    }
}

/// The ViT and the adapter of one step.
pub struct ImageSide {
    pub vit: VisionEncoder,
    pub adapter: AfmAdapter,
    frozen_vit: bool,
}

impl ImageSide {
    /// Image embeddings.
    ///
    /// # Shapes
    /// `pixels: (b, 3, s, s)` -> `(b, pool_h * pool_w, lm_hidden)`.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = self.vit.forward(pixels)?;
        if self.frozen_vit {
            x = x.detach();
        }
        let c = self.vit.config();
        let g = c.grid();
        self.adapter
            .forward(&x, (g, g), c.num_registers())
            .map_err(|e| TrainError::Invalid(format!("adapter: {e}")))
    }
}

/// SplitMix64: picks which of a sample's sequences example `j` trains on.
pub fn mix(j: u64) -> u64 {
    let mut z = j.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The question, answer and category (`None` for the caption) example `j` uses.
pub fn pick(
    sample: &Sample,
    j: u64,
    with_caption: bool,
) -> Result<(String, String, Option<QaCategory>)> {
    Ok(pick_turns(sample, j, with_caption, 1)?.swap_remove(0))
}

/// Whether training example `j` starts with its caption under `caption_share`
/// ([`AdapterTrainConfig::caption_share`]): a hash of `j` below the share.
pub fn caption_first(share: Option<f32>, j: u64) -> bool {
    share.is_some_and(|p| ((mix(j ^ 0xca97_1011) % 10_000) as f32) < p * 10_000.0)
}

/// The turns of example `j`: up to `max` of the sample's questions (and its caption, when
/// `with_caption` and not empty), each at most once. The first is the one numbered
/// `mix(j) % n` of the `n` candidates ([`pick`]); the rest follow in an order shuffled by
/// `mix(j)`.
pub fn pick_turns(
    sample: &Sample,
    j: u64,
    with_caption: bool,
    max: usize,
) -> Result<Vec<(String, String, Option<QaCategory>)>> {
    let cap = with_caption && !sample.caption.trim().is_empty();
    let n = sample.qa.len() + cap as usize;
    if n == 0 {
        return Err(TrainError::Invalid(format!(
            "sample {} of {:?} has no caption and no question",
            sample.index, sample.kind
        )));
    }
    let first = (mix(j) % n as u64) as usize;
    let mut rest: Vec<usize> = (0..n).filter(|&k| k != first).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(mix(j ^ 0x5eed_7a11));
    rest.shuffle(&mut rng);
    Ok(std::iter::once(first)
        .chain(rest)
        .take(max.max(1))
        .map(|k| {
            if cap && k == sample.qa.len() {
                (CAPTION_PROMPT.to_string(), sample.caption.clone(), None)
            } else {
                let q = &sample.qa[k];
                (q.question.clone(), q.answer.clone(), Some(q.category))
            }
        })
        .collect())
}

/// A batch: pixels, sequences, and what each asks.
pub struct Batch {
    /// `(views, 3, s, s)`: every example's views in turn (one each without tiling).
    pub pixels: Tensor,
    /// Views of each example (`views` above is their sum).
    pub view_counts: Vec<usize>,
    pub examples: Vec<Example>,
    /// The first turn of each sequence (the only one for held-out batches).
    pub questions: Vec<String>,
    pub answers: Vec<String>,
    pub categories: Vec<Option<QaCategory>>,
    /// Each image's caption (the caption-slot targets' source).
    pub captions: Vec<String>,
}

impl Batch {
    /// Examples `range` of the batch, with their views.
    pub fn part(&self, range: std::ops::Range<usize>) -> Result<Batch> {
        let at: usize = self.view_counts[..range.start].iter().sum();
        let n: usize = self.view_counts[range.clone()].iter().sum();
        Ok(Batch {
            pixels: self.pixels.narrow(0, at, n)?,
            view_counts: self.view_counts[range.clone()].to_vec(),
            examples: self.examples[range.clone()].to_vec(),
            questions: self.questions[range.clone()].to_vec(),
            answers: self.answers[range.clone()].to_vec(),
            categories: self.categories[range.clone()].to_vec(),
            captions: self.captions[range].to_vec(),
        })
    }
}

/// The first training example of step `step` (counted from 0 over all epochs):
/// `data_offset + step * batch_size`.
pub fn train_start(cfg: &AdapterTrainConfig, step: usize) -> u64 {
    cfg.data_offset + (step * cfg.batch_size) as u64
}

/// Examples `start .. start + n` of `split` (training: captions included, up to
/// `qa_per_sequence` turns per sequence; held-out: one question, no captions).
pub fn batch(
    cfg: &AdapterTrainConfig,
    fmt: &PromptFormat,
    split: Split,
    start: u64,
    n: usize,
    easy: Option<&EasyVqa>,
) -> Result<Batch> {
    let mut b = Batch {
        pixels: Tensor::zeros(1, DType::F32, &Device::Cpu)?,
        view_counts: vec![],
        examples: vec![],
        questions: vec![],
        answers: vec![],
        categories: vec![],
        captions: vec![],
    };
    let mut px = vec![];
    for j in start..start + n as u64 {
        let train = split == Split::Train;
        let mut s = match (train, &cfg.train_sources) {
            (true, Some(src)) => example_from(src, j, split, easy)?,
            _ => example(j, split, easy)?,
        };
        let mut with_caption = train;
        if let (true, Some(cats)) = (train, &cfg.train_categories) {
            with_caption = false;
            if s.qa.iter().any(|q| cats.contains(&q.category)) {
                s.qa.retain(|q| cats.contains(&q.category));
            }
        }
        let mut turns = pick_turns(
            &s,
            j,
            with_caption,
            if train { cfg.qa_per_sequence } else { 1 },
        )?;
        if train
            && with_caption
            && caption_first(cfg.caption_share, j)
            && !s.caption.trim().is_empty()
        {
            turns.retain(|t| t.2.is_some());
            turns.insert(0, (CAPTION_PROMPT.to_string(), s.caption.clone(), None));
            turns.truncate(cfg.qa_per_sequence.max(1));
        }
        // the image's text, as the pipeline puts it before the first question
        let first = match &cfg.read_text {
            Some(dir) => {
                let r = screen_reader(dir)?;
                let (lines, objects) = r.read(&s.image)?;
                let block = afm_fusion::vlm::image_block(Some(&lines), &objects);
                format!("{block}{}", turns[0].0)
            }
            None => turns[0].0.clone(),
        };
        let qa: Vec<(&str, &str)> = turns
            .iter()
            .enumerate()
            .map(|(i, (q, a, _))| (if i == 0 { first.as_str() } else { q.as_str() }, a.as_str()))
            .collect();
        let seq = |n: usize| {
            if cfg.isolate_turns {
                fmt.isolated_turns(&qa, n)
            } else {
                fmt.conversation(&qa, n)
            }
        };
        match &cfg.tiling {
            None => {
                b.examples.push(seq(cfg.tokens_per_image())?);
                px.push(pixels(&s, cfg.vision.image_size)?);
                b.view_counts.push(1);
            }
            Some(_) => {
                let proc = cfg.processor()?;
                let (w, h) = s.image.dimensions();
                let plan = proc.plan(w, h, None, true)?;
                b.examples.push(seq(plan.image_tokens)?);
                let v = proc.pixel_values(&s.image, &plan)?;
                b.view_counts.push(v.dim(0)?);
                px.push(v);
            }
        }
        let (q, a, c) = turns.into_iter().next().expect("at least one turn");
        b.questions.push(q);
        b.answers.push(a);
        b.categories.push(c);
        b.captions.push(s.caption);
    }
    b.pixels = if cfg.tiling.is_some() {
        Tensor::cat(&px, 0)?
    } else {
        Tensor::stack(&px, 0)?
    };
    Ok(b)
}

/// Each example's image embeddings from the embeddings of all views of a batch.
///
/// # Shapes
/// `views: (sum(counts), t, hidden)` -> `counts.len()` tensors `(counts[i] * t, hidden)`.
pub fn per_example(views: &Tensor, counts: &[usize]) -> Result<Vec<Tensor>> {
    let (n, t, h) = views.dims3()?;
    if counts.iter().sum::<usize>() != n {
        return Err(TrainError::Invalid(format!(
            "{n} views for view counts {counts:?}"
        )));
    }
    let mut at = 0;
    counts
        .iter()
        .map(|&c| {
            let r = views.narrow(0, at, c)?.reshape((c * t, h))?;
            at += c;
            Ok(r)
        })
        .collect()
}

/// Input embeddings of right-padded sequences with the image embeddings over the
/// placeholders (row `i`'s placeholders take `image[i]`'s rows in order).
///
/// # Shapes
/// `seqs.len() = b`, `image: (b, n, hidden)` -> `(b, max_len, hidden)`.
pub fn input_embeddings(
    lm: &DiffLm,
    seqs: &[&[u32]],
    placeholder: u32,
    image: &Tensor,
) -> Result<Tensor> {
    let rows = (0..image.dim(0)?)
        .map(|i| image.get(i))
        .collect::<candle_core::Result<Vec<_>>>()?;
    input_embeddings_ragged(lm, seqs, placeholder, &rows)
}

/// [`input_embeddings`] with each sequence's own number of image embeddings (tiled images).
///
/// # Shapes
/// `seqs.len() = b`, `images[i]: (n_i, hidden)` -> `(b, max_len, hidden)`.
pub fn input_embeddings_ragged(
    lm: &DiffLm,
    seqs: &[&[u32]],
    placeholder: u32,
    images: &[Tensor],
) -> Result<Tensor> {
    let b = images.len();
    if seqs.len() != b {
        return Err(TrainError::Invalid(format!(
            "{} sequences for {b} images",
            seqs.len()
        )));
    }
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut flat = Vec::with_capacity(b * t);
    for s in seqs {
        flat.extend_from_slice(s);
        // padding: any valid id (the causal mask keeps it out of the real positions)
        flat.extend(std::iter::repeat_n(
            s.first().copied().unwrap_or(0),
            t - s.len(),
        ));
    }
    let text = lm.embed(&Tensor::from_vec(flat.clone(), (b, t), &Device::Cpu)?)?;
    let mut rows = Vec::with_capacity(b);
    for (i, s) in seqs.iter().enumerate() {
        let count = s.iter().filter(|&&x| x == placeholder).count();
        let n = images[i].dim(0)?;
        if count != n {
            return Err(TrainError::Invalid(format!(
                "sequence {i} holds {count} image placeholders for {n} image embeddings"
            )));
        }
        let row_ids = &flat[i * t..(i + 1) * t];
        let text_i = text.get(i)?;
        let img_i = &images[i];
        let mut pieces = vec![];
        let (mut p, mut used) = (0, 0);
        while p < t {
            let is_img = row_ids[p] == placeholder && p < s.len();
            let start = p;
            while p < t && (row_ids[p] == placeholder && p < s.len()) == is_img {
                p += 1;
            }
            pieces.push(if is_img {
                let r = img_i.narrow(0, used, p - start)?;
                used += p - start;
                r
            } else {
                text_i.narrow(0, start, p - start)?
            });
        }
        rows.push(Tensor::cat(&pieces, 0)?);
    }
    Ok(Tensor::stack(&rows, 0)?)
}

/// Mean cross-entropy over the target tokens (answers + their end-of-turn tokens, the
/// examples' loss masks) of `examples`, given their image embeddings.
///
/// # Shapes
/// `image: (b, n, hidden)`.
pub fn sequence_loss(
    lm: &DiffLm,
    examples: &[Example],
    placeholder: u32,
    image: &Tensor,
) -> Result<Tensor> {
    let rows = (0..image.dim(0)?)
        .map(|i| image.get(i))
        .collect::<candle_core::Result<Vec<_>>>()?;
    sequence_loss_ragged(lm, examples, placeholder, &rows)
}

/// [`sequence_loss`] with each example's own image embeddings `(n_i, hidden)`.
pub fn sequence_loss_ragged(
    lm: &DiffLm,
    examples: &[Example],
    placeholder: u32,
    images: &[Tensor],
) -> Result<Tensor> {
    sequence_loss_weighted(lm, examples, placeholder, images, false)
}

/// [`sequence_loss_ragged`]; with `per_turn`, the mean over the batch's turns (each answer
/// with its end-of-turn token, a run of loss tokens) of each turn's mean token loss, so that
/// a one-word answer weighs as much as a 60-token caption (config `loss_per_turn`).
pub fn sequence_loss_weighted(
    lm: &DiffLm,
    examples: &[Example],
    placeholder: u32,
    images: &[Tensor],
    per_turn: bool,
) -> Result<Tensor> {
    let seqs: Vec<&[u32]> = examples.iter().map(|e| e.ids.as_slice()).collect();
    let x = input_embeddings_ragged(lm, &seqs, placeholder, images)?;
    let (b, t, h) = x.dims3()?;
    let packing = batch_packing(examples, t);
    let hs = lm
        .hidden_states_packed(&x, packing.as_ref())?
        .reshape((b * t, h))?;
    let (mut rows, mut targets) = (vec![], vec![]);
    for (i, e) in examples.iter().enumerate() {
        for k in (1..e.ids.len()).filter(|&k| e.loss[k]) {
            rows.push((i * t + k - 1) as u32);
            targets.push(e.ids[k]);
        }
    }
    if rows.is_empty() {
        return Err(TrainError::Invalid("the batch has no target tokens".into()));
    }
    let n = rows.len();
    let sel = hs.index_select(&Tensor::from_vec(rows, n, &Device::Cpu)?, 0)?;
    let logits = lm.logits(&sel)?;
    let targets = Tensor::from_vec(targets, n, &Device::Cpu)?;
    if !per_turn {
        return Ok(candle_nn::loss::cross_entropy(&logits, &targets)?);
    }
    let weights = turn_weights(examples);
    let w = Tensor::from_vec(weights, n, &Device::Cpu)?;
    let nll = candle_nn::ops::log_softmax(&logits, D::Minus1)?
        .gather(&targets.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?;
    Ok((nll * w)?.sum_all()?)
}

/// Per loss token of `examples` (in order), `1 / (turn's tokens * turns)`: the weights that
/// make the weighted sum of token losses the mean over turns of each turn's mean. A turn is a
/// run of consecutive loss tokens.
pub fn turn_weights(examples: &[Example]) -> Vec<f32> {
    let mut runs: Vec<usize> = vec![];
    for e in examples {
        let mut prev = false;
        for &m in e.loss.iter().skip(1) {
            if m {
                if prev {
                    *runs.last_mut().expect("a run is open") += 1;
                } else {
                    runs.push(1);
                }
            }
            prev = m;
        }
    }
    let turns = runs.len().max(1) as f32;
    runs.iter()
        .flat_map(|&r| std::iter::repeat_n(1.0 / (r as f32 * turns), r))
        .collect()
}

/// The batch's [`Packing`] when any of `examples` packs isolated turns (`None`: all plain
/// causal sequences). Plain examples take positions `0..len` in segment 0; the right
/// padding of every row is a segment of its own, so no real token reads it.
pub fn batch_packing(examples: &[Example], t: usize) -> Option<Packing> {
    if examples.iter().all(|e| e.packing.is_none()) {
        return None;
    }
    let mut p = Packing {
        positions: Vec::with_capacity(examples.len() * t),
        segments: Vec::with_capacity(examples.len() * t),
    };
    for e in examples {
        let n = e.ids.len();
        match &e.packing {
            Some(q) => {
                p.positions.extend_from_slice(&q.positions);
                p.segments.extend_from_slice(&q.segments);
            }
            None => {
                p.positions.extend(0..n as u32);
                p.segments.extend(std::iter::repeat_n(0, n));
            }
        }
        p.positions.extend(0..(t - n) as u32);
        p.segments.extend(std::iter::repeat_n(u32::MAX, t - n));
    }
    Some(p)
}

/// Greedy answers: up to `max_new` tokens after each prompt, stopping at `stop`; returns the
/// generated ids (the stop token excluded). No cache: every step re-runs the sequences.
///
/// # Shapes
/// `image: (b, n, hidden)` (detached by the caller for speed).
pub fn greedy(
    lm: &DiffLm,
    prompts: &[Vec<u32>],
    placeholder: u32,
    image: &Tensor,
    max_new: usize,
    stop: u32,
) -> Result<Vec<Vec<u32>>> {
    let rows = (0..image.dim(0)?)
        .map(|i| image.get(i))
        .collect::<candle_core::Result<Vec<_>>>()?;
    greedy_ragged(lm, prompts, placeholder, &rows, max_new, stop)
}

/// [`greedy`] with each prompt's own image embeddings `(n_i, hidden)`.
pub fn greedy_ragged(
    lm: &DiffLm,
    prompts: &[Vec<u32>],
    placeholder: u32,
    images: &[Tensor],
    max_new: usize,
    stop: u32,
) -> Result<Vec<Vec<u32>>> {
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<Vec<u32>> = vec![vec![]; prompts.len()];
    let mut done = vec![false; prompts.len()];
    for _ in 0..max_new {
        if done.iter().all(|&d| d) {
            break;
        }
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        let x = input_embeddings_ragged(lm, &refs, placeholder, images)?;
        let (b, t, h) = x.dims3()?;
        let hs = lm.hidden_states(&x)?.reshape((b * t, h))?;
        let last: Vec<u32> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| (i * t + s.len() - 1) as u32)
            .collect();
        let sel = hs.index_select(&Tensor::from_vec(last, b, &Device::Cpu)?, 0)?;
        let next: Vec<u32> = lm.logits(&sel)?.argmax(D::Minus1)?.to_vec1()?;
        for i in 0..b {
            if done[i] {
                continue;
            }
            if next[i] == stop {
                done[i] = true;
            } else {
                out[i].push(next[i]);
                seqs[i].push(next[i]);
            }
        }
    }
    Ok(out)
}

/// One held-out answer, for the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSample {
    pub question: String,
    pub expected: String,
    pub got: String,
}

/// One epoch's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f32,
    pub eval_loss: f32,
    /// Exact-match accuracy of greedy answers over all evaluated questions.
    pub eval_accuracy: f32,
    /// `(correct, asked)` per question category (snake_case names).
    pub per_category: BTreeMap<String, (usize, usize)>,
    /// The first few answers, to read.
    pub samples: Vec<EvalSample>,
    pub seconds: f64,
    /// Held-out caption-slot accuracy ([`crate::caption_slots`]) when the run has that loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_accuracy: Option<f32>,
    /// [`crate::spread`] of the held-out images' image tokens (the adapter's output): near
    /// 0 means they collapsed onto one vector. `None` in runs from before it was reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_token_spread: Option<f32>,
}

/// Held-out figures of the current parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    pub loss: f32,
    pub accuracy: f32,
    pub per_category: BTreeMap<String, (usize, usize)>,
    pub samples: Vec<EvalSample>,
    /// Held-out caption-slot accuracy ([`crate::caption_slots`]) when the run has that loss.
    pub slot_accuracy: Option<f32>,
    /// [`crate::spread`] of the held-out images' image tokens.
    pub image_token_spread: Option<f32>,
}

fn category_name(c: Option<QaCategory>) -> String {
    match c {
        None => "caption".into(),
        Some(c) => serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| format!("{c:?}")),
    }
}

/// Held-out loss and greedy exact-match accuracy (module docs), in batches of `batch_size`.
///
/// With `cfg.caption_slots` set (and `slots` given), the caption-slot accuracy of the same
/// held-out images too.
pub fn evaluate(
    cfg: &AdapterTrainConfig,
    trainable: &Trainable,
    lm: &FrozenLm,
    fmt: &PromptFormat,
    easy_eval: Option<&EasyVqa>,
    slots: Option<&SlotHead>,
) -> Result<EvalResult> {
    let side = trainable.build(cfg, lm.hidden_size())?;
    let mut res = EvalResult {
        loss: 0.0,
        accuracy: 0.0,
        per_category: BTreeMap::new(),
        samples: vec![],
        slot_accuracy: None,
        image_token_spread: None,
    };
    let (mut slot_hits, mut slot_words) = (0usize, 0usize);
    // per held-out image, the mean of its image tokens (for the spread)
    let mut token_means: Vec<Vec<f32>> = Vec::with_capacity(cfg.eval_questions);
    let total = cfg.eval_questions;
    let (mut done, mut correct, mut loss_sum, mut batches) = (0usize, 0usize, 0f32, 0usize);
    while done < total {
        let n = cfg.batch_size.min(total - done);
        let b = batch(cfg, fmt, Split::HeldOut, done as u64, n, easy_eval)?;
        let img = side.embed(&b.pixels)?.detach();
        let imgs = per_example(&img, &b.view_counts)?;
        for t in &imgs {
            token_means.push(crate::spread::token_mean(t)?);
        }
        if let (Some(c), Some(head)) = (&cfg.caption_slots, slots) {
            let t = slot_targets(cfg, fmt, &b.captions)?;
            let r = head.loss(&img, &t, fmt.placeholder_id(), c)?;
            slot_hits += r.hits;
            slot_words += r.words;
        }
        let l = sequence_loss_ragged(&lm.model, &b.examples, fmt.placeholder_id(), &imgs)?;
        loss_sum += l.to_scalar::<f32>()?;
        batches += 1;
        let prompts: Vec<Vec<u32>> = b
            .examples
            .iter()
            .map(|e| e.ids[..e.prompt_len].to_vec())
            .collect();
        let gen = greedy_ragged(
            &lm.model,
            &prompts,
            fmt.placeholder_id(),
            &imgs,
            cfg.eval_max_new_tokens,
            fmt.end_of_turn_id(),
        )?;
        for (i, g) in gen.iter().enumerate() {
            let got = lm.tokenizer.decode(g, true)?;
            let ok = got.trim() == b.answers[i].trim();
            correct += ok as usize;
            let e = res
                .per_category
                .entry(category_name(b.categories[i]))
                .or_insert((0, 0));
            e.0 += ok as usize;
            e.1 += 1;
            if res.samples.len() < 4 {
                res.samples.push(EvalSample {
                    question: b.questions[i].clone(),
                    expected: b.answers[i].clone(),
                    got,
                });
            }
        }
        done += n;
    }
    res.loss = loss_sum / batches.max(1) as f32;
    res.accuracy = correct as f32 / total.max(1) as f32;
    res.image_token_spread = crate::spread::spread(&token_means);
    if cfg.caption_slots.is_some() && slots.is_some() {
        res.slot_accuracy = Some(slot_hits as f32 / slot_words.max(1) as f32);
    }
    Ok(res)
}

/// The settings a run directory records (`adapter.json`'s `config`): a resumed run must match
/// all of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterRunConfig {
    pub train: AdapterTrainConfig,
    pub lm: LmInfo,
    /// sha256 of the stage-1 `vision/model.safetensors` the ViT started from (`None`: fresh).
    pub vision_init_sha256: Option<String>,
    /// sha256 of the `adapter.safetensors` the adapter started from (`None`: fresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_init_sha256: Option<String>,
    /// sha256 of the LoRA file the LM's adapter started from (`None`: fresh, or no LoRA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_init_sha256: Option<String>,
}

/// What a stage-2 run starts from (each `None`: fresh weights).
#[derive(Debug, Clone, Copy, Default)]
pub struct Inits<'a> {
    /// A stage-1 `vision/` export.
    pub vision: Option<&'a Path>,
    /// An export's `adapter.safetensors`.
    pub adapter: Option<&'a Path>,
    /// The LoRA file [`prepare_lora_from`] attached (recorded in `adapter.json`).
    pub lora: Option<&'a Path>,
}

/// `adapter.json`.
pub type RunState = crate::runloop::RunState<AdapterRunConfig, EpochReport>;

/// What a run reports as it goes; `Done` names the `afm-tiny/` export.
pub type Event = crate::runloop::Event<EpochReport>;

/// Runs (or resumes, when `dir` holds `adapter.json` and its checkpoint) a stage-2 run.
/// `vision_init`: a stage-1 `vision/` export to start the ViT from. `easy` / `easy_eval` as in
/// [`crate::pretrain::run`] (consistent across resumptions). `until`: stop after that many
/// steps in all; the export is written only when the run is complete. `adapter_init`: an
/// export's `adapter.safetensors` to start the adapter from ([`Trainable::init_from`]).
#[allow(clippy::too_many_arguments)]
pub fn run(
    cfg: &AdapterTrainConfig,
    lm: &FrozenLm,
    vision_init: Option<&Path>,
    adapter_init: Option<&Path>,
    dir: &Path,
    easy: Option<&EasyVqa>,
    easy_eval: Option<&EasyVqa>,
    until: Option<usize>,
    on_event: &mut dyn FnMut(&Event),
) -> Result<RunState> {
    let inits = Inits {
        vision: vision_init,
        adapter: adapter_init,
        lora: None,
    };
    run_with(cfg, lm, inits, dir, easy, easy_eval, until, on_event)
}

/// [`run`] from the starting points `inits`.
#[allow(clippy::too_many_arguments)]
pub fn run_with(
    cfg: &AdapterTrainConfig,
    lm: &FrozenLm,
    inits: Inits<'_>,
    dir: &Path,
    easy: Option<&EasyVqa>,
    easy_eval: Option<&EasyVqa>,
    until: Option<usize>,
    on_event: &mut dyn FnMut(&Event),
) -> Result<RunState> {
    let (vision_init, adapter_init) = (inits.vision, inits.adapter);
    cfg.validate()?;
    let fmt = PromptFormat::new(&lm.tokenizer, &cfg.image_placeholder)?;
    let mut trainable = Trainable::init_from(cfg, lm.hidden_size(), vision_init, adapter_init)?;
    match (&cfg.lora, lm.model.lora_vars().is_empty()) {
        (Some(_), true) => {
            return Err(TrainError::Invalid(
                "the run trains a LoRA adapter but the language model has none attached (call prepare_lora first)".into(),
            ))
        }
        (None, false) => {
            return Err(TrainError::Invalid(
                "the language model carries a LoRA adapter that the run's config does not name"
                    .into(),
            ))
        }
        _ => {}
    }
    trainable.add_lora(lm)?;
    let run_cfg = AdapterRunConfig {
        train: cfg.clone(),
        lm: lm.info.clone(),
        vision_init_sha256: vision_init
            .map(|d| sha256_file(&d.join("model.safetensors")))
            .transpose()?,
        adapter_init_sha256: adapter_init.map(sha256_file).transpose()?,
        lora_init_sha256: inits.lora.map(sha256_file).transpose()?,
    };
    let slots = match cfg.caption_slots {
        Some(_) => Some(SlotHead::new(&lm.model)?),
        None => None,
    };
    let spec = LoopSpec {
        dir,
        state_file: "adapter.json",
        steps_per_epoch: cfg.steps_per_epoch,
        epochs: cfg.epochs,
        warmup_steps: cfg.warmup_steps,
        checkpoint_every: cfg.checkpoint_every,
        adamw: cfg.adamw,
        until,
    };
    let st = run_loop(
        &run_cfg,
        &trainable.params,
        &spec,
        &mut |step| {
            let t0 = Instant::now();
            let b = batch(
                cfg,
                &fmt,
                Split::Train,
                train_start(cfg, step),
                cfg.batch_size,
                easy,
            )?;
            let data_s = t0.elapsed().as_secs_f64();
            let (loss, grads) = match cfg.micro_batch.filter(|&m| m < b.examples.len()) {
                Some(m) => {
                    let (l, g) = step_grads(cfg, &trainable, lm, &fmt, &b, m)?;
                    (l, Some(g))
                }
                None => (
                    step_loss(cfg, &trainable, lm, &fmt, &b, slots.as_ref())?,
                    None,
                ),
            };
            Ok(StepLoss {
                loss,
                grads,
                examples: cfg.batch_size,
                data_s,
            })
        },
        &mut |end: EpochEnd| {
            let r = evaluate(cfg, &trainable, lm, &fmt, easy_eval, slots.as_ref())?;
            Ok(EpochReport {
                epoch: end.epoch,
                train_loss: end.train_loss,
                eval_loss: r.loss,
                eval_accuracy: r.accuracy,
                per_category: r.per_category,
                samples: r.samples,
                seconds: end.seconds,
                slot_accuracy: r.slot_accuracy,
                image_token_spread: r.image_token_spread,
            })
        },
        on_event,
    )?;
    if st.step == cfg.total_steps() {
        let out = export(cfg, &trainable, lm, &fmt, dir)?;
        on_event(&Event::Done { dir: out });
    }
    Ok(st)
}

/// The training loss of one batch on the differentiable path.
///
/// `slots`: the LM's embedding table, needed (and only used) when `cfg.caption_slots` is set.
pub fn step_loss(
    cfg: &AdapterTrainConfig,
    trainable: &Trainable,
    lm: &FrozenLm,
    fmt: &PromptFormat,
    b: &Batch,
    slots: Option<&SlotHead>,
) -> Result<Tensor> {
    let side = trainable.build(cfg, lm.hidden_size())?;
    let img = side.embed(&b.pixels)?;
    let mut loss = if cfg.lm_loss {
        Some(sequence_loss_weighted(
            &lm.model,
            &b.examples,
            fmt.placeholder_id(),
            &per_example(&img, &b.view_counts)?,
            cfg.loss_per_turn,
        )?)
    } else {
        None
    };
    if let Some(w) = cfg.common_token_weight.filter(|&w| w > 0.0) {
        let l = (common_token_share(&img)? * w as f64)?;
        loss = Some(match loss {
            Some(a) => (a + l)?,
            None => l,
        });
    }
    if let Some(c) = &cfg.caption_slots {
        let head = slots.ok_or_else(|| {
            TrainError::Invalid("the caption-slot loss needs the LM's embedding table".into())
        })?;
        let t = slot_targets(cfg, fmt, &b.captions)?;
        let l = (head.loss(&img, &t, fmt.placeholder_id(), c)?.loss * c.weight as f64)?;
        loss = Some(match loss {
            Some(a) => (a + l)?,
            None => l,
        });
    }
    loss.ok_or_else(|| TrainError::Invalid("the run has no loss (config `lm_loss`)".into()))
}

/// What [`sequence_loss_weighted`] averages over in `examples`: their answer tokens, or with
/// `per_turn` their turns (runs of answer tokens).
pub fn loss_units(examples: &[Example], per_turn: bool) -> usize {
    examples
        .iter()
        .map(|e| {
            let m = &e.loss[1.min(e.loss.len())..];
            if per_turn {
                m.iter()
                    .enumerate()
                    .filter(|&(k, &x)| x && (k == 0 || !m[k - 1]))
                    .count()
            } else {
                m.iter().filter(|&&x| x).count()
            }
        })
        .sum()
}

/// The gradients of one batch's [`step_loss`], run as micro-batches of `micro` examples
/// (config `micro_batch`): each micro-batch's gradients weighted by its share of the batch's
/// [`loss_units`], so that their sum is the whole batch's gradient (the loss is a mean over
/// those units). Only each micro-batch's graph is alive at a time. Returns the batch loss (a
/// scalar without graph) and the summed gradients of `trainable`'s parameters.
pub fn step_grads(
    cfg: &AdapterTrainConfig,
    trainable: &Trainable,
    lm: &FrozenLm,
    fmt: &PromptFormat,
    b: &Batch,
    micro: usize,
) -> Result<(Tensor, candle_core::backprop::GradStore)> {
    let total = loss_units(&b.examples, cfg.loss_per_turn);
    if total == 0 {
        return Err(TrainError::Invalid("the batch has no target tokens".into()));
    }
    let (mut sum, mut loss) = (None, 0f64);
    let n = b.examples.len();
    for start in (0..n).step_by(micro.max(1)) {
        let part = b.part(start..(start + micro).min(n))?;
        let units = loss_units(&part.examples, cfg.loss_per_turn);
        if units == 0 {
            continue;
        }
        let w = units as f64 / total as f64;
        let l = step_loss(cfg, trainable, lm, fmt, &part, None)?;
        loss += w * l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        trainable.params.accumulate(&mut sum, l.backward()?, w)?;
    }
    let grads = sum.ok_or_else(|| TrainError::Invalid("the batch has no target tokens".into()))?;
    Ok((Tensor::new(loss as f32, &Device::Cpu)?, grads))
}

/// The share of the image tokens' energy that the batch's views have in common: the mean
/// square of the per-position mean over views, over the mean square of all tokens. 1 when
/// every view gives the same tokens, 0 when they average to zero at every position (config
/// `common_token_weight`). A batch of one view has nothing to compare and gives 0.
///
/// # Shapes
/// `img: (views, n, hidden)` -> scalar.
pub fn common_token_share(img: &Tensor) -> Result<Tensor> {
    let (v, _, _) = img.dims3()?;
    if v < 2 {
        return Ok(Tensor::zeros((), DType::F32, img.device())?);
    }
    let common = img.mean(0)?.sqr()?.mean_all()?;
    let all = (img.sqr()?.mean_all()? + 1e-12)?;
    Ok(common.div(&all)?)
}

/// The caption-slot targets of a batch's captions ([`caption_slots::targets`]), padded with
/// the image placeholder.
pub fn slot_targets(
    cfg: &AdapterTrainConfig,
    fmt: &PromptFormat,
    captions: &[String],
) -> Result<Vec<Vec<u32>>> {
    captions
        .iter()
        .map(|c| {
            caption_slots::targets(
                fmt.tokenizer(),
                c,
                cfg.tokens_per_image(),
                fmt.placeholder_id(),
            )
        })
        .collect()
}

/// Writes `dir/afm-tiny/` (module docs) and returns its path.
pub fn export(
    cfg: &AdapterTrainConfig,
    trainable: &Trainable,
    lm: &FrozenLm,
    fmt: &PromptFormat,
    dir: &Path,
) -> Result<PathBuf> {
    let out = dir.join("afm-tiny");
    let vdir = out.join("vision");
    std::fs::create_dir_all(&vdir).map_err(io(&vdir))?;
    write_json_atomic(&vdir.join("config.json"), &cfg.vision)?;
    let vt: HashMap<String, Tensor> = trainable
        .vit_tensors()
        .into_iter()
        .map(|(k, v)| (format!("vision_model.{k}"), v))
        .collect();
    candle_core::safetensors::save(&vt, vdir.join("model.safetensors"))?;
    let at: HashMap<String, Tensor> = trainable
        .params
        .tensors()
        .into_iter()
        .filter(|(k, _)| k.starts_with("adapter."))
        .collect();
    candle_core::safetensors::save(&at, out.join("adapter.safetensors"))?;
    let c = AfmTinyConfig {
        model_type: "afm-tiny".into(),
        vision: cfg.vision.clone(),
        adapter: cfg.adapter_config(lm.hidden_size()),
        lm: lm.info.clone(),
        image_placeholder: cfg.image_placeholder.clone(),
        image_placeholder_id: fmt.placeholder_id(),
        tokens_per_image: cfg.tokens_per_image(),
        image_size: cfg.vision.image_size,
        image_mean: 0.5,
        image_std: 0.5,
        caption_prompt: CAPTION_PROMPT.into(),
        // `None`: trained on one view per image, and so it runs
        tiling: cfg.tiling,
    };
    write_json_atomic(&out.join("config.json"), &c)?;
    let lora_file = out.join(afm_fusion::model_dir::EXPORT_LORA_FILE);
    if cfg.lora.is_some() {
        lm.model.lora_adapter()?.save(&lora_file)?;
    } else if lora_file.exists() {
        std::fs::remove_file(&lora_file).map_err(io(&lora_file))?;
    }
    Ok(out)
}
