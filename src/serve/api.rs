//! The OpenAI chat-completions wire format of `afm serve`: request parsing with clear
//! errors, image parts (`data:` URLs; local files only under `--allow-files DIR`), and the
//! response and stream-chunk bodies.

use super::engine::{MessageIn, PartIn};
use afm::lm::{GenerateOptions, SamplingParams, StopReason};
use afm::vision::ImageLimits;
use base64::Engine as _;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A request error: the HTTP status and the message the client sees.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            param: Some(param.into()),
        }
    }

    pub fn status(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }

    /// OpenAI's error body.
    pub fn body(&self) -> Value {
        let kind = match self.status {
            429 => "rate_limit_exceeded",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": null}})
    }
}

/// The server's limits and options that requests are checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_tokens: usize,
    pub default_max_tokens: usize,
    pub max_image_pixels: u64,
    pub max_images: usize,
    pub allow_files: Option<PathBuf>,
}

/// A parsed request, images not decoded yet.
pub struct Request {
    pub stream: bool,
    pub include_usage: bool,
    pub messages: Vec<(String, Vec<RawPart>)>,
    pub opts: GenerateOptions,
    /// `response_format`: the JSON Schema the answer must follow (guided generation).
    pub schema: Option<Value>,
    /// The request named a `seed`: it is prefilled cold, never from the prefix cache, so
    /// the same request with the same seed gives the same text.
    pub seeded: bool,
}

pub enum RawPart {
    Text(String),
    Image(String),
}

fn num(v: &Value, key: &str) -> Result<Option<f64>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::bad(key, format!("`{key}` must be a number"))),
    }
}

fn uint(v: &Value, key: &str) -> Result<Option<u64>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(key, format!("`{key}` must be a non-negative integer"))),
    }
}

/// Parses and checks a chat-completions body (no image decoding).
pub fn parse(body: &[u8], limits: &Limits) -> Result<Request, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("body", "the body must be a JSON object"));
    }
    let msgs = v
        .get("messages")
        .and_then(|m| m.as_array())
        .ok_or_else(|| ApiError::bad("messages", "`messages` must be a list of messages"))?;
    if msgs.is_empty() {
        return Err(ApiError::bad("messages", "`messages` is empty"));
    }
    let mut messages = Vec::new();
    let mut images = 0;
    for (i, m) in msgs.iter().enumerate() {
        let p = format!("messages[{i}]");
        let role = m
            .get("role")
            .and_then(|r| r.as_str())
            .ok_or_else(|| ApiError::bad(&p, format!("{p} has no `role`")))?;
        if !["system", "user", "assistant", "developer"].contains(&role) {
            return Err(ApiError::bad(
                &p,
                format!("{p}: role `{role}` is not one of system, developer, user, assistant"),
            ));
        }
        let role = if role == "developer" { "system" } else { role };
        let parts = match m.get("content") {
            Some(Value::String(s)) => vec![RawPart::Text(s.clone())],
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(j, part)| {
                    let pp = format!("{p}.content[{j}]");
                    match part.get("type").and_then(|t| t.as_str()) {
                        Some("text") => part
                            .get("text")
                            .and_then(|t| t.as_str())
                            .map(|t| RawPart::Text(t.to_string()))
                            .ok_or_else(|| ApiError::bad(&pp, format!("{pp}: `text` missing"))),
                        Some("image_url") => {
                            let u = part.get("image_url");
                            let url = u
                                .and_then(|u| u.get("url"))
                                .or(u)
                                .and_then(|u| u.as_str())
                                .ok_or_else(|| {
                                    ApiError::bad(&pp, format!("{pp}: `image_url.url` missing"))
                                })?;
                            images += 1;
                            Ok(RawPart::Image(url.to_string()))
                        }
                        other => Err(ApiError::bad(
                            &pp,
                            format!("{pp}: part type {other:?} is not supported (text, image_url)"),
                        )),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(Value::Null) | None if role == "assistant" => vec![],
            _ => {
                return Err(ApiError::bad(
                    &p,
                    format!("{p}: `content` must be a string or a list of parts"),
                ))
            }
        };
        messages.push((role.to_string(), parts));
    }
    if images > limits.max_images {
        return Err(ApiError::bad(
            "messages",
            format!(
                "{images} images in one request; the limit is {}",
                limits.max_images
            ),
        ));
    }
    if let Some(n) = uint(&v, "n")? {
        if n != 1 {
            return Err(ApiError::bad("n", "only n = 1 is supported"));
        }
    }
    let schema = match v.get("response_format").filter(|r| !r.is_null()) {
        None => None,
        Some(rf) => match rf.get("type").and_then(|t| t.as_str()) {
            Some("text") => None,
            Some("json_object") => Some(serde_json::json!({"type": "object"})),
            Some("json_schema") => Some(
                rf.pointer("/json_schema/schema")
                    .filter(|s| s.is_object())
                    .cloned()
                    .ok_or_else(|| {
                        ApiError::bad(
                            "response_format",
                            "response_format json_schema needs `json_schema.schema`, a JSON Schema object",
                        )
                    })?,
            ),
            t => {
                return Err(ApiError::bad(
                    "response_format",
                    format!(
                        "response_format {t:?} is not supported; use \"text\", \"json_object\" or \"json_schema\""
                    ),
                ))
            }
        },
    };
    for k in ["tools", "functions", "logprobs"] {
        if v.get(k)
            .is_some_and(|x| !x.is_null() && x != &Value::Bool(false))
        {
            return Err(ApiError::bad(k, format!("`{k}` is not supported")));
        }
    }
    let max_tokens = uint(&v, "max_completion_tokens")?
        .or(uint(&v, "max_tokens")?)
        .map(|n| n as usize)
        .unwrap_or(limits.default_max_tokens.min(limits.max_tokens));
    if max_tokens == 0 || max_tokens > limits.max_tokens {
        return Err(ApiError::bad(
            "max_tokens",
            format!(
                "max_tokens {max_tokens} is outside 1..={} (the server's --max-tokens)",
                limits.max_tokens
            ),
        ));
    }
    let temperature = num(&v, "temperature")?.unwrap_or(1.0) as f32;
    let top_p = num(&v, "top_p")?.unwrap_or(1.0) as f32;
    let min_p = num(&v, "min_p")?.unwrap_or(0.0) as f32;
    let top_k = uint(&v, "top_k")?.unwrap_or(0) as usize;
    let repetition_penalty = num(&v, "repetition_penalty")?.unwrap_or(1.0) as f32;
    let seeded = v.get("seed").is_some_and(|s| !s.is_null());
    let seed = uint(&v, "seed")?.unwrap_or(0);
    for k in ["frequency_penalty", "presence_penalty"] {
        if num(&v, k)?.is_some_and(|x| x != 0.0) {
            return Err(ApiError::bad(
                k,
                format!("`{k}` is not supported; use `repetition_penalty`"),
            ));
        }
    }
    let stop_strings = match v.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|s| s.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad("stop", "`stop` must be a string or up to 4 strings"))?,
        _ => {
            return Err(ApiError::bad(
                "stop",
                "`stop` must be a string or up to 4 strings",
            ))
        }
    };
    let sampling = SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        repetition_penalty,
        repeat_last_n: 64,
        seed,
    };
    sampling
        .validate()
        .map_err(|e| ApiError::bad("temperature", format!("sampling options: {e}")))?;
    let stream = v.get("stream").and_then(|s| s.as_bool()).unwrap_or(false);
    let include_usage = v
        .pointer("/stream_options/include_usage")
        .and_then(|s| s.as_bool())
        .unwrap_or(false);
    Ok(Request {
        stream,
        include_usage,
        messages,
        opts: GenerateOptions {
            max_new_tokens: max_tokens,
            sampling,
            stop_strings,
            ..Default::default()
        },
        schema,
        seeded,
    })
}

/// Reads an image part: a `data:` URL, or a local path / `file://` URL inside
/// `--allow-files`; decoded under the pixel limit.
pub fn decode_image(url: &str, limits: &Limits) -> Result<afm::vision::image::RgbImage, ApiError> {
    let il = ImageLimits {
        max_pixels: limits.max_image_pixels,
        ..ImageLimits::default()
    };
    let pixels_err = |e: afm::vision::VisionError| {
        let msg = e.to_string();
        let status = if msg.contains("pixels") { 413 } else { 400 };
        ApiError {
            status,
            message: format!("image: {msg}"),
            param: Some("image_url".into()),
        }
    };
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| ApiError::bad("image_url", "a data: URL without a comma"))?;
        if !meta.ends_with(";base64") {
            return Err(ApiError::bad(
                "image_url",
                "data: URLs must be base64 (`;base64,`)",
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| {
                ApiError::bad(
                    "image_url",
                    format!("the data: URL is not valid base64: {e}"),
                )
            })?;
        return afm::vision::decode_image(&bytes, "data: URL", &il).map_err(pixels_err);
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(ApiError::bad(
            "image_url",
            "remote image URLs are not fetched; send the image as a data: URL",
        ));
    }
    let Some(root) = &limits.allow_files else {
        return Err(ApiError::bad(
            "image_url",
            "local image paths are refused (start the server with --allow-files DIR to allow \
             files under DIR); send a data: URL",
        ));
    };
    let path = Path::new(url.strip_prefix("file://").unwrap_or(url));
    let path = if path.is_relative() {
        root.join(path)
    } else {
        path.to_path_buf()
    };
    let real = std::fs::canonicalize(&path)
        .map_err(|e| ApiError::bad("image_url", format!("{}: {e}", path.display())))?;
    if !real.starts_with(root) {
        return Err(ApiError::status(
            403,
            format!("{} is outside the --allow-files directory", path.display()),
        ));
    }
    afm::vision::load_image(&real, &il).map_err(pixels_err)
}

/// Decodes every image of a parsed request.
pub fn messages_in(
    req: &[(String, Vec<RawPart>)],
    limits: &Limits,
) -> Result<Vec<MessageIn>, ApiError> {
    req.iter()
        .map(|(role, parts)| {
            Ok(MessageIn {
                role: role.clone(),
                parts: parts
                    .iter()
                    .map(|p| {
                        Ok(match p {
                            RawPart::Text(t) => PartIn::Text(t.clone()),
                            RawPart::Image(u) => PartIn::Image(decode_image(u, limits)?),
                        })
                    })
                    .collect::<Result<_, ApiError>>()?,
            })
        })
        .collect()
}

pub fn finish_reason(s: StopReason) -> &'static str {
    match s {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        _ => "stop",
    }
}

/// OpenAI's `usage`, with `prompt_tokens_details.cached_tokens`: the prompt positions that
/// came from the prefix cache (`--prefix-cache`).
pub fn usage(prompt: usize, cached: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

/// A non-streaming response body.
pub fn completion(
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    stop: StopReason,
    usage_v: Value,
) -> Value {
    json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason(stop), "logprobs": null}],
        "usage": usage_v,
    })
}

/// A stream chunk: a delta (`role` on the first, `content`), or the finish reason.
pub fn chunk(id: &str, created: u64, model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
    })
}
