//! Sessions on a tiny random-weight model: KV reuse across turns gives what a from-scratch run
//! of the whole conversation gives, transcripts round-trip, token counts and overflow,
//! prewarm, guided generation errors before decoding, and the tool loop.

mod common;

use afm_lm::{GenerationOptions, LmError, Session, Tool, ToolChoice, Transcript};
use common::tiny;

fn opts(max_tokens: usize) -> GenerationOptions {
    GenerationOptions {
        max_tokens,
        ..Default::default()
    }
}

#[test]
fn follow_up_turn_reuses_the_cache_and_equals_a_fresh_run() {
    let m = tiny(512, 1);
    let mut s = Session::with_instructions(&m, "You are terse.");
    s.options = opts(12);
    let r1 = s.respond("What is a cat?").unwrap();
    assert_eq!(r1.stats.reused_tokens, 0);
    let r2 = s.respond("And a dog?").unwrap();
    // the first turn's prompt and most of its answer are served from the cache
    assert!(
        r2.stats.reused_tokens >= r1.stats.prompt_tokens,
        "{:?} vs {:?}",
        r2.stats,
        r1.stats
    );
    assert!(r2.stats.prefilled_tokens < r2.stats.prompt_tokens / 2);
    // the same conversation from scratch, in a new session, answers the same
    let mut t = s.transcript().clone();
    let last = t.entries.pop().unwrap();
    let question = t.entries.pop().unwrap();
    let mut fresh = Session::from_transcript(&m, t);
    fresh.options = opts(12);
    let afm_lm::Entry::Prompt { segments } = question else {
        panic!("{question:?}")
    };
    let r3 = fresh
        .respond(afm_lm::Prompt { segments })
        .expect("fresh run");
    assert_eq!(r3.stats.reused_tokens, 0);
    assert_eq!(r3.stats.prompt_tokens, r2.stats.prompt_tokens);
    assert_eq!(afm_lm::Entry::Response { text: r3.text }, last);
}

#[test]
fn transcript_round_trips_through_serde() {
    let m = tiny(512, 2);
    let mut s = Session::with_instructions(&m, "Be brief.");
    s.options = opts(6);
    s.respond("Hello").unwrap();
    s.respond("Again").unwrap();
    let json = serde_json::to_string_pretty(s.transcript()).unwrap();
    let back: Transcript = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, s.transcript());
    assert_eq!(back.entries.len(), 5);
    // a restored session goes on: it prefills everything once, then reuses
    let mut r = Session::from_transcript(&m, back);
    r.options = opts(4);
    let a = r.respond("Once more").unwrap();
    assert_eq!(a.stats.reused_tokens, 0);
    let b = r.respond("And again").unwrap();
    assert!(b.stats.reused_tokens > a.stats.prompt_tokens - 1);
}

#[test]
fn count_tokens_and_overflow_is_a_typed_error() {
    let m = tiny(64, 3);
    let s = Session::new(&m);
    let n = s.count_tokens("hi").unwrap();
    assert!(n > 2 && n < 20, "{n}");
    let long = "word ".repeat(100);
    match s.count_tokens(long.as_str()) {
        Err(LmError::PromptTooLong {
            tokens, context, ..
        }) => {
            assert!(tokens > 64);
            assert_eq!(context, 64);
        }
        other => panic!("{other:?}"),
    }
    let mut s = Session::new(&m);
    assert!(matches!(
        s.respond(long.as_str()),
        Err(LmError::PromptTooLong { .. })
    ));
    // the failed turn left no trace
    assert!(s.transcript().entries.is_empty());
    s.options = opts(4);
    s.respond("hi").unwrap();
}

#[test]
fn prewarm_caches_the_prefix_the_next_turn_reuses() {
    let m = tiny(512, 4);
    let mut s = Session::with_instructions(&m, "You answer questions about animals.");
    s.options = opts(4);
    let n = s.prewarm(Some("Question: ")).unwrap();
    assert!(n > 5);
    let r = s.respond("Question: what is a cat?").unwrap();
    assert!(r.stats.reused_tokens >= n - 2, "{n} {:?}", r.stats);
}

#[test]
fn bad_schemas_are_errors_before_decoding() {
    let m = tiny(512, 5);
    let mut s = Session::new(&m);
    for (schema, want) in [
        (
            serde_json::json!({"type": "integer", "minimum": 5, "maximum": 2}),
            "",
        ),
        (
            serde_json::json!({"type": "string", "format": "no-such-format"}),
            "format",
        ),
        (
            serde_json::json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}),
            "",
        ),
        (serde_json::json!(42), "object"),
    ] {
        match s.respond_to_schema("x", &schema) {
            Err(LmError::Schema(msg)) => assert!(msg.contains(want), "{msg}"),
            other => panic!("{schema}: {other:?}"),
        }
    }
    assert!(s.transcript().entries.is_empty());
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct AddArgs {
    #[schemars(range(min = 0, max = 99))]
    a: u32,
    #[schemars(range(min = 0, max = 99))]
    b: u32,
}

struct Add;
impl Tool for Add {
    type Arguments = AddArgs;
    fn name(&self) -> &str {
        "add"
    }
    fn description(&self) -> &str {
        "Adds two numbers."
    }
    fn call(&self, a: AddArgs) -> Result<String, String> {
        if a.a == 13 {
            return Err("13 is unlucky".into());
        }
        Ok((a.a + a.b).to_string())
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct NoArgs {}

struct Clock;
impl Tool for Clock {
    type Arguments = NoArgs;
    fn name(&self) -> &str {
        "clock"
    }
    fn description(&self) -> &str {
        "The time."
    }
    fn call(&self, _: NoArgs) -> Result<String, String> {
        Ok("12:00".into())
    }
}

#[test]
fn tool_loop_calls_declared_tools_and_continues() {
    let m = tiny(2048, 6);
    let mut calls_seen = 0;
    for seed in 0..8 {
        let mut s = Session::new(&m).with_tool(Add).with_tool(Clock);
        s.tool_choice = ToolChoice::Required;
        s.max_tool_calls = 3;
        s.options = GenerationOptions {
            max_tokens: 96,
            temperature: 1.0,
            seed,
            ..Default::default()
        };
        let r = s.respond("What is 2 + 3?").unwrap();
        assert!((1..=3).contains(&r.stats.tool_calls), "{:?}", r.stats);
        calls_seen += r.stats.tool_calls;
        let e = &s.transcript().entries;
        // prompt, then (call, output) pairs, then the answer
        assert!(matches!(e[0], afm_lm::Entry::Prompt { .. }));
        assert_eq!(e.len(), 2 + 2 * r.stats.tool_calls);
        for pair in e[1..e.len() - 1].chunks(2) {
            let (
                afm_lm::Entry::ToolCall { name, arguments },
                afm_lm::Entry::ToolOutput {
                    output, is_error, ..
                },
            ) = (&pair[0], &pair[1])
            else {
                panic!("{pair:?}")
            };
            match name.as_str() {
                "add" => {
                    let (a, b) = (
                        arguments["a"].as_u64().unwrap(),
                        arguments["b"].as_u64().unwrap(),
                    );
                    if a == 13 {
                        assert!(is_error);
                    } else {
                        assert_eq!(output, &(a + b).to_string());
                    }
                }
                "clock" => assert_eq!(output, "12:00"),
                other => panic!("undeclared tool {other}"),
            }
        }
        let afm_lm::Entry::Response { text } = e.last().unwrap() else {
            panic!()
        };
        assert!(!text.starts_with('{'), "{text}");
    }
    assert!(calls_seen >= 8);
}

/// SmolLM2-135M: the second turn's time to first token with the first turn's K/V reused
/// against a fresh session prefilling the whole conversation; both answer the same (greedy).
#[test]
fn smollm2_turn_two_reuses_the_cache() {
    let Some(p) = afm_lm::testing::smollm2_gguf_or_skip() else {
        return;
    };
    let m = afm_lm::Checkpoint::load(&p).unwrap();
    let long = "Here are my notes on the history of bread: ".to_string()
        + &"Bread was first made thousands of years ago from wild grains. ".repeat(12);
    let mut s = Session::with_instructions(&m, "You are a helpful assistant.");
    s.options = opts(24);
    s.respond(long.as_str()).unwrap();
    let q2 = "Summarise that in five words.";
    let (mut reuse, mut fresh) = (Vec::new(), Vec::new());
    let base = s.transcript().clone();
    let mut answers = Vec::new();
    for _ in 0..3 {
        // with reuse: the session's cache holds turn 1
        s.set_transcript(base.clone());
        let r = s.respond(q2).unwrap();
        reuse.push(r.stats.time_to_first_token_secs);
        assert!(
            r.stats.reused_tokens + 8 >= base_tokens(&m, &base),
            "{:?}",
            r.stats
        );
        // without: a new session prefills everything
        let mut f = Session::from_transcript(&m, base.clone());
        f.options = opts(24);
        let rf = f.respond(q2).unwrap();
        assert_eq!(rf.stats.reused_tokens, 0);
        fresh.push(rf.stats.time_to_first_token_secs);
        answers.push((r.text, rf.text));
    }
    for (a, b) in &answers {
        assert_eq!(a, b);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (r, f) = (med(reuse), med(fresh));
    eprintln!(
        "SmolLM2 turn 2 ({} prompt tokens): time to first token {:.1} ms with K/V reuse, {:.1} ms without ({:.1}x)",
        base_tokens(&m, &base),
        r * 1e3,
        f * 1e3,
        f / r
    );
    assert!(r < f, "reuse {r} s vs fresh {f} s");
}

fn base_tokens(m: &afm_lm::Checkpoint, t: &Transcript) -> usize {
    afm_lm::ChatModel::render(m, t).unwrap().ids.len()
}
