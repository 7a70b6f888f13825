//! The hostile-input corpus generator: writes, from a seed, valid base checkpoints (a tiny
//! llama LM as GGUF and as safetensors, a tiny PT-MoE server model, a tiny SmolVLM copied
//! from the fixtures, images of every format) and ~200 broken or odd variants of them and of
//! their configs, plus CLI argument cases, into a directory, with a manifest saying what each
//! case must give: a clear error (words it must contain) or a correct result (the same output
//! as its base). `tests/hostile_corpus.rs` runs every case; see `docs/hostile-input.md`.
#![allow(dead_code)]

use afm::lm::random::random_tensors;
use afm::lm::LmConfig;
use afm::vision::image;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a case is fed to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Target {
    /// `Checkpoint::load` (model + tokenizer), then last-position logits of a fixed prompt,
    /// compared with the base's.
    Lm,
    /// `ServerCheckpoint::load`, logits compared with the base's.
    Server,
    /// `load_image` with the default limits; pixels compared with the reference.
    Image,
    /// `ModelDir::open(..).load(..)`, then a 3-token caption of a fixed image compared with
    /// the base's.
    Vlm,
    /// `LmConfig::from_file`.
    LmConfig,
    /// `ServerConfig::from_file`.
    ServerConfig,
    /// `VisionConfig::from_file`.
    VisionConfig,
    /// `Tokenizer::from_dir`, then an encode/decode round trip.
    Tokenizer,
    /// The CLI only (`cli` holds the arguments).
    CliOnly,
}

/// What a case must give.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Expect {
    /// An error whose message holds every word (case-insensitive); a word starting with `!`
    /// must not appear.
    Err(Vec<String>),
    /// Success, with the base's output (within `tol` for logits / mean pixel difference).
    Ok { tol: f32 },
    /// Either success or an error holding the words: `--dry-run` reads an image's header
    /// only, so it plans a file whose body is cut or corrupt (the real run refuses it).
    Either(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Case {
    pub id: String,
    pub target: Target,
    /// The input (file or directory) for the library target.
    pub path: PathBuf,
    /// What the result is compared with (a base checkpoint, or raw RGB reference pixels).
    pub base: Option<PathBuf>,
    /// `afm` arguments (empty: no CLI run); `{path}` is replaced by `path`.
    pub cli: Vec<String>,
    /// Extra environment for the CLI run.
    pub env: Vec<(String, String)>,
    pub expect: Expect,
}

fn err(words: &[&str]) -> Expect {
    Expect::Err(words.iter().map(|s| s.to_string()).collect())
}

const OK: Expect = Expect::Ok { tol: 1e-4 };

/// The fixed prompt the LM targets are run on (token ids of the tiny vocabulary).
pub const PROMPT_IDS: [u32; 6] = [1, 20, 31, 42, 53, 64];

// ------------------------------------------------------------------------------------------
// GGUF, written by hand so that every header field can lie.

#[derive(Debug, Clone)]
pub enum Gv {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(u8),
    Str(String),
    /// A string whose declared length differs from its bytes.
    StrLen(u64, Vec<u8>),
    Arr(u32, Vec<Gv>),
    /// An array whose declared length differs from its elements.
    ArrLen(u32, u64, Vec<Gv>),
    U64(u64),
    I64(i64),
    F64(f64),
    /// An unknown value type id, followed by 4 bytes.
    Unknown(u32),
}

impl Gv {
    fn ty(&self) -> u32 {
        match self {
            Gv::U8(_) => 0,
            Gv::I8(_) => 1,
            Gv::U16(_) => 2,
            Gv::I16(_) => 3,
            Gv::U32(_) => 4,
            Gv::I32(_) => 5,
            Gv::F32(_) => 6,
            Gv::Bool(_) => 7,
            Gv::Str(_) | Gv::StrLen(..) => 8,
            Gv::Arr(..) | Gv::ArrLen(..) => 9,
            Gv::U64(_) => 10,
            Gv::I64(_) => 11,
            Gv::F64(_) => 12,
            Gv::Unknown(t) => *t,
        }
    }

    fn put(&self, o: &mut Vec<u8>) {
        match self {
            Gv::U8(v) => o.push(*v),
            Gv::I8(v) => o.push(*v as u8),
            Gv::U16(v) => o.extend(v.to_le_bytes()),
            Gv::I16(v) => o.extend(v.to_le_bytes()),
            Gv::U32(v) => o.extend(v.to_le_bytes()),
            Gv::I32(v) => o.extend(v.to_le_bytes()),
            Gv::F32(v) => o.extend(v.to_le_bytes()),
            Gv::Bool(v) => o.push(*v),
            Gv::Str(s) => {
                o.extend((s.len() as u64).to_le_bytes());
                o.extend(s.as_bytes());
            }
            Gv::StrLen(n, b) => {
                o.extend(n.to_le_bytes());
                o.extend(b);
            }
            Gv::Arr(t, vs) => {
                o.extend(t.to_le_bytes());
                o.extend((vs.len() as u64).to_le_bytes());
                vs.iter().for_each(|v| v.put(o));
            }
            Gv::ArrLen(t, n, vs) => {
                o.extend(t.to_le_bytes());
                o.extend(n.to_le_bytes());
                vs.iter().for_each(|v| v.put(o));
            }
            Gv::U64(v) => o.extend(v.to_le_bytes()),
            Gv::I64(v) => o.extend(v.to_le_bytes()),
            Gv::F64(v) => o.extend(v.to_le_bytes()),
            Gv::Unknown(_) => o.extend([0u8; 4]),
        }
    }
}

/// One tensor of a hand-written GGUF: dims in ggml order (fastest first).
#[derive(Debug, Clone)]
pub struct Gt {
    pub name: String,
    pub dims: Vec<u64>,
    pub dtype: u32,
    pub data: Vec<u8>,
    /// Added to the computed offset (a lying offset).
    pub offset_delta: u64,
}

#[derive(Debug, Clone)]
pub struct Gguf {
    pub version: u32,
    pub md: Vec<(String, Gv)>,
    pub tensors: Vec<Gt>,
    /// Data alignment used for the layout (the metadata may say otherwise).
    pub align: usize,
    /// Overrides of the declared counts.
    pub n_tensors: Option<u64>,
    pub n_kv: Option<u64>,
}

impl Gguf {
    pub fn set(&mut self, key: &str, v: Gv) {
        match self.md.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.md.push((key.to_string(), v)),
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.md.retain(|(k, _)| k != key);
    }

    pub fn tensor(&mut self, name: &str) -> &mut Gt {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.bytes_and_data_start().0
    }

    /// The file, and where its tensor data starts (the end of the header).
    pub fn bytes_and_data_start(&self) -> (Vec<u8>, usize) {
        let mut o = b"GGUF".to_vec();
        o.extend(self.version.to_le_bytes());
        o.extend(
            self.n_tensors
                .unwrap_or(self.tensors.len() as u64)
                .to_le_bytes(),
        );
        o.extend(self.n_kv.unwrap_or(self.md.len() as u64).to_le_bytes());
        for (k, v) in &self.md {
            Gv::Str(k.clone()).put(&mut o);
            o.extend(v.ty().to_le_bytes());
            v.put(&mut o);
        }
        let mut off = 0u64;
        let mut offs = vec![];
        for t in &self.tensors {
            Gv::Str(t.name.clone()).put(&mut o);
            o.extend((t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| o.extend(d.to_le_bytes()));
            o.extend(t.dtype.to_le_bytes());
            o.extend((off + t.offset_delta).to_le_bytes());
            offs.push(off);
            off += t.data.len() as u64;
            off = off.div_ceil(self.align as u64) * self.align as u64;
        }
        let a = self.align.max(1);
        while !o.len().is_multiple_of(a) {
            o.push(0);
        }
        let base = o.len();
        for (t, off) in self.tensors.iter().zip(offs) {
            o.resize(base + off as usize, 0);
            o.extend(&t.data);
        }
        (o, base)
    }
}

// ------------------------------------------------------------------------------------------
// safetensors, written by hand so that the header can lie.

#[derive(Debug, Clone)]
pub struct St {
    /// name -> (dtype, shape, data)
    pub tensors: BTreeMap<String, (String, Vec<usize>, Vec<u8>)>,
}

impl St {
    pub fn header(&self) -> serde_json::Value {
        let mut h = serde_json::Map::new();
        let mut off = 0usize;
        for (n, (dt, shape, data)) in &self.tensors {
            h.insert(
                n.clone(),
                serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [off, off + data.len()]}),
            );
            off += data.len();
        }
        serde_json::Value::Object(h)
    }

    pub fn bytes_with_header(&self, header: &str) -> Vec<u8> {
        let mut h = header.as_bytes().to_vec();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut o = (h.len() as u64).to_le_bytes().to_vec();
        o.extend(h);
        for (_, _, d) in self.tensors.values() {
            o.extend(d);
        }
        o
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.bytes_with_header(&self.header().to_string())
    }

    pub fn f32_values(&mut self, name: &str) -> Vec<f32> {
        let (_, _, d) = &self.tensors[name];
        d.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    pub fn set_f32(&mut self, name: &str, v: &[f32]) {
        let e = self.tensors.get_mut(name).unwrap();
        e.2 = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    }
}

fn f32_bytes(t: &Tensor) -> Vec<u8> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect()
}

fn f16_bytes(t: &Tensor) -> Vec<u8> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect()
}

// ------------------------------------------------------------------------------------------
// The bases.

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_tiny_idefics3")
}

/// The tiny LM: the text model of the SmolVLM fixture (its tokenizer fits), context 64.
pub fn lm_config() -> LmConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 448, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 64, "rope_theta": 100000.0, "bos_token_id": 1,
        "eos_token_id": 447, "tie_word_embeddings": false
    }))
    .unwrap()
}

/// `tokenizer.ggml.*` metadata rebuilt from the fixture's `tokenizer.json`.
fn gguf_tokenizer_md() -> Vec<(String, Gv)> {
    let t: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("tokenizer.json")).unwrap()).unwrap();
    let mut tokens: Vec<Option<String>> = vec![None; 448];
    let mut types = vec![1i32; 448];
    for (s, id) in t["model"]["vocab"].as_object().unwrap() {
        tokens[id.as_u64().unwrap() as usize] = Some(s.clone());
    }
    for a in t["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap() as usize;
        if id < 448 {
            tokens[id] = Some(a["content"].as_str().unwrap().to_string());
            types[id] = if a["special"].as_bool().unwrap_or(false) {
                3
            } else {
                4
            };
        }
    }
    let tokens: Vec<Gv> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| Gv::Str(t.unwrap_or_else(|| format!("<unused_{i}>"))))
        .collect();
    let merges: Vec<Gv> = t["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::Array(p) => Gv::Str(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            s => Gv::Str(s.as_str().unwrap().to_string()),
        })
        .collect();
    vec![
        ("tokenizer.ggml.model".into(), Gv::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Gv::Str("smollm".into())),
        ("tokenizer.ggml.tokens".into(), Gv::Arr(8, tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Gv::Arr(5, types.into_iter().map(Gv::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Gv::Arr(8, merges)),
        ("tokenizer.ggml.bos_token_id".into(), Gv::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Gv::U32(447)),
    ]
}

fn gguf_name(hf: &str) -> String {
    afm::lm::weights::gguf_name(hf)
}

/// The base GGUF: matrices Q8_0 (norms f32), llama metadata, the tokenizer.
pub fn base_gguf(cfg: &LmConfig, seed: u64) -> Gguf {
    let t = random_tensors(cfg, seed).unwrap();
    let mut names: Vec<&String> = t.keys().collect();
    names.sort();
    let tensors = names
        .into_iter()
        .map(|n| {
            let w = &t[n];
            let q = if w.rank() == 2 {
                QTensor::quantize(w, GgmlDType::Q8_0).unwrap()
            } else {
                QTensor::quantize(w, GgmlDType::F32).unwrap()
            };
            let dtype = if w.rank() == 2 { 8 } else { 0 };
            Gt {
                name: gguf_name(n),
                dims: w.dims().iter().rev().map(|&d| d as u64).collect(),
                dtype,
                data: q.data().unwrap().into_owned(),
                offset_delta: 0,
            }
        })
        .collect();
    let u = |x: usize| Gv::U32(x as u32);
    let mut md: Vec<(String, Gv)> = vec![
        ("general.architecture".into(), Gv::Str("llama".into())),
        ("general.alignment".into(), Gv::U32(32)),
        ("llama.vocab_size".into(), u(cfg.vocab_size)),
        ("llama.embedding_length".into(), u(cfg.hidden_size)),
        ("llama.feed_forward_length".into(), u(cfg.intermediate_size)),
        ("llama.block_count".into(), u(cfg.num_hidden_layers)),
        (
            "llama.attention.head_count".into(),
            u(cfg.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u(cfg.num_kv_heads()),
        ),
        ("llama.attention.key_length".into(), u(cfg.head_dim())),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Gv::F32(1e-5),
        ),
        (
            "llama.rope.freq_base".into(),
            Gv::F32(cfg.rope_theta as f32),
        ),
        (
            "llama.context_length".into(),
            u(cfg.max_position_embeddings),
        ),
    ];
    md.extend(gguf_tokenizer_md());
    Gguf {
        version: 3,
        md,
        tensors,
        align: 32,
        n_tensors: None,
        n_kv: None,
    }
}

pub fn base_st(cfg: &LmConfig, seed: u64) -> St {
    let t = random_tensors(cfg, seed).unwrap();
    St {
        tensors: t
            .iter()
            .map(|(n, w)| {
                (
                    n.clone(),
                    ("F32".to_string(), w.dims().to_vec(), f32_bytes(w)),
                )
            })
            .collect(),
    }
}

fn copy_tokenizer(dir: &Path) {
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(fixtures().join(f), dir.join(f)).unwrap();
    }
}

fn write_st_dir(dir: &Path, config: &serde_json::Value, st_bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("model.safetensors"), st_bytes).unwrap();
    copy_tokenizer(dir);
}

// ------------------------------------------------------------------------------------------
// Images.

/// A seeded test picture: smooth gradients plus a few blocks (compresses like a photo).
fn picture(w: u32, h: u32, rng: &mut ChaCha8Rng) -> image::RgbImage {
    let (a, b, c): (u32, u32, u32) = (
        rng.random_range(0..255),
        rng.random_range(0..255),
        rng.random_range(1..9),
    );
    image::RgbImage::from_fn(w, h, |x, y| {
        let blk = ((x / 8 + y / 8) % c) as u8 * 20;
        image::Rgb([
            ((x * 255 / w.max(1)) as u8).wrapping_add(a as u8),
            ((y * 255 / h.max(1)) as u8).wrapping_add(b as u8),
            blk,
        ])
    })
}

fn encode(img: &image::DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, fmt).unwrap();
    out.into_inner()
}

/// PNG chunk with a correct CRC.
fn png_chunk(ty: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut o = (data.len() as u32).to_be_bytes().to_vec();
    o.extend(ty);
    o.extend(data);
    let mut crc = 0xFFFF_FFFFu32;
    for &b in ty.iter().chain(data) {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    o.extend((!crc).to_be_bytes());
    o
}

/// A PNG whose header declares `w x h` but holds (almost) no data.
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut o = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    o.extend(png_chunk(b"IHDR", &ihdr));
    o.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    o.extend(png_chunk(b"IEND", &[]));
    o
}

/// Rewrites the first SOF marker's size fields of a JPEG.
fn jpeg_with_size(mut b: Vec<u8>, w: u16, h: u16) -> Vec<u8> {
    let i = b
        .windows(2)
        .position(|x| x[0] == 0xFF && (x[1] == 0xC0 || x[1] == 0xC2))
        .unwrap();
    b[i + 5..i + 7].copy_from_slice(&h.to_be_bytes());
    b[i + 7..i + 9].copy_from_slice(&w.to_be_bytes());
    b
}

// ------------------------------------------------------------------------------------------
// The corpus.

pub struct Corpus {
    pub cases: Vec<Case>,
    pub dir: PathBuf,
}

/// Writes the whole corpus into `dir` (created) from `seed`; returns the cases.
pub fn generate(dir: &Path, seed: u64) -> Corpus {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut cases = Vec::new();
    let cfg = lm_config();

    // ---- the bases -------------------------------------------------------------------
    let g0 = base_gguf(&cfg, seed);
    let base_gguf_path = dir.join("base.gguf");
    std::fs::write(&base_gguf_path, g0.bytes()).unwrap();
    let st0 = base_st(&cfg, seed);
    let cfg_json = serde_json::to_value(&cfg).unwrap();
    let base_st_dir = dir.join("base-st");
    write_st_dir(&base_st_dir, &cfg_json, &st0.bytes());
    let vlm_base = dir.join("base-vlm");
    std::fs::create_dir_all(&vlm_base).unwrap();
    for e in std::fs::read_dir(fixtures()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, vlm_base.join(p.file_name().unwrap())).unwrap();
    }
    let server_cfg = afm::lm::ServerConfig::preset("tiny").unwrap();
    let server_cfg = afm::lm::ServerConfig {
        vocab_size: 448,
        ..server_cfg
    };
    let server_base = dir.join("base-server");
    {
        let t = afm::lm::server_model::random_server_tensors(&server_cfg, seed).unwrap();
        afm::lm::server_checkpoint::write_server_safetensors(&server_base, &server_cfg, &t)
            .unwrap();
        copy_tokenizer(&server_base);
    }
    let img_base = dir.join("base.png");
    picture(48, 40, &mut rng).save(&img_base).unwrap();

    let gen_cli = |p: &str| -> Vec<String> {
        [
            "generate",
            "--raw",
            "--max-tokens",
            "3",
            "--model",
            p,
            "hello world",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // ---- GGUF ------------------------------------------------------------------------
    let gguf = |id: &str, g: Gguf, expect: Expect| -> Case {
        let p = dir.join(format!("{id}.gguf"));
        std::fs::write(&p, g.bytes()).unwrap();
        Case {
            id: id.into(),
            target: Target::Lm,
            path: p.clone(),
            base: Some(base_gguf_path.clone()),
            cli: gen_cli("{path}"),
            env: vec![],
            expect,
        }
    };
    cases.push(gguf("gguf-base", g0.clone(), OK));
    let mut g = g0.clone();
    g.align = 64;
    g.set("general.alignment", Gv::U32(64));
    cases.push(gguf("gguf-align-64", g, OK));
    let mut g = g0.clone();
    g.remove("general.alignment");
    cases.push(gguf("gguf-align-default", g, OK));
    for (id, v) in [
        ("gguf-align-0-u32", Gv::U32(0)),
        ("gguf-align-0-u8", Gv::U8(0)),
        ("gguf-align-0-i32", Gv::I32(0)),
        ("gguf-align-3", Gv::U32(3)),
        ("gguf-align-48", Gv::U32(48)),
        ("gguf-align-neg", Gv::I32(-32)),
    ] {
        let mut g = g0.clone();
        g.set("general.alignment", v);
        cases.push(gguf(id, g, err(&["general.alignment", "power of two"])));
    }
    let mut g = g0.clone();
    g.set("general.alignment", Gv::Str("32".into()));
    cases.push(gguf("gguf-align-string", g, OK));
    // dims whose product wraps
    for (id, name, dims) in [
        (
            "gguf-dims-wrap-embd",
            "token_embd.weight",
            vec![64u64, 1 << 58],
        ),
        (
            "gguf-dims-wrap-ffn",
            "blk.0.ffn_up.weight",
            vec![64, 1 << 62, 4],
        ),
        (
            "gguf-dims-wrap-norm",
            "output_norm.weight",
            vec![1 << 63, 4],
        ),
        ("gguf-dims-huge", "blk.1.attn_q.weight", vec![64, 1 << 40]),
    ] {
        let mut g = g0.clone();
        g.tensor(name).dims = dims;
        cases.push(gguf(id, g, err(&[name])));
    }
    // the case: the config agrees with the wrapped dims, so no shape check stops it
    let mut g = g0.clone();
    g.tensor("token_embd.weight").dims = vec![64, 1 << 58];
    g.tensor("output.weight").dims = vec![64, 1 << 58];
    g.set("llama.vocab_size", Gv::U64(1 << 58));
    cases.push(gguf(
        "gguf-dims-wrap-vocab",
        g,
        err(&["output.weight", "overflow"]),
    ));
    let mut g = g0.clone();
    g.tensor("blk.0.attn_k.weight").dims = vec![64, 32, 1, 1, 1];
    cases.push(gguf("gguf-ndims-5", g, err(&["dimensions"])));
    let mut g = g0.clone();
    g.tensor("output_norm.weight").dims = vec![];
    cases.push(gguf("gguf-ndims-0", g, err(&["output_norm.weight"])));
    let mut g = g0.clone();
    g.tensor("blk.0.attn_v.weight").dtype = 99;
    cases.push(gguf("gguf-dtype-unknown", g, err(&["99"])));
    let mut g = g0.clone();
    // f32 norm weights labelled as a 4-byte integer type (ggml I32 = 26)
    g.tensor("output_norm.weight").dtype = 26;
    cases.push(gguf("gguf-dtype-i32-norm", g, err(&["output_norm.weight"])));
    let mut g = g0.clone();
    g.tensor("blk.1.ffn_down.weight").offset_delta = 1 << 40;
    cases.push(gguf(
        "gguf-offset-past-eof",
        g,
        err(&["blk.1.ffn_down.weight"]),
    ));
    let mut g = g0.clone();
    g.tensor("blk.1.ffn_down.weight").offset_delta = u64::MAX - 100;
    cases.push(gguf(
        "gguf-offset-wraps",
        g,
        err(&["blk.1.ffn_down.weight"]),
    ));
    let mut g = g0.clone();
    g.tensor("blk.0.attn_q.weight").dims = vec![64, 65];
    cases.push(gguf("gguf-shape-mismatch", g, err(&["attn_q", "shape"])));
    let mut g = g0.clone();
    g.tensors.retain(|t| t.name != "blk.1.ffn_gate.weight");
    cases.push(gguf(
        "gguf-missing-tensor",
        g,
        err(&["blk.1.ffn_gate.weight", "missing"]),
    ));
    let mut g = g0.clone();
    let extra = g.tensors[0].clone();
    g.tensors.push(Gt {
        name: "some.extra.tensor".into(),
        ..extra
    });
    cases.push(gguf("gguf-extra-tensor", g, OK));
    let mut g = g0.clone();
    g.md.push(("general.name".into(), Gv::Str("x".repeat(100_000))));
    cases.push(gguf("gguf-long-name", g, OK));
    let mut g = g0.clone();
    g.md.push(("x.empty_array".into(), Gv::Arr(4, vec![])));
    g.md.push((
        "x.nested".into(),
        Gv::Arr(9, vec![Gv::Arr(4, vec![Gv::U32(1)])]),
    ));
    cases.push(gguf("gguf-odd-metadata", g, OK));
    // structure
    for (id, version) in [
        ("gguf-version-0", 0u32),
        ("gguf-version-4", 4),
        ("gguf-version-big", u32::MAX),
    ] {
        let mut g = g0.clone();
        g.version = version;
        cases.push(gguf(id, g, err(&["GGUF"])));
    }
    let mut g = g0.clone();
    g.version = 1;
    cases.push(gguf("gguf-version-1-lie", g, err(&["GGUF"])));
    for (id, n) in [
        ("gguf-tensor-count-huge", 1u64 << 40),
        ("gguf-tensor-count-max", u64::MAX),
    ] {
        let mut g = g0.clone();
        g.n_tensors = Some(n);
        cases.push(gguf(id, g, err(&["GGUF"])));
    }
    let mut g = g0.clone();
    g.n_tensors = Some(g0.tensors.len() as u64 + 1);
    cases.push(gguf("gguf-tensor-count-plus-1", g, err(&["GGUF"])));
    for (id, n) in [
        ("gguf-kv-count-huge", 1u64 << 40),
        ("gguf-kv-count-plus-1", g0.md.len() as u64 + 1),
    ] {
        let mut g = g0.clone();
        g.n_kv = Some(n);
        cases.push(gguf(id, g, err(&["GGUF"])));
    }
    for (id, v) in [
        ("gguf-string-len-huge", Gv::StrLen(1 << 60, b"abc".to_vec())),
        ("gguf-string-len-max", Gv::StrLen(u64::MAX, b"abc".to_vec())),
        (
            "gguf-array-len-huge",
            Gv::ArrLen(4, 1 << 61, vec![Gv::U32(1)]),
        ),
        ("gguf-array-len-max", Gv::ArrLen(8, u64::MAX, vec![])),
        ("gguf-array-bad-type", Gv::Arr(77, vec![])),
        ("gguf-bool-2", Gv::Bool(2)),
        ("gguf-value-type-unknown", Gv::Unknown(13)),
        ("gguf-value-type-max", Gv::Unknown(u32::MAX)),
    ] {
        let mut g = g0.clone();
        g.md.insert(3, ("x.hostile".into(), v));
        cases.push(gguf(id, g, err(&["GGUF"])));
    }
    let mut deep = Gv::Arr(4, vec![Gv::U32(1)]);
    for _ in 0..64 {
        deep = Gv::Arr(9, vec![deep]);
    }
    let mut g = g0.clone();
    g.md.push(("x.deep".into(), deep));
    cases.push(gguf("gguf-array-deep", g, err(&["GGUF"])));
    // configuration keys
    let mut g = g0.clone();
    g.remove("general.architecture");
    cases.push(gguf(
        "gguf-no-arch",
        g,
        err(&["general.architecture", "missing"]),
    ));
    let mut g = g0.clone();
    g.set("general.architecture", Gv::Str("gpt2".into()));
    cases.push(gguf(
        "gguf-arch-gpt2",
        g,
        err(&["general.architecture", "gpt2"]),
    ));
    let mut g = g0.clone();
    g.set("general.architecture", Gv::U32(7));
    cases.push(gguf("gguf-arch-int", g, err(&["general.architecture"])));
    for (id, key, v, word) in [
        ("gguf-blocks-missing", "llama.block_count", None, "missing"),
        (
            "gguf-blocks-0",
            "llama.block_count",
            Some(Gv::U32(0)),
            "num_hidden_layers",
        ),
        (
            "gguf-blocks-huge",
            "llama.block_count",
            Some(Gv::U64(1 << 40)),
            "num_hidden_layers",
        ),
        (
            "gguf-blocks-string",
            "llama.block_count",
            Some(Gv::Str("2".into())),
            "block_count",
        ),
        (
            "gguf-heads-0",
            "llama.attention.head_count",
            Some(Gv::U32(0)),
            "num_attention_heads",
        ),
        (
            "gguf-heads-3",
            "llama.attention.head_count",
            Some(Gv::U32(3)),
            "head",
        ),
        (
            "gguf-kv-heads-3",
            "llama.attention.head_count_kv",
            Some(Gv::U32(3)),
            "num_key_value_heads",
        ),
        (
            "gguf-ctx-0",
            "llama.context_length",
            Some(Gv::U32(0)),
            "max_position_embeddings",
        ),
        (
            "gguf-ctx-2e40",
            "llama.context_length",
            Some(Gv::U64(1 << 40)),
            "max_position_embeddings",
        ),
        (
            "gguf-ctx-2e26",
            "llama.context_length",
            Some(Gv::U64(1 << 26)),
            "max_position_embeddings",
        ),
        (
            "gguf-embd-mismatch",
            "llama.embedding_length",
            Some(Gv::U32(96)),
            "shape",
        ),
        (
            "gguf-embd-huge",
            "llama.embedding_length",
            Some(Gv::U64(1 << 50)),
            "hidden_size",
        ),
        (
            "gguf-vocab-0",
            "llama.vocab_size",
            Some(Gv::U32(0)),
            "vocab_size",
        ),
        (
            "gguf-vocab-huge",
            "llama.vocab_size",
            Some(Gv::U64(u64::MAX)),
            "vocab_size",
        ),
        (
            "gguf-theta-neg",
            "llama.rope.freq_base",
            Some(Gv::F32(-1.0)),
            "rope_theta",
        ),
        (
            "gguf-theta-nan",
            "llama.rope.freq_base",
            Some(Gv::F32(f32::NAN)),
            "rope_theta",
        ),
        (
            "gguf-theta-inf",
            "llama.rope.freq_base",
            Some(Gv::F32(f32::INFINITY)),
            "rope_theta",
        ),
        (
            "gguf-eps-0",
            "llama.attention.layer_norm_rms_epsilon",
            Some(Gv::F32(0.0)),
            "rms_norm_eps",
        ),
        (
            "gguf-eps-nan",
            "llama.attention.layer_norm_rms_epsilon",
            Some(Gv::F32(f32::NAN)),
            "rms_norm_eps",
        ),
        (
            "gguf-headdim-odd",
            "llama.attention.key_length",
            Some(Gv::U32(15)),
            "head_dim",
        ),
        (
            "gguf-tok-model-llama",
            "tokenizer.ggml.model",
            Some(Gv::Str("llama".into())),
            "tokenizer.ggml.model",
        ),
        (
            "gguf-tok-no-tokens",
            "tokenizer.ggml.tokens",
            None,
            "tokenizer.ggml.tokens",
        ),
        (
            "gguf-tok-tokens-ints",
            "tokenizer.ggml.tokens",
            Some(Gv::Arr(4, vec![Gv::U32(1)])),
            "tokenizer.ggml.tokens",
        ),
        (
            "gguf-tok-merges-bad",
            "tokenizer.ggml.merges",
            Some(Gv::Arr(8, vec![Gv::Str("nospace".into())])),
            "tokenizer.ggml.merges",
        ),
        (
            "gguf-tok-bos-out",
            "tokenizer.ggml.bos_token_id",
            Some(Gv::U32(100_000)),
            "bos_token_id",
        ),
        (
            "gguf-tok-eos-out",
            "tokenizer.ggml.eos_token_id",
            Some(Gv::U32(u32::MAX)),
            "eos_token_id",
        ),
    ] {
        let mut g = g0.clone();
        match v {
            Some(v) => g.set(key, v),
            None => g.remove(key),
        }
        cases.push(gguf(id, g, err(&[word])));
    }
    // non-finite values: f32 vectors at the first, a middle and the last element, and a
    // Q8_0 block scale
    for (id, name, at, v) in [
        ("gguf-nan-first", "output_norm.weight", 0usize, f32::NAN),
        ("gguf-nan-middle", "blk.1.attn_norm.weight", 37, f32::NAN),
        ("gguf-inf-last", "blk.0.ffn_norm.weight", 63, f32::INFINITY),
        (
            "gguf-neginf-middle",
            "output_norm.weight",
            20,
            f32::NEG_INFINITY,
        ),
    ] {
        let mut g = g0.clone();
        let t = g.tensor(name);
        t.data[at * 4..at * 4 + 4].copy_from_slice(&v.to_le_bytes());
        cases.push(gguf(id, g, err(&[name, &format!("[{at}]")])));
    }
    for (id, name, block) in [
        ("gguf-q8-scale-nan-first", "token_embd.weight", 0usize),
        ("gguf-q8-scale-nan-middle", "blk.0.ffn_down.weight", 100),
        ("gguf-q8-scale-inf-output", "output.weight", 5),
    ] {
        let mut g = g0.clone();
        let t = g.tensor(name);
        let nan16 = half::f16::from_f32(if id.contains("inf") {
            f32::INFINITY
        } else {
            f32::NAN
        });
        t.data[block * 34..block * 34 + 2].copy_from_slice(&nan16.to_le_bytes());
        cases.push(gguf(id, g, err(&[name, "not finite"])));
    }
    // truncations at seeded points through the file
    let full = g0.bytes();
    let mut cuts: Vec<usize> = vec![0, 3, 4, 8, 16, 23, 24];
    for _ in 0..10 {
        cuts.push(rng.random_range(24..full.len() - 1));
    }
    cuts.push(full.len() - 1);
    cuts.sort();
    cuts.dedup();
    for c in cuts {
        let id = format!("gguf-cut-{c}");
        let p = dir.join(format!("{id}.gguf"));
        std::fs::write(&p, &full[..c]).unwrap();
        cases.push(Case {
            id,
            target: Target::Lm,
            path: p,
            base: Some(base_gguf_path.clone()),
            cli: gen_cli("{path}"),
            env: vec![],
            expect: err(&[&format!("gguf-cut-{c}")]),
        });
    }
    // renamed, and random bytes under a .gguf name
    let p = dir.join("gguf-renamed.bin");
    std::fs::copy(&base_gguf_path, &p).unwrap();
    cases.push(Case {
        id: "gguf-renamed".into(),
        target: Target::Lm,
        path: p,
        base: Some(base_gguf_path.clone()),
        cli: gen_cli("{path}"),
        env: vec![],
        expect: OK,
    });
    let p = dir.join("gguf-random.gguf");
    std::fs::write(
        &p,
        (0..4096).map(|_| rng.random::<u8>()).collect::<Vec<_>>(),
    )
    .unwrap();
    cases.push(Case {
        id: "gguf-random-bytes".into(),
        target: Target::Lm,
        path: p,
        base: None,
        cli: gen_cli("{path}"),
        env: vec![],
        expect: err(&["gguf"]),
    });

    // ---- safetensors LM ----------------------------------------------------------------
    let st_case = |id: &str, config: &serde_json::Value, bytes: Vec<u8>, expect: Expect| -> Case {
        let d = dir.join(id);
        write_st_dir(&d, config, &bytes);
        Case {
            id: id.into(),
            target: Target::Lm,
            path: d,
            base: Some(base_st_dir.clone()),
            cli: gen_cli("{path}"),
            env: vec![],
            expect,
        }
    };
    cases.push(st_case("st-base", &cfg_json, st0.bytes(), OK));
    let mut s = st0.clone();
    for e in s.tensors.values_mut() {
        let v: Vec<f32> =
            e.2.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
        let t = Tensor::from_vec(v, e.1.clone(), &Device::Cpu).unwrap();
        *e = ("F16".into(), e.1.clone(), f16_bytes(&t));
    }
    cases.push(st_case(
        "st-f16",
        &cfg_json,
        s.bytes(),
        Expect::Ok { tol: 0.05 },
    ));
    let mut s = st0.clone();
    s.tensors
        .insert("unused.extra".into(), ("F32".into(), vec![2], vec![0; 8]));
    cases.push(st_case("st-extra-tensor", &cfg_json, s.bytes(), OK));
    let mut s = st0.clone();
    s.tensors.remove("model.layers.1.mlp.up_proj.weight");
    cases.push(st_case(
        "st-missing-tensor",
        &cfg_json,
        s.bytes(),
        err(&["model.layers.1.mlp.up_proj.weight", "missing"]),
    ));
    // integer dtypes of the same width as the float data
    for (id, name, dt) in [
        ("st-f32-as-i32", "model.norm.weight", "I32"),
        (
            "st-f32-as-u32",
            "model.layers.0.input_layernorm.weight",
            "U32",
        ),
        (
            "st-f32-as-i32-matrix",
            "model.layers.0.self_attn.q_proj.weight",
            "I32",
        ),
    ] {
        let mut s = st0.clone();
        s.tensors.get_mut(name).unwrap().0 = dt.into();
        cases.push(st_case(id, &cfg_json, s.bytes(), err(&[name, "dtype"])));
    }
    {
        let mut s = st0.clone();
        let name = "model.embed_tokens.weight";
        let v = s.f32_values(name);
        let t = Tensor::from_vec(v, (448, 64), &Device::Cpu).unwrap();
        let e = s.tensors.get_mut(name).unwrap();
        *e = ("I16".into(), e.1.clone(), f16_bytes(&t));
        cases.push(st_case(
            "st-f16-as-i16",
            &cfg_json,
            s.bytes(),
            err(&[name, "dtype"]),
        ));
        let mut s = st0.clone();
        let e = s.tensors.get_mut("model.norm.weight").unwrap();
        e.0 = "U8".into();
        e.1 = vec![256];
        cases.push(st_case(
            "st-f32-as-u8",
            &cfg_json,
            s.bytes(),
            err(&["model.norm.weight"]),
        ));
    }
    for (id, name, at, v) in [
        ("st-nan-first", "model.norm.weight", 0usize, f32::NAN),
        (
            "st-nan-middle",
            "model.layers.1.self_attn.o_proj.weight",
            2345,
            f32::NAN,
        ),
        ("st-inf-last", "lm_head.weight", 448 * 64 - 1, f32::INFINITY),
        (
            "st-neginf-embed",
            "model.embed_tokens.weight",
            1000,
            f32::NEG_INFINITY,
        ),
        (
            "st-nan-kproj",
            "model.layers.0.self_attn.k_proj.weight",
            700,
            f32::NAN,
        ),
    ] {
        let mut s = st0.clone();
        let mut vals = s.f32_values(name);
        vals[at] = v;
        s.set_f32(name, &vals);
        cases.push(st_case(
            id,
            &cfg_json,
            s.bytes(),
            err(&[name, &format!("element {at}")]),
        ));
    }
    {
        // NaN inside F16 data
        let mut s = st0.clone();
        let name = "model.layers.0.mlp.down_proj.weight";
        let v = s.f32_values(name);
        let t = Tensor::from_vec(v, (64, 128), &Device::Cpu).unwrap();
        let mut b = f16_bytes(&t);
        b[2 * 500..2 * 500 + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
        let e = s.tensors.get_mut(name).unwrap();
        *e = ("F16".into(), e.1.clone(), b);
        cases.push(st_case(
            "st-f16-nan",
            &cfg_json,
            s.bytes(),
            err(&[name, "element 500"]),
        ));
    }
    // lying headers
    let h = st0.header();
    let bad_headers: Vec<(&str, String)> = vec![
        ("st-header-not-json", "{not json".into()),
        ("st-header-array", "[1, 2, 3]".into()),
        ("st-header-empty-object", "{}".into()),
        (
            "st-header-bad-dtype",
            h.to_string().replacen("\"F32\"", "\"F99\"", 1),
        ),
        ("st-header-offsets-past-end", {
            let mut h = h.clone();
            h["model.norm.weight"]["data_offsets"] = serde_json::json!([0, 1u64 << 40]);
            h.to_string()
        }),
        ("st-header-offsets-reversed", {
            let mut h = h.clone();
            h["model.norm.weight"]["data_offsets"] = serde_json::json!([256, 0]);
            h.to_string()
        }),
        ("st-header-shape-lies", {
            let mut h = h.clone();
            h["model.norm.weight"]["shape"] = serde_json::json!([1u64 << 62, 4]);
            h.to_string()
        }),
        ("st-header-shape-overflow", {
            let mut h = h.clone();
            h["model.norm.weight"]["shape"] = serde_json::json!([u64::MAX, u64::MAX]);
            h.to_string()
        }),
        ("st-header-negative-shape", {
            let mut h = h.clone();
            h["model.norm.weight"]["shape"] = serde_json::json!([-64]);
            h.to_string()
        }),
    ];
    for (id, hdr) in bad_headers {
        let expect = err(&["safetensors"]);
        cases.push(st_case(id, &cfg_json, st0.bytes_with_header(&hdr), expect));
    }
    let full = st0.bytes();
    for (id, bytes) in [
        ("st-empty-file", vec![]),
        ("st-7-bytes", full[..7].to_vec()),
        ("st-header-len-huge", {
            let mut b = full.clone();
            b[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
            b
        }),
        ("st-header-len-max", {
            let mut b = full.clone();
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
        ("st-cut-half", full[..full.len() / 2].to_vec()),
        ("st-cut-last-byte", full[..full.len() - 1].to_vec()),
        ("st-trailing-bytes", {
            let mut b = full.clone();
            b.extend([0u8; 13]);
            b
        }),
    ] {
        cases.push(st_case(id, &cfg_json, bytes, err(&["safetensors"])));
    }
    // config.json
    let cfg_cases: Vec<(&str, serde_json::Value, Expect)> = {
        let set = |k: &str, v: serde_json::Value| {
            let mut c = cfg_json.clone();
            c[k] = v;
            c
        };
        let del = |k: &str| {
            let mut c = cfg_json.clone();
            c.as_object_mut().unwrap().remove(k);
            c
        };
        vec![
            (
                "cfg-unknown-fields",
                set("some_new_field", serde_json::json!({"a": 1})),
                OK,
            ),
            (
                "cfg-eos-list",
                set("eos_token_id", serde_json::json!([447, 2])),
                OK,
            ),
            (
                "cfg-missing-hidden",
                del("hidden_size"),
                err(&["hidden_size"]),
            ),
            (
                "cfg-hidden-string",
                set("hidden_size", "64".into()),
                err(&["config"]),
            ),
            (
                "cfg-hidden-negative",
                set("hidden_size", (-64).into()),
                err(&["config"]),
            ),
            (
                "cfg-hidden-float",
                set("hidden_size", 64.5.into()),
                err(&["config"]),
            ),
            (
                "cfg-hidden-0",
                set("hidden_size", 0.into()),
                err(&["hidden_size"]),
            ),
            (
                "cfg-hidden-huge",
                set("hidden_size", (1u64 << 40).into()),
                err(&["hidden_size"]),
            ),
            (
                "cfg-hidden-mismatch",
                set("hidden_size", 128.into()),
                err(&["shape"]),
            ),
            (
                "cfg-layers-huge",
                set("num_hidden_layers", (1u64 << 33).into()),
                err(&["num_hidden_layers"]),
            ),
            (
                "cfg-layers-more",
                set("num_hidden_layers", 3.into()),
                err(&["model.layers.2", "missing"]),
            ),
            (
                "cfg-heads-0",
                set("num_attention_heads", 0.into()),
                err(&["num_attention_heads"]),
            ),
            (
                "cfg-kv-heads-3",
                set("num_key_value_heads", 3.into()),
                err(&["num_key_value_heads"]),
            ),
            (
                "cfg-head-dim-odd",
                set("head_dim", 15.into()),
                err(&["head_dim"]),
            ),
            (
                "cfg-ctx-0",
                set("max_position_embeddings", 0.into()),
                err(&["max_position_embeddings"]),
            ),
            (
                "cfg-ctx-2e26",
                set("max_position_embeddings", (1u64 << 26).into()),
                err(&["max_position_embeddings"]),
            ),
            (
                "cfg-ctx-2e40",
                set("max_position_embeddings", (1u64 << 40).into()),
                err(&["max_position_embeddings"]),
            ),
            (
                "cfg-ctx-1m",
                set("max_position_embeddings", (1u64 << 20).into()),
                OK,
            ),
            (
                "cfg-vocab-huge",
                set("vocab_size", (1u64 << 40).into()),
                err(&["vocab_size"]),
            ),
            (
                "cfg-eps-negative",
                set("rms_norm_eps", (-1.0).into()),
                err(&["rms_norm_eps"]),
            ),
            (
                "cfg-theta-0",
                set("rope_theta", 0.0.into()),
                err(&["rope_theta"]),
            ),
            (
                "cfg-rope-llama3",
                set(
                    "rope_scaling",
                    serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
                ),
                err(&["rope_scaling", "llama3"]),
            ),
            (
                "cfg-reuse-all",
                set("num_kv_reuse_layers", 2.into()),
                err(&["num_kv_reuse_layers"]),
            ),
            ("cfg-array", serde_json::json!([1, 2]), err(&["config"])),
            ("cfg-null", serde_json::Value::Null, err(&["config"])),
        ]
    };
    for (id, c, expect) in cfg_cases {
        cases.push(st_case(id, &c, st0.bytes(), expect.clone()));
        // the same file through the config parser alone
        let p = dir.join(format!("{id}.config.json"));
        std::fs::write(&p, c.to_string()).unwrap();
        let lib_expect = match (&expect, id) {
            // these are only wrong against the weights
            (_, "cfg-hidden-mismatch" | "cfg-layers-more") => OK,
            (e, _) => e.clone(),
        };
        cases.push(Case {
            id: format!("{id}-parse"),
            target: Target::LmConfig,
            path: p,
            base: None,
            cli: vec![],
            env: vec![],
            expect: lib_expect,
        });
    }
    for (id, text) in [
        ("cfg-not-json", "{\"vocab_size\": 448,"),
        ("cfg-bom", "\u{feff}{}"),
        ("cfg-empty", ""),
    ] {
        let d = dir.join(id);
        write_st_dir(&d, &cfg_json, &st0.bytes());
        std::fs::write(d.join("config.json"), text).unwrap();
        cases.push(Case {
            id: id.into(),
            target: Target::Lm,
            path: d,
            base: None,
            cli: gen_cli("{path}"),
            env: vec![],
            expect: err(&["config.json"]),
        });
    }
    // tokenizer files
    for (id, f, text, word) in [
        ("tok-missing", "tokenizer.json", None, "tokenizer.json"),
        (
            "tok-not-json",
            "tokenizer.json",
            Some("{\"model\": "),
            "tokenizer.json",
        ),
        (
            "tok-wrong-schema",
            "tokenizer.json",
            Some("{\"model\": 5}"),
            "tokenizer.json",
        ),
        (
            "tok-config-not-json",
            "tokenizer_config.json",
            Some("{{"),
            "tokenizer_config.json",
        ),
    ] {
        let d = dir.join(id);
        write_st_dir(&d, &cfg_json, &st0.bytes());
        match text {
            None => std::fs::remove_file(d.join(f)).unwrap(),
            Some(t) => std::fs::write(d.join(f), t).unwrap(),
        }
        cases.push(Case {
            id: id.into(),
            target: Target::Tokenizer,
            path: d.clone(),
            base: None,
            cli: gen_cli("{path}"),
            env: vec![],
            expect: err(&[word]),
        });
    }
    cases.push(Case {
        id: "tok-base".into(),
        target: Target::Tokenizer,
        path: base_st_dir.clone(),
        base: None,
        cli: vec![],
        env: vec![],
        expect: OK,
    });

    // ---- server (PT-MoE) -------------------------------------------------------------
    let scfg = serde_json::to_value(&server_cfg).unwrap();
    let server_cases: Vec<(&str, &str, serde_json::Value, Expect)> = vec![
        ("server-base", "", serde_json::Value::Null, OK),
        (
            "server-ctx-2e40",
            "max_position_embeddings",
            (1u64 << 40).into(),
            err(&["max_position_embeddings"]),
        ),
        (
            "server-ctx-2e26",
            "max_position_embeddings",
            (1u64 << 26).into(),
            err(&["max_position_embeddings"]),
        ),
        (
            "server-ctx-1m",
            "max_position_embeddings",
            (1u64 << 20).into(),
            OK,
        ),
        (
            "server-ctx-0",
            "max_position_embeddings",
            0.into(),
            err(&["max_position_embeddings"]),
        ),
        (
            "server-tracks-0",
            "num_tracks",
            0.into(),
            err(&["num_tracks"]),
        ),
        (
            "server-tracks-huge",
            "num_tracks",
            (1u64 << 40).into(),
            err(&["num_tracks"]),
        ),
        (
            "server-experts-huge",
            "num_experts",
            (1u64 << 40).into(),
            err(&["num_experts"]),
        ),
        (
            "server-topk-too-big",
            "experts_per_token",
            99.into(),
            err(&["experts_per_token"]),
        ),
        (
            "server-pattern-empty",
            "attention_pattern",
            serde_json::json!([]),
            err(&["attention_pattern"]),
        ),
        (
            "server-pattern-unknown",
            "attention_pattern",
            serde_json::json!(["sideways"]),
            err(&["config"]),
        ),
        (
            "server-depth-not-dividing",
            "track_block_depth",
            3.into(),
            err(&["track_block_depth"]),
        ),
        (
            "server-softcap-neg",
            "router_softcap",
            (-1.0).into(),
            err(&["router_softcap"]),
        ),
        (
            "server-theta-0",
            "rope_theta",
            0.0.into(),
            err(&["rope_theta"]),
        ),
        (
            "server-hidden-huge",
            "hidden_size",
            (1u64 << 50).into(),
            err(&["hidden_size"]),
        ),
        (
            "server-head-dim-odd",
            "head_dim",
            7.into(),
            err(&["head_dim"]),
        ),
        (
            "server-moe-width-huge",
            "moe_intermediate_size",
            (1u64 << 45).into(),
            err(&["moe_intermediate_size"]),
        ),
    ];
    let server_weights = std::fs::read(server_base.join("model.safetensors")).unwrap();
    for (id, key, v, expect) in server_cases {
        let mut c = scfg.clone();
        c["model_type"] = "afm_ptmoe".into();
        if !key.is_empty() {
            c[key] = v;
        }
        let d = dir.join(id);
        write_st_dir(&d, &c, &server_weights);
        cases.push(Case {
            id: id.into(),
            target: Target::Server,
            path: d,
            base: Some(server_base.clone()),
            cli: gen_cli("{path}"),
            env: vec![],
            expect: expect.clone(),
        });
        let p = dir.join(format!("{id}.config.json"));
        std::fs::write(&p, c.to_string()).unwrap();
        cases.push(Case {
            id: format!("{id}-parse"),
            target: Target::ServerConfig,
            path: p,
            base: None,
            cli: vec![],
            env: vec![],
            expect,
        });
    }

    // ---- images ----------------------------------------------------------------------
    let img_case = |id: &str,
                    file: &str,
                    bytes: &[u8],
                    reference: Option<&image::RgbImage>,
                    expect: Expect|
     -> Vec<Case> {
        let p = dir.join(file);
        std::fs::write(&p, bytes).unwrap();
        let base = reference.map(|r| {
            let rp = dir.join(format!("{file}.rgb"));
            let mut b = (r.width()).to_le_bytes().to_vec();
            b.extend(r.height().to_le_bytes());
            b.extend(r.as_raw());
            std::fs::write(&rp, b).unwrap();
            rp
        });
        let cli = vec![
            "caption".to_string(),
            "--model".into(),
            vlm_base.display().to_string(),
            "--max-tokens".into(),
            "2".into(),
            "--jsonl".into(),
            "{path}".into(),
        ];
        let mut out = vec![];
        out.push(Case {
            id: id.into(),
            target: Target::Image,
            path: p.clone(),
            base,
            cli,
            env: vec![],
            expect: expect.clone(),
        });
        // the plan alone (--dry-run) must apply the same limits
        out.push(Case {
            id: format!("{id}-dry-run"),
            target: Target::CliOnly,
            path: p,
            base: None,
            cli: vec![
                "caption".into(),
                "--dry-run".into(),
                "--model".into(),
                vlm_base.display().to_string(),
                "{path}".into(),
            ],
            env: vec![],
            expect: match &expect {
                // the header alone cannot tell a truncated or corrupt body
                Expect::Err(_) if id.contains("cut") || id.contains("crc") => {
                    Expect::Either(vec![file.to_string()])
                }
                e => e.clone(),
            },
        });
        out
    };
    use image::ImageFormat as F;
    let pic = picture(61, 47, &mut rng);
    let dynpic = image::DynamicImage::ImageRgb8(pic.clone());
    let lossless = [
        ("png", F::Png),
        ("bmp", F::Bmp),
        ("tiff", F::Tiff),
        ("webp", F::WebP),
    ];
    for (ext, f) in lossless {
        let b = encode(&dynpic, f);
        cases.extend(img_case(
            &format!("img-{ext}"),
            &format!("img.{ext}"),
            &b,
            Some(&pic),
            Expect::Ok { tol: 0.0 },
        ));
        cases.extend(img_case(
            &format!("img-{ext}-cut-half"),
            &format!("img-cut.{ext}"),
            &b[..b.len() / 2],
            None,
            err(&["img-cut"]),
        ));
    }
    let jpg = encode(&dynpic, F::Jpeg);
    cases.extend(img_case(
        "img-jpeg",
        "img.jpg",
        &jpg,
        Some(&pic),
        Expect::Ok { tol: 8.0 },
    ));
    for (id, n) in [
        ("img-jpeg-cut-half", jpg.len() / 2),
        ("img-jpeg-cut-90", jpg.len() * 9 / 10),
        ("img-jpeg-cut-eoi", jpg.len() - 2),
        ("img-jpeg-cut-header", 40),
    ] {
        cases.extend(img_case(
            id,
            &format!("{id}.jpg"),
            &jpg[..n],
            None,
            err(&["truncated"]),
        ));
    }
    {
        let mut b = jpg.clone();
        b.extend(b"trailing garbage after the end marker");
        cases.extend(img_case(
            "img-jpeg-trailing",
            "img-trailing.jpg",
            &b,
            Some(&pic),
            Expect::Ok { tol: 8.0 },
        ));
    }
    let gif = encode(&dynpic, F::Gif);
    let gif_img = image::load_from_memory(&gif).unwrap().to_rgb8();
    cases.extend(img_case(
        "img-gif",
        "img.gif",
        &gif,
        Some(&gif_img),
        Expect::Ok { tol: 0.0 },
    ));
    cases.extend(img_case(
        "img-gif-cut-half",
        "img-cut.gif",
        &gif[..gif.len() / 2],
        None,
        err(&["img-cut.gif"]),
    ));
    let gray = image::DynamicImage::ImageLuma8(image::imageops::grayscale(&pic));
    cases.extend(img_case(
        "img-gray-png",
        "gray.png",
        &encode(&gray, F::Png),
        Some(&gray.to_rgb8()),
        Expect::Ok { tol: 0.0 },
    ));
    let rgba = image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(20, 10, |x, _| {
        image::Rgba([200, 10, 10, if x < 10 { 255 } else { 0 }])
    }));
    let rgba_ref = image::RgbImage::from_fn(20, 10, |x, _| {
        if x < 10 {
            image::Rgb([200, 10, 10])
        } else {
            image::Rgb([255, 255, 255])
        }
    });
    cases.extend(img_case(
        "img-rgba-png",
        "rgba.png",
        &encode(&rgba, F::Png),
        Some(&rgba_ref),
        Expect::Ok { tol: 0.0 },
    ));
    let px1 = image::RgbImage::from_pixel(1, 1, image::Rgb([9, 99, 199]));
    cases.extend(img_case(
        "img-1x1",
        "one.png",
        &encode(&image::DynamicImage::ImageRgb8(px1.clone()), F::Png),
        Some(&px1),
        Expect::Ok { tol: 0.0 },
    ));
    let tall = picture(2, 3000, &mut rng);
    cases.extend(img_case(
        "img-2x3000",
        "tall.png",
        &encode(&image::DynamicImage::ImageRgb8(tall.clone()), F::Png),
        Some(&tall),
        Expect::Ok { tol: 0.0 },
    ));
    for (id, w, h) in [
        ("img-png-50000sq", 50_000u32, 50_000u32),
        ("img-png-max", u32::MAX / 2, 3),
        ("img-png-7000sq", 7000, 7000),
    ] {
        cases.extend(img_case(
            id,
            &format!("{id}.png"),
            &png_declaring(w, h),
            None,
            err(&["pixels", "limit"]),
        ));
    }
    cases.extend(img_case(
        "img-png-0x0",
        "zero.png",
        &png_declaring(0, 5),
        None,
        err(&["zero.png"]),
    ));
    cases.extend(img_case(
        "img-jpeg-65535sq",
        "huge.jpg",
        &jpeg_with_size(jpg.clone(), 65535, 65535),
        None,
        err(&["pixels", "limit"]),
    ));
    cases.extend(img_case(
        "img-jpeg-0-wide",
        "zerow.jpg",
        &jpeg_with_size(jpg.clone(), 0, 47),
        None,
        err(&["zerow.jpg"]),
    ));
    {
        let mut b = encode(&dynpic, F::Png);
        // flip a byte of the first IDAT's data: the CRC no longer matches
        let i = b.windows(4).position(|w| w == b"IDAT").unwrap() + 10;
        b[i] ^= 0x55;
        cases.extend(img_case(
            "img-png-bad-crc",
            "badcrc.png",
            &b,
            None,
            err(&["badcrc.png"]),
        ));
    }
    cases.extend(img_case(
        "img-text-as-png",
        "text.png",
        b"this is not an image, just text\n",
        None,
        err(&["text.png", "not an image"]),
    ));
    cases.extend(img_case(
        "img-empty-jpg",
        "empty.jpg",
        b"",
        None,
        err(&["empty.jpg"]),
    ));
    cases.extend(img_case(
        "img-random-jpg",
        "random.jpg",
        &(0..3000).map(|_| rng.random::<u8>()).collect::<Vec<_>>(),
        None,
        err(&["random.jpg"]),
    ));
    cases.extend(img_case(
        "img-html-as-png",
        "page.png",
        b"<!DOCTYPE html><html><body>404</body></html>",
        None,
        err(&["page.png"]),
    ));
    cases.extend(img_case(
        "img-zip-as-jpg",
        "archive.jpg",
        b"PK\x03\x04\x14\x00\x00\x00\x08\x00",
        None,
        err(&["archive.jpg"]),
    ));
    cases.extend(img_case(
        "img-magic-only-png",
        "magic.png",
        b"\x89PNG\r\n\x1a\n",
        None,
        err(&["magic.png"]),
    ));
    cases.extend(img_case(
        "img-magic-only-jpg",
        "magic.jpg",
        b"\xff\xd8\xff",
        None,
        err(&["magic.jpg"]),
    ));

    // ---- VLM model directories ---------------------------------------------------------
    let vlm_case = |id: &str, edit: &dyn Fn(&Path), expect: Expect| -> Case {
        let d = dir.join(id);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&vlm_base).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
        edit(&d);
        Case {
            id: id.into(),
            target: Target::Vlm,
            path: d.clone(),
            base: Some(vlm_base.clone()),
            cli: vec![
                "caption".into(),
                "--model".into(),
                d.display().to_string(),
                "--max-tokens".into(),
                "3".into(),
                img_base.display().to_string(),
            ],
            env: vec![],
            expect,
        }
    };
    let edit_cfg = |f: &'static dyn Fn(&mut serde_json::Value)| {
        move |d: &Path| {
            let p = d.join("config.json");
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            f(&mut v);
            std::fs::write(&p, v.to_string()).unwrap();
        }
    };
    cases.push(vlm_case("vlm-base", &|_| {}, OK));
    cases.push(vlm_case(
        "vlm-image-token-out",
        &edit_cfg(&|v| v["image_token_id"] = 100_000.into()),
        err(&["image_token_id"]),
    ));
    cases.push(vlm_case(
        "vlm-scale-0",
        &edit_cfg(&|v| v["scale_factor"] = 0.into()),
        err(&["scale_factor"]),
    ));
    cases.push(vlm_case(
        "vlm-patch-0",
        &edit_cfg(&|v| v["vision_config"]["patch_size"] = 0.into()),
        err(&["patch_size"]),
    ));
    cases.push(vlm_case(
        "vlm-patch-7",
        &edit_cfg(&|v| v["vision_config"]["patch_size"] = 7.into()),
        err(&["patch_size"]),
    ));
    cases.push(vlm_case(
        "vlm-text-ctx-2e40",
        &edit_cfg(&|v| v["text_config"]["max_position_embeddings"] = (1u64 << 40).into()),
        err(&["max_position_embeddings"]),
    ));
    cases.push(vlm_case(
        "vlm-vision-hidden-huge",
        &edit_cfg(&|v| v["vision_config"]["hidden_size"] = (1u64 << 40).into()),
        err(&["hidden_size"]),
    ));
    cases.push(vlm_case(
        "vlm-no-vision-config",
        &edit_cfg(&|v| {
            v.as_object_mut().unwrap().remove("vision_config");
        }),
        err(&["vision_config"]),
    ));
    cases.push(vlm_case(
        "vlm-act-unknown",
        &edit_cfg(&|v| v["vision_config"]["hidden_act"] = "swish9".into()),
        err(&["hidden_act"]),
    ));
    cases.push(vlm_case(
        "vlm-no-weights",
        &|d: &Path| std::fs::remove_file(d.join("model.safetensors")).unwrap(),
        err(&["safetensors"]),
    ));
    cases.push(vlm_case(
        "vlm-no-tokenizer",
        &|d: &Path| std::fs::remove_file(d.join("tokenizer.json")).unwrap(),
        err(&["tokenizer.json"]),
    ));
    cases.push(vlm_case(
        "vlm-processor-not-json",
        &|d: &Path| std::fs::write(d.join("processor_config.json"), "{oops").unwrap(),
        err(&["processor_config.json"]),
    ));
    // weights edited through the safetensors header
    let vlm_st = std::fs::read(vlm_base.join("model.safetensors")).unwrap();
    let (hlen, header) = {
        let n = u64::from_le_bytes(vlm_st[..8].try_into().unwrap()) as usize;
        (
            n,
            serde_json::from_slice::<serde_json::Value>(&vlm_st[8..8 + n]).unwrap(),
        )
    };
    let conn = "model.connector.modality_projection.proj.weight";
    let conn_off = header[conn]["data_offsets"][0].as_u64().unwrap() as usize + 8 + hlen;
    let conn_dtype = header[conn]["dtype"].as_str().unwrap().to_string();
    let patch = "model.vision_model.embeddings.patch_embedding.weight";
    let patch_off = header[patch]["data_offsets"][0].as_u64().unwrap() as usize + 8 + hlen;
    assert_eq!(conn_dtype, "F32", "the fixture is f32");
    let nan_at = move |off: usize, at: usize| {
        move |d: &Path| {
            let mut b = vlm_st_clone(d);
            b[off + 4 * at..off + 4 * at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            std::fs::write(d.join("model.safetensors"), b).unwrap();
        }
    };
    cases.push(vlm_case(
        "vlm-nan-connector",
        &nan_at(conn_off, 77),
        err(&[conn, "element 77"]),
    ));
    cases.push(vlm_case(
        "vlm-nan-patch-embed",
        &nan_at(patch_off, 300),
        err(&["patch_embedding", "element 300"]),
    ));
    let relabel = move |name: &'static str, dt: &'static str| {
        move |d: &Path| {
            let b = vlm_st_clone(d);
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let mut h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
            h[name]["dtype"] = dt.into();
            let mut hs = h.to_string().into_bytes();
            while hs.len() < n {
                hs.push(b' ');
            }
            assert_eq!(hs.len(), n, "relabelled header keeps its length");
            let mut o = b[..8].to_vec();
            o.extend(hs);
            o.extend(&b[8 + n..]);
            std::fs::write(d.join("model.safetensors"), o).unwrap();
        }
    };
    cases.push(vlm_case(
        "vlm-connector-as-i32",
        &relabel(conn, "I32"),
        err(&[conn, "dtype"]),
    ));
    cases.push(vlm_case(
        "vlm-patch-as-u32",
        &relabel(patch, "U32"),
        err(&["patch_embedding", "dtype"]),
    ));

    // ---- CLI arguments ---------------------------------------------------------------
    let st = base_st_dir.display().to_string();
    let vlm = vlm_base.display().to_string();
    let img = img_base.display().to_string();
    let cli_case = |id: &str, args: &[&str], env: Vec<(String, String)>, expect: Expect| Case {
        id: id.into(),
        target: Target::CliOnly,
        path: PathBuf::new(),
        base: None,
        cli: args.iter().map(|s| s.to_string()).collect(),
        env,
        expect,
    };
    let long_prompt = "word ".repeat(200);
    let tiny_default = dir.join("not-the-default.gguf");
    std::fs::copy(&base_gguf_path, &tiny_default).unwrap();
    let mut extra = vec![
        cli_case(
            "cli-generate-ok",
            &[
                "generate",
                "--raw",
                "--max-tokens",
                "3",
                "--model",
                &st,
                "hello",
            ],
            vec![],
            OK,
        ),
        cli_case(
            "cli-empty-prompt",
            &["generate", "--model", &st, ""],
            vec![],
            err(&["prompt", "empty"]),
        ),
        cli_case(
            "cli-blank-prompt",
            &["generate", "--model", &st, "  \n\t "],
            vec![],
            err(&["prompt", "empty"]),
        ),
        cli_case(
            "cli-max-tokens-0",
            &["generate", "--max-tokens", "0", "--model", &st, "hi"],
            vec![],
            err(&["--max-tokens"]),
        ),
        cli_case(
            "cli-max-tokens-neg",
            &["generate", "--max-tokens", "-3", "--model", &st, "hi"],
            vec![],
            err(&["max-tokens"]),
        ),
        cli_case(
            "cli-max-tokens-huge",
            &[
                "generate",
                "--raw",
                "--max-tokens",
                "1000000000",
                "--model",
                &st,
                "hello",
            ],
            vec![],
            OK,
        ),
        cli_case(
            "cli-temperature-neg",
            &["generate", "--temperature", "-1", "--model", &st, "hi"],
            vec![],
            err(&["temperature", ">= 0"]),
        ),
        cli_case(
            "cli-temperature-nan",
            &["generate", "--temperature", "NaN", "--model", &st, "hi"],
            vec![],
            err(&["temperature"]),
        ),
        cli_case(
            "cli-temperature-inf",
            &["generate", "--temperature", "inf", "--model", &st, "hi"],
            vec![],
            err(&["temperature"]),
        ),
        cli_case(
            "cli-top-p-0",
            &["generate", "--top-p", "0", "--model", &st, "hi"],
            vec![],
            err(&["top_p"]),
        ),
        cli_case(
            "cli-top-p-2",
            &["generate", "--top-p", "2", "--model", &st, "hi"],
            vec![],
            err(&["top_p"]),
        ),
        cli_case(
            "cli-top-p-neg",
            &["generate", "--top-p", "-0.5", "--model", &st, "hi"],
            vec![],
            err(&["top_p"]),
        ),
        cli_case(
            "cli-min-p-neg",
            &["generate", "--min-p", "-0.1", "--model", &st, "hi"],
            vec![],
            err(&["min_p"]),
        ),
        cli_case(
            "cli-repeat-penalty-0",
            &["generate", "--repeat-penalty", "0", "--model", &st, "hi"],
            vec![],
            err(&["repetition_penalty"]),
        ),
        cli_case(
            "cli-repeat-penalty-neg",
            &["generate", "--repeat-penalty", "-2", "--model", &st, "hi"],
            vec![],
            err(&["repetition_penalty"]),
        ),
        cli_case(
            "cli-threads-0",
            &["--threads", "0", "generate", "--model", &st, "hi"],
            vec![],
            err(&["--threads"]),
        ),
        cli_case(
            "cli-model-missing",
            &["generate", "--model", "/nonexistent/model.gguf", "hi"],
            vec![],
            err(&["/nonexistent/model.gguf"]),
        ),
        cli_case(
            "cli-prompt-too-long",
            &["generate", "--raw", "--model", &st, &long_prompt],
            vec![],
            err(&["context", "shorten the prompt", "!lower max_new_tokens"]),
        ),
        cli_case(
            "cli-prompt-too-long-small-max",
            &[
                "generate",
                "--raw",
                "--max-tokens",
                "1",
                "--model",
                &st,
                &long_prompt,
            ],
            vec![],
            err(&["context", "shorten the prompt"]),
        ),
        cli_case(
            "cli-default-model-sha256",
            &["generate", "--max-tokens", "2", "hi"],
            vec![(
                "AFM_SMOLLM2_GGUF".into(),
                tiny_default.display().to_string(),
            )],
            err(&["sha256", &tiny_default.display().to_string()]),
        ),
        cli_case(
            "cli-ask-empty-question",
            &["ask", "--model", &vlm, &img, ""],
            vec![],
            err(&["question", "empty"]),
        ),
        cli_case(
            "cli-ask-blank-question",
            &["ask", "--model", &vlm, &img, "   "],
            vec![],
            err(&["question", "empty"]),
        ),
        cli_case(
            "cli-ask-ok",
            &[
                "ask",
                "--model",
                &vlm,
                "--max-tokens",
                "2",
                &img,
                "What is this?",
            ],
            vec![],
            OK,
        ),
        cli_case(
            "cli-ask-max-tokens-0",
            &["ask", "--model", &vlm, "--max-tokens", "0", &img, "What?"],
            vec![],
            err(&["--max-tokens"]),
        ),
        cli_case(
            "cli-ask-temperature-neg",
            &["ask", "--model", &vlm, "--temperature", "-1", &img, "What?"],
            vec![],
            err(&["temperature", ">= 0"]),
        ),
        cli_case(
            "cli-caption-max-tokens-0",
            &["caption", "--model", &vlm, "--max-tokens", "0", &img],
            vec![],
            err(&["--max-tokens"]),
        ),
        cli_case(
            "cli-caption-image-max-tokens-0",
            &["caption", "--model", &vlm, "--image-max-tokens", "0", &img],
            vec![],
            err(&["--image-max-tokens"]),
        ),
        cli_case(
            "cli-caption-missing-image",
            &["caption", "--model", &vlm, "/nonexistent/x.png"],
            vec![],
            err(&["/nonexistent/x.png"]),
        ),
        cli_case(
            "cli-caption-empty-dir",
            &[
                "caption",
                "--model",
                &vlm,
                &dir.join("base-st").display().to_string(),
            ],
            vec![],
            err(&["no images"]),
        ),
        cli_case(
            "cli-caption-model-missing",
            &["caption", "--model", "/nonexistent/vlm", &img],
            vec![],
            err(&["/nonexistent/vlm"]),
        ),
        cli_case(
            "cli-screen-ok",
            &["screen", "--model", &vlm, "--max-tokens", "2", &img],
            vec![],
            OK,
        ),
    ];
    cases.append(&mut extra);
    Corpus {
        cases,
        dir: dir.to_path_buf(),
    }
}

fn vlm_st_clone(d: &Path) -> Vec<u8> {
    std::fs::read(d.join("model.safetensors")).unwrap()
}
