//! The model thread of `afm serve`: one loaded model, continuous batching.
//!
//! Requests arrive as [`Job`]s on a channel. The thread prefills a new job (its images
//! encoded first, through the pipeline's image cache), then runs one decode step for every
//! running job at once ([`afm::lm::batch::step`]: the weights are read once per step for the
//! whole batch), sends each job's new text to its own event channel, and lets jobs join and
//! leave at any step. A job whose client went away (its channel closed) is dropped at the
//! next step. A failing job gets an error event; the others go on.

use afm::fusion::{ChatMessage, Part, Vlm};
use afm::lm::batch::{step, Sequence, StepOutput};
use afm::lm::{
    Checkpoint, DeviceModel, GenerateOptions, LanguageModel, Message, StopReason, Tokenizer,
};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, TryRecvError};
use tokio::sync::mpsc::UnboundedSender;

/// The served model: a language model alone, or a vision-language pipeline.
pub enum Model {
    Text(Checkpoint),
    Vision(Box<Vlm<DeviceModel>>),
}

/// A part of an incoming chat message (images already decoded).
pub enum PartIn {
    Text(String),
    Image(afm::vision::image::RgbImage),
}

pub struct MessageIn {
    pub role: String,
    pub parts: Vec<PartIn>,
}

impl Model {
    pub fn lm(&self) -> &DeviceModel {
        match self {
            Model::Text(c) => &c.model,
            Model::Vision(v) => v.lm(),
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        match self {
            Model::Text(c) => &c.tokenizer,
            Model::Vision(v) => v.tokenizer(),
        }
    }

    pub fn has_vision(&self) -> bool {
        matches!(self, Model::Vision(_))
    }

    /// Prompt ids and input embeddings of a chat (images encoded and spliced in).
    ///
    /// # Shapes
    /// `-> (ids: t, embeds: (t, hidden))`.
    fn prepare(&self, messages: &[MessageIn]) -> Result<(Vec<u32>, Tensor)> {
        match self {
            Model::Text(c) => {
                let mut msgs = Vec::new();
                for m in messages {
                    let mut text = String::new();
                    for p in &m.parts {
                        match p {
                            PartIn::Text(t) => text.push_str(t),
                            PartIn::Image(_) => bail!("this model has no vision encoder"),
                        }
                    }
                    msgs.push(Message::new(m.role.clone(), text));
                }
                let text = afm::lm::chat::render_chat(&c.tokenizer, &msgs)?;
                let ids = c.tokenizer.encode(&text)?;
                let embeds = c.model.embed_tokens(&ids)?;
                Ok((ids, embeds))
            }
            Model::Vision(v) => {
                let mut msgs = Vec::new();
                for m in messages {
                    let mut parts = Vec::new();
                    for p in &m.parts {
                        parts.push(match p {
                            PartIn::Text(t) => Part::Text(t.clone()),
                            PartIn::Image(img) => Part::Image(v.encode_image(img, None)?),
                        });
                    }
                    msgs.push(ChatMessage {
                        role: m.role.clone(),
                        parts,
                    });
                }
                Ok(v.prepare(&msgs)?)
            }
        }
    }
}

/// What a job's client receives.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done {
        stop: StopReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// One chat completion request.
pub struct Job {
    pub messages: Vec<MessageIn>,
    pub opts: GenerateOptions,
    /// `response_format`: the compiled schema the answer follows.
    pub guide: Option<afm::lm::guided::Guide>,
    pub events: UnboundedSender<Event>,
}

struct Running {
    seq: Sequence,
    events: UnboundedSender<Event>,
}

impl Running {
    /// Sends a step's output; false when the client is gone or the job has finished.
    fn deliver(&mut self, out: StepOutput) -> bool {
        if !out.text.is_empty() && self.events.send(Event::Text(out.text)).is_err() {
            self.seq.cancel();
            return false;
        }
        if let Some(stop) = out.stop {
            let _ = self.events.send(Event::Done {
                stop,
                prompt_tokens: self.seq.prompt_tokens(),
                completion_tokens: self.seq.ids().len(),
            });
            return false;
        }
        !self.events.is_closed()
    }
}

/// A panic inside the model code becomes an error (the thread and the other jobs go on).
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown".into());
            bail!("internal error (panic: {msg})")
        }
    }
}

/// Prefills a job; `Some` when it keeps running after its first token.
fn admit(model: &Model, job: Job) -> Option<Running> {
    if job.events.is_closed() {
        return None;
    }
    let started = guarded(|| {
        let (ids, embeds) = model.prepare(&job.messages)?;
        Ok(Sequence::start_guided(
            model.lm(),
            model.tokenizer(),
            &embeds,
            &ids,
            &job.opts,
            job.guide,
        )?)
    });
    match started {
        Ok((seq, first)) => {
            let mut r = Running {
                seq,
                events: job.events,
            };
            r.deliver(first).then_some(r)
        }
        Err(e) => {
            let _ = job.events.send(Event::Error(crate::error_line(&e)));
            None
        }
    }
}

/// The model thread's loop (module docs); returns when the job channel closes and every
/// running job has finished.
pub fn run(model: &Model, jobs: Receiver<Job>, max_batch: usize) {
    let mut running: Vec<Running> = Vec::new();
    let mut open = true;
    loop {
        if running.is_empty() {
            if !open {
                return;
            }
            match jobs.recv() {
                Ok(j) => running.extend(admit(model, j)),
                Err(_) => return,
            }
        }
        while open && running.len() < max_batch {
            match jobs.try_recv() {
                Ok(j) => running.extend(admit(model, j)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        running.retain(|r| !r.events.is_closed());
        if running.is_empty() {
            continue;
        }
        let mut seqs: Vec<&mut Sequence> = running.iter_mut().map(|r| &mut r.seq).collect();
        match guarded(|| Ok(step(model.lm(), model.tokenizer(), &mut seqs)?)) {
            Ok(outs) => {
                let mut keep = Vec::with_capacity(running.len());
                for (mut r, out) in running.drain(..).zip(outs) {
                    if r.deliver(out) {
                        keep.push(r);
                    }
                }
                running = keep;
            }
            Err(e) => {
                let msg = crate::error_line(&e);
                for r in running.drain(..) {
                    let _ = r.events.send(Event::Error(msg.clone()));
                }
            }
        }
    }
}
