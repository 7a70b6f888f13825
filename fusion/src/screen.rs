//! A typed description of a screenshot ([`ScreenDescription`]), generated under its JSON
//! Schema so it always parses: the window title, the buttons, the fields with their values,
//! the list items and the selected one.

use crate::session::attachment;
use crate::vlm::Vlm;
use afm_lm::{GenerationOptions, LanguageModel, Prompt, Session};
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// A button and whether it can be pressed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Button {
    #[schemars(length(max = 24))]
    pub label: String,
    pub enabled: bool,
}

/// A labelled input field and what it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Field {
    #[schemars(length(max = 24))]
    pub label: String,
    #[schemars(length(max = 40))]
    pub value: String,
}

/// What is on a screen. The bounds (at most 8 buttons, 6 fields, 8 list items, short texts)
/// keep the output within [`ScreenDescription::MAX_TOKENS`] tokens, so it always completes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ScreenDescription {
    #[schemars(length(max = 60))]
    pub title: String,
    #[schemars(length(max = 8))]
    pub buttons: Vec<Button>,
    #[schemars(length(max = 6))]
    pub fields: Vec<Field>,
    #[schemars(length(max = 8), inner(length(max = 40)))]
    pub list_items: Vec<String>,
    /// The selected list item's text, if one is selected.
    #[schemars(length(max = 40))]
    pub selected_item: Option<String>,
}

impl ScreenDescription {
    /// A token budget that fits the longest description the schema allows (every character
    /// a token, plus the JSON around them).
    pub const MAX_TOKENS: usize = 1600;

    /// The typed form of a screen description written in afm-tiny's sentences (what
    /// `afm screen` prints for it): `A window titled "T" ...`, `It has 2 text fields: Name
    /// containing "Ann" and ...`, `A list shows 3 items: "a", "b" and "c". "b" is selected.`,
    /// `There is one button, "OK".` or `The buttons are "A" and "B", with "B" highlighted.`
    /// Sentences of other kinds (checkboxes, the status bar, a message) have no slot and are
    /// left out; a slot with no sentence stays empty. Every button is `enabled` (the
    /// sentences do not say otherwise). Texts and counts are held to the schema's bounds.
    pub fn from_sentences(text: &str) -> Self {
        let mut d = ScreenDescription {
            title: String::new(),
            buttons: Vec::new(),
            fields: Vec::new(),
            list_items: Vec::new(),
            selected_item: None,
        };
        let bound = |s: &str, n: usize| s.chars().take(n).collect::<String>();
        for sentence in sentences(text) {
            let quoted = quoted_in(sentence);
            if let Some(i) = sentence.find("titled \"") {
                if let Some(t) = quoted_after(sentence, i) {
                    d.title = bound(t, 60);
                }
            } else if sentence.starts_with("There is one button") {
                d.buttons = quoted
                    .iter()
                    .take(1)
                    .map(|l| button(bound(l, 24)))
                    .collect();
            } else if sentence.starts_with("The buttons are") {
                // the list ends where ", with \"X\" highlighted" begins
                let end = sentence.find(", with \"").unwrap_or(sentence.len());
                d.buttons = quoted_in(&sentence[..end])
                    .iter()
                    .take(8)
                    .map(|l| button(bound(l, 24)))
                    .collect();
            } else if sentence.contains("text field") {
                d.fields = fields(sentence)
                    .into_iter()
                    .take(6)
                    .map(|(l, v)| Field {
                        label: bound(l, 24),
                        value: bound(v, 40),
                    })
                    .collect();
            } else if sentence.starts_with("A list shows") {
                d.list_items = list_items(sentence)
                    .iter()
                    .take(8)
                    .map(|t| bound(t, 40))
                    .collect();
            } else if sentence.ends_with("is selected") && quoted.len() == 1 {
                d.selected_item = Some(bound(quoted[0], 40));
            }
        }
        d
    }
}

fn button(label: String) -> Button {
    Button {
        label,
        enabled: true,
    }
}

/// The sentences of `text`: split at each `.` outside double quotes, trimmed, without the
/// full stop.
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut in_quote) = (0, false);
    for (i, c) in text.char_indices() {
        match c {
            '"' => in_quote = !in_quote,
            '.' if !in_quote => {
                out.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(text[start..].trim());
    out.retain(|s| !s.is_empty());
    out
}

/// The double-quoted texts of `s`, in order (an unclosed quote is left out).
fn quoted_in(s: &str) -> Vec<&str> {
    let parts: Vec<&str> = s.split('"').collect();
    // odd pieces are inside quotes; with an odd number of quotes the last is unclosed
    let closed = if parts.len().is_multiple_of(2) {
        parts.len() - 1
    } else {
        parts.len()
    };
    (1..closed).step_by(2).map(|i| parts[i]).collect()
}

/// The quoted text that starts at or after byte `from` of `s`.
fn quoted_after(s: &str, from: usize) -> Option<&str> {
    let rest = &s[from..];
    let a = rest.find('"')? + 1;
    let b = rest[a..].find('"')?;
    Some(&rest[a..a + b])
}

/// The items of `A list shows 3 items: Oslo, Rome and Lima` (the generator's sentence names
/// them unquoted; quoted items are taken as quoted).
fn list_items(sentence: &str) -> Vec<&str> {
    let Some(colon) = sentence.find(':') else {
        return Vec::new();
    };
    let rest = sentence[colon + 1..].trim();
    let quoted = quoted_in(rest);
    if !quoted.is_empty() {
        return quoted;
    }
    let (init, last) = match rest.rfind(" and ") {
        Some(k) => (&rest[..k], Some(&rest[k + " and ".len()..])),
        None => (rest, None),
    };
    init.split(", ")
        .chain(last)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// `(label, value)` of each `Label containing "value"` in a text-field sentence.
fn fields(sentence: &str) -> Vec<(&str, &str)> {
    let Some(colon) = sentence.find(':') else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut rest = &sentence[colon + 1..];
    while let Some(k) = rest.find(" containing \"") {
        let label = rest[..k]
            .trim()
            .trim_start_matches(',')
            .trim()
            .trim_start_matches("and ")
            .trim();
        let after = &rest[k + " containing ".len()..];
        let Some(value) = quoted_after(after, 0) else {
            break;
        };
        out.push((label, value));
        // past the value's closing quote
        rest = &after[value.len() + 2..];
    }
    out
}

/// Fewest tokens afm-tiny is given to describe a screen in sentences.
const SENTENCE_TOKENS: usize = 256;

impl<M: LanguageModel> Vlm<M> {
    /// A typed description of a screenshot, decoded under [`ScreenDescription`]'s schema
    /// (always valid). A model with a text reader (afm-tiny) instead writes its description
    /// in the sentences it was trained on ([`Vlm::describe_screen`], under the grammar of
    /// [`crate::grounded_screen`]), put in the schema's slots
    /// ([`ScreenDescription::from_sentences`]). `opts.max_tokens` is raised to
    /// [`ScreenDescription::MAX_TOKENS`] when lower; `max_image_tokens` is the image budget
    /// (`None`: full resolution).
    pub fn describe_screen_typed(
        &self,
        img: &RgbImage,
        max_image_tokens: Option<usize>,
        opts: &GenerationOptions,
    ) -> afm_lm::Result<ScreenDescription> {
        if self.reader().is_some() {
            // afm-tiny: its LM was trained to describe screens in sentences, not JSON, and
            // under a JSON grammar it copies the schema. So it writes its description, and
            // the sentences are put in their slots.
            let ask = crate::vlm::AskOptions {
                generate: GenerationOptions {
                    max_tokens: opts.max_tokens.max(SENTENCE_TOKENS),
                    ..opts.clone()
                }
                .to_generate_options(),
                max_image_tokens,
            };
            let a = self
                .describe_screen(img, &ask, &mut |_| true)
                .map_err(crate::session::lm_err)?;
            return Ok(ScreenDescription::from_sentences(&a.generation.text));
        }
        let mut s = Session::new(self);
        s.options = GenerationOptions {
            max_tokens: opts.max_tokens.max(ScreenDescription::MAX_TOKENS),
            ..opts.clone()
        };
        let p = Prompt::default()
            .image(attachment(img).with_max_tokens(max_image_tokens))
            .then(self.screen_prompt().to_string());
        s.respond_as::<ScreenDescription>(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_fill_the_slots() {
        let d = ScreenDescription::from_sentences(
            "A maximised window titled \"Backup v2.1\" with the menus File and Edit. It has 2 \
             text fields: Size containing \"275 MB\" and Name containing \"Emma. Evans\". \
             Checkbox: \"Name\" (unchecked). A list shows 3 items: Oslo, Rome and Lima. \
             \"Rome\" is selected. The buttons are \"Set Up\", \"Help\" and \
             \"Cancel\", with \"Set Up\" highlighted. The status bar reads \"Idle\".",
        );
        assert_eq!(d.title, "Backup v2.1");
        let labels: Vec<&str> = d.buttons.iter().map(|b| b.label.as_str()).collect();
        assert_eq!(labels, ["Set Up", "Help", "Cancel"]);
        assert!(d.buttons.iter().all(|b| b.enabled));
        let fields: Vec<(&str, &str)> = d
            .fields
            .iter()
            .map(|f| (f.label.as_str(), f.value.as_str()))
            .collect();
        assert_eq!(fields, [("Size", "275 MB"), ("Name", "Emma. Evans")]);
        assert_eq!(d.list_items, ["Oslo", "Rome", "Lima"]);
        assert_eq!(d.selected_item.as_deref(), Some("Rome"));

        let d = ScreenDescription::from_sentences(
            "A dialog titled \"Ignore Rule\". It has 3 text fields: Size containing \"275 MB\", \
             Name containing \"Emma Evans\" and Country containing \"Norway\". There is one \
             button, \"Set Up\". The status bar reads \"Idle\".",
        );
        assert_eq!(d.title, "Ignore Rule");
        assert_eq!(d.buttons.len(), 1);
        assert_eq!(d.buttons[0].label, "Set Up");
        assert_eq!(d.fields.len(), 3);
        assert_eq!(d.fields[2].label, "Country");
        assert!(d.list_items.is_empty() && d.selected_item.is_none());
        // quoted items are taken as quoted; a one-item list
        let d = ScreenDescription::from_sentences(
            "A window titled \"T\". A list shows 2 items: \"Oslo, Norway\" and \"Rome\".",
        );
        assert_eq!(d.list_items, ["Oslo, Norway", "Rome"]);
        let d = ScreenDescription::from_sentences("A list shows 1 item: Lima.");
        assert_eq!(d.list_items, ["Lima"]);
    }

    #[test]
    fn broken_or_foreign_text_gives_empty_slots_within_bounds() {
        for text in [
            "",
            "Hello.",
            "A window titled \"unclosed",
            "\"\"\"",
            "titled \"\".",
        ] {
            let d = ScreenDescription::from_sentences(text);
            assert!(d.title.is_empty() && d.buttons.is_empty(), "{text}: {d:?}");
        }
        let long = format!(
            "A window titled \"{}\". The buttons are {}.",
            "x".repeat(100),
            (0..12)
                .map(|i| format!("\"b{i}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let d = ScreenDescription::from_sentences(&long);
        assert_eq!(d.title.chars().count(), 60);
        assert_eq!(d.buttons.len(), 8);
    }
}
