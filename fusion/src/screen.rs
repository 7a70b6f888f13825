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
}

impl<M: LanguageModel> Vlm<M> {
    /// A typed description of a screenshot, decoded under [`ScreenDescription`]'s schema
    /// (always valid). `opts.max_tokens` is raised to [`ScreenDescription::MAX_TOKENS`] when
    /// lower; `max_image_tokens` is the image budget (`None`: full resolution).
    pub fn describe_screen_typed(
        &self,
        img: &RgbImage,
        max_image_tokens: Option<usize>,
        opts: &GenerationOptions,
    ) -> afm_lm::Result<ScreenDescription> {
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
