//! Guided generation from a random-weight model, the hardest case (the model has no idea of
//! JSON): for each of 22 schemas (Rust types through schemars, and hand-written JSON Schemas),
//! `AFM_GUIDED_RUNS` generations (default 1,000) at temperature 1.0, each checked against
//! its schema by an independent validator (the `jsonschema` crate) and deserialised into its
//! Rust type.

mod common;

use afm_lm::{schema_for, GenerationOptions, Session};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Instant;

// The schemas cover: required and optional properties (in declaration order), arrays with
// min and max counts, strings with enum, pattern and length, integers and numbers with
// ranges, booleans, nested objects, anyOf, $ref/$defs, const, and top-level non-objects.

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Flag {
    on: bool,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Person {
    #[schemars(length(min = 1, max = 8))]
    name: String,
    #[schemars(range(min = 0, max = 130))]
    age: u8,
    #[schemars(length(max = 6))]
    nickname: Option<String>,
}

#[derive(Deserialize, JsonSchema, PartialEq, Debug)]
#[serde(rename_all = "lowercase")]
enum Color {
    Red,
    Green,
    Blue,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Paint {
    color: Color,
    #[schemars(range(min = 0.0, max = 1.0))]
    opacity: f64,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Tags {
    #[schemars(length(min = 1, max = 4), inner(length(min = 1, max = 5)))]
    tags: Vec<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Code {
    #[schemars(regex(pattern = r"^[A-Z]{3}-[0-9]{2}$"))]
    code: String,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Point {
    #[schemars(range(min = -100, max = 100))]
    x: i32,
    #[schemars(range(min = -100, max = 100))]
    y: i32,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Polygon {
    #[schemars(length(min = 3, max = 5))]
    points: Vec<Point>,
    closed: bool,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Button {
    #[schemars(length(min = 1, max = 8))]
    label: String,
    enabled: bool,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Field {
    #[schemars(length(max = 6))]
    name: String,
    #[schemars(length(max = 6))]
    value: Option<String>,
}

/// The typed screen description of `afm screen --json`, in small.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Screen {
    #[schemars(length(max = 10))]
    title: String,
    #[schemars(length(max = 3))]
    buttons: Vec<Button>,
    #[schemars(length(max = 2))]
    fields: Vec<Field>,
    #[schemars(length(max = 3), inner(length(max = 6)))]
    list_items: Vec<String>,
    #[schemars(range(min = 0, max = 2))]
    selected_item: Option<u8>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum Shape {
    Circle {
        #[schemars(range(min = 1, max = 9))]
        radius: u8,
    },
    Square {
        #[schemars(range(min = 1, max = 9))]
        side: u8,
        filled: bool,
    },
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Drawing {
    #[schemars(length(min = 1, max = 3))]
    shapes: Vec<Shape>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[allow(dead_code)]
enum Event {
    Click {
        #[schemars(range(min = 0, max = 9))]
        x: u8,
    },
    Key {
        #[schemars(length(min = 1, max = 1))]
        key: String,
    },
    Quit,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Address {
    #[schemars(length(max = 8))]
    street: String,
    #[schemars(regex(pattern = r"^[0-9]{5}$"))]
    zip: String,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Customer {
    #[schemars(range(min = 1, max = 9999))]
    id: u32,
    address: Address,
    billing: Option<Address>,
    vip: bool,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Matrix {
    #[schemars(length(min = 2, max = 2), inner(length(min = 2, max = 2)))]
    rows: Vec<Vec<bool>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Reading {
    #[schemars(range(min = -40.0, max = 60.0))]
    celsius: f32,
    #[schemars(range(min = 0, max = 100))]
    humidity: Option<u8>,
    unit: Unit,
}

#[derive(Deserialize, JsonSchema)]
#[allow(dead_code)]
enum Unit {
    #[serde(rename = "C")]
    C,
    #[serde(rename = "F")]
    F,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Todo {
    #[schemars(length(max = 8))]
    text: String,
    done: bool,
    #[schemars(range(min = 1, max = 5))]
    priority: u8,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct TodoList {
    #[schemars(length(max = 3))]
    items: Vec<Todo>,
}

/// Checks `runs` seeded generations under `schema` against the validator and `T`.
fn check<T: DeserializeOwned + JsonSchema>(
    m: &afm_lm::TextModel<afm_lm::DeviceModel>,
    guides: &afm_lm::guided::GuideFactory,
    name: &str,
    schema: Value,
    runs: usize,
) -> usize {
    let validator = jsonschema::validator_for(&schema).expect("a valid JSON Schema");
    let mut s = Session::new(m).with_guides(guides.clone());
    s.include_schema_in_prompt = false;
    let base = s.transcript().clone();
    let mut tokens = 0;
    let mut longest = 0;
    let t0 = Instant::now();
    for seed in 0..runs as u64 {
        s.set_transcript(base.clone());
        s.options = GenerationOptions {
            max_tokens: 4000,
            temperature: 1.0,
            seed,
            ..Default::default()
        };
        let (v, r) = s
            .respond_to_schema("Give an example.", &schema)
            .unwrap_or_else(|e| panic!("{name}, seed {seed}: {e}"));
        tokens += r.stats.generated_tokens;
        longest = longest.max(r.stats.generated_tokens);
        assert!(
            validator.is_valid(&v),
            "{name}, seed {seed}: {} does not validate",
            r.text
        );
        if let Err(e) = serde_json::from_value::<T>(v) {
            panic!("{name}, seed {seed}: {} does not deserialise: {e}", r.text);
        }
    }
    eprintln!(
        "{name}: {runs} valid, {tokens} tokens (longest {longest}) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    tokens
}

#[test]
fn random_weights_always_give_valid_json() {
    let runs: usize = std::env::var("AFM_GUIDED_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let m = common::tiny(8192, 11);
    let guides =
        afm_lm::guided::GuideFactory::new(&m.tokenizer, 512, &afm_lm::ChatModel::stop_ids(&m))
            .unwrap();
    let t0 = Instant::now();
    let mut tokens = 0;
    let mut n = 0;
    macro_rules! typed {
        ($($t:ty),*) => {$(
            tokens += check::<$t>(&m, &guides, stringify!($t), schema_for::<$t>(), runs);
            n += 1;
        )*};
    }
    typed!(
        Flag, Person, Paint, Tags, Code, Point, Polygon, Screen, Drawing, Event, Customer, Matrix,
        Reading, TodoList, Color
    );
    // hand-written schemas (what `afm generate --schema FILE` reads)
    let raw = [
        json!({"type": "object", "properties": {"b": {"type": "boolean"}, "a": {"type": "integer", "minimum": 3, "maximum": 7}}, "required": ["a", "b"], "additionalProperties": false}),
        json!({"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4}),
        json!({"type": "string", "enum": ["yes", "no", "maybe"]}),
        json!({"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3}, {"type": "null"}]}),
        json!({"type": "object", "properties": {"kind": {"const": "point"}, "v": {"type": "number", "minimum": 0, "maximum": 10}}, "required": ["kind", "v"], "additionalProperties": false}),
        json!({"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-f0-9]{4}$"}, "parent": {"$ref": "#/$defs/node"}}, "required": ["id"], "additionalProperties": false, "$defs": {"node": {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-f0-9]{4}$"}}, "required": ["id"], "additionalProperties": false}}}),
        json!({"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3}, "ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}),
    ];
    for (i, schema) in raw.into_iter().enumerate() {
        tokens += check::<Value>(&m, &guides, &format!("raw {i}"), schema, runs);
        n += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "{n} schemas x {runs} generations: all valid; {tokens} tokens in {secs:.1} s ({:.1} us/token)",
        secs * 1e6 / tokens.max(1) as f64
    );
    assert!(n >= 20);
}

#[test]
fn respond_as_returns_the_type() {
    let m = common::tiny(1024, 12);
    let mut s = Session::new(&m);
    s.options.temperature = 1.0;
    s.options.max_tokens = 400;
    let mut snapshots = Vec::new();
    let p: Person = s
        .respond_as_streaming("Who?", &mut |v| {
            snapshots.push(v.clone());
            true
        })
        .unwrap();
    assert!(!p.name.is_empty() && p.name.chars().count() <= 8);
    // snapshots grow into the final object
    assert!(snapshots.len() >= 2, "{snapshots:?}");
    assert_eq!(snapshots[0], json!({}));
    let last = snapshots.last().unwrap();
    assert_eq!(last["age"], json!(p.age));
    let c: Color = s.respond_as("A colour?").unwrap();
    assert!(matches!(c, Color::Red | Color::Green | Color::Blue));
    assert_eq!(s.transcript().entries.len(), 4);
}
