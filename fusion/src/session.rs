//! Sessions over a vision-language pipeline: [`Vlm`] as an [`afm_lm::ChatModel`], so
//! [`afm_lm::Session`] runs it with images as prompt attachments.
//!
//! Rendering needs only each image's plan (its size and the processor's budget): the
//! prompt's image tokens are known before anything is encoded. With a text reader
//! ([`Vlm::set_reader`]) the prompt also carries each image's text, so rendering encodes the
//! image (once: the encoding and its text stay in the pipeline's image cache). An image is encoded (or taken
//! from the pipeline's image cache) only when its positions are not in the session's K/V
//! cache, so a follow-up question about the same image runs neither the encoder nor the
//! prefill of the earlier turns.

use crate::vlm::{ChatMessage, EncodedImage, Part, Vlm};
use afm_lm::session::{ChatModel, ImageSpan, RenderedPrompt};
use afm_lm::{Entry, ImageAttachment, LanguageModel, LmError, Segment, Tokenizer, Transcript};
use afm_vision::{load_image, ImageLimits};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use std::ops::Range;
use std::sync::Arc;

pub(crate) fn lm_err(e: crate::FusionError) -> LmError {
    match e {
        crate::FusionError::Lm(e) => e,
        other => LmError::Model(Box::new(other)),
    }
}

/// The pixels of an attachment: in memory, or read again from its path.
pub fn attachment_pixels(a: &ImageAttachment) -> afm_lm::Result<RgbImage> {
    if let Some(rgb) = &a.rgb {
        return RgbImage::from_raw(a.width, a.height, rgb.as_ref().clone()).ok_or_else(|| {
            LmError::Invalid(format!(
                "image {}: {} bytes are not {}x{} RGB",
                &a.key[..12.min(a.key.len())],
                rgb.len(),
                a.width,
                a.height
            ))
        });
    }
    let Some(p) = &a.path else {
        return Err(LmError::Invalid(format!(
            "image {} ({}x{}) has no pixels in this session and no path to read them from; \
             attach it again",
            &a.key[..12.min(a.key.len())],
            a.width,
            a.height
        )));
    };
    let img = load_image(p, &ImageLimits::default()).map_err(|e| LmError::Model(Box::new(e)))?;
    let again = attachment(&img);
    if again.key != a.key {
        return Err(LmError::Invalid(format!(
            "{} no longer holds the image the transcript attached (sha256 differs)",
            p.display()
        )));
    }
    Ok(img)
}

/// An attachment of a decoded image.
pub fn attachment(img: &RgbImage) -> ImageAttachment {
    ImageAttachment::from_rgb(img.width(), img.height(), img.as_raw().clone())
        .expect("an RgbImage holds width * height * 3 bytes")
}

impl<M: LanguageModel> Vlm<M> {
    /// The chat messages of a transcript, each image as a plan-only stand-in (rendering
    /// needs no embeddings), and each image's token count.
    fn transcript_messages(
        &self,
        t: &Transcript,
    ) -> afm_lm::Result<(Vec<ChatMessage>, Vec<(String, usize)>)> {
        let mut images = Vec::new();
        let mut msgs = Vec::new();
        let tool_text = |e: &Entry| -> Option<(String, String)> {
            let m = Transcript {
                entries: vec![e.clone()],
            }
            .messages(&mut |_| Ok(String::new()))
            .ok()?;
            m.into_iter().next().map(|m| (m.role, m.content))
        };
        for e in &t.entries {
            match e {
                Entry::Prompt { segments } => {
                    let mut parts = Vec::new();
                    for s in segments {
                        match s {
                            Segment::Text(x) => parts.push(Part::Text(x.clone())),
                            Segment::Image(a) => {
                                let plan =
                                    self.plan(a.width, a.height, a.max_tokens).map_err(lm_err)?;
                                images.push((a.key.clone(), plan.image_tokens));
                                // with a text reader the prompt carries the image's text, so
                                // rendering needs the image itself (encoded once, cached)
                                let (text, objects) = match self.reader() {
                                    Some(_) => {
                                        let img = attachment_pixels(a)?;
                                        let e = self
                                            .encode_image(&img, a.max_tokens)
                                            .map_err(lm_err)?;
                                        (e.text.clone(), e.objects.clone())
                                    }
                                    None => (None, Vec::new()),
                                };
                                parts.push(Part::Image(Arc::new(EncodedImage {
                                    plan,
                                    embeds: Tensor::zeros((0, 1), DType::F32, &Device::Cpu)?,
                                    encode_secs: 0.0,
                                    from_cache: false,
                                    text,
                                    objects,
                                })));
                            }
                        }
                    }
                    msgs.push(ChatMessage::user(parts));
                }
                other => {
                    if let Some((role, content)) = tool_text(other) {
                        msgs.push(ChatMessage {
                            role,
                            parts: vec![Part::Text(content)],
                        });
                    }
                }
            }
        }
        Ok((msgs, images))
    }
}

impl<M: LanguageModel> ChatModel for Vlm<M> {
    fn language_model(&self) -> &dyn LanguageModel {
        self.lm()
    }

    fn tokenizer(&self) -> &Tokenizer {
        Vlm::tokenizer(self)
    }

    fn render(&self, t: &Transcript) -> afm_lm::Result<RenderedPrompt> {
        let (msgs, images) = self.transcript_messages(t)?;
        let text = Vlm::render(self, &msgs).map_err(lm_err)?;
        let ids = Vlm::tokenizer(self).encode(&text)?;
        // image tokens in order: the first image's count, then the next image's, ...
        let image_id = self.image_token().1;
        let positions: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == image_id).collect();
        let want: usize = images.iter().map(|(_, n)| n).sum();
        if positions.len() != want {
            return Err(LmError::Model(Box::new(
                crate::FusionError::PlaceholderMismatch {
                    placeholders: positions.len(),
                    embeddings: want,
                },
            )));
        }
        let mut spans = Vec::new();
        let mut at = 0;
        for (key, n) in images {
            if n == 0 {
                continue;
            }
            let (first, last) = (positions[at], positions[at + n - 1]);
            spans.push(ImageSpan {
                start: first,
                len: last + 1 - first,
                key,
            });
            at += n;
        }
        Ok(RenderedPrompt { ids, images: spans })
    }

    fn embed(
        &self,
        t: &Transcript,
        prompt: &RenderedPrompt,
        range: Range<usize>,
    ) -> afm_lm::Result<Tensor> {
        let ids = &prompt.ids[range.clone()];
        let text0 = self.lm().embed_tokens(ids)?;
        let dt = text0.dtype();
        let text = text0.to_dtype(DType::F32)?;
        let needed: Vec<&ImageSpan> = prompt
            .images
            .iter()
            .filter(|s| s.start < range.end && s.start + s.len > range.start)
            .collect();
        if needed.is_empty() {
            return Ok(text0);
        }
        let hidden = text.dim(1)?;
        let mut rows: Vec<f32> = text.flatten_all()?.to_vec1()?;
        let image_id = self.image_token().1;
        for span in needed {
            let a = t.images().find(|a| a.key == span.key).ok_or_else(|| {
                LmError::Invalid(format!("image {} is not in the transcript", span.key))
            })?;
            let img = attachment_pixels(a)?;
            let enc = self.encode_image(&img, a.max_tokens).map_err(lm_err)?;
            let e: Vec<f32> = enc.embeds.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if enc.embeds.dim(1)? != hidden {
                return Err(LmError::Invalid(format!(
                    "image embeddings are {} wide, the language model {hidden}",
                    enc.embeds.dim(1)?
                )));
            }
            let mut k = 0;
            for pos in span.start..span.start + span.len {
                if prompt.ids[pos] != image_id {
                    continue;
                }
                if range.contains(&pos) {
                    let r = pos - range.start;
                    rows[r * hidden..(r + 1) * hidden]
                        .copy_from_slice(&e[k * hidden..(k + 1) * hidden]);
                }
                k += 1;
            }
        }
        Ok(Tensor::from_vec(rows, (range.len(), hidden), &Device::Cpu)?.to_dtype(dt)?)
    }
}
