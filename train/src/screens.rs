//! Procedurally generated UI screenshots with ground truth.
//!
//! A screenshot is a desktop with one window or one dialog on it, or a maximised window filling
//! the whole canvas (640x400 up to 1280x800). A window has a title bar (controls on the left
//! with a centred title, or on the right with a left-aligned title), optionally a menu bar, a
//! form of labelled text fields with content, checkboxes, a list of 1-8 items (below the form or
//! as a sidebar), a row of 1-3 buttons (the primary one highlighted) and optionally a status
//! bar. A dialog has a title bar, an icon, a one-line message and 1-3 buttons. All text is
//! drawn with the embedded DejaVu fonts at one em size per screenshot; every text drawn is
//! fully visible (layouts that do not fit are shrunk before drawing).
//!
//! The ground truth ([`ScreenTruth`]) names every element with its pixel rectangle and colours,
//! so tests can check that labels match what is drawn. Questions ([`crate::Qa`]) ask for the
//! title, each button's label by position, the number of buttons, each field's content, the
//! number of list items, the first, last and selected item, checkbox states and the dialog
//! message. Held-out screenshots also use words never seen in training in some titles and
//! button labels ([`vocab`], [`HELD_OUT_WORDS_STREAM`]); the questions whose answer holds one
//! are flagged ([`crate::Qa::unseen`]). How the held-out split differs is in the crate docs (and [`font_px_ranges`],
//! [`canvas_sizes`], [`theme_names`]).

use image::RgbImage;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::font::{self, Face, TextStyle};
use crate::raster::{self, mix};
use crate::vocab;
use crate::{Generated, Qa, QaCategory as C, Rect, Rgb, Split};

// ---------------------------------------------------------------------------------------------
// Split parameters

/// Half-open ranges of the em font size (px) of each split; a screenshot's size is drawn
/// uniformly from one of its split's ranges (chosen with equal probability).
pub fn font_px_ranges(split: Split) -> &'static [(f32, f32)] {
    match split {
        Split::Train => &[(12.0, 16.0)],
        Split::HeldOut => &[(10.5, 12.0), (16.0, 18.0)],
    }
}

/// Canvas sizes (width, height) of each split.
pub fn canvas_sizes(split: Split) -> &'static [(u32, u32)] {
    match split {
        Split::Train => &[(640, 400), (800, 500), (1024, 640), (1152, 720)],
        Split::HeldOut => &[(720, 450), (960, 600), (1280, 800)],
    }
}

/// Names of the colour themes of each split.
pub fn theme_names(split: Split) -> Vec<&'static str> {
    themes(split).iter().map(|t| t.name).collect()
}

/// Button row alignments used by each split.
pub fn button_aligns(split: Split) -> &'static [ButtonAlign] {
    match split {
        Split::Train => &[ButtonAlign::Right, ButtonAlign::Left],
        Split::HeldOut => &[ButtonAlign::Center],
    }
}

/// Where text-field labels go in each split.
pub fn label_placement(split: Split) -> LabelPlacement {
    match split {
        Split::Train => LabelPlacement::Left,
        Split::HeldOut => LabelPlacement::Above,
    }
}

/// List placements (next to a form) used by each split.
pub fn list_placements(split: Split) -> &'static [ListPlacement] {
    match split {
        Split::Train => &[ListPlacement::Below, ListPlacement::SidebarLeft],
        Split::HeldOut => &[ListPlacement::Below, ListPlacement::SidebarRight],
    }
}

// ---------------------------------------------------------------------------------------------
// Themes

#[derive(Clone, Copy, Debug)]
struct Theme {
    name: &'static str,
    desktop: (Rgb, Rgb),
    window_bg: Rgb,
    border: Rgb,
    titlebar: Rgb,
    title_text: Rgb,
    text: Rgb,
    muted: Rgb,
    field_bg: Rgb,
    field_border: Rgb,
    button_bg: Rgb,
    button_border: Rgb,
    button_text: Rgb,
    accent: Rgb,
    accent_text: Rgb,
    list_bg: Rgb,
    list_alt: Rgb,
    menu_bg: Rgb,
    status_bg: Rgb,
}

const TRAIN_THEMES: [Theme; 4] = [
    Theme {
        name: "light",
        desktop: ([64, 120, 180], [30, 70, 120]),
        window_bg: [243, 243, 243],
        border: [170, 170, 170],
        titlebar: [226, 226, 226],
        title_text: [25, 25, 25],
        text: [20, 20, 20],
        muted: [100, 100, 100],
        field_bg: [255, 255, 255],
        field_border: [150, 150, 150],
        button_bg: [252, 252, 252],
        button_border: [160, 160, 160],
        button_text: [20, 20, 20],
        accent: [0, 103, 192],
        accent_text: [255, 255, 255],
        list_bg: [255, 255, 255],
        list_alt: [242, 245, 250],
        menu_bg: [248, 248, 248],
        status_bg: [235, 235, 235],
    },
    Theme {
        name: "graphite",
        desktop: ([110, 110, 120], [60, 60, 70]),
        window_bg: [236, 236, 236],
        border: [180, 180, 180],
        titlebar: [214, 214, 214],
        title_text: [40, 40, 40],
        text: [30, 30, 30],
        muted: [110, 110, 110],
        field_bg: [255, 255, 255],
        field_border: [170, 170, 170],
        button_bg: [255, 255, 255],
        button_border: [175, 175, 175],
        button_text: [30, 30, 30],
        accent: [95, 95, 108],
        accent_text: [255, 255, 255],
        list_bg: [255, 255, 255],
        list_alt: [244, 244, 244],
        menu_bg: [230, 230, 230],
        status_bg: [226, 226, 226],
    },
    Theme {
        name: "dark",
        desktop: ([40, 44, 60], [15, 15, 25]),
        window_bg: [43, 43, 46],
        border: [80, 80, 85],
        titlebar: [32, 32, 35],
        title_text: [235, 235, 235],
        text: [228, 228, 228],
        muted: [160, 160, 165],
        field_bg: [28, 28, 30],
        field_border: [95, 95, 100],
        button_bg: [62, 62, 68],
        button_border: [90, 90, 96],
        button_text: [235, 235, 235],
        accent: [10, 110, 220],
        accent_text: [255, 255, 255],
        list_bg: [30, 30, 33],
        list_alt: [38, 38, 42],
        menu_bg: [38, 38, 41],
        status_bg: [36, 36, 39],
    },
    Theme {
        name: "ocean",
        desktop: ([20, 120, 140], [10, 60, 90]),
        window_bg: [234, 242, 250],
        border: [120, 150, 180],
        titlebar: [36, 92, 150],
        title_text: [255, 255, 255],
        text: [20, 30, 45],
        muted: [80, 95, 115],
        field_bg: [255, 255, 255],
        field_border: [130, 155, 185],
        button_bg: [245, 249, 253],
        button_border: [130, 155, 185],
        button_text: [20, 30, 45],
        accent: [36, 92, 150],
        accent_text: [255, 255, 255],
        list_bg: [255, 255, 255],
        list_alt: [236, 243, 250],
        menu_bg: [222, 233, 245],
        status_bg: [222, 233, 245],
    },
];

const HELD_OUT_THEMES: [Theme; 3] = [
    Theme {
        name: "sand",
        desktop: ([190, 150, 100], [120, 85, 50]),
        window_bg: [246, 240, 228],
        border: [185, 165, 130],
        titlebar: [214, 196, 160],
        title_text: [50, 38, 25],
        text: [45, 35, 25],
        muted: [120, 100, 80],
        field_bg: [255, 252, 245],
        field_border: [180, 160, 125],
        button_bg: [252, 247, 236],
        button_border: [180, 160, 125],
        button_text: [45, 35, 25],
        accent: [176, 98, 36],
        accent_text: [255, 255, 255],
        list_bg: [255, 252, 245],
        list_alt: [246, 239, 226],
        menu_bg: [238, 229, 210],
        status_bg: [236, 226, 205],
    },
    Theme {
        name: "forest",
        desktop: ([60, 110, 70], [25, 55, 35]),
        window_bg: [236, 244, 236],
        border: [130, 165, 135],
        titlebar: [46, 110, 70],
        title_text: [255, 255, 255],
        text: [20, 40, 25],
        muted: [80, 105, 85],
        field_bg: [255, 255, 255],
        field_border: [130, 165, 135],
        button_bg: [248, 252, 248],
        button_border: [130, 165, 135],
        button_text: [20, 40, 25],
        accent: [46, 125, 70],
        accent_text: [255, 255, 255],
        list_bg: [255, 255, 255],
        list_alt: [236, 245, 237],
        menu_bg: [224, 238, 226],
        status_bg: [224, 238, 226],
    },
    Theme {
        name: "midnight",
        desktop: ([30, 30, 70], [5, 5, 20]),
        window_bg: [30, 34, 52],
        border: [70, 78, 110],
        titlebar: [20, 23, 38],
        title_text: [225, 230, 245],
        text: [220, 226, 242],
        muted: [150, 158, 185],
        field_bg: [22, 25, 40],
        field_border: [80, 90, 125],
        button_bg: [46, 52, 78],
        button_border: [80, 90, 125],
        button_text: [225, 230, 245],
        accent: [120, 90, 210],
        accent_text: [255, 255, 255],
        list_bg: [24, 27, 43],
        list_alt: [32, 36, 56],
        menu_bg: [26, 30, 46],
        status_bg: [26, 30, 46],
    },
];

fn themes(split: Split) -> &'static [Theme] {
    match split {
        Split::Train => &TRAIN_THEMES,
        Split::HeldOut => &HELD_OUT_THEMES,
    }
}

// ---------------------------------------------------------------------------------------------
// Ground truth

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    Window,
    Dialog,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ButtonAlign {
    Left,
    Center,
    Right,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelPlacement {
    /// Label on the same row, left of the field.
    Left,
    /// Label on its own line above the field.
    Above,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListPlacement {
    /// Under the form (or alone).
    Below,
    /// A full-height sidebar left of the form.
    SidebarLeft,
    /// A full-height sidebar right of the form.
    SidebarRight,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Controls {
    /// Three coloured circles at the left of the title bar, title centred.
    LeftCircles,
    /// Minimise, maximise and close glyphs at the right, title left-aligned after an icon.
    RightGlyphs,
}

/// A piece of text and exactly how it is drawn: `font::draw_text` with `TextStyle { face, px,
/// color }` at `origin` (x, baseline) reproduces its pixels over a flat background.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TextItem {
    pub text: String,
    /// The line box: advance width by ascent + descent.
    pub rect: Rect,
    pub color: Rgb,
    pub face: Face,
    pub px: f32,
    /// Start of the baseline.
    pub origin: [f32; 2],
}

impl TextItem {
    pub fn style(&self) -> TextStyle {
        TextStyle::new(self.face, self.px, self.color)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Button {
    pub label: TextItem,
    /// The whole button.
    pub rect: Rect,
    pub background: Rgb,
    /// The highlighted (default) button.
    pub primary: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Field {
    pub label: TextItem,
    pub content: TextItem,
    /// The text box.
    pub rect: Rect,
    pub background: Rgb,
    pub focused: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Checkbox {
    pub label: TextItem,
    pub checked: bool,
    pub box_rect: Rect,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ListBox {
    pub items: Vec<TextItem>,
    /// The whole list box, border included.
    pub rect: Rect,
    /// One rectangle per item row, with its background colour.
    pub row_rects: Vec<Rect>,
    pub row_backgrounds: Vec<Rgb>,
    pub selected: Option<usize>,
    pub background: Rgb,
    pub placement: ListPlacement,
}

impl ListBox {
    pub fn item_texts(&self) -> Vec<String> {
        self.items.iter().map(|t| t.text.clone()).collect()
    }
}

/// Everything drawn on a generated screenshot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScreenTruth {
    pub width: u32,
    pub height: u32,
    pub window_kind: WindowKind,
    pub theme: &'static str,
    /// Em size of all text, px.
    pub font_px: f32,
    pub window_rect: Rect,
    pub maximized: bool,
    pub controls: Controls,
    pub title: TextItem,
    pub menu: Vec<TextItem>,
    pub message: Option<TextItem>,
    pub fields: Vec<Field>,
    pub label_placement: LabelPlacement,
    pub checkboxes: Vec<Checkbox>,
    pub list: Option<ListBox>,
    /// Left to right.
    pub buttons: Vec<Button>,
    pub button_align: ButtonAlign,
    pub status: Option<TextItem>,
}

// ---------------------------------------------------------------------------------------------
// Content

const FIELD_LABELS: &[&str] = &[
    "Name", "Email", "Phone", "Address", "Country", "Location", "Host", "Server", "Port", "Path",
    "Folder", "Version", "Company", "Comment", "Tag", "Date", "Time", "Size", "Login", "Domain",
    "Language", "Budget", "Label", "Region",
];

const LANGUAGES: &[&str] = &[
    "English",
    "French",
    "German",
    "Spanish",
    "Japanese",
    "Portuguese",
    "Italian",
    "Korean",
    "Dutch",
    "Polish",
    "Swedish",
    "Greek",
];

const COMMENTS: &[&str] = &[
    "call back on Monday",
    "needs review",
    "sent to printer",
    "waiting for approval",
    "see attached notes",
    "urgent",
    "draft only",
    "moved to archive",
    "check the totals",
    "ready for release",
];

const STATUS_TEXTS: &[&str] = &[
    "Ready",
    "Connected",
    "Saved",
    "Offline",
    "Syncing",
    "Done",
    "Idle",
    "Up to date",
];

const SERVER_NAMES: &[&str] = &["srv", "db", "mail", "web", "files", "build"];
const COMPANY_KINDS: &[&str] = &[
    "Labs", "Systems", "Group", "Design", "Media", "Foods", "Studio",
];
const SIZE_UNITS: &[&str] = &["KB", "MB", "GB"];
const CURRENCIES: &[&str] = &["EUR", "USD", "GBP"];

/// The word lists of screenshots' free text besides [`vocab`]'s (field labels, languages,
/// comments, status texts, server names, company kinds, units, currencies), for the test that
/// keeps the held-out words apart from everything training draws.
pub fn free_text_lists() -> [&'static [&'static str]; 8] {
    [
        FIELD_LABELS,
        LANGUAGES,
        COMMENTS,
        STATUS_TEXTS,
        SERVER_NAMES,
        COMPANY_KINDS,
        SIZE_UNITS,
        CURRENCIES,
    ]
}

fn pick(rng: &mut ChaCha8Rng, list: &[&'static str]) -> &'static str {
    list.choose(rng).copied().unwrap_or("")
}

fn lower(s: &str) -> String {
    s.to_lowercase()
}

/// Content for a field with this label.
fn field_content(rng: &mut ChaCha8Rng, label: &str) -> String {
    let first = pick(rng, vocab::FIRST_NAMES);
    let last = pick(rng, vocab::LAST_NAMES);
    match label {
        "Name" => format!("{first} {last}"),
        "Email" => format!(
            "{}.{}@{}",
            lower(first),
            lower(last),
            pick(rng, vocab::DOMAINS)
        ),
        "Phone" => format!(
            "+{} {:03} {:04}",
            rng.random_range(1..50),
            rng.random_range(100..1000),
            rng.random_range(0..10000)
        ),
        "Address" => format!("{} {last} Street", rng.random_range(1..200)),
        "Country" => pick(rng, vocab::COUNTRIES).to_string(),
        "Location" => pick(rng, vocab::CITIES).to_string(),
        "Host" => format!(
            "{}.{}",
            lower(pick(rng, vocab::OBJECTS)),
            pick(rng, vocab::DOMAINS)
        ),
        "Server" => format!(
            "{}{}.{}",
            lower(pick(rng, SERVER_NAMES)),
            rng.random_range(1..40),
            pick(rng, vocab::DOMAINS)
        ),
        "Port" => rng.random_range(1024..65536).to_string(),
        "Path" => format!("/home/{}/{}", lower(first), pick(rng, vocab::OBJECTS)),
        "Folder" => {
            if rng.random_bool(0.5) {
                pick(rng, vocab::OBJECTS).to_string()
            } else {
                format!(
                    "{} {}",
                    pick(rng, vocab::OBJECTS),
                    rng.random_range(2015..2027)
                )
            }
        }
        "Version" => format!(
            "{}.{}.{}",
            rng.random_range(0..10),
            rng.random_range(0..20),
            rng.random_range(0..30)
        ),
        "Company" => format!("{last} {}", pick(rng, COMPANY_KINDS)),
        "Comment" => pick(rng, COMMENTS).to_string(),
        "Tag" | "Label" => lower(pick(rng, vocab::OBJECTS)),
        "Date" => format!(
            "{}-{:02}-{:02}",
            rng.random_range(2018..2027),
            rng.random_range(1..13),
            rng.random_range(1..29)
        ),
        "Time" => format!(
            "{:02}:{:02}",
            rng.random_range(0..24),
            rng.random_range(0..12) * 5
        ),
        "Size" => format!("{} {}", rng.random_range(1..1000), pick(rng, SIZE_UNITS)),
        "Login" => format!("{}{}", lower(first), rng.random_range(1..100)),
        "Domain" => pick(rng, vocab::DOMAINS).to_string(),
        "Language" => pick(rng, LANGUAGES).to_string(),
        "Budget" => format!(
            "{} {}",
            rng.random_range(1..500) * 50,
            pick(rng, CURRENCIES)
        ),
        _ => vocab::checkbox_label(rng),
    }
}

fn content_face(label: &str) -> Face {
    match label {
        "Host" | "Server" | "Port" | "Path" | "Version" => Face::Mono,
        _ => Face::Sans,
    }
}

/// `n` distinct list items of one style (names of things, files, people or cities).
fn list_items(rng: &mut ChaCha8Rng, n: usize) -> Vec<String> {
    let style = rng.random_range(0..4);
    let mut out: Vec<String> = Vec::with_capacity(n);
    let mut guard = 0;
    while out.len() < n && guard < 200 {
        guard += 1;
        let s = match style {
            0 => pick(rng, vocab::OBJECTS).to_string(),
            1 => format!(
                "{}_{}.{}",
                lower(pick(rng, vocab::OBJECTS)),
                rng.random_range(1..30),
                pick(rng, vocab::FILE_EXTS)
            ),
            2 => format!(
                "{} {}",
                pick(rng, vocab::FIRST_NAMES),
                pick(rng, vocab::LAST_NAMES)
            ),
            _ => pick(rng, vocab::CITIES).to_string(),
        };
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

fn dialog_message(rng: &mut ChaCha8Rng) -> String {
    let obj = pick(rng, vocab::OBJECTS);
    let file = format!(
        "{}_{}.{}",
        lower(obj),
        rng.random_range(1..30),
        pick(rng, vocab::FILE_EXTS)
    );
    match rng.random_range(0..9) {
        0 => format!("Do you want to save the changes to {file}?"),
        1 => format!("Are you sure you want to delete {file}?"),
        2 => format!("The file {file} already exists."),
        3 => format!("A new version of {obj} is available."),
        4 => format!(
            "Could not connect to {}.{}.",
            lower(obj),
            pick(rng, vocab::DOMAINS)
        ),
        5 => format!("Your password expires in {} days.", rng.random_range(2..30)),
        6 => format!("{obj} settings were changed."),
        7 => format!(
            "{} items will be moved to the trash.",
            rng.random_range(2..60)
        ),
        _ => format!("The {} could not be found.", lower(obj)),
    }
}

// ---------------------------------------------------------------------------------------------
// Layout

/// Sizes derived from the em size.
#[derive(Clone, Copy)]
struct Dims {
    px: f32,
    /// Control (field, button) height.
    ch: u32,
    pad: u32,
    gap: u32,
    /// Title bar, menu bar, status bar heights.
    tb: u32,
    mb: u32,
    sb: u32,
    /// Inner padding of a field or list row.
    ip: u32,
    /// Line height.
    lh: u32,
    /// Checkbox size.
    cb: u32,
    /// List row height.
    rh: u32,
}

impl Dims {
    fn new(px: f32) -> Dims {
        let m = font::metrics(Face::Sans, px);
        let r = |k: f32| (px * k).round() as u32;
        Dims {
            px,
            ch: r(2.0),
            pad: r(1.2),
            gap: r(0.75),
            tb: r(2.3),
            mb: r(1.9),
            sb: r(1.7),
            ip: r(0.6),
            lh: (m.ascent + m.descent).ceil() as u32,
            cb: r(1.15),
            rh: r(1.8),
        }
    }
    fn tw(&self, face: Face, text: &str) -> u32 {
        font::text_width(face, self.px, text).ceil() as u32
    }
}

struct ListSpec {
    items: Vec<String>,
    selected: Option<usize>,
    striped: bool,
    icons: bool,
    placement: ListPlacement,
}

/// What a window shows, before placement.
struct Spec {
    kind: WindowKind,
    title: String,
    title_face: Face,
    controls: Controls,
    menu: Vec<String>,
    fields: Vec<(String, String)>,
    focused: Option<usize>,
    field_w: u32,
    checks: Vec<(String, bool)>,
    list: Option<ListSpec>,
    message: Option<String>,
    icon: u8,
    buttons: Vec<String>,
    primary: usize,
    status: Option<String>,
    labels: LabelPlacement,
    align: ButtonAlign,
}

/// Sizes of the blocks of a window.
struct Measure {
    label_col: u32,
    field_w: u32,
    fields: (u32, u32),
    list: (u32, u32),
    /// Form (fields + checkboxes).
    form: (u32, u32),
    buttons: (u32, u32),
    button_ws: Vec<u32>,
    message: (u32, u32),
    /// Content area (between the bars, inside the padding).
    content: (u32, u32),
    /// Smallest window.
    window: (u32, u32),
}

fn controls_width(d: &Dims) -> u32 {
    (d.tb as f32 * 3.6).round() as u32
}

fn measure(spec: &Spec, d: &Dims) -> Measure {
    let pad = d.pad;
    let label_col = spec
        .fields
        .iter()
        .map(|(l, _)| d.tw(Face::Sans, l))
        .max()
        .unwrap_or(0);
    let content_w = spec
        .fields
        .iter()
        .map(|(l, c)| d.tw(content_face(l), c) + 2 * d.ip + 2)
        .max()
        .unwrap_or(0);
    let field_w = spec.field_w.max(content_w);
    let n = spec.fields.len() as u32;
    let fields = if n == 0 {
        (0, 0)
    } else {
        match spec.labels {
            LabelPlacement::Left => (label_col + d.gap + field_w, n * d.ch + (n - 1) * d.gap),
            LabelPlacement::Above => (
                label_col.max(field_w),
                n * (d.lh + 2 + d.ch) + (n - 1) * d.gap,
            ),
        }
    };
    let nc = spec.checks.len() as u32;
    let check_row = d.cb.max(d.lh);
    let checks = if nc == 0 {
        (0, 0)
    } else {
        let w = spec
            .checks
            .iter()
            .map(|(l, _)| d.cb + d.gap + d.tw(Face::Sans, l))
            .max()
            .unwrap_or(0);
        (w, nc * check_row + (nc - 1) * (d.gap / 2))
    };
    let form = (
        fields.0.max(checks.0),
        fields.1 + checks.1 + if n > 0 && nc > 0 { d.gap } else { 0 },
    );
    let list = match &spec.list {
        None => (0, 0),
        Some(l) => {
            let icon = if l.icons { d.lh + d.ip / 2 } else { 0 };
            let w = l
                .items
                .iter()
                .map(|s| d.tw(Face::Sans, s))
                .max()
                .unwrap_or(0)
                + 2 * d.ip
                + icon
                + 2;
            (w.max((d.px * 12.0) as u32), l.items.len() as u32 * d.rh + 2)
        }
    };
    let button_ws: Vec<u32> = spec
        .buttons
        .iter()
        .map(|b| (d.tw(Face::Sans, b) + 2 * (d.px * 1.2) as u32).max((d.px * 5.5) as u32))
        .collect();
    let nb = button_ws.len() as u32;
    let buttons = (
        button_ws.iter().sum::<u32>() + nb.saturating_sub(1) * d.gap,
        d.ch,
    );
    let message = match &spec.message {
        None => (0, 0),
        Some(m) => {
            let icon = d.ch + d.pad / 2;
            (icon + d.pad + d.tw(Face::Sans, m), icon.max(d.lh))
        }
    };
    let mut content = match spec.kind {
        WindowKind::Dialog => message,
        WindowKind::Window => match spec.list.as_ref().map(|l| l.placement) {
            None => form,
            Some(_) if form.1 == 0 => list,
            Some(ListPlacement::Below) => (form.0.max(list.0), form.1 + pad + list.1),
            Some(_) => (list.0 + pad + form.0, list.1.max(form.1)),
        },
    };
    content.0 = content.0.max(buttons.0);
    content.1 += pad + buttons.1;
    let title_w = d.tw(spec.title_face, &spec.title) + 2 * controls_width(d) + 2 * pad;
    let menu_w = spec
        .menu
        .iter()
        .map(|m| d.tw(Face::Sans, m) + d.pad)
        .sum::<u32>()
        + pad;
    let w = (content.0 + 2 * pad).max(title_w).max(menu_w);
    let bars = d.tb
        + if spec.menu.is_empty() { 0 } else { d.mb }
        + if spec.status.is_some() { d.sb } else { 0 };
    let h = bars + content.1 + 2 * pad;
    Measure {
        label_col,
        field_w,
        fields,
        list,
        form,
        buttons,
        button_ws,
        message,
        content,
        window: (w, h),
    }
}

/// Removes one element to make a window smaller; false when nothing is left to remove.
fn shrink(spec: &mut Spec) -> bool {
    if let Some(l) = &mut spec.list {
        if l.items.len() > 3 {
            l.items.pop();
            if l.selected.is_some_and(|s| s >= l.items.len()) {
                l.selected = None;
            }
            return true;
        }
    }
    if spec.fields.len() > 1 {
        spec.fields.pop();
        if spec.focused.is_some_and(|f| f >= spec.fields.len()) {
            spec.focused = None;
        }
        return true;
    }
    if !spec.checks.is_empty() {
        spec.checks.pop();
        return true;
    }
    if !spec.menu.is_empty() {
        spec.menu.clear();
        return true;
    }
    if spec.status.is_some() {
        spec.status = None;
        return true;
    }
    if spec.field_w > 0 && !spec.fields.is_empty() {
        spec.field_w = 0;
        return true;
    }
    if spec.buttons.len() > 1 {
        spec.buttons.remove(0);
        spec.primary = spec.buttons.len() - 1;
        return true;
    }
    false
}

fn make_spec(rng: &mut ChaCha8Rng, split: Split, d: &Dims) -> Spec {
    let controls = if rng.random_bool(0.5) {
        Controls::LeftCircles
    } else {
        Controls::RightGlyphs
    };
    let title_face = if rng.random_bool(0.5) {
        Face::SansBold
    } else {
        Face::Sans
    };
    let align = *button_aligns(split)
        .choose(rng)
        .unwrap_or(&ButtonAlign::Right);
    let labels = label_placement(split);
    let title = vocab::title(rng);
    if rng.random_bool(0.25) {
        let set = vocab::DIALOG_BUTTON_SETS
            .choose(rng)
            .copied()
            .unwrap_or(&["OK"]);
        let buttons: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        return Spec {
            kind: WindowKind::Dialog,
            title,
            title_face,
            controls,
            menu: vec![],
            fields: vec![],
            focused: None,
            field_w: 0,
            checks: vec![],
            list: None,
            message: Some(dialog_message(rng)),
            icon: rng.random_range(0..3),
            primary: buttons.len() - 1,
            buttons,
            status: None,
            labels,
            align,
        };
    }
    // Window: a form, a list, or both.
    let (n_fields, has_list) = match rng.random_range(0..3) {
        0 => (rng.random_range(1..=4), false),
        1 => (0, true),
        _ => (rng.random_range(1..=3), true),
    };
    let mut labels_pool: Vec<&str> = FIELD_LABELS.to_vec();
    labels_pool.shuffle(rng);
    let fields: Vec<(String, String)> = labels_pool[..n_fields]
        .iter()
        .map(|l| (l.to_string(), field_content(rng, l)))
        .collect();
    let focused = if n_fields > 0 && rng.random_bool(0.5) {
        Some(rng.random_range(0..n_fields))
    } else {
        None
    };
    let n_checks = if rng.random_bool(0.5) {
        rng.random_range(1..=3)
    } else {
        0
    };
    let mut checks: Vec<(String, bool)> = Vec::new();
    while checks.len() < n_checks {
        let l = vocab::checkbox_label(rng);
        if !checks.iter().any(|(c, _)| *c == l) {
            checks.push((l, rng.random_bool(0.5)));
        }
    }
    let list = if has_list {
        let n = rng.random_range(1..=8);
        let items = list_items(rng, n);
        let selected = if rng.random_bool(0.4) {
            Some(rng.random_range(0..items.len()))
        } else {
            None
        };
        let placement = if n_fields + n_checks == 0 {
            ListPlacement::Below
        } else {
            *list_placements(split)
                .choose(rng)
                .unwrap_or(&ListPlacement::Below)
        };
        Some(ListSpec {
            items,
            selected,
            striped: rng.random_bool(0.5),
            icons: rng.random_bool(0.4),
            placement,
        })
    } else {
        None
    };
    let n_buttons = rng.random_range(1..=3);
    let buttons = vocab::button_labels(rng, n_buttons);
    let menu = if rng.random_bool(0.5) {
        let mut m: Vec<&str> = vocab::MENUS.to_vec();
        m.shuffle(rng);
        let k = rng.random_range(2..=5);
        let mut v = vec!["File".to_string()];
        v.extend(m[..k].iter().map(|s| s.to_string()));
        v.push("Help".to_string());
        v
    } else {
        vec![]
    };
    let status = if rng.random_bool(0.4) {
        Some(pick(rng, STATUS_TEXTS).to_string())
    } else {
        None
    };
    Spec {
        kind: WindowKind::Window,
        title,
        title_face,
        controls,
        menu,
        fields,
        focused,
        field_w: (d.px * rng.random_range(12.0..22.0)) as u32,
        checks,
        list,
        message: None,
        icon: 0,
        primary: buttons.len() - 1,
        buttons,
        status,
        labels,
        align,
    }
}

// ---------------------------------------------------------------------------------------------
// Drawing

/// Draws `text` from `x`, capitals centred vertically in `[y, y + h)`.
fn put_text(img: &mut RgbImage, st: TextStyle, x: u32, y: u32, h: u32, text: &str) -> TextItem {
    let baseline = font::baseline_centered(st.face, st.px, y as f32, h as f32).round();
    let rect = font::draw_text(img, st, x as f32, baseline, text);
    TextItem {
        text: text.to_string(),
        rect,
        color: st.color,
        face: st.face,
        px: st.px,
        origin: [x as f32, baseline],
    }
}

fn draw_shadow(img: &mut RgbImage, r: Rect) {
    for i in 1..=8u32 {
        let g = Rect::new(
            r.x.saturating_sub(i),
            (r.y + 2).saturating_sub(i),
            r.w + 2 * i,
            r.h + 2 * i,
        );
        raster::shade_rect(img, g, [0, 0, 0], 0.035);
    }
}

fn draw_title_bar(img: &mut RgbImage, spec: &Spec, t: &Theme, d: &Dims, win: Rect) -> TextItem {
    let bar = Rect::new(win.x + 1, win.y + 1, win.w - 2, d.tb);
    raster::fill_rect(img, bar, t.titlebar);
    raster::fill_rect(img, Rect::new(win.x, win.y + d.tb, win.w, 1), t.border);
    let cy = bar.y as f32 + d.tb as f32 / 2.0;
    let title_w = d.tw(spec.title_face, &spec.title);
    let x = match spec.controls {
        Controls::LeftCircles => {
            let r = d.px * 0.42;
            let colors = [[255, 95, 87], [255, 189, 46], [39, 201, 63]];
            for (i, c) in colors.into_iter().enumerate() {
                let cx = bar.x as f32 + d.pad as f32 + r + i as f32 * r * 3.0;
                raster::fill_circle(img, cx, cy, r, c);
            }
            win.x + (win.w - title_w) / 2
        }
        Controls::RightGlyphs => {
            let bw = d.tb as f32 * 1.2;
            let s = d.px * 0.35;
            let lw = (d.px / 12.0).max(1.0);
            let right = bar.right() as f32;
            let c = t.title_text;
            // close: a cross
            let x0 = right - bw / 2.0;
            raster::draw_line(img, (x0 - s, cy - s), (x0 + s, cy + s), lw, c);
            raster::draw_line(img, (x0 - s, cy + s), (x0 + s, cy - s), lw, c);
            // maximise and minimise, on windows only
            let x1 = right - bw * 1.5;
            let sq = Rect::new(
                (x1 - s) as u32,
                (cy - s) as u32,
                (2.0 * s) as u32,
                (2.0 * s) as u32,
            );
            if spec.kind == WindowKind::Window {
                raster::stroke_rect(img, sq, lw.round() as u32, c);
                let x2 = right - bw * 2.5;
                raster::draw_line(img, (x2 - s, cy + s * 0.6), (x2 + s, cy + s * 0.6), lw, c);
            }
            // app icon
            let icon = (d.px * 1.1) as u32;
            let ir = Rect::new(bar.x + d.pad, (cy - icon as f32 / 2.0) as u32, icon, icon);
            raster::fill_rounded_rect(img, ir, icon as f32 * 0.25, t.accent);
            raster::fill_rounded_rect(
                img,
                Rect::new(ir.x + icon / 4, ir.y + icon / 4, icon / 2, icon / 2),
                1.0,
                mix(t.accent, [255, 255, 255], 0.7),
            );
            bar.x + d.pad + icon + d.gap
        }
    };
    put_text(
        img,
        TextStyle::new(spec.title_face, d.px, t.title_text),
        x,
        bar.y,
        d.tb,
        &spec.title,
    )
}

fn draw_field(
    img: &mut RgbImage,
    t: &Theme,
    d: &Dims,
    (label, content): (&str, &str),
    label_at: (u32, u32, u32),
    rect: Rect,
    focused: bool,
) -> Field {
    let (lx, ly, lh) = label_at;
    let label = put_text(
        img,
        TextStyle::new(Face::Sans, d.px, t.text),
        lx,
        ly,
        lh,
        label,
    );
    let (border, bw) = if focused {
        (t.accent, 2)
    } else {
        (t.field_border, 1)
    };
    raster::bordered_rounded_rect(img, rect, d.px * 0.2, bw, border, t.field_bg);
    let face = content_face(&label.text);
    let content = put_text(
        img,
        TextStyle::new(face, d.px, t.text),
        rect.x + d.ip + 1,
        rect.y,
        rect.h,
        content,
    );
    if focused {
        let x = content.rect.right() as f32 + 1.5;
        let m = d.ch as f32 * 0.22;
        raster::draw_line(
            img,
            (x, rect.y as f32 + m),
            (x, rect.bottom() as f32 - m),
            1.0,
            t.text,
        );
    }
    Field {
        label,
        content,
        rect,
        background: t.field_bg,
        focused,
    }
}

fn draw_check(
    img: &mut RgbImage,
    t: &Theme,
    d: &Dims,
    x: u32,
    y: u32,
    row: u32,
    (label, checked): (&str, bool),
) -> Checkbox {
    let by = y + (row - d.cb) / 2;
    let b = Rect::new(x, by, d.cb, d.cb);
    if checked {
        raster::fill_rounded_rect(img, b, d.px * 0.18, t.accent);
        let (fx, fy, s) = (b.x as f32, b.y as f32, d.cb as f32);
        let lw = (s * 0.14).max(1.2);
        let p1 = (fx + s * 0.22, fy + s * 0.52);
        let p2 = (fx + s * 0.42, fy + s * 0.72);
        let p3 = (fx + s * 0.78, fy + s * 0.28);
        raster::draw_line(img, p1, p2, lw, t.accent_text);
        raster::draw_line(img, p2, p3, lw, t.accent_text);
    } else {
        raster::bordered_rounded_rect(img, b, d.px * 0.18, 1, t.field_border, t.field_bg);
    }
    let label = put_text(
        img,
        TextStyle::new(Face::Sans, d.px, t.text),
        x + d.cb + d.gap,
        y,
        row,
        label,
    );
    Checkbox {
        label,
        checked,
        box_rect: b,
    }
}

fn draw_list(
    img: &mut RgbImage,
    t: &Theme,
    d: &Dims,
    l: &ListSpec,
    rect: Rect,
    rng: &mut ChaCha8Rng,
) -> ListBox {
    raster::fill_rect(img, rect, t.field_border);
    let inner = Rect::new(rect.x + 1, rect.y + 1, rect.w - 2, rect.h - 2);
    raster::fill_rect(img, inner, t.list_bg);
    let icon_colors: [Rgb; 4] = [
        [230, 180, 60],
        [90, 150, 220],
        [120, 180, 110],
        [200, 110, 110],
    ];
    let icon_c = *icon_colors.choose(rng).unwrap_or(&[128, 128, 128]);
    let mut row_rects = Vec::new();
    let mut row_backgrounds = Vec::new();
    let mut items = Vec::new();
    for (i, item) in l.items.iter().enumerate() {
        let row = Rect::new(inner.x, inner.y + i as u32 * d.rh, inner.w, d.rh);
        let selected = l.selected == Some(i);
        let (bg, fg) = if selected {
            (t.accent, t.accent_text)
        } else if l.striped && i % 2 == 1 {
            (t.list_alt, t.text)
        } else {
            (t.list_bg, t.text)
        };
        raster::fill_rect(img, row, bg);
        let mut x = row.x + d.ip;
        if l.icons {
            let s = d.lh.saturating_sub(2);
            let ir = Rect::new(x, row.y + (d.rh - s) / 2, s, s);
            raster::fill_rounded_rect(img, ir, s as f32 * 0.2, icon_c);
            x += d.lh + d.ip / 2;
        }
        items.push(put_text(
            img,
            TextStyle::new(Face::Sans, d.px, fg),
            x,
            row.y,
            d.rh,
            item,
        ));
        row_rects.push(row);
        row_backgrounds.push(bg);
    }
    ListBox {
        items,
        rect,
        row_rects,
        row_backgrounds,
        selected: l.selected,
        background: t.list_bg,
        placement: l.placement,
    }
}

fn draw_button(
    img: &mut RgbImage,
    t: &Theme,
    d: &Dims,
    label: &str,
    r: Rect,
    primary: bool,
) -> Button {
    let (bg, border, fg) = if primary {
        (t.accent, t.accent, t.accent_text)
    } else {
        (t.button_bg, t.button_border, t.button_text)
    };
    raster::bordered_rounded_rect(img, r, d.px * 0.3, 1, border, bg);
    let w = d.tw(Face::Sans, label);
    let label = put_text(
        img,
        TextStyle::new(Face::Sans, d.px, fg),
        r.x + (r.w - w) / 2,
        r.y,
        r.h,
        label,
    );
    Button {
        label,
        rect: r,
        background: bg,
        primary,
    }
}

fn draw_dialog_icon(img: &mut RgbImage, t: &Theme, d: &Dims, kind: u8, r: Rect) {
    let (cx, cy, rad) = (
        r.x as f32 + r.w as f32 / 2.0,
        r.y as f32 + r.h as f32 / 2.0,
        r.w as f32 / 2.0,
    );
    let glyph_px = d.px * 1.3;
    let (mark, fg) = match kind {
        0 => {
            raster::fill_circle(img, cx, cy, rad, t.accent);
            ("i", t.accent_text)
        }
        1 => {
            raster::fill_polygon(
                img,
                &[
                    (cx, cy - rad),
                    (cx + rad, cy + rad * 0.85),
                    (cx - rad, cy + rad * 0.85),
                ],
                [245, 190, 40],
            );
            ("!", [30, 30, 30])
        }
        _ => {
            raster::fill_circle(img, cx, cy, rad, [215, 60, 50]);
            ("!", [255, 255, 255])
        }
    };
    let w = font::text_width(Face::SansBold, glyph_px, mark);
    let dy = if kind == 1 { rad * 0.2 } else { 0.0 };
    font::draw_text_in(
        img,
        TextStyle::new(Face::SansBold, glyph_px, fg),
        cx - w / 2.0,
        r.y as f32 + dy,
        r.h as f32,
        mark,
    );
}

/// The ChaCha8 stream (of the sample's own seed) that decides a held-out screenshot's
/// held-out words; the screenshot's other draws use stream 0.
pub const HELD_OUT_WORDS_STREAM: u64 = 1;

/// Held-out screens only: replaces the title, with probability
/// [`vocab::HELD_OUT_TITLE_FRACTION`], by one with a held-out word, then each button label, with
/// probability [`vocab::HELD_OUT_BUTTON_FRACTION`], by one with a held-out word that no other
/// button of the row has.
fn use_held_out_words(spec: &mut Spec, rng: &mut ChaCha8Rng) {
    if rng.random_bool(vocab::HELD_OUT_TITLE_FRACTION) {
        spec.title = vocab::held_out_title(rng);
    }
    for i in 0..spec.buttons.len() {
        if rng.random_bool(vocab::HELD_OUT_BUTTON_FRACTION) {
            for _ in 0..100 {
                let l = vocab::held_out_button_label(rng);
                if !spec.buttons.contains(&l) {
                    spec.buttons[i] = l;
                    break;
                }
            }
        }
    }
}

/// Generates one screenshot in `split` from `rng` (a sample's fresh generator: a held-out
/// screenshot's held-out words come from its stream [`HELD_OUT_WORDS_STREAM`]).
pub(crate) fn generate(rng: &mut ChaCha8Rng, split: Split) -> Generated<ScreenTruth> {
    let mut words_rng = (split == Split::HeldOut).then(|| {
        let mut r = rng.clone();
        r.set_stream(HELD_OUT_WORDS_STREAM);
        r
    });
    let (w, h) = *canvas_sizes(split).choose(rng).unwrap_or(&(800, 500));
    let ranges = font_px_ranges(split);
    let (lo, hi) = ranges[rng.random_range(0..ranges.len())];
    let px = rng.random_range(lo..hi);
    let theme = *themes(split).choose(rng).unwrap_or(&TRAIN_THEMES[0]);
    let d = Dims::new(px);
    let mut spec = make_spec(rng, split, &d);
    if let Some(r) = &mut words_rng {
        use_held_out_words(&mut spec, r);
    }
    let maximized = spec.kind == WindowKind::Window && rng.random_bool(0.25);
    let margin = if maximized { 0 } else { 12 };
    let mut m = measure(&spec, &d);
    while m.window.0 + 2 * margin > w || m.window.1 + 2 * margin > h {
        if !shrink(&mut spec) {
            break;
        }
        m = measure(&spec, &d);
    }

    // Window rectangle.
    let win = if maximized {
        Rect::new(0, 0, w, h)
    } else {
        let max_w = w - 2 * margin;
        let max_h = h - 2 * margin;
        let extra = |rng: &mut ChaCha8Rng, have: u32, max: u32, k: f32| {
            let room = max.saturating_sub(have).min((d.px * k) as u32);
            if room == 0 {
                0
            } else {
                rng.random_range(0..=room)
            }
        };
        let (ew, eh) = match spec.kind {
            WindowKind::Dialog => (
                extra(rng, m.window.0, max_w, 6.0),
                extra(rng, m.window.1, max_h, 1.0),
            ),
            WindowKind::Window => (
                extra(rng, m.window.0, max_w, 24.0),
                extra(rng, m.window.1, max_h, 10.0),
            ),
        };
        let ww = (m.window.0 + ew).min(max_w);
        let wh = (m.window.1 + eh).min(max_h);
        let (x, y) = match spec.kind {
            // Dialogs sit near the centre.
            WindowKind::Dialog => {
                let (fx, fy) = ((max_w - ww) / 2, (max_h - wh) / 2);
                (
                    margin + fx / 2 + rng.random_range(0..=fx),
                    margin + fy / 2 + rng.random_range(0..=fy),
                )
            }
            WindowKind::Window => (
                margin + rng.random_range(0..=(max_w - ww)),
                margin + rng.random_range(0..=(max_h - wh)),
            ),
        };
        Rect::new(x, y, ww, wh)
    };

    // Desktop.
    let mut img = RgbImage::new(w, h);
    let tint: Rgb = [
        rng.random_range(0..=255),
        rng.random_range(0..=255),
        rng.random_range(0..=255),
    ];
    raster::vertical_gradient(
        &mut img,
        mix(theme.desktop.0, tint, 0.15),
        mix(theme.desktop.1, tint, 0.15),
    );
    if !maximized {
        draw_shadow(&mut img, win);
    }
    let rad = if maximized || spec.controls == Controls::RightGlyphs {
        0.0
    } else {
        d.px * 0.6
    };
    raster::bordered_rounded_rect(&mut img, win, rad, 1, theme.border, theme.window_bg);
    let title = draw_title_bar(&mut img, &spec, &theme, &d, win);
    let mut y = win.y + d.tb + 1;

    // Menu bar.
    let mut menu = Vec::new();
    if !spec.menu.is_empty() {
        let bar = Rect::new(win.x + 1, y, win.w - 2, d.mb);
        raster::fill_rect(&mut img, bar, theme.menu_bg);
        raster::fill_rect(
            &mut img,
            Rect::new(win.x + 1, y + d.mb - 1, win.w - 2, 1),
            mix(theme.border, theme.menu_bg, 0.5),
        );
        let mut x = bar.x + d.pad;
        for item in &spec.menu {
            menu.push(put_text(
                &mut img,
                TextStyle::new(Face::Sans, d.px, theme.text),
                x,
                bar.y,
                d.mb,
                item,
            ));
            x += d.tw(Face::Sans, item) + d.pad;
        }
        y += d.mb;
    }

    // Status bar.
    let mut bottom = win.bottom() - 1;
    let mut status = None;
    if let Some(s) = &spec.status {
        bottom -= d.sb;
        let bar = Rect::new(win.x + 1, bottom, win.w - 2, d.sb);
        raster::fill_rect(&mut img, bar, theme.status_bg);
        raster::fill_rect(
            &mut img,
            Rect::new(win.x + 1, bottom, win.w - 2, 1),
            mix(theme.border, theme.status_bg, 0.5),
        );
        let small = d.px * 0.92;
        status = Some(put_text(
            &mut img,
            TextStyle::new(Face::Sans, small, theme.muted),
            bar.x + d.pad,
            bar.y,
            d.sb,
            s,
        ));
    }

    // Content area.
    let cx0 = win.x + d.pad;
    let cx1 = win.right() - d.pad;
    let cy0 = y + d.pad;
    let buttons_y = bottom - d.pad - d.ch;

    let mut fields = Vec::new();
    let mut checkboxes = Vec::new();
    let mut list = None;
    let mut message = None;
    match spec.kind {
        WindowKind::Dialog => {
            let icon = d.ch + d.pad / 2;
            let row_h = m.message.1.max(icon);
            let ir = Rect::new(cx0, cy0, icon, icon);
            draw_dialog_icon(&mut img, &theme, &d, spec.icon, ir);
            let text = spec.message.clone().unwrap_or_default();
            message = Some(put_text(
                &mut img,
                TextStyle::new(Face::Sans, d.px, theme.text),
                cx0 + icon + d.pad,
                cy0,
                row_h,
                &text,
            ));
        }
        WindowKind::Window => {
            let placement = spec.list.as_ref().map(|l| l.placement);
            let has_form = m.form.1 > 0;
            // Where the form and the list go.
            let (form_x, list_rect) = match (placement, has_form) {
                (None, _) => (cx0, None),
                (Some(_), false) => (
                    cx0,
                    Some(Rect::new(
                        cx0,
                        cy0,
                        (cx1 - cx0).min(m.list.0.max(m.content.0)),
                        m.list.1,
                    )),
                ),
                (Some(ListPlacement::Below), true) => {
                    let lw = m.list.0.max(m.form.0);
                    (
                        cx0,
                        Some(Rect::new(cx0, cy0 + m.form.1 + d.pad, lw, m.list.1)),
                    )
                }
                (Some(p), true) => {
                    let full_h = buttons_y - d.pad - cy0;
                    let lh = m.list.1.max(full_h.min(m.list.1 + d.rh * 3));
                    let lw = m.list.0;
                    if p == ListPlacement::SidebarLeft {
                        (cx0 + lw + d.pad, Some(Rect::new(cx0, cy0, lw, lh)))
                    } else {
                        let lx = cx1 - lw;
                        (cx0, Some(Rect::new(lx, cy0, lw, lh)))
                    }
                }
            };
            // Fields.
            let mut fy = cy0;
            for (i, (label, content)) in spec.fields.iter().enumerate() {
                let focused = spec.focused == Some(i);
                match spec.labels {
                    LabelPlacement::Left => {
                        let r = Rect::new(form_x + m.label_col + d.gap, fy, m.field_w, d.ch);
                        fields.push(draw_field(
                            &mut img,
                            &theme,
                            &d,
                            (label, content),
                            (form_x, fy, d.ch),
                            r,
                            focused,
                        ));
                        fy += d.ch + d.gap;
                    }
                    LabelPlacement::Above => {
                        let r = Rect::new(form_x, fy + d.lh + 2, m.field_w, d.ch);
                        fields.push(draw_field(
                            &mut img,
                            &theme,
                            &d,
                            (label, content),
                            (form_x, fy, d.lh),
                            r,
                            focused,
                        ));
                        fy += d.lh + 2 + d.ch + d.gap;
                    }
                }
            }
            let mut ky = cy0 + m.fields.1 + if m.fields.1 > 0 { d.gap } else { 0 };
            let row = d.cb.max(d.lh);
            for (label, checked) in &spec.checks {
                checkboxes.push(draw_check(
                    &mut img,
                    &theme,
                    &d,
                    form_x,
                    ky,
                    row,
                    (label, *checked),
                ));
                ky += row + d.gap / 2;
            }
            if let (Some(l), Some(r)) = (&spec.list, list_rect) {
                list = Some(draw_list(&mut img, &theme, &d, l, r, rng));
            }
        }
    }

    // Buttons.
    let total = m.buttons.0;
    let mut bx = match spec.align {
        ButtonAlign::Left => cx0,
        ButtonAlign::Right => cx1 - total,
        ButtonAlign::Center => win.x + (win.w - total) / 2,
    };
    let mut buttons = Vec::new();
    for (i, (label, bw)) in spec.buttons.iter().zip(&m.button_ws).enumerate() {
        let r = Rect::new(bx, buttons_y, *bw, d.ch);
        buttons.push(draw_button(
            &mut img,
            &theme,
            &d,
            label,
            r,
            i == spec.primary,
        ));
        bx += bw + d.gap;
    }

    let truth = ScreenTruth {
        width: w,
        height: h,
        window_kind: spec.kind,
        theme: theme.name,
        font_px: px,
        window_rect: win,
        maximized,
        controls: spec.controls,
        title,
        menu,
        message,
        fields,
        label_placement: spec.labels,
        checkboxes,
        list,
        buttons,
        button_align: spec.align,
        status,
    };
    let caption = describe(&truth);
    let qa = questions(&truth, rng);
    Generated {
        image: img,
        caption,
        qa,
        truth,
    }
}

// ---------------------------------------------------------------------------------------------
// Language

fn quoted_list(items: &[String]) -> String {
    let q: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    join_and(&q)
}

fn join_and(items: &[String]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        n => format!("{} and {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// The natural-language description of a screenshot.
pub fn describe(t: &ScreenTruth) -> String {
    let mut s = String::new();
    let what = match t.window_kind {
        WindowKind::Window => "window",
        WindowKind::Dialog => "dialog",
    };
    let how = if t.maximized { "A maximised" } else { "A" };
    s.push_str(&format!("{how} {what} titled \"{}\"", t.title.text));
    if !t.menu.is_empty() {
        let m: Vec<String> = t.menu.iter().map(|m| m.text.clone()).collect();
        s.push_str(&format!(" with the menus {}", join_and(&m)));
    }
    s.push('.');
    if let Some(m) = &t.message {
        s.push_str(&format!(" It says \"{}\".", m.text));
    }
    if !t.fields.is_empty() {
        let f: Vec<String> = t
            .fields
            .iter()
            .map(|f| format!("{} containing \"{}\"", f.label.text, f.content.text))
            .collect();
        s.push_str(&format!(
            " It has {}: {}.",
            plural(t.fields.len(), "text field", "text fields"),
            join_and(&f)
        ));
    }
    if !t.checkboxes.is_empty() {
        let c: Vec<String> = t
            .checkboxes
            .iter()
            .map(|c| {
                format!(
                    "\"{}\" ({})",
                    c.label.text,
                    if c.checked { "checked" } else { "unchecked" }
                )
            })
            .collect();
        s.push_str(&format!(
            " {}: {}.",
            if c.len() == 1 {
                "Checkbox"
            } else {
                "Checkboxes"
            },
            join_and(&c)
        ));
    }
    if let Some(l) = &t.list {
        s.push_str(&format!(
            " A list shows {}: {}.",
            plural(l.items.len(), "item", "items"),
            join_and(&l.item_texts())
        ));
        if let Some(i) = l.selected {
            s.push_str(&format!(" \"{}\" is selected.", l.items[i].text));
        }
    }
    let labels: Vec<String> = t.buttons.iter().map(|b| b.label.text.clone()).collect();
    if labels.len() == 1 {
        s.push_str(&format!(" There is one button, \"{}\".", labels[0]));
    } else {
        s.push_str(&format!(" The buttons are {}", quoted_list(&labels)));
        if let Some(p) = t.buttons.iter().find(|b| b.primary) {
            s.push_str(&format!(", with \"{}\" highlighted", p.label.text));
        }
        s.push('.');
    }
    if let Some(st) = &t.status {
        s.push_str(&format!(" The status bar reads \"{}\".", st.text));
    }
    s
}

fn questions(t: &ScreenTruth, rng: &mut ChaCha8Rng) -> Vec<Qa> {
    let mut qa = Vec::new();
    let what = match t.window_kind {
        WindowKind::Window => "window",
        WindowKind::Dialog => "dialog",
    };
    qa.push(Qa::new(
        format!("What is the title of the {what}?"),
        &t.title.text,
        C::Title,
    ));
    if let Some(m) = &t.message {
        qa.push(Qa::new("What does the dialog say?", &m.text, C::Message));
    }
    let b = &t.buttons;
    match b.len() {
        0 => {}
        1 => qa.push(Qa::new(
            "What does the button say?",
            &b[0].label.text,
            C::Button,
        )),
        n => {
            qa.push(Qa::new(
                "What does the button on the left say?",
                &b[0].label.text,
                C::Button,
            ));
            qa.push(Qa::new(
                "What does the button on the right say?",
                &b[n - 1].label.text,
                C::Button,
            ));
            if n == 3 {
                qa.push(Qa::new(
                    "What does the middle button say?",
                    &b[1].label.text,
                    C::Button,
                ));
            }
            if let Some(p) = b.iter().find(|b| b.primary) {
                qa.push(Qa::new(
                    "Which button is highlighted?",
                    &p.label.text,
                    C::Button,
                ));
            }
        }
    }
    qa.push(Qa::new(
        "How many buttons are there?",
        b.len().to_string(),
        C::ButtonCount,
    ));
    for f in &t.fields {
        qa.push(Qa::new(
            format!("What is in the {} field?", f.label.text),
            &f.content.text,
            C::Field,
        ));
    }
    for c in &t.checkboxes {
        qa.push(Qa::new(
            format!("Is \"{}\" checked?", c.label.text),
            if c.checked { "yes" } else { "no" },
            C::Checkbox,
        ));
    }
    if let Some(l) = &t.list {
        let n = l.items.len();
        qa.push(Qa::new(
            "How many items are in the list?",
            n.to_string(),
            C::ListCount,
        ));
        qa.push(Qa::new(
            "What is the first item in the list?",
            &l.items[0].text,
            C::ListItem,
        ));
        if n > 1 {
            qa.push(Qa::new(
                "What is the last item in the list?",
                &l.items[n - 1].text,
                C::ListItem,
            ));
        }
        if let Some(i) = l.selected {
            qa.push(Qa::new(
                "Which item in the list is selected?",
                &l.items[i].text,
                C::ListItem,
            ));
        }
    }
    // Mix the order so no position in the list always carries the same question.
    qa[1..].shuffle(rng);
    for q in &mut qa {
        q.unseen = vocab::has_held_out_word(&q.answer);
    }
    qa
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn theme_text_contrasts_with_backgrounds() {
        for t in TRAIN_THEMES.iter().chain(HELD_OUT_THEMES.iter()) {
            let dist = |a: Rgb, b: Rgb| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (*x as i32 - y as i32).abs())
                    .sum::<i32>()
            };
            for (fg, bg) in [
                (t.text, t.window_bg),
                (t.text, t.field_bg),
                (t.text, t.list_bg),
                (t.text, t.list_alt),
                (t.button_text, t.button_bg),
                (t.accent_text, t.accent),
                (t.title_text, t.titlebar),
            ] {
                assert!(dist(fg, bg) > 250, "{}: {fg:?} on {bg:?}", t.name);
            }
        }
    }
}
