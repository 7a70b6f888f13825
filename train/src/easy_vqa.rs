//! Reader of the easy-VQA data set (Victor Zhou, MIT licence) as shipped inside the PyPI package
//! `easy-vqa` 1.0 and copied out by `scripts/fetch_easy_vqa.sh` into `models/easy-vqa/`:
//!
//! ```text
//! models/easy-vqa/answers.txt              the 13 possible answers, one a line
//! models/easy-vqa/{train,test}/questions.json  [[question, answer, image_id], ...]
//! models/easy-vqa/{train,test}/images/<image_id>.png  64x64 RGB, one shape each
//! ```
//!
//! `train` holds 4,000 images and 38,575 questions, `test` 1,000 images and 9,673 questions.
//! [`EasyVqa::open`] reads the questions of one split and checks that every image they name
//! exists; [`EasyVqa::get`] loads one image and returns a [`Sample`] with all of its questions
//! and a caption ("A blue rectangle.") derived from the answers (or, for the few images whose
//! questions leave the colour or shape open, from the pixels). `Split::Train` is the package's
//! `train` folder and `Split::HeldOut` its `test` folder. Every failure is a [`DataError`]
//! naming the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::{Kind, Qa, QaCategory, Sample, Split, Truth};

/// Where `scripts/fetch_easy_vqa.sh` puts the data, relative to the workspace root.
pub const DEFAULT_DIR: &str = "models/easy-vqa";
/// Environment variable that overrides [`DEFAULT_DIR`].
pub const DIR_ENV: &str = "AFM_EASY_VQA_DIR";

const COLOURS: &[&str] = &[
    "red", "green", "blue", "yellow", "teal", "brown", "black", "gray",
];
const SHAPES: &[&str] = &["circle", "rectangle", "triangle"];

/// A data file that could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid easy-VQA questions JSON ([[question, answer, image_id], ...]): {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot decode image {path}: {source}")]
    Image {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

/// The directory to read easy-VQA from: `$AFM_EASY_VQA_DIR` if set, else
/// `<workspace_root>/models/easy-vqa`.
pub fn data_dir(workspace_root: &Path) -> PathBuf {
    std::env::var_os(DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root.join(DEFAULT_DIR))
}

/// The questions of one split, grouped by image.
#[derive(Clone, Debug)]
pub struct EasyVqa {
    split: Split,
    images_dir: PathBuf,
    /// (image id, its questions), by id.
    images: Vec<(u32, Vec<Qa>)>,
    n_questions: usize,
}

fn split_dir(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::HeldOut => "test",
    }
}

/// What a question asks about.
pub fn category(question: &str) -> QaCategory {
    let q = question.to_ascii_lowercase();
    if q.starts_with("what color") || q.starts_with("what is the color") {
        QaCategory::Colour
    } else if q.starts_with("what") {
        QaCategory::Shape
    } else {
        QaCategory::Exists
    }
}

/// Colour and shape of an image's one shape, as told by its questions and answers.
fn colour_and_shape(qa: &[Qa]) -> (Option<String>, Option<String>) {
    let mut colour = None;
    let mut shape = None;
    for q in qa {
        let text = q.question.to_ascii_lowercase();
        let words: Vec<&str> = text.split(|c: char| !c.is_ascii_alphabetic()).collect();
        let named_colour = COLOURS.iter().find(|c| words.contains(c));
        let named_shape = SHAPES.iter().find(|s| words.contains(s));
        // Each image has one shape, so what a question names about it is true of it:
        // "what color is the triangle? blue", "what is the red shape? circle",
        // "is there a red shape? yes", "is there not a circle? no".
        let present = match q.category {
            QaCategory::Colour => {
                colour = Some(q.answer.clone());
                true
            }
            QaCategory::Shape => {
                shape = Some(q.answer.clone());
                true
            }
            _ => {
                let negated = text.contains(" not ") || text.starts_with("is no ");
                (q.answer == "yes") != negated
            }
        };
        if present {
            if let Some(c) = named_colour {
                colour.get_or_insert_with(|| c.to_string());
            }
            if let Some(s) = named_shape {
                shape.get_or_insert_with(|| s.to_string());
            }
        }
    }
    (colour, shape)
}

/// easy-VQA draws every shape in one flat colour; these are its eight (measured on the data).
const CSS_COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [255, 0, 0]),
    ("green", [0, 255, 0]),
    ("blue", [0, 0, 255]),
    ("yellow", [255, 255, 0]),
    ("teal", [0, 128, 128]),
    ("brown", [165, 42, 42]),
    ("black", [0, 0, 0]),
    ("gray", [128, 128, 128]),
];

/// The exact RGB of one of easy-VQA's colours, by name.
pub fn css_colour(name: &str) -> Option<[u8; 3]> {
    CSS_COLOURS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, c)| *c)
}

/// Colour and shape of an easy-VQA image read from its pixels: the CSS colour with the most
/// exactly matching pixels, and the shape from how much of that colour's bounding box it
/// fills (rectangle ~1, circle ~pi/4, triangle ~1/2). Used when the questions leave them open.
pub fn colour_and_shape_from_pixels(img: &RgbImage) -> Option<(&'static str, &'static str)> {
    let mut best: Option<(usize, usize)> = None;
    for (i, (_, rgb)) in CSS_COLOURS.iter().enumerate() {
        let n = img.pixels().filter(|p| p.0 == *rgb).count();
        if n > 0 && best.is_none_or(|(_, m)| n > m) {
            best = Some((i, n));
        }
    }
    let (i, n) = best?;
    let (name, rgb) = CSS_COLOURS[i];
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if p.0 == rgb {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
    }
    let area = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f32;
    let fill = n as f32 / area;
    let shape = if fill > 0.9 {
        "rectangle"
    } else if fill > 0.65 {
        "circle"
    } else {
        "triangle"
    };
    Some((name, shape))
}

impl EasyVqa {
    /// Reads `<root>/<train|test>/questions.json` and checks that every image it names exists.
    pub fn open(root: &Path, split: Split) -> Result<EasyVqa, DataError> {
        let dir = root.join(split_dir(split));
        let qpath = dir.join("questions.json");
        let text = std::fs::read_to_string(&qpath).map_err(|source| DataError::Io {
            path: qpath.clone(),
            source,
        })?;
        let rows: Vec<(String, String, u32)> =
            serde_json::from_str(&text).map_err(|source| DataError::Json {
                path: qpath.clone(),
                source,
            })?;
        if rows.is_empty() {
            return Err(DataError::Invalid {
                path: qpath,
                msg: "no questions".into(),
            });
        }
        let n_questions = rows.len();
        let mut by_id: BTreeMap<u32, Vec<Qa>> = BTreeMap::new();
        for (question, answer, id) in rows {
            let category = category(&question);
            by_id.entry(id).or_default().push(Qa {
                question,
                answer,
                category,
                unseen: false,
            });
        }
        let images_dir = dir.join("images");
        for id in by_id.keys() {
            let p = images_dir.join(format!("{id}.png"));
            if !p.is_file() {
                return Err(DataError::Invalid {
                    path: p,
                    msg: format!("image {id} is named in {} but missing", qpath.display()),
                });
            }
        }
        Ok(EasyVqa {
            split,
            images_dir,
            images: by_id.into_iter().collect(),
            n_questions,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Number of questions over all images.
    pub fn num_questions(&self) -> usize {
        self.n_questions
    }

    pub fn split(&self) -> Split {
        self.split
    }

    /// Image ids, ascending.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.images.iter().map(|(id, _)| *id)
    }

    /// The `i`-th image (by ascending id) with its questions. Errors name the image file.
    pub fn get(&self, i: usize) -> Result<Sample, DataError> {
        let (id, qa) = self.images.get(i).ok_or_else(|| DataError::Invalid {
            path: self.images_dir.clone(),
            msg: format!("index {i} out of range (have {} images)", self.images.len()),
        })?;
        let path = self.images_dir.join(format!("{id}.png"));
        let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        let image: RgbImage = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .map_err(|source| DataError::Image {
                path: path.clone(),
                source,
            })?
            .to_rgb8();
        let (mut colour, mut shape) = colour_and_shape(qa);
        if colour.is_none() || shape.is_none() {
            if let Some((c, s)) = colour_and_shape_from_pixels(&image) {
                colour.get_or_insert_with(|| c.to_string());
                shape.get_or_insert_with(|| s.to_string());
            }
        }
        let caption = match (&colour, &shape) {
            (Some(c), Some(s)) => format!("A {c} {s}."),
            (None, Some(s)) => format!("A {s}."),
            (Some(c), None) => format!("A {c} shape."),
            (None, None) => "A shape.".to_string(),
        };
        Ok(Sample {
            image,
            caption,
            qa: qa.clone(),
            kind: Kind::EasyVqa,
            split: self.split,
            index: *id as u64,
            truth: Truth::EasyVqa {
                image_id: *id,
                colour,
                shape,
            },
        })
    }
}

/// Reads `<root>/answers.txt`: the possible answers, one a line.
pub fn answers(root: &Path) -> Result<Vec<String>, DataError> {
    let path = root.join("answers.txt");
    let text = std::fs::read_to_string(&path).map_err(|source| DataError::Io {
        path: path.clone(),
        source,
    })?;
    let v: Vec<String> = text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if v.is_empty() {
        return Err(DataError::Invalid {
            path,
            msg: "no answers".into(),
        });
    }
    Ok(v)
}
