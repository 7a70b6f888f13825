//! LoRA adapters on the language models' projections: low-rank updates
//! `W' = W + (alpha / r) * B A` on attention q/k/v/o and MLP gate/up/down, as the AFM report
//! uses them (rank 32, alpha 16, all seven projections) to customise a frozen base.
//!
//! # File format
//! A safetensors file with PEFT's tensor names (module paths are the base checkpoint's HF
//! names without `.weight`):
//! - `base_model.model.{module}.lora_A.weight (r, in)`,
//! - `base_model.model.{module}.lora_B.weight (out, r)`,
//!
//! e.g. `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`; and string metadata
//! `afm_lora_version` (`1`), `rank`, `alpha`, `targets` (`q,k,v,o,gate,up,down`, any subset)
//! and `base_sha256`, the sha256 of the base checkpoint ([`checkpoint_sha256`]). An adapter
//! only means something on the weights it was trained on, so applying it to a model whose
//! hash differs is refused ([`LmError::LoraBaseMismatch`], naming both hashes). Keep adapter
//! files out of a safetensors model directory: every `*.safetensors` there is a weight shard.
//!
//! PEFT's own `adapter_model.safetensors` has the same tensors but no base hash; it is
//! imported with [`LoraAdapter::from_peft`] (the caller names the base's hash) or
//! [`LoraAdapter::import_peft`] (the caller names the base file, whose hash is computed and
//! whose layout is followed), and can then be saved as an afm file. Loading a PEFT file with
//! [`LoraAdapter::load`] is an error that says so: nothing binds an adapter to a base
//! silently.
//!
//! # Applying
//! [`LoraMode::Merged`] adds `scale * B A` into dense f32 weights (no cost at inference);
//! [`LoraMode::Unmerged`] keeps A and B in f32 beside the base weights and computes
//! `y = base(x) + scale * (x A^T) B^T`, the only way on a quantized base (GGUF Q4_1/Q8_0
//! blocks, int8); [`LoraMode::Auto`] merges where the base matrix is dense f32 and keeps the
//! rest unmerged. Fused q/k/v and gate/up matrices take each part's delta on that part's
//! slice of the output.
//!
//! Module paths: `DeviceModel`: `model.layers.{i}.self_attn.{q,k,v,o}_proj` (KV-reuse layers
//! have no `k_proj`/`v_proj`) and `model.layers.{i}.mlp.{gate,up,down}_proj`. `ServerModel`
//! (PT-MoE): `model.tracks.{t}.layers.{i}.self_attn.{q,k,v,o}_proj`; dense layers
//! `model.tracks.{t}.layers.{i}.mlp.{gate,up,down}_proj`; MoE layers every expert,
//! `...mlp.experts.{e}.{gate,up,down}_proj`, and the shared expert
//! `...mlp.shared_expert.{gate,up,down}_proj`. The MoE router, the embeddings and the output
//! head are never targeted (a change of routing is not a low-rank update of a projection).

use crate::error::{LmError, Result};
use crate::linear::Fused;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The paper's rank.
pub const DEFAULT_RANK: usize = 32;
/// The paper's alpha.
pub const DEFAULT_ALPHA: f32 = 16.0;

/// Prefix of every tensor name (PEFT's).
const PREFIX: &str = "base_model.model.";
const A_SUFFIX: &str = ".lora_A.weight";
const B_SUFFIX: &str = ".lora_B.weight";

/// Metadata keys of an afm adapter file.
const META_VERSION: &str = "afm_lora_version";
const META_RANK: &str = "rank";
const META_ALPHA: &str = "alpha";
const META_TARGETS: &str = "targets";
const META_BASE: &str = "base_sha256";
const VERSION: &str = "1";

/// A projection kind an adapter can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    /// All seven, in file order.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// Short name, as in the `targets` metadata: `q`, `k`, `v`, `o`, `gate`, `up`, `down`.
    pub fn short(self) -> &'static str {
        match self {
            LoraTarget::Q => "q",
            LoraTarget::K => "k",
            LoraTarget::V => "v",
            LoraTarget::O => "o",
            LoraTarget::Gate => "gate",
            LoraTarget::Up => "up",
            LoraTarget::Down => "down",
        }
    }

    /// The last component of the module path: `q_proj`, ..., `down_proj`.
    pub fn proj(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// The projection's HF module path inside the layer at `layer` (e.g. `model.layers.3`):
    /// `model.layers.3.self_attn.q_proj`, ..., `model.layers.3.mlp.down_proj`.
    pub fn module_in(self, layer: &str) -> String {
        let group = match self {
            LoraTarget::Gate | LoraTarget::Up | LoraTarget::Down => "mlp",
            _ => "self_attn",
        };
        format!("{layer}.{group}.{}", self.proj())
    }

    /// Accepts the short name or the projection name (`q` or `q_proj`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.short() == s || t.proj() == s)
    }

    /// The target of a module path (its last component), if it is one.
    fn of_module(module: &str) -> Option<Self> {
        Self::parse(module.rsplit('.').next()?)
            .filter(|t| module.ends_with(&format!(".{}", t.proj())))
    }
}

/// Parses a comma-separated target list (`q,k,v,o,gate,up,down`; `q_proj` also accepted;
/// `all` for the seven), naming an unknown entry.
pub fn parse_targets(s: &str) -> Result<Vec<LoraTarget>> {
    if s.trim() == "all" {
        return Ok(LoraTarget::ALL.to_vec());
    }
    let mut v = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let t = LoraTarget::parse(p).ok_or_else(|| {
            LmError::config(
                "targets",
                format!("`{p}` is not a LoRA target (q, k, v, o, gate, up, down)"),
            )
        })?;
        if !v.contains(&t) {
            v.push(t);
        }
    }
    if v.is_empty() {
        return Err(LmError::config("targets", "no LoRA target given"));
    }
    v.sort();
    Ok(v)
}

/// Rank, alpha and targets of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    /// Sorted, no duplicates.
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    /// Rank 32, alpha 16, all seven projections (the paper's).
    fn default() -> Self {
        Self {
            rank: DEFAULT_RANK,
            alpha: DEFAULT_ALPHA,
            targets: LoraTarget::ALL.to_vec(),
        }
    }
}

impl LoraConfig {
    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(LmError::config("rank", "must be at least 1"));
        }
        if !self.alpha.is_finite() {
            return Err(LmError::config(
                "alpha",
                format!("{} is not finite", self.alpha),
            ));
        }
        if self.targets.is_empty() {
            return Err(LmError::config("targets", "no LoRA target given"));
        }
        Ok(())
    }
}

/// One projection of a model that an adapter can target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraSite {
    /// HF module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub module: String,
    pub target: LoraTarget,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl LoraSite {
    pub(crate) fn new(prefix: &str, target: LoraTarget, out_dim: usize, in_dim: usize) -> Self {
        Self {
            module: format!("{prefix}.{}", target.proj()),
            target,
            out_dim,
            in_dim,
        }
    }
}

/// The two factors of one projection's update.
///
/// # Shapes
/// `a: (r, in)`, `b: (out, r)`, f32.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// A LoRA adapter bound to one base checkpoint (see the module docs).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    config: LoraConfig,
    base_sha256: String,
    /// Keyed by module path.
    modules: BTreeMap<String, LoraPair>,
}

/// `base_model.model.{module}.lora_A.weight`.
pub fn a_name(module: &str) -> String {
    format!("{PREFIX}{module}{A_SUFFIX}")
}

/// `base_model.model.{module}.lora_B.weight`.
pub fn b_name(module: &str) -> String {
    format!("{PREFIX}{module}{B_SUFFIX}")
}

fn check_sha256(s: &str) -> Result<()> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    {
        return Err(LmError::config(
            META_BASE,
            format!("`{s}` is not a sha256 (64 lowercase hex digits)"),
        ));
    }
    Ok(())
}

fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    let bad = t
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .any(|v| !v.is_finite());
    if bad {
        return Err(LmError::BadTensor {
            name: name.to_string(),
            reason: "contains NaN or infinite values".into(),
        });
    }
    Ok(())
}

impl LoraAdapter {
    /// An adapter from its parts, validated: every module's target is among
    /// `config.targets`, `a` is `(rank, in)` and `b` is `(out, rank)`, all values finite.
    /// Whether the modules exist in the base (and their widths) is checked when applying.
    pub fn new(
        config: LoraConfig,
        base_sha256: &str,
        modules: BTreeMap<String, LoraPair>,
    ) -> Result<Self> {
        let mut config = config;
        config.targets.sort();
        config.targets.dedup();
        config.validate()?;
        check_sha256(base_sha256)?;
        let r = config.rank;
        let mut checked = BTreeMap::new();
        for (module, LoraPair { a, b }) in modules {
            let an = a_name(&module);
            let target = LoraTarget::of_module(&module).ok_or_else(|| LmError::BadTensor {
                name: an.clone(),
                reason: format!(
                    "`{module}` is not a LoRA target projection (q/k/v/o_proj, \
                     gate/up/down_proj)"
                ),
            })?;
            if !config.targets.contains(&target) {
                return Err(LmError::BadTensor {
                    name: an,
                    reason: format!(
                        "target `{}` is not among the adapter's targets ({})",
                        target.short(),
                        targets_string(&config.targets)
                    ),
                });
            }
            let a = a.to_dtype(DType::F32)?;
            let b = b.to_dtype(DType::F32)?;
            let bn = b_name(&module);
            match a.dims() {
                [ra, _] if *ra == r => {}
                d => {
                    return Err(LmError::ShapeMismatch {
                        name: an,
                        expected: vec![r, a.dims().last().copied().unwrap_or(0)],
                        got: d.to_vec(),
                    })
                }
            }
            match b.dims() {
                [_, rb] if *rb == r => {}
                d => {
                    return Err(LmError::ShapeMismatch {
                        name: bn,
                        expected: vec![b.dims().first().copied().unwrap_or(0), r],
                        got: d.to_vec(),
                    })
                }
            }
            check_finite(&an, &a)?;
            check_finite(&bn, &b)?;
            checked.insert(module, LoraPair { a, b });
        }
        if checked.is_empty() {
            return Err(LmError::Invalid("a LoRA adapter with no modules".into()));
        }
        Ok(Self {
            config,
            base_sha256: base_sha256.to_string(),
            modules: checked,
        })
    }

    /// A seeded random adapter on every site whose target is in `config.targets`:
    /// `A ~ N(0, 1/in)`, `B ~ N(0, b_std^2)` (`b_std = 0` gives PEFT's initial state, an
    /// adapter that changes nothing). For tests and as the start of training.
    pub fn random(
        sites: &[LoraSite],
        config: LoraConfig,
        base_sha256: &str,
        seed: u64,
        b_std: f32,
    ) -> Result<Self> {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let r = config.rank;
        let mut modules = BTreeMap::new();
        for s in sites.iter().filter(|s| config.targets.contains(&s.target)) {
            let a = crate::random::randn(&mut rng, &[r, s.in_dim], 1.0 / (s.in_dim as f32).sqrt())?;
            let b = if b_std == 0.0 {
                Tensor::zeros((s.out_dim, r), DType::F32, &Device::Cpu)?
            } else {
                crate::random::randn(&mut rng, &[s.out_dim, r], b_std)?
            };
            modules.insert(s.module.clone(), LoraPair { a, b });
        }
        Self::new(config, base_sha256, modules)
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.config.scale()
    }

    /// The sha256 of the base checkpoint this adapter belongs to.
    pub fn base_sha256(&self) -> &str {
        &self.base_sha256
    }

    /// Module paths and factors.
    pub fn modules(&self) -> &BTreeMap<String, LoraPair> {
        &self.modules
    }

    /// The same factors bound to another base hash. Only for re-binding an adapter to a
    /// base whose weights are known to be the same (e.g. the same model re-saved); nothing
    /// checks that.
    pub fn rebind(mut self, base_sha256: &str) -> Result<Self> {
        check_sha256(base_sha256)?;
        self.base_sha256 = base_sha256.to_string();
        Ok(self)
    }

    /// Refuses a model whose checkpoint hash is not the adapter's base hash.
    pub fn check_base(&self, model_sha256: &str) -> Result<()> {
        if model_sha256 != self.base_sha256 {
            return Err(LmError::LoraBaseMismatch {
                adapter_base: self.base_sha256.clone(),
                model_base: model_sha256.to_string(),
            });
        }
        Ok(())
    }

    /// Writes the afm adapter file (see the module docs).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (m, p) in &self.modules {
            tensors.push((a_name(m), p.a.clone()));
            tensors.push((b_name(m), p.b.clone()));
        }
        let meta: HashMap<String, String> = [
            (META_VERSION, VERSION.to_string()),
            (META_RANK, self.config.rank.to_string()),
            (META_ALPHA, format!("{}", self.config.alpha)),
            (META_TARGETS, targets_string(&self.config.targets)),
            (META_BASE, self.base_sha256.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize_to_file(tensors, Some(meta), path).map_err(|e| LmError::BadFile {
            path: path.to_path_buf(),
            format: "LoRA adapter",
            reason: format!("cannot write: {e}"),
        })
    }

    /// Reads an afm adapter file, validating everything but the base (checked when
    /// applying): metadata present and well-formed, only `lora_A`/`lora_B` tensors, each
    /// module with both, shapes agreeing with the rank, finite values, targets among the
    /// listed ones. A PEFT file (no `base_sha256`) is refused with a pointer to
    /// [`LoraAdapter::from_peft`].
    pub fn load(path: &Path) -> Result<Self> {
        let (tensors, meta) = read_safetensors(path)?;
        let bad = |reason: String| LmError::BadFile {
            path: path.to_path_buf(),
            format: "afm LoRA adapter",
            reason,
        };
        let Some(base) = meta.get(META_BASE) else {
            return Err(bad(format!(
                "no `{META_BASE}` in its metadata, so nothing says which base model it \
                 belongs to; if it is a PEFT adapter, import it naming its base \
                 (LoraAdapter::from_peft / import_peft, `afm lora-import`)"
            )));
        };
        match meta.get(META_VERSION).map(String::as_str) {
            Some(VERSION) => {}
            v => {
                return Err(bad(format!(
                    "`{META_VERSION}` is {v:?}, this afm reads version {VERSION}"
                )))
            }
        }
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| bad(format!("metadata `{k}` is missing")))
        };
        let rank: usize = get(META_RANK)?
            .parse()
            .map_err(|e| bad(format!("metadata `{META_RANK}`: {e}")))?;
        let alpha: f32 = get(META_ALPHA)?
            .parse()
            .map_err(|e| bad(format!("metadata `{META_ALPHA}`: {e}")))?;
        let targets = parse_targets(get(META_TARGETS)?)?;
        let modules = pair_up(tensors)?;
        Self::new(
            LoraConfig {
                rank,
                alpha,
                targets,
            },
            base,
            modules,
        )
        .map_err(|e| match e {
            LmError::Config { field, reason } => bad(format!("metadata `{field}`: {reason}")),
            e => e,
        })
    }

    /// Imports a PEFT adapter: `path` is PEFT's output directory (or its
    /// `adapter_model.safetensors`, with `adapter_config.json` beside it), `base_sha256` the
    /// hash of the base checkpoint the caller states it belongs to. Factors are taken as
    /// they are (the base's own tensor layout). Rank, alpha and targets come from
    /// `adapter_config.json` (`r`, `lora_alpha`, `target_modules`); features that change
    /// the function (rsLoRA, DoRA, per-module rank or alpha patterns, biases, extra saved
    /// modules, fan-in-fan-out weights) are refused by name.
    pub fn from_peft(path: &Path, base_sha256: &str) -> Result<Self> {
        let (file, cfg_path) = if path.is_dir() {
            (
                path.join("adapter_model.safetensors"),
                path.join("adapter_config.json"),
            )
        } else {
            let dir = path.parent().unwrap_or(Path::new("."));
            (path.to_path_buf(), dir.join("adapter_config.json"))
        };
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| LmError::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let bad = |reason: String| LmError::BadFile {
            path: cfg_path.clone(),
            format: "PEFT adapter_config.json",
            reason,
        };
        let c: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let rank = c["r"]
            .as_u64()
            .ok_or_else(|| bad("`r` is missing or not an integer".into()))?
            as usize;
        let alpha = c["lora_alpha"]
            .as_f64()
            .ok_or_else(|| bad("`lora_alpha` is missing or not a number".into()))?
            as f32;
        for key in [
            "use_rslora",
            "use_dora",
            "use_qalora",
            "lora_bias",
            "fan_in_fan_out",
        ] {
            if c[key].as_bool() == Some(true) {
                return Err(bad(format!(
                    "`{key}` is true; afm supports plain LoRA only"
                )));
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if c[key].as_object().is_some_and(|o| !o.is_empty()) {
                return Err(bad(format!(
                    "`{key}` is not empty; afm supports one rank and alpha for all modules"
                )));
            }
        }
        if let Some(b) = c["bias"].as_str() {
            if b != "none" {
                return Err(bad(format!("`bias` is `{b}`; afm supports `none` only")));
            }
        }
        if c["modules_to_save"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            return Err(bad(
                "`modules_to_save` is not empty; afm adapters hold LoRA factors only".into(),
            ));
        }
        let (tensors, _) = read_safetensors(&file)?;
        let modules = pair_up(tensors)?;
        // targets: PEFT's list, or (a regex or "all-linear") the ones present
        let targets = match &c["target_modules"] {
            serde_json::Value::Array(a) => {
                let mut v = Vec::new();
                for t in a {
                    let s = t.as_str().unwrap_or("");
                    v.push(LoraTarget::parse(s).ok_or_else(|| {
                        bad(format!(
                            "target module `{s}` is not one afm supports (q_proj, k_proj, \
                             v_proj, o_proj, gate_proj, up_proj, down_proj)"
                        ))
                    })?);
                }
                v
            }
            _ => modules
                .keys()
                .filter_map(|m| LoraTarget::of_module(m))
                .collect::<HashSet<_>>()
                .into_iter()
                .collect(),
        };
        Self::new(
            LoraConfig {
                rank,
                alpha,
                targets,
            },
            base_sha256,
            modules,
        )
    }

    /// [`LoraAdapter::from_peft`] bound to the checkpoint at `base` (its hash is computed).
    /// PEFT adapters are trained on HF checkpoints; a GGUF `llama` base was converted by
    /// llama.cpp, which permutes the rows of every q/k matrix for its rotation of adjacent
    /// pairs, so the rows of the q/k `B` factors are permuted the same way to stay in the
    /// base's layout.
    pub fn import_peft(path: &Path, base: &Path) -> Result<Self> {
        let sha = checkpoint_sha256(base)?;
        let mut ad = Self::from_peft(path, &sha)?;
        if let crate::load::CheckpointFiles::Gguf(p) = crate::load::CheckpointFiles::resolve(base)?
        {
            let src = crate::weights::WeightSource::from_gguf(&p)?;
            let arch = src
                .gguf_metadata()
                .and_then(|m| m.get("general.architecture"))
                .and_then(|v| v.to_string().ok().cloned());
            if arch.as_deref() == Some("llama") {
                let cfg = crate::load::config_from_gguf(&src)?;
                for (m, pair) in ad.modules.iter_mut() {
                    let heads = match LoraTarget::of_module(m) {
                        Some(LoraTarget::Q) => cfg.num_attention_heads,
                        Some(LoraTarget::K) => cfg.num_kv_heads(),
                        _ => continue,
                    };
                    pair.b = crate::random::permute_for_interleaved(&pair.b, heads)?;
                }
            }
        }
        Ok(ad)
    }

    /// Applies the adapter to the projections `groups` describe (see [`LoraFused`]), after
    /// checking everything first so that a refused adapter leaves the model untouched: the
    /// base hash, that every adapter module is one of the sites (else the error names its
    /// `lora_A` tensor), the widths of both factors, and (for [`LoraMode::Merged`]) that
    /// every targeted base matrix is dense.
    pub(crate) fn apply(
        &self,
        model_sha256: &str,
        mode: LoraMode,
        mut groups: Vec<LoraFused<'_>>,
    ) -> Result<LoraApplied> {
        self.check_base(model_sha256)?;
        let mut plan = Vec::new();
        let mut used = HashSet::new();
        for (gi, g) in groups.iter().enumerate() {
            for (pi, site) in g.sites.iter().enumerate() {
                let Some(pair) = self.modules.get(&site.module) else {
                    continue;
                };
                let r = self.config.rank;
                if pair.a.dims() != [r, site.in_dim] {
                    return Err(LmError::ShapeMismatch {
                        name: a_name(&site.module),
                        expected: vec![r, site.in_dim],
                        got: pair.a.dims().to_vec(),
                    });
                }
                if pair.b.dims() != [site.out_dim, r] {
                    return Err(LmError::ShapeMismatch {
                        name: b_name(&site.module),
                        expected: vec![site.out_dim, r],
                        got: pair.b.dims().to_vec(),
                    });
                }
                let merge = match mode {
                    LoraMode::Unmerged => false,
                    LoraMode::Auto => g.fused.can_merge(pi),
                    LoraMode::Merged => {
                        if !g.fused.can_merge(pi) {
                            return Err(LmError::Invalid(format!(
                                "cannot merge the LoRA update of `{}`: the base matrix is \
                                 quantized (GGUF blocks or int8); apply the adapter unmerged",
                                site.module
                            )));
                        }
                        true
                    }
                };
                used.insert(site.module.as_str());
                plan.push((gi, pi, pair, merge));
            }
        }
        if let Some(m) = self.modules.keys().find(|m| !used.contains(m.as_str())) {
            return Err(LmError::BadTensor {
                name: a_name(m),
                reason: format!(
                    "the base model has no projection `{m}` (unknown layer or target for \
                     this model)"
                ),
            });
        }
        let scale = self.scale();
        let mut done = LoraApplied::default();
        for (gi, pi, pair, merge) in plan {
            let f = &mut *groups[gi].fused;
            if merge {
                let delta = (pair.b.matmul(&pair.a)? * scale as f64)?;
                f.merge_lora(pi, &delta)?;
                done.merged += 1;
            } else {
                f.attach_lora(pi, LoraDelta::new(&pair.a, &pair.b, scale)?)?;
                done.unmerged += 1;
            }
        }
        Ok(done)
    }
}

fn targets_string(t: &[LoraTarget]) -> String {
    t.iter().map(|t| t.short()).collect::<Vec<_>>().join(",")
}

/// All tensors of a safetensors file (as f32) and its string metadata.
fn read_safetensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|source| LmError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| LmError::BadFile {
        path: path.to_path_buf(),
        format: "safetensors",
        reason,
    };
    let (_, md) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = md.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| bad(e.to_string()))?;
    Ok((tensors, meta))
}

/// Groups `base_model.model.{m}.lora_{A,B}.weight` tensors by module; any other tensor, or a
/// module with one factor only, is an error naming the tensor.
fn pair_up(tensors: HashMap<String, Tensor>) -> Result<BTreeMap<String, LoraPair>> {
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    for (name, t) in tensors {
        let module = name.strip_prefix(PREFIX).and_then(|r| {
            r.strip_suffix(A_SUFFIX)
                .map(|m| (m, true))
                .or_else(|| r.strip_suffix(B_SUFFIX).map(|m| (m, false)))
        });
        match module {
            Some((m, true)) => {
                a.insert(m.to_string(), t);
            }
            Some((m, false)) => {
                b.insert(m.to_string(), t);
            }
            None => {
                return Err(LmError::BadTensor {
                    name,
                    reason: format!(
                        "not a LoRA factor (expected `{PREFIX}<module>{A_SUFFIX}` or \
                         `...{B_SUFFIX}`)"
                    ),
                })
            }
        }
    }
    let mut out = BTreeMap::new();
    for (m, at) in a {
        let bt = b
            .remove(&m)
            .ok_or_else(|| LmError::MissingTensor { name: b_name(&m) })?;
        out.insert(m, LoraPair { a: at, b: bt });
    }
    if let Some(m) = b.keys().next() {
        return Err(LmError::MissingTensor { name: a_name(m) });
    }
    Ok(out)
}

/// How to apply an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraMode {
    /// Add `scale * B A` into every targeted matrix; an error if one is quantized.
    Merged,
    /// Keep the factors beside the base weights.
    Unmerged,
    /// Merge into dense f32 matrices, unmerged elsewhere.
    #[default]
    Auto,
}

/// What applying an adapter did: projections merged and kept unmerged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoraApplied {
    pub merged: usize,
    pub unmerged: usize,
}

/// One fused matrix of a model and the sites of its parts, in part order.
pub(crate) struct LoraFused<'a> {
    pub fused: &'a mut Fused,
    pub sites: Vec<LoraSite>,
}

/// The LoRA sites of an attention layer: `[[q, k, v] or [q], [o]]`, as its two fused
/// matrices hold them.
pub(crate) fn attention_sites(
    prefix: &str,
    hidden: usize,
    q_out: usize,
    kv_out: Option<usize>,
) -> [Vec<LoraSite>; 2] {
    let mut qkv = vec![LoraSite::new(prefix, LoraTarget::Q, q_out, hidden)];
    if let Some(kv) = kv_out {
        qkv.push(LoraSite::new(prefix, LoraTarget::K, kv, hidden));
        qkv.push(LoraSite::new(prefix, LoraTarget::V, kv, hidden));
    }
    [
        qkv,
        vec![LoraSite::new(prefix, LoraTarget::O, hidden, q_out)],
    ]
}

/// The LoRA sites of a SwiGLU MLP: `[[gate, up], [down]]`.
pub(crate) fn mlp_sites(prefix: &str, hidden: usize, inner: usize) -> [Vec<LoraSite>; 2] {
    [
        vec![
            LoraSite::new(prefix, LoraTarget::Gate, inner, hidden),
            LoraSite::new(prefix, LoraTarget::Up, inner, hidden),
        ],
        vec![LoraSite::new(prefix, LoraTarget::Down, hidden, inner)],
    ]
}

/// An unmerged LoRA update kept in f32 beside a base matrix.
///
/// # Shapes
/// `at: (in, r)` = `A^T` and `bt: (r, out)` = `scale * B^T`, contiguous tensors for prefill
/// (candle's matmul); `a: (r, in)` and the same `bt` as plain rows for decode.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    at: Tensor,
    bt: Tensor,
    a: std::sync::Arc<Vec<f32>>,
    bt_rows: std::sync::Arc<Vec<f32>>,
    rank: usize,
    in_dim: usize,
    out_dim: usize,
}

/// Up to this many rows the delta runs as plain dot products and axpys: a candle matmul's
/// fixed cost (tensor building, dispatch) dominates two rank-r products of one row, and an
/// adapter on every projection has 7 of them per layer and token.
const SMALL_ROWS: usize = 8;

impl LoraDelta {
    /// # Shapes
    /// `a: (r, in)`, `b: (out, r)`.
    pub fn new(a: &Tensor, b: &Tensor, scale: f32) -> Result<Self> {
        let (rank, in_dim) = a.dims2()?;
        let (out_dim, rb) = b.dims2()?;
        if rb != rank {
            return Err(LmError::Invalid(format!(
                "LoRA factors of ranks {rank} (A) and {rb} (B)"
            )));
        }
        let at = a.to_dtype(DType::F32)?.t()?.contiguous()?;
        let bt = (b.to_dtype(DType::F32)?.t()? * scale as f64)?.contiguous()?;
        Ok(Self {
            a: std::sync::Arc::new(a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
            bt_rows: std::sync::Arc::new(bt.flatten_all()?.to_vec1()?),
            at,
            bt,
            rank,
            in_dim,
            out_dim,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Adds `scale * (x A^T) B^T` to columns `at..at + out` of `out` (rows of `stride`).
    ///
    /// # Shapes
    /// `x: (m, in)`, `out: (m, stride)`.
    pub fn add_into(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        stride: usize,
        at: usize,
    ) -> Result<()> {
        let (inp, o, r) = (self.in_dim, self.out_dim, self.rank);
        if x.len() != m * inp || out.len() != m * stride || at + o > stride {
            return Err(LmError::Invalid(format!(
                "LoRA delta ({inp} -> {o}) on {} inputs, {} outputs of {m} rows",
                x.len(),
                out.len()
            )));
        }
        if m <= SMALL_ROWS {
            let mut xa = vec![0f32; r];
            for (xr, row) in x.chunks_exact(inp).zip(out.chunks_exact_mut(stride)) {
                for (j, v) in xa.iter_mut().enumerate() {
                    *v = crate::par::dot(xr, &self.a[j * inp..(j + 1) * inp]);
                }
                let y = &mut row[at..at + o];
                for (j, &v) in xa.iter().enumerate() {
                    crate::par::axpy(v, &self.bt_rows[j * o..(j + 1) * o], y);
                }
            }
            return Ok(());
        }
        let xt = Tensor::from_slice(x, (m, inp), &Device::Cpu)?;
        let d = xt.matmul(&self.at)?.matmul(&self.bt)?;
        let d = d.flatten_all()?.to_vec1::<f32>()?;
        for (row, drow) in out.chunks_exact_mut(stride).zip(d.chunks_exact(o)) {
            row[at..at + o]
                .iter_mut()
                .zip(drow)
                .for_each(|(y, d)| *y += d);
        }
        Ok(())
    }
}

/// The sha256 (lowercase hex) of a checkpoint as [`crate::load::CheckpointFiles::resolve`]
/// finds it: a GGUF file or a single safetensors file hashes as the file itself (what
/// `sha256sum FILE` prints); a checkpoint in several safetensors shards hashes as the
/// `sha256sum` listing of the shards by file name, in name order (`cd DIR && sha256sum
/// *.safetensors | sha256sum`). `config.json` is not part of it.
pub fn checkpoint_sha256(path: &Path) -> Result<String> {
    files_sha256(&crate::load::CheckpointFiles::resolve(path)?)
}

/// [`checkpoint_sha256`] of resolved checkpoint files.
pub fn files_sha256(files: &crate::load::CheckpointFiles) -> Result<String> {
    let files: Vec<PathBuf> = match files.clone() {
        crate::load::CheckpointFiles::Gguf(p) => vec![p],
        crate::load::CheckpointFiles::Safetensors { weights, .. } => weights,
    };
    if let [one] = files.as_slice() {
        return file_sha256(one);
    }
    let mut listing = String::new();
    for f in &files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        listing.push_str(&format!("{}  {name}\n", file_sha256(f)?));
    }
    Ok(hex(&Sha256::digest(listing.as_bytes())))
}

/// sha256 of one file, lowercase hex.
pub fn file_sha256(path: &Path) -> Result<String> {
    let io = |source| LmError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both paths of [`LoraDelta::add_into`] (row loop for decode, matmul for prefill)
    /// against `scale * x A^T B^T` written out, on a column block of a wider output.
    #[test]
    fn delta_rows_and_matmul_paths_agree_with_the_definition() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (r, inp, o, stride, at) = (3, 20, 7, 12, 4);
        let a = crate::random::randn(&mut rng, &[r, inp], 1.0).unwrap();
        let b = crate::random::randn(&mut rng, &[o, r], 1.0).unwrap();
        let d = LoraDelta::new(&a, &b, 0.5).unwrap();
        let (av, bv): (Vec<f32>, Vec<f32>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        for m in [1, SMALL_ROWS, SMALL_ROWS + 5] {
            let x = crate::random::randn(&mut rng, &[m * inp], 1.0).unwrap();
            let x: Vec<f32> = x.to_vec1().unwrap();
            let mut out = vec![1f32; m * stride];
            d.add_into(&x, m, &mut out, stride, at).unwrap();
            for i in 0..m {
                for c in 0..stride {
                    let want = if (at..at + o).contains(&c) {
                        let k = c - at;
                        1.0 + 0.5
                            * (0..r)
                                .map(|j| {
                                    let xa: f32 =
                                        (0..inp).map(|q| x[i * inp + q] * av[j * inp + q]).sum();
                                    xa * bv[k * r + j]
                                })
                                .sum::<f32>()
                    } else {
                        1.0
                    };
                    let got = out[i * stride + c];
                    assert!(
                        (got - want).abs() < 1e-4,
                        "m {m} row {i} col {c}: {got} vs {want}"
                    );
                }
            }
        }
        assert!(d.add_into(&[0.0; 5], 1, &mut [0.0; 12], 12, 0).is_err());
    }
}
