//! afm-tiny's image processor over the shipped export (`assets/afm-tiny`): without a `tiling`
//! section it is exactly the one-view preprocessing the model was trained with; with one, a
//! 1280x800 screenshot becomes the overview plus its native-resolution 224-px tiles (36
//! tokens each, through the real ViT and adapter), and a budget below the native grid
//! downscales and says so.

use afm_fusion::afm_prompt::{image_expansion, view_order, View};
use afm_fusion::afm_tiny::{load_export, AfmTinyConfig};
use afm_fusion::{ImageProcessor, Processor, TilingSettings, VisionAdapter};
use afm_vision::image::{Rgb, RgbImage};
use afm_vision::{load_image, ImageLimits};
use candle_core::Tensor;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn shipped() -> AfmTinyConfig {
    AfmTinyConfig::from_file(&root().join("assets/afm-tiny/config.json")).unwrap()
}

fn tiled(max_tokens: usize) -> AfmTinyConfig {
    let mut c = shipped();
    let v = serde_json::json!({"tile": 224, "max_tokens": max_tokens, "overview": true});
    c.tiling = Some(serde_json::from_value::<TilingSettings>(v).unwrap());
    c.validate().unwrap();
    c
}

/// A 1280x800 "screenshot": a title bar, a dark left panel and a grey body.
fn screenshot() -> RgbImage {
    RgbImage::from_fn(1280, 800, |x, y| {
        if y < 40 {
            Rgb([40, 90, 200])
        } else if x < 300 {
            Rgb([30, 30, 30])
        } else {
            Rgb([((x / 5) % 256) as u8, 200, ((y / 4) % 256) as u8])
        }
    })
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn shipped_config_keeps_one_squashed_view_per_image() {
    let cfg = shipped();
    assert!(cfg.tiling.is_none());
    let p = Processor::new(Box::new(cfg.processor().unwrap()));
    let pre = cfg.preprocess().unwrap();
    for name in ["scene.png", "screen.png"] {
        let img = load_image(
            &root().join("assets/images").join(name),
            &ImageLimits::default(),
        )
        .unwrap();
        let plan = p.plan(img.width(), img.height(), None).unwrap();
        assert_eq!(
            (
                plan.rows,
                plan.cols,
                plan.tiles,
                plan.image_tokens,
                plan.downscale
            ),
            (0, 0, 1, 36, None),
            "{name}"
        );
        // the training-time preprocessing, bit for bit
        let want = pre.run(&img, 224, 224).unwrap().unsqueeze(0).unwrap();
        let got = p.pixel_values(&img, &plan).unwrap();
        assert_eq!(got.dims(), &[1, 3, 224, 224]);
        assert_eq!(max_diff(&got, &want), 0.0, "{name}");
        // any budget that covers the view changes nothing; one below it is refused
        assert_eq!(p.plan(img.width(), img.height(), Some(5000)).unwrap(), plan);
        let e = p
            .plan(img.width(), img.height(), Some(35))
            .unwrap_err()
            .to_string();
        assert!(e.contains("budget of 35") && e.contains("36 tokens"), "{e}");
    }
    assert!(p.budget_note().unwrap().contains("no `tiling` section"));
    assert_eq!(
        p.prompt_expansion(&p.plan(10, 10, None).unwrap()),
        "<empty_output>".repeat(36)
    );
}

#[test]
fn tiling_section_plans_overview_and_native_tiles_for_a_screenshot() {
    // 1280x800 at native resolution: ceil(1280/224) = 6 columns, ceil(800/224) = 4 rows,
    // plus the overview = 25 views of 36 tokens
    let cfg = tiled(36 * 25);
    let p = Processor::new(Box::new(cfg.processor().unwrap()));
    assert!(p.budget_note().is_none());
    let img = screenshot();
    let plan = p.plan(1280, 800, None).unwrap();
    assert_eq!(
        (plan.cols, plan.rows, plan.overview, plan.tiles),
        (6, 4, true, 25)
    );
    assert_eq!((plan.image_tokens, plan.downscale), (900, None));
    assert_eq!((plan.resized, plan.grid_size), ((1280, 800), (1344, 896)));
    assert!(plan
        .describe()
        .contains("25 tiles (6x4 grid of 224 px + overview) = 900 image tokens"));

    // the order: the overview, then the tiles row-major; one placeholder per embedding
    let order = view_order(&plan);
    assert_eq!(order.len(), 25);
    assert_eq!(order[0], View::Whole);
    assert_eq!(order[1], View::Tile { row: 0, col: 0 });
    assert_eq!(order[6], View::Tile { row: 0, col: 5 });
    assert_eq!(order[7], View::Tile { row: 1, col: 0 });
    assert_eq!(order[24], View::Tile { row: 3, col: 5 });
    let text = p.prompt_expansion(&plan);
    assert_eq!(text, image_expansion("<empty_output>", &plan));
    assert_eq!(text.matches("<empty_output>").count(), 900);
    assert_eq!(text.len(), "<empty_output>".len() * 900);

    // the views: the overview first (the title bar's blue across its top), then the
    // top-left tile (title bar, then the dark panel)
    let px = p.pixel_values(&img, &plan).unwrap();
    assert_eq!(px.dims(), &[25, 3, 224, 224]);
    let at = |v: usize, c: usize, y: usize, x: usize| {
        px.get(v)
            .unwrap()
            .get(c)
            .unwrap()
            .get(y)
            .unwrap()
            .get(x)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // overview: 1280x800 fitted into 224x140, padded below with the mean (~0)
    assert!(at(0, 2, 2, 200) > 0.5, "{}", at(0, 2, 2, 200));
    assert!(at(0, 0, 200, 100).abs() < 0.01); // 128 of 255
                                              // tile (0, 0): pixels 0..224 of the native image; (1, 0) starts at row 224
    assert!(at(1, 2, 10, 100) > 0.5 && at(1, 0, 100, 100) < -0.7);
    assert!(at(7, 0, 10, 100) < -0.7 && at(7, 2, 10, 100) < -0.7);
    // the right column's padding beyond x = 1280 (1344 - 1280 = 64 px) is the mean
    assert!(at(6, 1, 100, 200).abs() < 0.01);

    // through the shipped ViT and adapter: 36 embeddings per view, 900 in all
    let (c, vit, adapter) = load_export(&root().join("assets/afm-tiny")).unwrap();
    let g = c.image_size / c.vision.patch_size;
    let y = adapter
        .forward(&vit.forward(&px).unwrap(), (g, g), c.vision.num_registers())
        .unwrap();
    assert_eq!(y.dims(), &[25, 36, 576]);
}

#[test]
fn budget_below_the_native_grid_downscales_and_says_so() {
    let cfg = tiled(36 * 25);
    let p = Processor::new(Box::new(cfg.processor().unwrap()));
    // the caller's budget replaces the config's
    let plan = p.plan(1280, 800, Some(36 * 10)).unwrap();
    assert!(plan.image_tokens <= 360, "{plan:?}");
    let f = plan.downscale.expect("the downscale must be reported");
    assert!(f < 1.0);
    assert!(plan.overview && plan.tiles > 1);
    assert_eq!(plan.image_tokens, plan.tiles * 36);
    assert!(
        plan.describe().contains("downscaled"),
        "{}",
        plan.describe()
    );
    let (w, h) = plan.resized;
    assert!(w < 1280 && h < 800);
    assert!((w as f64 / h as f64 - 1.6).abs() < 0.01);
    // so does the config's own budget
    let small = Processor::new(Box::new(tiled(36 * 7).processor().unwrap()));
    let d = small.plan(1280, 800, None).unwrap();
    assert!(d.image_tokens <= 252 && d.downscale.is_some(), "{d:?}");
    // one view only: the overview alone (no downscale reported: it is the choice)
    let mut one = Processor::new(Box::new(cfg.processor().unwrap()));
    one.do_image_splitting = false;
    let o = one.plan(1280, 800, None).unwrap();
    assert_eq!((o.tiles, o.image_tokens, o.downscale), (1, 36, None));
    // budgets below one tile are refused, with a clear message
    let e = p.plan(1280, 800, Some(20)).unwrap_err().to_string();
    assert!(e.contains("budget of 20") && e.contains("36 tokens"), "{e}");
}

#[test]
fn bad_tiling_sections_are_refused_by_name() {
    let mut c = shipped();
    c.tiling = Some(TilingSettings {
        tile: 448,
        max_tokens: 900,
        overview: true,
    });
    let e = c.validate().unwrap_err();
    assert!(e.contains("tiling.tile 448"), "{e}");
    c.tiling = Some(TilingSettings {
        tile: 224,
        max_tokens: 10,
        overview: true,
    });
    assert!(c.validate().unwrap_err().contains("tiling.max_tokens 10"));
    // unknown keys and a missing budget are errors of the config file
    let dir = std::env::temp_dir().join(format!("afm-tiling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("assets/afm-tiny/config.json")).unwrap(),
    )
    .unwrap();
    for (bad, needle) in [
        (
            serde_json::json!({"tile": 224, "max_tokens": 900, "tiles": 3}),
            "tiles",
        ),
        (serde_json::json!({"tile": 224}), "max_tokens"),
        (
            serde_json::json!({"tile": 112, "max_tokens": 900}),
            "tiling.tile 112",
        ),
    ] {
        v["tiling"] = bad;
        let f = dir.join("config.json");
        std::fs::write(&f, v.to_string()).unwrap();
        let e = AfmTinyConfig::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains(needle), "{e}");
    }
    // the shipped config serialises without a tiling section (unchanged exports)
    let s = serde_json::to_string(&shipped()).unwrap();
    assert!(!s.contains("tiling"));
    std::fs::remove_dir_all(&dir).ok();
    // the trait object and the config agree on the tile
    assert_eq!(tiled(900).processor().unwrap().tile_size(), 224);
}
