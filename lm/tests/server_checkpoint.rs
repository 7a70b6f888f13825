//! Server-model (PT-MoE) checkpoints: safetensors and GGUF round trips (experts quantized),
//! the size figures (parameters, K/V bytes) against what the model really holds, presets,
//! generation through a `ServerCheckpoint`, and malformed files.

use afm_lm::generate::{generate, GenerateOptions};
use afm_lm::server_checkpoint::{
    is_server_checkpoint, write_server_gguf, write_server_safetensors, GGUF_CONFIG_KEY,
};
use afm_lm::server_model::{random_server_tensors, AttentionKind, ServerConfig, ServerModel};
use afm_lm::testing::max_abs_diff;
use afm_lm::weights::WeightSource;
use afm_lm::{LanguageModel, LmError, LogitsFor, ServerCheckpoint};
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("afm-server-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny() -> ServerConfig {
    ServerConfig::preset("tiny").unwrap()
}

fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 11) % vocab) as u32).collect()
}

fn logits(m: &ServerModel, ids: &[u32]) -> Tensor {
    m.forward_tokens(ids, &mut m.new_cache(), &LogitsFor::All)
        .unwrap()
}

fn in_memory(cfg: &ServerConfig, t: &HashMap<String, Tensor>) -> ServerModel {
    ServerModel::from_source(&WeightSource::from_tensors(t.clone()), cfg.clone()).unwrap()
}

#[test]
fn param_counts_equal_the_tensors_loaded() {
    let mut untied = tiny();
    untied.tie_word_embeddings = false;
    untied.qk_norm = false;
    untied.moe_every = 3;
    for cfg in [tiny(), untied] {
        let t = random_server_tensors(&cfg, 1).unwrap();
        let n: usize = t.values().map(|t| t.elem_count()).sum();
        let pc = cfg.param_counts();
        assert_eq!(pc.total, n, "{cfg:?}");
        // active: the unchosen experts of every MoE layer are the difference
        let expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size;
        let moe_layers = (0..cfg.num_layers_per_track)
            .filter(|&i| cfg.is_moe(i))
            .count();
        assert_eq!(
            pc.total - pc.active,
            cfg.num_tracks * moe_layers * (cfg.num_experts - cfg.experts_per_token) * expert
        );
    }
    let p = ServerConfig::preset("paper-small").unwrap().param_counts();
    println!(
        "paper-small: {:.1} M parameters, {:.1} M active per token",
        p.total as f64 / 1e6,
        p.active as f64 / 1e6
    );
    assert!(p.total > 5 * p.active);
}

#[test]
fn kv_bytes_formula_equals_the_cache_local_layers_stop_growing() {
    let cfg = tiny();
    let m = in_memory(&cfg, &random_server_tensors(&cfg, 2).unwrap());
    let mut c = m.new_cache();
    let ids = prompt(40, cfg.vocab_size);
    // prefill past the window, then decode: the cache always equals the formula
    m.forward_tokens(&ids[..20], &mut c, &LogitsFor::Last)
        .unwrap();
    assert_eq!(c.used_bytes(), cfg.kv_cache_bytes(20));
    for (i, &id) in ids[20..].iter().enumerate() {
        m.forward_tokens(&[id], &mut c, &LogitsFor::Last).unwrap();
        assert_eq!(c.used_bytes(), cfg.kv_cache_bytes(21 + i));
    }
    let (pattern, global) = (cfg.kv_cache_bytes(40), cfg.kv_cache_bytes_all_global(40));
    println!(
        "tiny, 40 tokens, window {}: K/V {pattern} bytes with (local x3, global), {global} all-global",
        cfg.sliding_window
    );
    // 3 of 4 layers hold 8 of 40 positions
    assert_eq!(pattern * 40, global * (8 * 3 + 40) / 4);
    let mut all_global = cfg.clone();
    all_global.attention_pattern = vec![AttentionKind::Global];
    assert_eq!(all_global.kv_cache_bytes(40), global);
    assert_eq!(cfg.syncs_per_pass(), (2, 8));
}

#[test]
fn safetensors_round_trip_is_exact() {
    let cfg = tiny();
    let t = random_server_tensors(&cfg, 3).unwrap();
    let dir = tmp("st");
    write_server_safetensors(&dir, &cfg, &t).unwrap();
    assert!(is_server_checkpoint(&dir).unwrap());
    let loaded = ServerModel::load(&dir).unwrap();
    assert_eq!(loaded.config(), &cfg);
    let ids = prompt(20, cfg.vocab_size);
    let d = max_abs_diff(&logits(&loaded, &ids), &logits(&in_memory(&cfg, &t), &ids)).unwrap();
    assert_eq!(d, 0.0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn gguf_round_trip_f32_exact_and_quantized_experts_close() {
    let cfg = tiny();
    let t = random_server_tensors(&cfg, 4).unwrap();
    let ids = prompt(20, cfg.vocab_size);
    let want = logits(&in_memory(&cfg, &t), &ids);
    let dir = tmp("gguf");
    let scale = want.abs().unwrap().max_keepdim(1).unwrap();
    let scale = scale.mean_all().unwrap().to_scalar::<f32>().unwrap();
    for (dtype, tol) in [
        (GgmlDType::F32, 0.0),
        (GgmlDType::Q8_0, 0.03),
        (GgmlDType::Q4_1, 0.25),
    ] {
        let p = dir.join(format!("tiny-{dtype:?}.gguf"));
        write_server_gguf(&p, &cfg, &t, dtype, &[]).unwrap();
        assert!(is_server_checkpoint(&p).unwrap());
        // the experts really are stored in `dtype`, the routers in f32
        let src = WeightSource::from_gguf(&p).unwrap();
        let WeightSource::Gguf { content, .. } = &src else {
            unreachable!()
        };
        let info = |n: &str| content.tensor_infos[n].ggml_dtype;
        assert_eq!(info("trk.1.blk.3.ffn_down_exp.2.weight"), dtype);
        assert_eq!(info("trk.1.blk.3.ffn_gate_inp.weight"), GgmlDType::F32);
        let m = ServerModel::load(&p).unwrap();
        assert_eq!(m.config(), &cfg);
        let d = max_abs_diff(&logits(&m, &ids), &want).unwrap();
        println!("GGUF {dtype:?}: max |logit diff| {d:.2e} vs f32 (mean max |logit| {scale:.2})");
        assert!(d <= tol * scale, "{dtype:?}: {d} > {tol} x {scale}");
        if dtype != GgmlDType::F32 {
            assert!(d > 0.0, "{dtype:?} gave exact logits: not quantized?");
            // dequantized on load, the same weights give the same function
            let opts = afm_lm::LoadOptions {
                dequantize: true,
                ..Default::default()
            };
            let deq = ServerModel::load_with(&p, &opts).unwrap();
            let d2 = max_abs_diff(&logits(&deq, &ids), &logits(&m, &ids)).unwrap();
            assert!(d2 < 0.05 * scale, "{dtype:?} kernels vs dequantized: {d2}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn generates_text_through_a_server_checkpoint() {
    // the tiny SmolVLM fixture's tokenizer (451 tokens) on a 512-token server model
    let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_tiny_idefics3");
    let mut cfg = tiny();
    cfg.vocab_size = 512;
    let dir = tmp("gen");
    write_server_safetensors(&dir, &cfg, &random_server_tensors(&cfg, 5).unwrap()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fx.join(f), dir.join(f)).unwrap();
    }
    let ck = ServerCheckpoint::load(&dir).unwrap();
    let ids = ck.tokenizer.encode("a picture of a cat").unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 12,
        ..Default::default()
    };
    let mut streamed = String::new();
    let g = generate(&ck.model, &ck.tokenizer, &ids, &opts, &mut |s| {
        streamed.push_str(s);
        true
    })
    .unwrap();
    assert!(g.stats.generated_tokens >= 1);
    assert_eq!(streamed, g.text);
    // greedy decoding with the cache equals argmax over a full forward of the whole text
    let mut all = ids.clone();
    all.extend(&g.ids);
    let full = logits(&ck.model, &all);
    let n = g.ids.len();
    for (j, &tok) in g.ids.iter().enumerate() {
        let row = full.get(ids.len() - 1 + j).unwrap();
        let best = row.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(tok, best, "token {j} of {n}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_server_checkpoints_are_errors_naming_the_problem() {
    let cfg = tiny();
    let t = random_server_tensors(&cfg, 6).unwrap();
    let dir = tmp("bad");
    let err = |p: &std::path::Path| ServerModel::load(p).unwrap_err().to_string();

    // a missing expert
    let mut missing = t.clone();
    missing.remove("model.tracks.1.layers.3.mlp.experts.2.up_proj.weight");
    let st = dir.join("missing");
    write_server_safetensors(&st, &cfg, &missing).unwrap();
    let e = err(&st);
    assert!(
        e.contains("model.tracks.1.layers.3.mlp.experts.2.up_proj.weight"),
        "{e}"
    );

    // a config field out of range, and a dense (llama) config
    let cj = st.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cj).unwrap()).unwrap();
    v["experts_per_token"] = 9.into();
    std::fs::write(&cj, v.to_string()).unwrap();
    let e = err(&st);
    assert!(e.contains("experts_per_token"), "{e}");
    let obj = v.as_object_mut().unwrap();
    obj.remove("num_tracks");
    std::fs::write(&cj, v.to_string()).unwrap();
    assert!(!is_server_checkpoint(&st).unwrap());
    let e = err(&st);
    assert!(e.contains("num_tracks"), "{e}");

    // GGUF: no config key, a config that is not JSON, a llama GGUF, a truncated file
    let g = dir.join("m.gguf");
    write_server_gguf(&g, &cfg, &t, GgmlDType::Q8_0, &[]).unwrap();
    let full = std::fs::read(&g).unwrap();
    std::fs::write(dir.join("cut.gguf"), &full[..full.len() * 2 / 3]).unwrap();
    let e = err(&dir.join("cut.gguf"));
    assert!(e.contains("cut.gguf") || e.contains("trk."), "{e}");

    let write_md = |name: &str, md: Vec<(&str, gguf_file::Value)>| {
        let p = dir.join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        let refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut f, &refs, &[]).unwrap();
        p
    };
    use gguf_file::Value as V;
    let p = write_md(
        "nokey.gguf",
        vec![("general.architecture", V::String("afm_ptmoe".into()))],
    );
    assert!(err(&p).contains(GGUF_CONFIG_KEY));
    let p = write_md(
        "notjson.gguf",
        vec![
            ("general.architecture", V::String("afm_ptmoe".into())),
            (GGUF_CONFIG_KEY, V::String("{ tracks: 2".into())),
        ],
    );
    let e = err(&p);
    assert!(e.contains(GGUF_CONFIG_KEY) && e.contains("not JSON"), "{e}");
    let p = write_md(
        "llama.gguf",
        vec![("general.architecture", V::String("llama".into()))],
    );
    let e = err(&p);
    assert!(e.contains("`llama` is not a server"), "{e}");
    assert!(matches!(
        ServerModel::load(&dir.join("nothing-here")),
        Err(LmError::Io { .. })
    ));
    assert!(ServerConfig::preset("huge").is_err());
    std::fs::remove_dir_all(dir).unwrap();
}
