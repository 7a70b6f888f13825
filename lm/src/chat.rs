//! Chat prompts rendered with the checkpoint's own Jinja chat template (as transformers and
//! llama.cpp do), through minijinja with Python-compatible string methods.

use crate::error::{LmError, Result};
use crate::tokenizer::Tokenizer;
use serde::Serialize;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(c: impl Into<String>) -> Self {
        Self::new("system", c)
    }
    pub fn user(c: impl Into<String>) -> Self {
        Self::new("user", c)
    }
    pub fn assistant(c: impl Into<String>) -> Self {
        Self::new("assistant", c)
    }
}

/// Renders `messages` with `template` and `add_generation_prompt = true`.
pub fn render<T: Serialize>(
    template: &str,
    messages: &[T],
    bos: &str,
    eos: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.render_str(
        template,
        minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => bos,
            eos_token => eos,
        },
    )
    .map_err(|e| LmError::Template(format!("{e:#}")))
}

/// Renders a chat with the tokenizer's template.
pub fn render_chat(tok: &Tokenizer, messages: &[Message]) -> Result<String> {
    let t = tok.chat_template().ok_or_else(|| {
        LmError::Template(
            "the checkpoint defines no chat template; pass a raw prompt instead".into(),
        )
    })?;
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    render(
        t,
        messages,
        &name(tok.bos_id()),
        &name(tok.eos_ids().first().copied()),
    )
}

/// Token ids that end an assistant turn under a template: the template's end-of-turn marker
/// (`<|im_end|>`, `<turn_end>`, `<|eot_id|>`, `<end_of_turn>`) when the vocabulary has it.
pub fn end_of_turn_ids(tok: &Tokenizer) -> Vec<u32> {
    [
        "<|im_end|>",
        "<turn_end>",
        "<|eot_id|>",
        "<end_of_turn>",
        "<|end|>",
    ]
    .iter()
    .filter(|m| tok.chat_template().is_some_and(|t| t.contains(**m)))
    .filter_map(|m| tok.token_to_id(m))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_template_renders_like_jinja2() {
        let t = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nDefault<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let s = render(t, &[Message::user("Hi")], "", "").unwrap();
        assert_eq!(s, "<|im_start|>system\nDefault<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = "{{ messages[0]['content'].strip() }}{% if messages|length > 1 %}{{ raise_exception('too many') }}{% endif %}";
        assert_eq!(render(t, &[Message::user("  x  ")], "", "").unwrap(), "x");
        let e = render(t, &[Message::user("a"), Message::user("b")], "", "").unwrap_err();
        assert!(e.to_string().contains("too many"), "{e}");
    }
}
