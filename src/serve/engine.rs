//! The model thread of `afm serve`: one loaded model, continuous batching.
//!
//! Requests arrive as [`Job`]s on a channel. The thread admits every job waiting (its
//! images encoded first, through the pipeline's image cache; its prompt checked), then runs
//! one model pass for every job at once ([`afm::lm::batch::step`]: the new jobs' prompts are
//! prefilled in the same pass as the running jobs' decode step, so the weights are read once
//! for all of them and no running job waits for another's prefill), sends each job's new
//! text to its own event channel, and lets jobs join and leave at any step. A job whose
//! client went away (its channel closed) is dropped at the next step. When a pass fails,
//! each job runs that step alone: a failing job gets an error event; the others go on.

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
// one per server, so the larger variant's size does not matter
#[allow(clippy::large_enum_variant)]
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
        /// Of `prompt_tokens`, those taken from the prefix cache.
        cached_tokens: usize,
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
    /// Prefill without the prefix cache (a request with a `seed`): reused K/V was summed in
    /// a prefill of another length, so a sampled token can differ from a cold start.
    pub cold: bool,
    /// The client streams (SSE): text is sent at every step. Otherwise it is sent once, with
    /// the end, so that a step wakes no HTTP task (on a machine with as many cores as model
    /// threads, each wake-up delays the step).
    pub stream: bool,
}

struct Running {
    seq: Sequence,
    events: UnboundedSender<Event>,
    stream: bool,
    /// A text-only prompt's ids, kept until its prefill has run so that its K/V can enter
    /// the prefix cache.
    prefix_key: Option<Vec<u32>>,
}

impl Running {
    /// Sends a step's output (a non-streaming job's text only at its end, the sequence keeps
    /// it); false when the client is gone or the job has finished.
    fn deliver(&mut self, out: StepOutput) -> bool {
        let text = match (self.stream, out.stop.is_some()) {
            (true, _) => out.text,
            (false, true) => self.seq.text().to_string(),
            (false, false) => String::new(),
        };
        if !text.is_empty() && self.events.send(Event::Text(text)).is_err() {
            self.seq.cancel();
            return false;
        }
        if let Some(stop) = out.stop {
            let _ = self.events.send(Event::Done {
                stop,
                prompt_tokens: self.seq.prompt_tokens(),
                cached_tokens: self.seq.cached_tokens(),
                completion_tokens: self.seq.ids().len(),
            });
            return false;
        }
        !self.events.is_closed()
    }
}

/// A panic caught by [`guarded`]: the model code stopped half-way, so the caches it was
/// writing may hold rows their lengths do not count.
#[derive(Debug)]
struct Panicked(String);

impl std::fmt::Display for Panicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "internal error (panic: {})", self.0)
    }
}

impl std::error::Error for Panicked {}

/// A panic inside the model code becomes an error ([`Panicked`]; the thread and the other
/// jobs go on).
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown".into());
            Err(Panicked(msg).into())
        }
    }
}

/// The K/V of recent text-only prompts, so that a prompt that starts like one of them (the
/// chat template's system prompt, an earlier turn of the same conversation) prefills only
/// what differs. Keyed by token ids alone, so prompts with images never enter it or use it
/// (their image tokens are placeholders whose embeddings depend on the image).
pub struct PrefixCache {
    entries: std::collections::VecDeque<(Vec<u32>, afm::lm::Cache)>,
    /// K/V bytes kept over all entries; the least recently used go first.
    max_bytes: usize,
    /// Shortest prefix worth reusing.
    min_reuse: usize,
    /// Prompt positions taken from the cache instead of being prefilled, since start.
    pub reused: usize,
}

impl PrefixCache {
    /// Up to `max_bytes` of K/V; 0 keeps nothing (`--prefix-cache` not given).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            entries: Default::default(),
            max_bytes,
            min_reuse: 8,
            reused: 0,
        }
    }

    /// A copy of the cache of the longest stored prefix of `ids` (at most `ids.len() - 1`
    /// positions, so the last prompt position is always run), when it is long enough.
    fn lookup(&mut self, ids: &[u32]) -> Option<afm::lm::Cache> {
        let (k, n) = self
            .entries
            .iter()
            .enumerate()
            .map(|(k, (e, _))| {
                let lcp = e.iter().zip(ids).take_while(|(a, b)| a == b).count();
                (k, lcp.min(ids.len().saturating_sub(1)))
            })
            .max_by_key(|&(_, n)| n)?;
        if n < self.min_reuse {
            return None;
        }
        let mut c = self.entries[k].1.clone();
        c.truncate(n);
        // most recently used last
        let e = self.entries.remove(k)?;
        self.entries.push_back(e);
        self.reused += n;
        Some(c)
    }

    /// Keeps `cache` (holding exactly the positions of `ids`) as a prefix for later prompts.
    fn insert(&mut self, ids: &[u32], cache: &afm::lm::Cache) {
        if self.max_bytes == 0
            || cache.used_bytes() > self.max_bytes
            || cache.seq_len() != ids.len()
        {
            return;
        }
        self.entries.retain(|(e, _)| e.as_slice() != ids);
        self.entries.push_back((ids.to_vec(), cache.clone()));
        while self
            .entries
            .iter()
            .map(|(_, c)| c.used_bytes())
            .sum::<usize>()
            > self.max_bytes
        {
            self.entries.pop_front();
        }
    }
}

/// Whether a chat has no image: only such prompts use the prefix cache, whose key is the
/// token ids (an image's placeholder ids are the same for every image).
fn text_only(messages: &[MessageIn]) -> bool {
    messages
        .iter()
        .all(|m| m.parts.iter().all(|p| matches!(p, PartIn::Text(_))))
}

/// Admits a job: its images encoded, its prompt checked and set up to run from the prefix
/// cache where its prompt allows. The prompt itself runs in the next step, in the same pass
/// as the other jobs' decode step. `None` when the job failed (its client has the error) or
/// its client is gone.
fn admit(model: &Model, prefixes: &mut PrefixCache, job: Job) -> Option<Running> {
    if job.events.is_closed() {
        return None;
    }
    let text_only = text_only(&job.messages);
    let started = guarded(|| {
        let (ids, embeds) = model.prepare(&job.messages)?;
        let prefix = if text_only && !job.cold {
            prefixes.lookup(&ids)
        } else {
            None
        };
        let seq = Sequence::pending(
            model.lm(),
            model.tokenizer(),
            &embeds,
            &ids,
            &job.opts,
            job.guide,
            prefix,
        )?;
        Ok((seq, text_only.then_some(ids)))
    });
    match started {
        Ok((seq, prefix_key)) => Some(Running {
            seq,
            events: job.events,
            stream: job.stream,
            prefix_key,
        }),
        Err(e) => {
            let _ = job.events.send(Event::Error(crate::error_line(&e)));
            None
        }
    }
}

/// One model pass for every running job ([`step`]), each job's output or error. When the
/// pass fails and rolled every cache back, each job runs the step alone, so only the job
/// whose input fails (an f16 cache's out-of-range value, a cache that does not fit the
/// model) gets an error; a panic (the caches may be half-written) or a failure after the
/// pass (some jobs already took their token) fails them all.
fn run_step(model: &Model, running: &mut [Running]) -> Vec<Result<StepOutput>> {
    let before: Vec<(usize, usize)> = running
        .iter()
        .map(|r| (r.seq.cache().seq_len(), r.seq.ids().len()))
        .collect();
    let mut seqs: Vec<&mut Sequence> = running.iter_mut().map(|r| &mut r.seq).collect();
    match guarded(|| Ok(step(model.lm(), model.tokenizer(), &mut seqs)?)) {
        Ok(outs) => outs.into_iter().map(Ok).collect(),
        Err(e)
            if running.len() == 1
                || e.is::<Panicked>()
                || running
                    .iter()
                    .zip(&before)
                    .any(|(r, b)| (r.seq.cache().seq_len(), r.seq.ids().len()) != *b) =>
        {
            let msg = crate::error_line(&e);
            running
                .iter()
                .map(|_| Err(anyhow::anyhow!("{msg}")))
                .collect()
        }
        Err(_) => running
            .iter_mut()
            .map(|r| {
                guarded(|| Ok(step(model.lm(), model.tokenizer(), &mut [&mut r.seq])?))
                    .map(|mut o| o.remove(0))
            })
            .collect(),
    }
}

/// The model thread's loop (module docs); returns when the job channel closes and every
/// running job has finished.
pub fn run(model: &Model, jobs: Receiver<Job>, max_batch: usize, mut prefixes: PrefixCache) {
    let mut running: Vec<Running> = Vec::new();
    let mut open = true;
    loop {
        if running.is_empty() {
            if !open {
                return;
            }
            match jobs.recv() {
                Ok(j) => running.extend(admit(model, &mut prefixes, j)),
                Err(_) => return,
            }
        }
        // every job waiting now joins this step (its prompt runs beside the others' decode)
        while open && running.len() < max_batch {
            match jobs.try_recv() {
                Ok(j) => running.extend(admit(model, &mut prefixes, j)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        running.retain(|r| !r.events.is_closed());
        if running.is_empty() {
            continue;
        }
        let outs = run_step(model, &mut running);
        let mut keep = Vec::with_capacity(running.len());
        for (mut r, out) in running.drain(..).zip(outs) {
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    let _ = r.events.send(Event::Error(crate::error_line(&e)));
                    continue;
                }
            };
            if let Some(ids) = r.prefix_key.take() {
                // the cache holds the prompt and the first token's K/V is not in it yet:
                // exactly the prompt's positions
                prefixes.insert(&ids, r.seq.cache());
            }
            if r.deliver(out) {
                keep.push(r);
            }
        }
        running = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use afm::lm::Cache;

    /// A cache of `n` positions of a tiny random model (2 layers, K/V width 32: 512 bytes
    /// per position).
    fn cache(n: usize) -> Cache {
        use afm::lm::{LmConfig, LogitsFor};
        let c = LmConfig {
            vocab_size: 128,
            hidden_size: 32,
            intermediate_size: 64,
            num_attention_heads: 2,
            ..afm::lm::testing::tiny_llama()
        };
        let m = DeviceModel::from_source(
            &afm::lm::weights::WeightSource::from_tensors(
                afm::lm::random::random_tensors(&c, 1).unwrap(),
            ),
            c,
        )
        .unwrap();
        let mut cache = m.new_cache();
        let ids: Vec<u32> = (0..n as u32).collect();
        m.forward_tokens(&ids, &mut cache, &LogitsFor::Last)
            .unwrap();
        assert_eq!(cache.used_bytes(), 512 * n);
        cache
    }

    #[test]
    fn the_longest_stored_prefix_is_reused_and_the_oldest_entries_go_first() {
        let mut pc = PrefixCache::new(512 * 30);
        let a: Vec<u32> = (0..12).collect();
        let mut b = a.clone();
        b[10] = 99;
        assert!(pc.lookup(&a).is_none(), "empty");
        pc.insert(&a, &cache(12));
        // b shares 10 positions with a
        assert_eq!(pc.lookup(&b).map(|c| c.seq_len()), Some(10));
        // a itself: all but its last position, which must run
        assert_eq!(pc.lookup(&a).map(|c| c.seq_len()), Some(11));
        assert_eq!(pc.reused, 21);
        // shorter than the minimum: not worth it
        let mut c = a.clone();
        c[3] = 77;
        assert!(pc.lookup(&c).is_none());
        // a cache that does not hold exactly the prompt's positions is not kept
        pc.insert(&c, &cache(5));
        assert!(pc.lookup(&c).is_none());
        // 30 positions fit: a (12) + b (12), then a third of 12 evicts the least recently used
        pc.insert(&b, &cache(12));
        assert_eq!(pc.lookup(&a).map(|c| c.seq_len()), Some(11)); // a is now the most recent
        let d: Vec<u32> = (100..112).collect();
        pc.insert(&d, &cache(12));
        assert_eq!(
            pc.lookup(&a).map(|c| c.seq_len()),
            Some(11),
            "a was used last: kept"
        );
        let mut b2 = b.clone();
        b2.push(5);
        assert_eq!(
            pc.lookup(&b2).map(|c| c.seq_len()),
            Some(10),
            "b was evicted: only a's 10 shared positions remain"
        );
        // size 0 keeps nothing
        let mut off = PrefixCache::new(0);
        off.insert(&a, &cache(12));
        assert!(off.lookup(&a).is_none());
    }

    /// A job whose step fails (here: a prefix cache made for another model, one layer of
    /// width 8) gets the error alone; the jobs beside it take the tokens they take alone.
    #[test]
    fn a_failing_job_fails_alone_and_the_others_go_on() {
        let Some(gguf) = afm::lm::testing::smollm2_gguf_or_skip() else {
            return;
        };
        let model =
            Model::Text(afm::lm::Checkpoint::load_with(&gguf, &Default::default()).unwrap());
        let opts = GenerateOptions {
            max_new_tokens: 4,
            ..Default::default()
        };
        let job = |text: &str, prefix: Option<Cache>| {
            let msg = MessageIn {
                role: "user".into(),
                parts: vec![PartIn::Text(text.into())],
            };
            let (ids, embeds) = model.prepare(&[msg]).unwrap();
            let seq = Sequence::pending(
                model.lm(),
                model.tokenizer(),
                &embeds,
                &ids,
                &opts,
                None,
                prefix,
            )
            .unwrap();
            let (events, rx) = tokio::sync::mpsc::unbounded_channel();
            let r = Running {
                seq,
                events,
                stream: true,
                prefix_key: None,
            };
            (r, rx)
        };
        let questions = ["Name a colour.", "Name an animal."];
        let mut alone = Vec::new();
        for q in questions {
            let (r, _rx) = job(q, None);
            let mut rs = vec![r];
            let mut text = String::new();
            for _ in 0..3 {
                text.push_str(&run_step(&model, &mut rs).remove(0).unwrap().text);
            }
            alone.push(text);
        }
        let (a, _ra) = job(questions[0], None);
        let (bad, _rb) = job("Name a fruit.", Some(Cache::new(&[Some(8)], 100)));
        let (c, _rc) = job(questions[1], None);
        let mut rs = vec![a, bad, c];
        let outs = run_step(&model, &mut rs);
        let e = outs[1].as_ref().map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("another model"), "{e}");
        let mut texts: Vec<String> = outs
            .into_iter()
            .filter_map(|o| o.ok().map(|o| o.text))
            .collect();
        assert_eq!(texts.len(), 2);
        rs.remove(1);
        for _ in 0..2 {
            for (t, o) in texts.iter_mut().zip(run_step(&model, &mut rs)) {
                t.push_str(&o.unwrap().text);
            }
        }
        assert_eq!(texts, alone);
        assert!(!texts[0].is_empty());
    }

    /// A panic in the model code is an error of its own kind (a failed step is then not
    /// run again job by job: the caches may be half-written).
    #[test]
    fn a_panic_becomes_an_error_that_names_it() {
        let e = guarded::<()>(|| panic!("boom")).unwrap_err();
        assert!(e.is::<Panicked>(), "{e}");
        assert_eq!(e.to_string(), "internal error (panic: boom)");
        let e = guarded::<()>(|| bail!("plain")).unwrap_err();
        assert!(!e.is::<Panicked>());
    }

    #[test]
    fn only_prompts_without_images_use_the_prefix_cache() {
        let text = MessageIn {
            role: "user".into(),
            parts: vec![PartIn::Text("hi".into())],
        };
        assert!(text_only(std::slice::from_ref(&text)));
        let img = MessageIn {
            role: "user".into(),
            parts: vec![
                PartIn::Text("what is this?".into()),
                PartIn::Image(afm::vision::image::RgbImage::new(2, 2)),
            ],
        };
        assert!(!text_only(&[text, img]));
    }
}
