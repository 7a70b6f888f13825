//! The `Vlm` API beyond numerics: one model shared by threads, batch captioning, and the
//! transformers-4 checkpoint layout that SmolVLM checkpoints on the Hub use.

use afm_fusion::{AskOptions, ChatMessage, Part, Vlm};
use afm_lm::GenerateOptions;
use afm_vision::{load_image, ImageLimits};
use std::path::PathBuf;
use std::sync::Arc;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_tiny_idefics3")
}

fn opts(n: usize) -> AskOptions {
    AskOptions {
        generate: GenerateOptions {
            max_new_tokens: n,
            ..Default::default()
        },
        max_image_tokens: None,
    }
}

#[test]
fn one_model_serves_threads_and_batches_with_the_same_answers() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Vlm<afm_lm::DeviceModel>>();
    let vlm = Arc::new(Vlm::load_idefics3(&dir()).unwrap());
    let lim = ImageLimits::default();
    let imgs = vec![
        load_image(&dir().join("sample.png"), &lim).unwrap(),
        load_image(&dir().join("wide.png"), &lim).unwrap(),
    ];
    let mut done = vec![];
    let batch = vlm.caption_many(&imgs, &opts(8), &mut |i, r| done.push((i, r.is_ok())));
    assert_eq!(done, vec![(0, true), (1, true)]);
    let want: Vec<Vec<u32>> = batch
        .iter()
        .map(|r| r.as_ref().unwrap().generation.ids.clone())
        .collect();
    assert_ne!(
        want[0], want[1],
        "different images must give different answers"
    );
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let (vlm, img) = (vlm.clone(), imgs[i].clone());
            std::thread::spawn(move || {
                vlm.caption(&img, &opts(8), &mut |_| true)
                    .unwrap()
                    .generation
                    .ids
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), want[i], "thread {i}");
    }
}

#[test]
fn multi_turn_chat_reuses_the_encoded_image() {
    let vlm = Vlm::load_idefics3(&dir()).unwrap();
    let img = load_image(&dir().join("sample.png"), &ImageLimits::default()).unwrap();
    let enc = vlm.encode_image(&img, None).unwrap();
    let g = GenerateOptions {
        max_new_tokens: 4,
        ..Default::default()
    };
    let mut msgs = vec![ChatMessage::user(vec![
        Part::Image(enc.clone()),
        Part::Text("Describe this image.".into()),
    ])];
    let first = vlm.chat(&msgs, &g, &mut |_| true).unwrap();
    msgs.push(ChatMessage::assistant(first.text.clone()));
    msgs.push(ChatMessage::user(vec![Part::Text(
        "And the colours?".into(),
    )]));
    let text = vlm.render(&msgs).unwrap();
    assert_eq!(text.matches("<global-img>").count(), 1);
    assert!(
        text.ends_with("And the colours?<end_of_utterance>\nAssistant:"),
        "{text}"
    );
    let again = vlm.encode_image(&img, None).unwrap();
    assert!(again.from_cache);
    vlm.chat(&msgs, &g, &mut |_| true).unwrap();
}

#[test]
fn transformers_4_layout_loads_the_same() {
    // Hub checkpoints saved by transformers 4 keep the image-processor settings in
    // preprocessor_config.json and the template in chat_template.json.
    let tmp = std::env::temp_dir().join(format!("afm-fusion-v4-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for f in std::fs::read_dir(dir()).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, tmp.join(p.file_name().unwrap())).unwrap();
    }
    let pc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.join("processor_config.json")).unwrap())
            .unwrap();
    std::fs::write(
        tmp.join("preprocessor_config.json"),
        pc["image_processor"].to_string(),
    )
    .unwrap();
    std::fs::write(
        tmp.join("processor_config.json"),
        serde_json::json!({"image_seq_len": pc["image_seq_len"], "processor_class": "Idefics3Processor"})
            .to_string(),
    )
    .unwrap();
    let tpl = std::fs::read_to_string(tmp.join("chat_template.jinja")).unwrap();
    std::fs::remove_file(tmp.join("chat_template.jinja")).unwrap();
    std::fs::write(
        tmp.join("chat_template.json"),
        serde_json::json!({ "chat_template": tpl }).to_string(),
    )
    .unwrap();
    let a = Vlm::load_idefics3(&dir()).unwrap();
    let b = Vlm::load_idefics3(&tmp).unwrap();
    assert_eq!(
        format!("{:?}", a.processor()),
        format!("{:?}", b.processor())
    );
    let img = load_image(&dir().join("sample.png"), &ImageLimits::default()).unwrap();
    let ra = a.caption(&img, &opts(6), &mut |_| true).unwrap();
    let rb = b.caption(&img, &opts(6), &mut |_| true).unwrap();
    assert_eq!(ra.generation.ids, rb.generation.ids);
    std::fs::remove_dir_all(&tmp).ok();
}
