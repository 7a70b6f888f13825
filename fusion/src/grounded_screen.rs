//! Grounded screen descriptions: afm-tiny's description of a screenshot, decoded under a
//! grammar built from the lines its text reader read, so that every text it quotes or names
//! is one it read, and its buttons are exactly the lines the reader found in boxes.
//!
//! afm-tiny's language model describes a screenshot in the sentences it was trained on (the
//! screen generator's `describe`): `A dialog titled "Ignore Rule". It has 3 text fields: Size
//! containing "275 MB", ... There is one button, "Set Up". The status bar reads "Idle".`
//! Free, it sometimes names a button that is not there ("Erase") or calls the title a
//! checkbox. Under [`screen_grammar`] it still chooses which line is the title, which are
//! fields, values, checkboxes, list items, the message and the status, and whether each
//! sentence is there at all; but
//! * every quoted or named text is a line the reader read, the title one of the first
//!   [`MAX_TITLES`] lines not in a box, and no sentence but the buttons' uses the title or a
//!   boxed line;
//! * the buttons are the boxed lines ([`crate::vlm::ReadLine::boxed`]) and the lines in a
//!   boxed line's row, each once, in any order (the reader's order past
//!   [`MAX_ORDERED_BUTTONS`]), and only the line the reader found highlighted may be called
//!   highlighted. When no line is boxed, the buttons are 1-4 of the other lines.

use crate::grounded::{join_and, lit, orders};
use crate::vlm::ReadLine;

/// Most lines the title is chosen from: the first lines not in a box, top to bottom (a title
/// is at the top of its window or page). Each is a branch of the grammar, so this also keeps
/// the grammar of a page with hundreds of lines small.
pub const MAX_TITLES: usize = 12;

/// Most boxed lines whose every order the grammar offers (5! = 120 orders); with more, the
/// reader's order (top to bottom) is the only one.
pub const MAX_ORDERED_BUTTONS: usize = 5;

/// Most text fields, checkboxes, list items and menus one sentence may name (the schema's
/// and the generator's bounds).
const MAX_ITEMS: usize = 6;

/// Most buttons named when the reader found no boxed line.
const MAX_UNBOXED_BUTTONS: usize = 4;

/// `a, b and c` over grammar terms: `x_1 ", " x_2 " and " x_3`, for `k` copies of `term`.
fn listed(term: &str, k: usize) -> String {
    match k {
        0 => String::new(),
        1 => term.to_string(),
        _ => {
            let mut parts = vec![term.to_string(); k - 1].join(" \", \" ");
            parts.push_str(&format!(" \" and \" {term}"));
            parts
        }
    }
}

/// `1 item` / `3 items`, as the generator counts.
fn counted(k: usize, one: &str, many: &str) -> String {
    if k == 1 {
        format!("1 {one}")
    } else {
        format!("{k} {many}")
    }
}

/// The grammar (llguidance's Lark) of a description of a screenshot whose reader read
/// `lines` (module docs). `None` when fewer than two different lines were read: a screenshot
/// has at least a title and a button, and a lone line is more often a shape read as a glyph
/// (an easy-VQA triangle read as "A"), whose caption is better left free.
pub fn screen_grammar(lines: &[ReadLine]) -> Option<String> {
    let mut texts: Vec<&str> = Vec::new();
    for l in lines {
        if !l.text.is_empty() && !texts.contains(&l.text.as_str()) {
            texts.push(&l.text);
        }
    }
    if texts.len() < 2 {
        return None;
    }
    let is_boxed = |t: &str| {
        lines
            .iter()
            .any(|l| l.text == t && (l.boxed || beside_a_button(l, lines)))
    };
    let boxed: Vec<&str> = texts.iter().copied().filter(|t| is_boxed(t)).collect();
    let plain: Vec<&str> = texts.iter().copied().filter(|t| !is_boxed(t)).collect();
    let highlighted: Option<&str> = lines
        .iter()
        .find(|l| l.highlighted && l.boxed)
        .map(|l| l.text.as_str());
    let quoted = |t: &str| lit(&format!("\"{t}\""));

    let mut g = String::new();
    // the title: one of the first lines not in a box (of any line when all are)
    let titles: Vec<&str> = if plain.is_empty() { &texts } else { &plain }
        .iter()
        .copied()
        .take(MAX_TITLES)
        .collect();
    let heads: Vec<String> = (0..titles.len()).map(|i| format!("head{i}")).collect();
    g.push_str(&format!("start: {}\n", heads.join(" | ")));
    g.push_str("how: \"A \" | \"A maximised \"\nkind: \"window\" | \"dialog\"\n");
    g.push_str("check: \" (checked)\" | \" (unchecked)\"\n");
    g.push_str(&buttons_rules(&boxed, highlighted));
    for (i, title) in titles.iter().enumerate() {
        // what the other sentences may use: the lines that are neither the title nor boxed
        let others: Vec<&str> = plain.iter().copied().filter(|t| t != title).collect();
        let q = format!("q{i}");
        let w = format!("w{i}");
        let has_others = !others.is_empty();
        if has_others {
            g.push_str(&format!(
                "{q}: {}\n{w}: {}\n",
                others
                    .iter()
                    .map(|t| quoted(t))
                    .collect::<Vec<_>>()
                    .join(" | "),
                others
                    .iter()
                    .map(|t| lit(t))
                    .collect::<Vec<_>>()
                    .join(" | "),
            ));
        }
        let n = others.len().min(MAX_ITEMS);
        let mut body = Vec::new();
        if has_others {
            // `with the menus File and Edit`
            let menus: Vec<String> = (1..=n.min(4)).map(|k| listed(&w, k)).collect();
            g.push_str(&format!(
                "menus{i}: \" with the menus \" ({})\n",
                menus.join(" | ")
            ));
            // `It says "..."`
            g.push_str(&format!("message{i}: \" It says \" {q} \".\"\n"));
            // `It has 2 text fields: Size containing "275 MB" and Name containing "Ann".`
            g.push_str(&format!("field{i}: {w} \" containing \" {q}\n"));
            let fields: Vec<String> = (1..=n)
                .map(|k| {
                    format!(
                        "{} {}",
                        lit(&format!(
                            " It has {}: ",
                            counted(k, "text field", "text fields")
                        )),
                        listed(&format!("field{i}"), k)
                    )
                })
                .collect();
            g.push_str(&format!("fields{i}: ({}) \".\"\n", fields.join(" | ")));
            // `Checkboxes: "A" (checked) and "B" (unchecked).`
            g.push_str(&format!("box{i}: {q} check\n"));
            let mut checks = vec![format!("\" Checkbox: \" box{i}")];
            checks.extend(
                (2..=n).map(|k| format!("\" Checkboxes: \" {}", listed(&format!("box{i}"), k))),
            );
            g.push_str(&format!("checks{i}: ({}) \".\"\n", checks.join(" | ")));
            // `A list shows 3 items: Oslo, Rome and Lima. "Rome" is selected.`
            let lists: Vec<String> = (1..=n)
                .map(|k| {
                    format!(
                        "{} {}",
                        lit(&format!(" A list shows {}: ", counted(k, "item", "items"))),
                        listed(&w, k)
                    )
                })
                .collect();
            g.push_str(&format!(
                "list{i}: ({}) \".\" (\" \" {q} \" is selected.\")?\n",
                lists.join(" | ")
            ));
            g.push_str(&format!(
                "status{i}: \" The status bar reads \" {q} \".\"\n"
            ));
            body.extend([
                format!("message{i}?"),
                format!("fields{i}?"),
                format!("checks{i}?"),
                format!("list{i}?"),
            ]);
        }
        body.push(if boxed.is_empty() {
            format!("unboxed{i}")
        } else {
            "buttons".to_string()
        });
        if has_others {
            body.push(format!("status{i}?"));
        }
        if boxed.is_empty() {
            g.push_str(&unboxed_rules(i, &others, title));
        }
        g.push_str(&format!(
            "head{i}: how kind {}{} \".\" {}\n",
            lit(&format!(" titled \"{title}\"")),
            if has_others {
                format!(" menus{i}?")
            } else {
                String::new()
            },
            body.join(" ")
        ));
    }
    Some(g)
}

/// Whether `l`, not boxed itself, sits in the row of a boxed line: their heights overlap by
/// at least half the smaller one. Buttons stand in a row, and a plain button drawn in about
/// its window's colour can be missed as a box ([`crate::vlm::ReadLine::boxed`]) while its
/// accent neighbour is found; a title, a field or a status line does not share their row.
fn beside_a_button(l: &ReadLine, lines: &[ReadLine]) -> bool {
    let (a0, a1) = (l.region.y, l.region.y + l.region.h);
    !l.boxed
        && lines.iter().any(|b| {
            let (b0, b1) = (b.region.y, b.region.y + b.region.h);
            let overlap = a1.min(b1).saturating_sub(a0.max(b0));
            b.boxed && 2 * overlap >= l.region.h.min(b.region.h)
        })
}

/// The `buttons` rule over the boxed lines (empty: none).
fn buttons_rules(boxed: &[&str], highlighted: Option<&str>) -> String {
    let quoted = |t: &str| format!("\"{t}\"");
    match boxed {
        [] => String::new(),
        [one] => format!(
            "buttons: {}\n",
            lit(&format!(" There is one button, {}.", quoted(one)))
        ),
        _ => {
            let lists: Vec<String> = if boxed.len() <= MAX_ORDERED_BUTTONS {
                orders(boxed.len())
                    .into_iter()
                    .map(|o| {
                        let q: Vec<String> = o.iter().map(|&k| quoted(boxed[k])).collect();
                        lit(&join_and(&q))
                    })
                    .collect()
            } else {
                let q: Vec<String> = boxed.iter().map(|t| quoted(t)).collect();
                vec![lit(&join_and(&q))]
            };
            let hl: Vec<String> = match highlighted {
                Some(h) => vec![lit(&format!(", with {} highlighted", quoted(h)))],
                None => boxed
                    .iter()
                    .map(|b| lit(&format!(", with {} highlighted", quoted(b))))
                    .collect(),
            };
            format!(
                "buttons: \" The buttons are \" ({}) ({})? \".\"\n",
                lists.join(" | "),
                hl.join(" | ")
            )
        }
    }
}

/// The `unboxed{i}` rule: 1-4 buttons among the lines (the title's branch `i`) when the
/// reader found no boxed line.
fn unboxed_rules(i: usize, others: &[&str], title: &str) -> String {
    let pool: Vec<&str> = if others.is_empty() {
        vec![title]
    } else {
        others.to_vec()
    };
    let b = format!("b{i}");
    let mut g = format!(
        "{b}: {}\n",
        pool.iter()
            .map(|t| lit(&format!("\"{t}\"")))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let mut alts = vec![format!("\" There is one button, \" {b} \".\"")];
    for k in 2..=pool.len().min(MAX_UNBOXED_BUTTONS) {
        alts.push(format!(
            "\" The buttons are \" {} (\", with \" {b} \" highlighted\")? \".\"",
            listed(&b, k)
        ));
    }
    g.push_str(&format!("unboxed{i}: {}\n", alts.join(" | ")));
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grounded::tests::accepts;
    use afm_vision::reader::Region;

    /// A line alone in its row (row `y` of 20 px rows).
    fn line(text: &str, boxed: bool, highlighted: bool) -> ReadLine {
        static ROW: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let y = 20 * ROW.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        line_at(text, y, boxed, highlighted)
    }

    fn line_at(text: &str, y: u32, boxed: bool, highlighted: bool) -> ReadLine {
        ReadLine {
            text: text.into(),
            region: Region {
                x: 0,
                y,
                w: 40,
                h: 12,
            },
            boxed,
            highlighted,
        }
    }

    /// What the reader read off `assets/images/screen.png` (`afm read`: text, x, y, w, h).
    fn screen_png() -> Vec<ReadLine> {
        [
            ("Ignore Rule", 227, 146, 73, 13),
            ("C1", 439, 146, 8, 8),
            ("X", 470, 146, 10, 9),
            ("Size", 205, 179, 24, 10),
            ("275 MB", 213, 199, 43, 10),
            ("Name", 206, 226, 33, 9),
            ("Emma Evans", 214, 245, 72, 10),
            ("Country", 205, 271, 45, 13),
            ("Norway", 214, 291, 42, 13),
            ("Set Up", 323, 368, 37, 13),
            ("Idle", 207, 402, 18, 9),
        ]
        .iter()
        .map(|&(text, x, y, w, h)| ReadLine {
            text: text.into(),
            region: Region { x, y, w, h },
            boxed: text == "Set Up",
            highlighted: text == "Set Up",
        })
        .collect()
    }

    #[test]
    fn the_description_quotes_only_read_lines_and_names_the_boxed_ones_as_buttons() {
        assert!(screen_grammar(&[]).is_none());
        assert!(screen_grammar(&[line("A", false, false)]).is_none());
        assert!(screen_grammar(&[line("A", false, false), line("A", true, false)]).is_none());
        let g = screen_grammar(&screen_png()).unwrap();
        // the truth of screen.png, as the generator writes it
        let truth = "A dialog titled \"Ignore Rule\". It has 3 text fields: Size containing \
                     \"275 MB\", Name containing \"Emma Evans\" and Country containing \
                     \"Norway\". There is one button, \"Set Up\". The status bar reads \"Idle\".";
        assert!(accepts(&g, truth), "{g}");
        assert!(accepts(
            &g,
            "A window titled \"Ignore Rule\". There is one button, \"Set Up\"."
        ));
        // a button that was not read, a second button, an unboxed line as a button
        for bad in [
            "A dialog titled \"Ignore Rule\". The buttons are \"Set Up\" and \"Erase\".",
            "A dialog titled \"Ignore Rule\". The buttons are \"Set Up\" and \"Idle\".",
            "A dialog titled \"Ignore Rule\". There is one button, \"Idle\".",
            // no button sentence
            "A dialog titled \"Ignore Rule\". The status bar reads \"Idle\".",
            // the title or the button as a checkbox
            "A dialog titled \"Ignore Rule\". Checkbox: \"Ignore Rule\" (checked). There is \
             one button, \"Set Up\".",
            "A dialog titled \"Ignore Rule\". Checkbox: \"Set Up\" (checked). There is one \
             button, \"Set Up\".",
            // a boxed line as the title, a text not read
            "A dialog titled \"Set Up\". There is one button, \"Set Up\".",
            "A dialog titled \"Backup\". There is one button, \"Set Up\".",
        ] {
            assert!(!accepts(&g, bad), "{bad}");
        }
    }

    #[test]
    fn several_buttons_any_order_and_only_the_highlighted_one_highlighted() {
        let lines = [
            line("Export", false, false),
            line("Oslo", false, false),
            line("Rome", false, false),
            line("OK", true, true),
            line("Cancel", true, false),
        ];
        let g = screen_grammar(&lines).unwrap();
        for good in [
            "A window titled \"Export\". The buttons are \"OK\" and \"Cancel\".",
            "A window titled \"Export\". The buttons are \"Cancel\" and \"OK\", with \"OK\" \
             highlighted.",
            "A maximised window titled \"Export\" with the menus Oslo and Rome. A list shows \
             2 items: Oslo and Rome. \"Rome\" is selected. The buttons are \"OK\" and \
             \"Cancel\".",
        ] {
            assert!(accepts(&g, good), "{good}\n{g}");
        }
        for bad in [
            "A window titled \"Export\". There is one button, \"OK\".",
            "A window titled \"Export\". The buttons are \"OK\", \"Cancel\" and \"OK\".",
            "A window titled \"Export\". The buttons are \"OK\" and \"Cancel\", with \
             \"Cancel\" highlighted.",
        ] {
            assert!(!accepts(&g, bad), "{bad}");
        }
        // a plain button missed as a box beside a boxed one is a button too; a line in
        // another row is not
        let lines = [
            line_at("Export", 0, false, false),
            line_at("Rename Cargo", 100, false, false),
            line_at("Select", 98, true, true),
            line_at("Idle", 130, false, false),
        ];
        let g = screen_grammar(&lines).unwrap();
        for good in [
            "A window titled \"Export\". The buttons are \"Rename Cargo\" and \"Select\", \
             with \"Select\" highlighted. The status bar reads \"Idle\".",
            "A window titled \"Export\". The buttons are \"Select\" and \"Rename Cargo\".",
        ] {
            assert!(accepts(&g, good), "{good}\n{g}");
        }
        for bad in [
            "A window titled \"Export\". There is one button, \"Select\".",
            "A window titled \"Export\". The buttons are \"Rename Cargo\", \"Select\" and \
             \"Idle\".",
            "A window titled \"Rename Cargo\". There is one button, \"Select\".",
        ] {
            assert!(!accepts(&g, bad), "{bad}");
        }
        // no boxed line: the buttons come from the other lines
        let lines = [
            line("Export", false, false),
            line("OK", false, false),
            line("Cancel", false, false),
        ];
        let g = screen_grammar(&lines).unwrap();
        assert!(accepts(
            &g,
            "A window titled \"Export\". The buttons are \"OK\" and \"Cancel\"."
        ));
        assert!(!accepts(
            &g,
            "A window titled \"Export\". There is one button, \"Export\"."
        ));
        // a page of many lines: the title comes from the first ones, and the grammar stays
        // small enough to compile
        let many: Vec<ReadLine> = (0..300)
            .map(|k| line_at(&format!("Line {k}"), 20 * k, false, false))
            .chain([line_at("Go", 7000, true, false)])
            .collect();
        let g = screen_grammar(&many).unwrap();
        assert_eq!(g.matches("head").count(), 2 * MAX_TITLES, "{}", g.len());
        assert!(accepts(&g, "A window titled \"Line 3\". It has 1 text field: Line 200 containing \"Line 299\". There is one button, \"Go\"."));
        assert!(!accepts(
            &g,
            "A window titled \"Line 12\". There is one button, \"Go\"."
        ));
        // quotes in a read line are escaped in the grammar
        let g =
            screen_grammar(&[line("Say \"hi\"", false, false), line("Go", true, false)]).unwrap();
        assert!(accepts(
            &g,
            "A window titled \"Say \"hi\"\". There is one button, \"Go\"."
        ));
    }
}
