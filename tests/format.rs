//! Properties of the text formats on real-looking rows (the bundled sample CSV) with the
//! bundled tokenizer: length limits, BOS/EOS placement, exact A/B swap symmetry of `turns`,
//! newest-turn-first truncation, and `concat` truncation.

mod common;

use engine::data::csv::{ArenaRow, Labels, read_arena_csv};
use engine::data::format::{Encoder, Part, TextFormat};

const EOS: u32 = 1;
const BOS: u32 = 2;

fn encoder(format: TextFormat, max_length: usize) -> Encoder {
    Encoder::from_file(
        &common::tiny_model().join("tokenizer.json"),
        EOS,
        1024,
        format,
        max_length,
    )
    .unwrap()
}

fn rows() -> Vec<ArenaRow> {
    read_arena_csv(&common::demo_csv(), Labels::Required)
        .unwrap()
        .rows
}

#[test]
fn turns_fit_the_budget_and_end_with_eos() {
    for max_len in [24, 40, 64, 100, 256, 2048] {
        let enc = encoder(TextFormat::Turns, max_len);
        for r in rows() {
            let ids = enc.encode(&r).unwrap();
            assert!(
                ids.len() <= max_len,
                "row {} has {} ids > {max_len}",
                r.id,
                ids.len()
            );
            assert_eq!(ids[0], BOS);
            assert_eq!(*ids.last().unwrap(), EOS);
            assert_eq!(ids.iter().filter(|&&t| t == EOS).count(), 1);
        }
    }
}

#[test]
fn swapping_a_and_b_swaps_exactly_their_ids() {
    for max_len in [30, 48, 80, 128, 4096] {
        let enc = encoder(TextFormat::Turns, max_len);
        for r in rows() {
            let s = enc.encode_turns(&r).unwrap();
            let w = enc.encode_turns(&r.swapped()).unwrap();
            assert_eq!(s.len(), w.len(), "row {}", r.id);
            for ((ps, is), (pw, iw)) in s.iter().zip(&w) {
                let want = match ps {
                    Part::ResponseA(t) => {
                        assert_eq!(*pw, Part::ResponseA(*t));
                        s.iter()
                            .find(|(p, _)| *p == Part::ResponseB(*t))
                            .map(|(_, i)| i)
                            .unwrap()
                    }
                    Part::ResponseB(t) => s
                        .iter()
                        .find(|(p, _)| *p == Part::ResponseA(*t))
                        .map(|(_, i)| i)
                        .unwrap(),
                    _ => is,
                };
                assert_eq!(iw, want, "row {} part {ps:?} at max_length {max_len}", r.id);
            }
        }
    }
}

#[test]
fn short_budgets_keep_the_newest_turn() {
    let text = |s: &str, n: usize| Some(std::iter::repeat_n(s, n).collect::<Vec<_>>().join(" "));
    let row = ArenaRow {
        id: "x".into(),
        prompt: vec![text("old question", 40), text("new question", 5)],
        response_a: vec![text("old answer a", 40), text("new answer a", 60)],
        response_b: vec![text("old answer b", 40), text("new answer b", 2)],
        label: None,
    };
    let enc = encoder(TextFormat::Turns, 120);
    let parts = enc.encode_turns(&row).unwrap();
    let total: usize = parts.iter().map(|(_, i)| i.len()).sum();
    assert!(total <= 120);
    let has = |p: Part| parts.iter().any(|(q, ids)| *q == p && !ids.is_empty());
    assert!(has(Part::Prompt(1)) && has(Part::ResponseA(1)) && has(Part::ResponseB(1)));
    assert!(!has(Part::Prompt(0)), "the old turn must be dropped first");
    // The short prompt and B of the newest turn are whole; A takes what is left.
    let full = encoder(TextFormat::Turns, 100_000)
        .encode_turns(&row)
        .unwrap();
    let len = |ps: &[(Part, Vec<u32>)], p: Part| {
        ps.iter()
            .find(|(q, _)| *q == p)
            .map(|(_, i)| i.len())
            .unwrap()
    };
    assert_eq!(len(&parts, Part::Prompt(1)), len(&full, Part::Prompt(1)));
    assert_eq!(
        len(&parts, Part::ResponseB(1)),
        len(&full, Part::ResponseB(1))
    );
    assert!(len(&parts, Part::ResponseA(1)) < len(&full, Part::ResponseA(1)));
    // Whole, the sequence has both turns in order.
    let order: Vec<Part> = full
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !matches!(p, Part::Header | Part::Special))
        .collect();
    assert_eq!(order[0], Part::Prompt(0));
    assert_eq!(order[3], Part::Prompt(1));
}

#[test]
fn concat_cuts_text_never_eos() {
    let long = encoder(TextFormat::Concat, 100_000);
    let short = encoder(TextFormat::Concat, 32);
    for r in rows() {
        let full = long.encode(&r).unwrap();
        let cut = short.encode(&r).unwrap();
        if full.len() <= 32 {
            assert_eq!(cut, full);
        } else {
            assert_eq!(cut.len(), 32);
            assert_eq!(cut[..31], full[..31]);
            assert_eq!(cut[31], EOS);
        }
    }
}

#[test]
fn too_small_max_length_is_a_clear_error() {
    let e = Encoder::from_file(
        &common::tiny_model().join("tokenizer.json"),
        EOS,
        1024,
        TextFormat::Turns,
        5,
    )
    .err()
    .expect("max_length 5 cannot hold the headers")
    .to_string();
    assert!(e.contains("--max-length 5 is too small"), "{e}");
}

#[test]
fn a_tokenizer_that_appends_eos_still_gives_one_bos_and_one_eos() {
    let path = common::tiny_model().join("tokenizer.json");
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    t["post_processor"]["single"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"SpecialToken": {"id": "<eos>", "type_id": 0}}));
    t["post_processor"]["special_tokens"]["<eos>"] =
        serde_json::json!({"id": "<eos>", "ids": [EOS], "tokens": ["<eos>"]});
    let dir = tempfile::tempdir().unwrap();
    let edited = dir.path().join("tokenizer.json");
    std::fs::write(&edited, t.to_string()).unwrap();
    let enc = Encoder::from_file(&edited, EOS, 1024, TextFormat::Turns, 4096).unwrap();
    let plain = encoder(TextFormat::Turns, 4096);
    for r in rows() {
        let ids = enc.encode(&r).unwrap();
        assert_eq!(ids, plain.encode(&r).unwrap(), "row {}", r.id);
        assert_eq!(ids.iter().filter(|&&i| i == BOS).count(), 1);
        assert_eq!(ids.iter().filter(|&&i| i == EOS).count(), 1);
    }
}
