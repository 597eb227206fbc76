//! From an arena row to token ids, in one of two text formats.
//!
//! ## `concat` (compatibility with the popular public notebook)
//! `P`, `A`, `B` are the turns of each field joined by a single space (`null` → empty);
//! the text `"<prompt>: " + P + "\n\n<response_a>: " + A + "\n\n<response_b>: " + B` is
//! tokenised with the tokenizer's special tokens (BOS), cut to its first `max_length − 1` ids,
//! and the EOS id appended.
//!
//! ## `turns` (the default)
//! Turns are interleaved — prompt, response A, response B for turn 1, then turn 2, … — and
//! every piece is tokenised on its own (no special tokens), so the ids of A's text never depend
//! on B's. The sequence is
//! `BOS · [H_P p₁ H_A a₁ H_B b₁] · SEP · [H_P p₂ H_A a₂ H_B b₂] · … · EOS`
//! with headers `H_P = "<prompt>:"`, `H_A = "\n\n<response_a>:"`, `H_B = "\n\n<response_b>:"`,
//! `SEP = "\n\n"` between turns, and each non-empty piece tokenised as `" " + text` (so its
//! first word merges with its leading space as in running text). A turn's missing entries are
//! empty. BOS is whatever the tokenizer puts before a text; special tokens a tokenizer appends
//! after a text are left out, so the sequence ends with exactly one EOS.
//!
//! Truncation, when the sequence exceeds `max_length`:
//! 1. Turns are taken newest first; each one that fits whole is kept.
//! 2. The first turn that does not fit is cut to the space left: with that space `S` (after
//!    its headers), the largest cap `c` with `min(|p|,c) + min(|a|,c) + min(|b|,c) ≤ S` is
//!    found; `a` and `b` keep their first `min(len, c)` ids and `p` its first
//!    `min(|p|, c + leftover)` ids, where leftover is what the three leave unused. An older
//!    turn is only cut this way if at least [`MIN_PARTIAL_TURN`] ids of content fit; the
//!    newest turn is always kept.
//! 3. Older turns are dropped.
//!
//! A and B are always cut by the same rule from their own lengths, so swapping A and B in the
//! row swaps exactly their ids in the output (what test-time augmentation relies on). The last
//! id is always EOS, the token the classifier reads.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::bail;
use crate::data::csv::ArenaRow;
use crate::error::{Error, Result};

/// An older turn is cut to fit only if this many content ids remain for it.
pub const MIN_PARTIAL_TURN: usize = 32;

const H_PROMPT: &str = "<prompt>:";
const H_A: &str = "\n\n<response_a>:";
const H_B: &str = "\n\n<response_b>:";
const SEP: &str = "\n\n";
/// `concat`'s headers: the public notebook's strings.
const C_PROMPT: &str = "<prompt>: ";
const C_A: &str = "\n\n<response_a>: ";
const C_B: &str = "\n\n<response_b>: ";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextFormat {
    Concat,
    Turns,
}

impl std::str::FromStr for TextFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "concat" => Ok(TextFormat::Concat),
            "turns" => Ok(TextFormat::Turns),
            _ => Err(format!("unknown format `{s}` (expected concat or turns)")),
        }
    }
}

/// What a span of ids in a `turns` sequence holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Special,
    Header,
    Prompt(usize),
    ResponseA(usize),
    ResponseB(usize),
}

/// One turn's (index, prompt, response A, response B) ids after truncation.
type KeptTurn = (usize, Vec<u32>, Vec<u32>, Vec<u32>);

/// Turns rows into ids.
pub struct Encoder {
    tokenizer: Tokenizer,
    format: TextFormat,
    max_length: usize,
    eos: u32,
    prefix: Vec<u32>,
    h_prompt: Vec<u32>,
    h_a: Vec<u32>,
    h_b: Vec<u32>,
    sep: Vec<u32>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("tokenizer: {e}"))
}

impl Encoder {
    /// Load `tokenizer.json` and check it against the model's vocabulary.
    pub fn from_file(
        path: &Path,
        eos: u32,
        vocab_size: usize,
        format: TextFormat,
        max_length: usize,
    ) -> Result<Self> {
        if !path.exists() {
            bail!(
                Model,
                "{}: tokenizer not found (pass --tokenizer FILE or put tokenizer.json in the model directory)",
                path.display()
            );
        }
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| Error::Model(format!("{}: cannot load tokenizer: {e}", path.display())))?;
        Self::new(tokenizer, eos, vocab_size, format, max_length)
            .map_err(|e| e.context(format!("tokenizer {}", path.display())))
    }

    pub fn new(
        mut tokenizer: Tokenizer,
        eos: u32,
        vocab_size: usize,
        format: TextFormat,
        max_length: usize,
    ) -> Result<Self> {
        let max_id = tokenizer
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0);
        if max_id as usize >= vocab_size {
            bail!(
                Model,
                "token ids reach {max_id}, but the model's embedding table has only {vocab_size} rows; \
                 is this the model's own tokenizer?"
            );
        }
        if eos as usize >= vocab_size {
            bail!(
                Model,
                "eos_token_id {eos} is outside the embedding table of {vocab_size} rows"
            );
        }
        // transformers ignores a tokenizer.json's own truncation and padding settings unless
        // asked for them; so do we (truncation is the format's job).
        tokenizer.with_truncation(None).map_err(tok_err)?;
        tokenizer.with_padding(None);
        let enc = |s: &str, special: bool| -> Result<Vec<u32>> {
            Ok(tokenizer
                .encode_fast(s, special)
                .map_err(tok_err)?
                .get_ids()
                .to_vec())
        };
        // The special tokens the tokenizer puts before the text (BOS), found by comparing an
        // encoding with and without them; any it appends after the text (an EOS some
        // tokenizers add) are left out of `turns`, which ends with exactly one EOS.
        let bare = enc("x", false)?;
        let full = enc("x", true)?;
        let prefix = (0..=full.len().saturating_sub(bare.len()))
            .find(|&i| full[i..].starts_with(&bare))
            .map(|i| full[..i].to_vec())
            .unwrap_or_default();
        let (h_prompt, h_a, h_b, sep) = (
            enc(H_PROMPT, false)?,
            enc(H_A, false)?,
            enc(H_B, false)?,
            enc(SEP, false)?,
        );
        let min = match format {
            TextFormat::Concat => prefix.len() + 2,
            TextFormat::Turns => prefix.len() + h_prompt.len() + h_a.len() + h_b.len() + 1,
        };
        if max_length < min {
            bail!(
                Usage,
                "--max-length {max_length} is too small for the {format:?} format (it needs at least {min})"
            );
        }
        Ok(Encoder {
            tokenizer,
            format,
            max_length,
            eos,
            prefix,
            h_prompt,
            h_a,
            h_b,
            sep,
        })
    }

    pub fn format(&self) -> TextFormat {
        self.format
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    fn ids(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode_fast(text, special)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// The ids of a row, ending with EOS.
    pub fn encode(&self, row: &ArenaRow) -> Result<Vec<u32>> {
        match self.format {
            TextFormat::Concat => self.encode_concat(row),
            TextFormat::Turns => Ok(self
                .encode_turns(row)?
                .into_iter()
                .flat_map(|(_, ids)| ids)
                .collect()),
        }
    }

    fn encode_concat(&self, row: &ArenaRow) -> Result<Vec<u32>> {
        let join = |v: &[Option<String>]| {
            v.iter()
                .map(|s| s.as_deref().unwrap_or(""))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let text = format!(
            "{C_PROMPT}{}{C_A}{}{C_B}{}",
            join(&row.prompt),
            join(&row.response_a),
            join(&row.response_b)
        );
        let mut ids = self.ids(&text, true)?;
        ids.truncate(self.max_length - 1);
        ids.push(self.eos);
        Ok(ids)
    }

    /// The `turns` sequence as labelled spans (concatenated, they are [`Encoder::encode`]).
    pub fn encode_turns(&self, row: &ArenaRow) -> Result<Vec<(Part, Vec<u32>)>> {
        let n_turns = row
            .prompt
            .len()
            .max(row.response_a.len())
            .max(row.response_b.len())
            .max(1);
        let get = |v: &[Option<String>], t: usize| -> Result<Vec<u32>> {
            // Each piece follows its header after one space, tokenised with the text so the
            // word boundary merges as in running text.
            match v.get(t).and_then(|s| s.as_deref()) {
                Some(s) if !s.is_empty() => self.ids(&format!(" {s}"), false),
                _ => Ok(Vec::new()),
            }
        };
        let hdr = self.h_prompt.len() + self.h_a.len() + self.h_b.len();
        let mut remaining = self.max_length - self.prefix.len() - 1;
        // Newest first: (turn, p, a, b), cut to what is kept.
        let mut kept: Vec<KeptTurn> = Vec::new();
        for t in (0..n_turns).rev() {
            let (mut p, mut a, mut b) = (
                get(&row.prompt, t)?,
                get(&row.response_a, t)?,
                get(&row.response_b, t)?,
            );
            let overhead = hdr + if kept.is_empty() { 0 } else { self.sep.len() };
            let full = overhead + p.len() + a.len() + b.len();
            if full <= remaining {
                remaining -= full;
                kept.push((t, p, a, b));
                continue;
            }
            let space = remaining.saturating_sub(overhead);
            if kept.is_empty() || space >= MIN_PARTIAL_TURN {
                let (cp, cr) = fair_caps(space, p.len(), a.len(), b.len());
                p.truncate(cp);
                a.truncate(cr);
                b.truncate(cr);
                kept.push((t, p, a, b));
            }
            break;
        }
        let mut out = vec![(Part::Special, self.prefix.clone())];
        let last = kept.len();
        for (i, (t, p, a, b)) in kept.into_iter().rev().enumerate() {
            out.push((Part::Header, self.h_prompt.clone()));
            out.push((Part::Prompt(t), p));
            out.push((Part::Header, self.h_a.clone()));
            out.push((Part::ResponseA(t), a));
            out.push((Part::Header, self.h_b.clone()));
            out.push((Part::ResponseB(t), b));
            if i + 1 < last {
                out.push((Part::Header, self.sep.clone()));
            }
        }
        out.push((Part::Special, vec![self.eos]));
        Ok(out)
    }
}

/// Caps (prompt, each response) for a turn cut to `space` ids: the largest common cap `c`
/// with `min(p,c) + min(a,c) + min(b,c) ≤ space`, the prompt also taking what is left over.
pub fn fair_caps(space: usize, p: usize, a: usize, b: usize) -> (usize, usize) {
    let used = |c: usize| p.min(c) + a.min(c) + b.min(c);
    let (mut lo, mut hi) = (0usize, p.max(a).max(b));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if used(mid) <= space {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let c = lo;
    let leftover = space - used(c);
    ((c + leftover).min(p), c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_caps_fill_the_space_symmetrically() {
        assert_eq!(fair_caps(30, 100, 100, 100), (10, 10));
        assert_eq!(fair_caps(31, 100, 100, 100), (11, 10));
        assert_eq!(fair_caps(30, 2, 100, 100), (2, 14));
        assert_eq!(fair_caps(30, 100, 5, 100), (13, 12));
        assert_eq!(fair_caps(0, 10, 10, 10), (0, 0));
        for space in 0..60 {
            let (cp, cr) = fair_caps(space, 17, 23, 9);
            assert!(cp.min(17) + cr.min(23) + cr.min(9) <= space);
        }
    }
}
