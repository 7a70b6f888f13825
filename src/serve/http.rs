//! The HTTP side of `afm serve` (axum on tokio): routes, limits, SSE streams, the web page.
//!
//! * `POST /v1/chat/completions`: OpenAI chat completions, streaming (SSE) or not.
//! * `GET /v1/models`, `GET /health`, `GET /` (the web page, `page.html`).
//!
//! Limits give clear 4xx answers: body size (413), image pixels (413), max tokens (400),
//! concurrent requests (429: running plus queued requests at most `--max-concurrent`).

use super::api::{self, ApiError, Limits};
use super::engine::{Event, Job};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

const PAGE: &str = include_str!("page.html");

pub struct AppState {
    pub model_name: String,
    pub has_vision: bool,
    pub limits: Limits,
    pub max_concurrent: usize,
    pub jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    /// Compiles `response_format` schemas (a bad one is a 400 before the job is queued).
    pub guides: Option<afm::lm::guided::GuideFactory>,
    in_flight: AtomicUsize,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(
        model_name: String,
        has_vision: bool,
        limits: Limits,
        max_concurrent: usize,
        jobs: std::sync::mpsc::Sender<Job>,
    ) -> Self {
        Self {
            model_name,
            has_vision,
            limits,
            max_concurrent,
            jobs: Mutex::new(Some(jobs)),
            guides: None,
            in_flight: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        }
    }
}

/// One admitted request; frees its slot when dropped (the response or stream has ended).
struct Slot(Arc<AppState>);

impl Slot {
    fn take(s: &Arc<AppState>) -> Result<Self, ApiError> {
        let n = s.in_flight.fetch_add(1, Ordering::SeqCst);
        if n >= s.max_concurrent {
            s.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::status(
                429,
                format!(
                    "the server is busy: {} requests in flight (--max-concurrent); retry later",
                    s.max_concurrent
                ),
            ));
        }
        Ok(Slot(s.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(self.body())).into_response()
    }
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .fallback(|| async {
            ApiError::status(
                404,
                "no such route (POST /v1/chat/completions, GET /v1/models, GET /health, GET /)",
            )
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn health(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": s.model_name,
        "in_flight": s.in_flight.load(Ordering::SeqCst),
    }))
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": s.model_name, "object": "model", "created": 0, "owned_by": "afm",
        "vision": s.has_vision,
    }]}))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn chat(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status().as_u16();
        if status == 413 {
            ApiError::status(
                413,
                "the request body is over the server's --max-body-bytes limit",
            )
        } else {
            ApiError::status(status, format!("reading the body: {e}"))
        }
    })?;
    let req = api::parse(&body, &s.limits)?;
    let has_images = req
        .messages
        .iter()
        .flat_map(|(_, p)| p)
        .any(|p| matches!(p, api::RawPart::Image(_)));
    if has_images && !s.has_vision {
        return Err(ApiError::bad(
            "messages",
            format!(
                "the model {} has no vision encoder; send text only",
                s.model_name
            ),
        ));
    }
    let guide = match &req.schema {
        None => None,
        Some(schema) => {
            let g = s.guides.as_ref().ok_or_else(|| {
                ApiError::bad(
                    "response_format",
                    "this model's tokenizer does not support guided generation",
                )
            })?;
            Some(
                g.json_schema(schema)
                    .map_err(|e| ApiError::bad("response_format", e.to_string()))?,
            )
        }
    };
    let slot = Slot::take(&s)?;
    let limits = s.limits.clone();
    let raw = req.messages;
    let messages = tokio::task::spawn_blocking(move || api::messages_in(&raw, &limits))
        .await
        .map_err(|e| ApiError::status(500, format!("decoding images: {e}")))??;
    let (tx, rx) = unbounded_channel();
    let job = Job {
        messages,
        opts: req.opts,
        guide,
        events: tx,
        cold: req.seeded,
        stream: req.stream,
    };
    {
        let jobs = s.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let sent = jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        if !sent {
            return Err(ApiError::status(503, "the server is shutting down"));
        }
    }
    let id = format!("chatcmpl-{}", s.next_id.fetch_add(1, Ordering::SeqCst));
    let created = now();
    if req.stream {
        Ok(stream(
            s.model_name.clone(),
            id,
            created,
            req.include_usage,
            rx,
            slot,
        )
        .into_response())
    } else {
        collect(&s.model_name, &id, created, rx, slot).await
    }
}

async fn collect(
    model: &str,
    id: &str,
    created: u64,
    mut rx: UnboundedReceiver<Event>,
    _slot: Slot,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                stop,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            } => {
                let body = api::completion(
                    id,
                    created,
                    model,
                    &text,
                    stop,
                    api::usage(prompt_tokens, cached_tokens, completion_tokens),
                );
                return Ok(Json(body).into_response());
            }
            Event::Error(e) => return Err(request_failed(e)),
        }
    }
    Err(ApiError::status(
        503,
        "the server stopped before the answer was complete",
    ))
}

/// A failure inside the model: the request's own fault (too long a prompt, a bad image)
/// is a 400, anything else a 500.
fn request_failed(e: String) -> ApiError {
    let client = ["context", "too long", "image", "placeholder", "token id"]
        .iter()
        .any(|k| e.contains(k));
    ApiError::status(if client { 400 } else { 500 }, e)
}

struct StreamState {
    model: String,
    id: String,
    created: u64,
    include_usage: bool,
    rx: UnboundedReceiver<Event>,
    started: bool,
    finished: bool,
    _slot: Slot,
}

/// The SSE stream: a role chunk, content chunks, the finish chunk (and usage when asked),
/// then `[DONE]`. An error mid-stream is sent as an `error` object.
fn stream(
    model: String,
    id: String,
    created: u64,
    include_usage: bool,
    rx: UnboundedReceiver<Event>,
    slot: Slot,
) -> impl IntoResponse {
    let st = StreamState {
        model,
        id,
        created,
        include_usage,
        rx,
        started: false,
        finished: false,
        _slot: slot,
    };
    let events = futures_util::stream::unfold(st, |mut st| async move {
        if st.finished {
            return None;
        }
        let data = |v: Value| SseEvent::default().data(v.to_string());
        if !st.started {
            st.started = true;
            let c = api::chunk(
                &st.id,
                st.created,
                &st.model,
                json!({"role": "assistant", "content": ""}),
                None,
            );
            return Some((vec![data(c)], st));
        }
        let out = match st.rx.recv().await {
            Some(Event::Text(t)) => vec![data(api::chunk(
                &st.id,
                st.created,
                &st.model,
                json!({"content": t}),
                None,
            ))],
            Some(Event::Done {
                stop,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            }) => {
                st.finished = true;
                let mut v = vec![data(api::chunk(
                    &st.id,
                    st.created,
                    &st.model,
                    json!({}),
                    Some(api::finish_reason(stop)),
                ))];
                if st.include_usage {
                    let mut u = api::chunk(&st.id, st.created, &st.model, json!({}), None);
                    u["choices"] = json!([]);
                    u["usage"] = api::usage(prompt_tokens, cached_tokens, completion_tokens);
                    v.push(data(u));
                }
                v.push(SseEvent::default().data("[DONE]"));
                v
            }
            Some(Event::Error(e)) => {
                st.finished = true;
                vec![data(request_failed(e).body())]
            }
            None => {
                st.finished = true;
                vec![data(
                    ApiError::status(503, "the server stopped before the answer was complete")
                        .body(),
                )]
            }
        };
        Some((out, st))
    });
    use futures_util::StreamExt;
    let flat =
        events.flat_map(|v| futures_util::stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    ([(header::CACHE_CONTROL, "no-cache")], Sse::new(flat))
}
