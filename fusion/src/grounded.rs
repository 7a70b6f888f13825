//! Grounded captions: afm-tiny's caption of a picture of objects, decoded under a grammar
//! built from what the object finder found, so that it names every group it found, with its
//! count, colour and shape, and nothing else.
//!
//! afm-tiny's language model writes a scene's caption in the form it was trained on: `Three
//! purple hexagons and three brown circles on a white background.`, optionally followed by
//! where one shape is (`The star is left of the circle.`), and an easy-VQA picture's as `A red
//! circle.` Free, it sometimes adds a group
//! the list does not hold ("... and a purple triangle"). Under [`caption_grammar`] it still
//! chooses the order of the groups, the background and whether and how to place one shape,
//! but every group it names comes from the list, each once, with the list's count.

use crate::session::attachment;
use crate::vlm::{Answer, AskOptions, EncodedImage, Vlm};
use afm_lm::generate::{Generation, GenerationStats};
use afm_lm::{GenerationOptions, LanguageModel, Prompt, Session};
use afm_vision::objects::{groups, plural, SeenObject};
use image::RgbImage;

/// Most groups whose every order the grammar offers (5! = 120 orders); with more, the
/// finder's order is the only one.
pub const MAX_ORDERED_GROUPS: usize = 5;

/// Background names the caption may use: the basic colour terms, alone or after `light`,
/// `pale` or `dark`, and the few other names of flat grounds.
const BACKGROUND_COLOURS: &[&str] = &[
    "white", "black", "gray", "grey", "red", "green", "blue", "yellow", "orange", "purple", "pink",
    "brown", "cream", "beige", "lavender", "teal", "cyan",
];

/// `two` .. `nine`, else the digits (as the training captions count).
fn number_word(n: usize) -> String {
    const W: [&str; 8] = [
        "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ];
    W.get(n.wrapping_sub(2))
        .map_or(n.to_string(), |w| w.to_string())
}

/// `a red circle`, `an orange star`, `three purple hexagons`: how a caption names a group
/// of `n` (at least 1) shapes of one colour. The scene generator's captions use it too.
pub fn group_phrase(n: usize, colour: &str, shape: &str) -> String {
    if n == 1 {
        let article = if colour.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {colour} {shape}")
    } else {
        format!("{} {colour} {}", number_word(n), plural(shape))
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next().map_or(String::new(), |f| {
        f.to_uppercase().collect::<String>() + c.as_str()
    })
}

/// `a, b and c`.
pub(crate) fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Every order of `0..n`.
pub(crate) fn orders(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for rest in orders(n - 1) {
        for at in 0..=rest.len() {
            let mut o = rest.clone();
            o.insert(at, n - 1);
            out.push(o);
        }
    }
    out
}

/// A Lark string literal of `s` (no character of a caption needs more than `"` and `\`
/// escaped).
pub(crate) fn lit(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The grammar (llguidance's Lark) of a caption of `objects`: every found group once, in any
/// order (the finder's order only, past [`MAX_ORDERED_GROUPS`] groups), then either `.` (as
/// easy-VQA's captions end) or `on a <colour> background.` and optionally `The <one> is left of|right of|above|below the <other>.`,
/// where the two are different single shapes of the list, named as the generator's captions
/// name them (the shape alone when it is the only one of its kind, else colour and shape). `None`
/// when no objects were found.
///
/// `ground` is the name of the picture's background when it was measured
/// ([`afm_vision::objects::ground_name`]): the caption may then name only that one (`on a pale
/// green background.`). `None`: any of the basic names, light, pale or dark.
pub fn caption_grammar(objects: &[SeenObject], ground: Option<&str>) -> Option<String> {
    let g = groups(objects);
    if g.is_empty() {
        return None;
    }
    let phrases: Vec<String> = g.iter().map(|&(n, c, s)| group_phrase(n, c, s)).collect();
    let lists: Vec<String> = if g.len() <= MAX_ORDERED_GROUPS {
        orders(g.len())
            .into_iter()
            .map(|o| {
                let p: Vec<String> = o.iter().map(|&i| phrases[i].clone()).collect();
                capitalise(&join_and(&p))
            })
            .collect()
    } else {
        vec![capitalise(&join_and(&phrases))]
    };
    let backgrounds: Vec<String> = BACKGROUND_COLOURS.iter().map(|c| lit(c)).collect();
    // single shapes, as the captions name them
    let refs: Vec<String> = g
        .iter()
        .filter(|x| x.0 == 1)
        .map(|&(_, c, s)| {
            let kind_once = objects.iter().filter(|o| o.shape == s).count() == 1;
            if kind_once {
                s.to_string()
            } else {
                format!("{c} {s}")
            }
        })
        .collect();
    let background = match ground {
        Some(name) => {
            let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            lit(&format!(" on {article} {name} background."))
        }
        None => "\" on a \" tone? colour \" background.\"".to_string(),
    };
    let mut grammar = format!(
        "start: list end\n\
         end: \".\" | {background}{}\n\
         list: {}\n",
        if refs.len() >= 2 { " place?" } else { "" },
        lists.iter().map(|l| lit(l)).collect::<Vec<_>>().join(" | "),
    );
    if ground.is_none() {
        grammar.push_str(&format!(
            "tone: \"light \" | \"pale \" | \"dark \"\n\
             colour: {}\n",
            backgrounds.join(" | ")
        ));
    }
    if refs.len() >= 2 {
        // every ordered pair of two different shapes
        let mut pairs = Vec::new();
        for a in &refs {
            for b in refs.iter().filter(|b| *b != a) {
                pairs.push(format!(
                    "{} relation {}",
                    lit(&format!(" The {a} is ")),
                    lit(&format!(" the {b}."))
                ));
            }
        }
        grammar.push_str(&format!(
            "place: {}\n\
             relation: \"left of\" | \"right of\" | \"above\" | \"below\"\n",
            pairs.join(" | ")
        ));
    }
    Some(grammar)
}

/// The grammar of `img`'s caption when its objects were found (`enc.objects`):
/// [`caption_grammar`] of them and of its measured background. `None` without objects.
pub(crate) fn picture_grammar(img: &RgbImage, enc: &EncodedImage) -> Option<String> {
    let ground = afm_vision::objects::ground(img).map(afm_vision::objects::ground_name);
    caption_grammar(&enc.objects, ground.as_deref())
}

impl<M: LanguageModel> Vlm<M> {
    /// `request` about `img` (already encoded as `enc`), answered under the Lark `grammar`
    /// in a fresh session, streaming each piece to `on_text`.
    pub(crate) fn answer_under_grammar(
        &self,
        img: &RgbImage,
        enc: &EncodedImage,
        request: &str,
        grammar: &str,
        opts: &AskOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> crate::Result<Answer> {
        let mut s = Session::new(self);
        s.options = GenerationOptions::from_generate_options(&opts.generate);
        let p = Prompt::default()
            .image(attachment(img).with_max_tokens(opts.max_image_tokens))
            .then(request.to_string());
        let r = s.respond_to_grammar_streaming(p, grammar, on_text)?;
        let ids = self.tokenizer().encode(&r.text)?;
        Ok(Answer {
            generation: Generation {
                text: r.text,
                ids,
                // the session keeps no logits; nothing reads them from a grounded answer
                first_logits: Vec::new(),
                stats: GenerationStats {
                    prompt_tokens: r.stats.prompt_tokens,
                    generated_tokens: r.stats.generated_tokens,
                    prefill_secs: r.stats.time_to_first_token_secs,
                    decode_secs: r.stats.decode_secs,
                    stop: r.stats.stop,
                },
            },
            plan: enc.plan.clone(),
            encode_secs: enc.encode_secs,
            image_from_cache: enc.from_cache,
            prompt_tokens: r.stats.prompt_tokens,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use afm_lm::guided::GuideFactory;
    use afm_lm::Tokenizer;

    /// Whether `grammar` takes `text` whole.
    pub(crate) fn accepts(grammar: &str, text: &str) -> bool {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/hf_tiny_idefics3");
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let vocab = tok.inner().get_vocab_size(true);
        let eos = tok.eos_ids().to_vec();
        let f = GuideFactory::new(&tok, vocab, &eos).unwrap();
        let mut guide = f.lark(grammar).unwrap();
        let enc = tok.inner().encode(text, false).unwrap();
        for &id in enc.get_ids() {
            let bytes = tok.decode(&[id], false).unwrap();
            if guide.consume(id, bytes.as_bytes()).is_err() {
                return false;
            }
        }
        guide.is_accepting()
    }

    use afm_vision::reader::Region;

    fn obj(colour: &'static str, shape: &str) -> SeenObject {
        SeenObject {
            colour,
            rgb: [0; 3],
            shape: shape.into(),
            region: Region {
                x: 0,
                y: 0,
                w: 1,
                h: 1,
            },
            area: 1,
        }
    }

    #[test]
    fn the_grammar_names_every_found_group_once_in_any_order() {
        assert!(caption_grammar(&[], None).is_none());
        let o = [
            obj("purple", "hexagon"),
            obj("brown", "circle"),
            obj("purple", "hexagon"),
            obj("brown", "circle"),
            obj("purple", "hexagon"),
            obj("brown", "circle"),
        ];
        let g = caption_grammar(&o, None).unwrap();
        assert!(
            g.contains("\"Three purple hexagons and three brown circles\""),
            "{g}"
        );
        assert!(
            g.contains("\"Three brown circles and three purple hexagons\""),
            "{g}"
        );
        // no single shapes: no place sentence; a caption may end after the groups
        assert!(!g.contains("place"), "{g}");
        assert!(g.contains("end: \".\" | \" on a \""), "{g}");
        let o = [
            obj("orange", "star"),
            obj("green", "diamond"),
            obj("green", "star"),
            obj("black", "square"),
            obj("black", "square"),
        ];
        let g = caption_grammar(&o, Some("pale green")).unwrap();
        // a measured background is the only one the caption may name
        assert!(
            g.contains("end: \".\" | \" on a pale green background.\" place?"),
            "{g}"
        );
        assert!(!g.contains("colour:"), "{g}");
        assert!(accepts(
            &g,
            "Two black squares, a green star, a green diamond and an orange star on a pale \
             green background. The diamond is below the green star."
        ));
        assert!(accepts(
            &g,
            "An orange star, a green diamond, a green star and two black squares."
        ));
        for bad in [
            // the wrong background, a count changed, a group left out, a shape added
            "Two black squares, a green star, a green diamond and an orange star on a white \
             background.",
            "Three black squares, a green star, a green diamond and an orange star.",
            "Two black squares, a green star and a green diamond.",
            "Two black squares, a green star, a green diamond, an orange star and a red circle.",
        ] {
            assert!(!accepts(&g, bad), "{bad}");
        }
        let g2 = caption_grammar(&o, Some("orange")).unwrap();
        assert!(g2.contains("\" on an orange background.\""), "{g2}");
        let list = g.lines().find(|l| l.starts_with("list: ")).unwrap();
        assert_eq!(list.matches(" | ").count() + 1, 24, "{g}");
        assert!(
            g.contains("\"An orange star, a green diamond, a green star and two black squares\""),
            "{g}"
        );
        // the diamond is the only one of its kind; the stars are named with their colour;
        // a shape is never placed against itself
        assert!(
            g.contains("\" The orange star is \" relation \" the diamond.\""),
            "{g}"
        );
        assert!(
            g.contains("\" The diamond is \" relation \" the green star.\""),
            "{g}"
        );
        assert!(
            !g.contains("\" The diamond is \" relation \" the diamond.\""),
            "{g}"
        );
        let place = g.lines().find(|l| l.starts_with("place: ")).unwrap();
        assert_eq!(place.matches(" | ").count() + 1, 6, "{g}");
    }

    #[test]
    fn phrases_and_orders() {
        assert_eq!(group_phrase(1, "orange", "star"), "an orange star");
        assert_eq!(
            group_phrase(4, "red", "box"),
            format!("four red {}", plural("box"))
        );
        assert_eq!(group_phrase(9, "red", "star"), "nine red stars");
        assert_eq!(group_phrase(13, "red", "star"), "13 red stars");
        assert_eq!(orders(3).len(), 6);
        assert_eq!(orders(0), vec![Vec::<usize>::new()]);
        assert_eq!(
            join_and(&["a".into(), "b".into(), "c".into()]),
            "a, b and c"
        );
    }
}
