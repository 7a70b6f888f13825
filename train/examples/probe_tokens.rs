//! Probe: what an afm-tiny export's image tokens still say about an easy-VQA image's colour
//! and shape, next to what its ViT's features say.
//!
//! ```text
//! cargo run --release -p afm-train --example probe_tokens -- EXPORT_DIR [TRAIN] [TEST]
//! ```
//!
//! Encodes `TRAIN` (default 1,500) images of easy-VQA's `train` folder and `TEST` (default
//! 500) of its `test` folder (data: `bash scripts/fetch_easy_vqa.sh`, read from
//! `models/easy-vqa` under the working directory), and fits linear softmax probes (features
//! standardised on the training images, AdamW, full batch, 400 steps) for the shape's colour
//! and its shape on three features of each image:
//!
//! * the ViT's patch outputs averaged over the image (width of the ViT);
//! * the adapter's image tokens averaged (width of the LM);
//! * the adapter's image tokens side by side (tokens x width of the LM).
//!
//! Prints held-out accuracy per probe, with the majority class as the floor. If the tokens
//! keep what the ViT has, a model that does not answer colour questions loses it in the
//! language model, not in the adapter.
use afm_fusion::afm_tiny::load_export;
use afm_fusion::VisionAdapter;
use afm_train::easy_vqa::{data_dir, EasyVqa};
use afm_train::linprobe::linear_probe;
use afm_train::pretrain::pixels;
use afm_train::{Split, Truth};
use candle_core::{Device, Tensor};
use std::path::Path;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Features `(n, 3 kinds)` and the two labels of `n` images of `split`.
fn encode(
    dir: &Path,
    split: Split,
    n: usize,
) -> Res<(Vec<Tensor>, Vec<Option<String>>, Vec<Option<String>>)> {
    let (cfg, vit, adapter) = load_export(dir)?;
    let easy = EasyVqa::open(&data_dir(Path::new(".")), split)?;
    let n = n.min(easy.len());
    let (g, regs) = (cfg.vision.grid(), cfg.vision.num_registers());
    let (mut vm, mut am, mut af) = (vec![], vec![], vec![]);
    let (mut colours, mut shapes) = (vec![], vec![]);
    for start in (0..n).step_by(32) {
        let k = 32.min(n - start);
        let mut px = vec![];
        for i in start..start + k {
            let s = easy.get(i)?;
            px.push(pixels(&s, cfg.vision.image_size)?);
            match s.truth {
                Truth::EasyVqa { colour, shape, .. } => {
                    colours.push(colour);
                    shapes.push(shape);
                }
                _ => return Err("not an easy-VQA sample".into()),
            }
        }
        let x = vit.forward(&Tensor::stack(&px, 0)?)?;
        let patches = x.narrow(1, regs, g * g)?;
        vm.push(patches.mean(1)?);
        let t = adapter.forward(&x, (g, g), regs)?;
        am.push(t.mean(1)?);
        af.push(t.flatten_from(1)?);
        eprint!("\r{} {}/{n} images", split.name(), start + k);
    }
    eprintln!();
    Ok((
        vec![
            Tensor::cat(&vm, 0)?,
            Tensor::cat(&am, 0)?,
            Tensor::cat(&af, 0)?,
        ],
        colours,
        shapes,
    ))
}

/// Held-out accuracy of a linear softmax probe, and the majority class's.
fn probe(
    train: &Tensor,
    ytr: &[Option<String>],
    test: &Tensor,
    yte: &[Option<String>],
) -> Res<(f64, f64, usize)> {
    let classes: Vec<&String> = {
        let mut c: Vec<&String> = ytr.iter().flatten().collect();
        c.sort();
        c.dedup();
        c
    };
    let idx = |y: &Option<String>| {
        y.as_ref()
            .and_then(|v| classes.iter().position(|c| *c == v))
    };
    let pick = |x: &Tensor, y: &[Option<String>]| -> Res<(Tensor, Vec<u32>)> {
        let rows: Vec<(u32, u32)> = y
            .iter()
            .enumerate()
            .filter_map(|(i, v)| idx(v).map(|c| (i as u32, c as u32)))
            .collect();
        let r: Vec<u32> = rows.iter().map(|p| p.0).collect();
        let n = r.len();
        Ok((
            x.index_select(&Tensor::from_vec(r, n, &Device::Cpu)?, 0)?,
            rows.iter().map(|p| p.1).collect(),
        ))
    };
    let (xtr, ltr) = pick(train, ytr)?;
    let (xte, lte) = pick(test, yte)?;
    let (acc, major) = linear_probe(&xtr, &ltr, &xte, &lte, classes.len())?;
    Ok((acc, major, lte.len()))
}

fn main() -> Res<()> {
    let a: Vec<String> = std::env::args().collect();
    let Some(dir) = a.get(1) else {
        return Err("usage: probe_tokens EXPORT_DIR [TRAIN] [TEST]".into());
    };
    let num = |i: usize, d: usize| -> Res<usize> {
        Ok(match a.get(i) {
            Some(s) => s.parse().map_err(|_| format!("not a number: `{s}`"))?,
            None => d,
        })
    };
    let (ntr, nte) = (num(2, 1500)?, num(3, 500)?);
    let dir = Path::new(dir);
    let (ftr, ctr, str_) = encode(dir, Split::Train, ntr)?;
    let (fte, cte, ste) = encode(dir, Split::HeldOut, nte)?;
    let names = [
        "ViT patch features, averaged",
        "image tokens, averaged",
        "image tokens, side by side",
    ];
    println!("linear probes on easy-VQA, held-out accuracy (majority class in brackets):");
    for (k, name) in names.iter().enumerate() {
        let (c, cm, cn) = probe(&ftr[k], &ctr, &fte[k], &cte)?;
        let (s, sm, sn) = probe(&ftr[k], &str_, &fte[k], &ste)?;
        println!(
            "  {name:<32} width {:>6}: colour {:.1}% ({:.1}%, {cn} images), shape {:.1}% ({:.1}%, {sn} images)",
            ftr[k].dim(1)?,
            c * 100.0,
            cm * 100.0,
            s * 100.0,
            sm * 100.0
        );
    }
    Ok(())
}
