//! The `prompt` / `response_*` cells: JSON lists of strings, one per turn, whose entries may be
//! `null`. Real rows contain escaped lone surrogates (`"\ud83d"` without its pair), which
//! strict JSON parsers reject; this parser turns each one into U+FFFD, the way a lenient
//! decoder would, so no row is lost to a stray escape.

/// Parse a JSON list of strings/nulls. `Err` carries a short description for the caller to
/// wrap with file, row and field.
pub fn parse(cell: &str) -> Result<Vec<Option<String>>, String> {
    let mut p = Parser {
        s: cell.as_bytes(),
        i: 0,
        text: cell,
    };
    p.ws();
    if !p.eat(b'[') {
        return Err(format!(
            "not a JSON list (starts with {})",
            p.describe_here()
        ));
    }
    let mut out = Vec::new();
    p.ws();
    if p.eat(b']') {
        return p.finish(out);
    }
    loop {
        p.ws();
        match p.peek() {
            Some(b'"') => out.push(Some(p.string()?)),
            Some(b'n') if p.s[p.i..].starts_with(b"null") => {
                p.i += 4;
                out.push(None);
            }
            _ => {
                return Err(format!(
                    "list entries must be strings or null, found {}",
                    p.describe_here()
                ));
            }
        }
        p.ws();
        if p.eat(b',') {
            continue;
        }
        if p.eat(b']') {
            return p.finish(out);
        }
        return Err(format!(
            "expected `,` or `]` in the list, found {}",
            p.describe_here()
        ));
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    text: &'a str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn describe_here(&self) -> String {
        match self.text.get(self.i..) {
            Some(rest) if !rest.is_empty() => {
                let snippet: String = rest.chars().take(20).collect();
                format!(
                    "`{snippet}` at character {}",
                    self.text[..self.i].chars().count()
                )
            }
            _ => "the end of the cell".into(),
        }
    }

    fn finish(&mut self, out: Vec<Option<String>>) -> Result<Vec<Option<String>>, String> {
        self.ws();
        if self.i != self.s.len() {
            return Err(format!(
                "unexpected text after the list: {}",
                self.describe_here()
            ));
        }
        Ok(out)
    }

    fn hex4(&mut self) -> Result<u16, String> {
        let h = self
            .s
            .get(self.i..self.i + 4)
            .ok_or("truncated \\u escape")?;
        let h = std::str::from_utf8(h).map_err(|_| "invalid \\u escape")?;
        let v = u16::from_str_radix(h, 16).map_err(|_| format!("invalid \\u escape `\\u{h}`"))?;
        self.i += 4;
        Ok(v)
    }

    /// A JSON string starting at the opening quote.
    fn string(&mut self) -> Result<String, String> {
        self.i += 1;
        let mut out = String::new();
        loop {
            // Copy the run of plain bytes up to the next quote or backslash in one go.
            let start = self.i;
            while let Some(c) = self.peek() {
                if c == b'"' || c == b'\\' {
                    break;
                }
                self.i += 1;
            }
            // Splitting only at ASCII bytes keeps the slice on UTF-8 boundaries.
            out.push_str(&self.text[start..self.i]);
            match self.peek() {
                None => return Err("unterminated string".into()),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                _ => {
                    self.i += 1;
                    let Some(e) = self.peek() else {
                        return Err("unterminated escape".into());
                    };
                    self.i += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let u = self.hex4()?;
                            out.push(self.code_point(u)?);
                        }
                        other => return Err(format!("invalid escape `\\{}`", other as char)),
                    }
                }
            }
        }
    }

    /// Resolve a `\uXXXX` escape, joining surrogate pairs; a lone surrogate becomes U+FFFD.
    fn code_point(&mut self, u: u16) -> Result<char, String> {
        match u {
            0xD800..=0xDBFF => {
                if self.s[self.i..].starts_with(b"\\u") {
                    let save = self.i;
                    self.i += 2;
                    let lo = self.hex4()?;
                    if (0xDC00..=0xDFFF).contains(&lo) {
                        let c = 0x10000 + (((u as u32) - 0xD800) << 10) + (lo as u32 - 0xDC00);
                        return Ok(char::from_u32(c).unwrap_or('\u{FFFD}'));
                    }
                    // Not a low surrogate: leave it to be parsed on its own.
                    self.i = save;
                }
                Ok('\u{FFFD}')
            }
            0xDC00..=0xDFFF => Ok('\u{FFFD}'),
            _ => Ok(char::from_u32(u as u32).unwrap_or('\u{FFFD}')),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn strings_nulls_and_escapes() {
        let v = parse(r#"["a, \"b\"\n", null , "\u00e9\u4e2d"]"#).unwrap();
        assert_eq!(v, vec![Some("a, \"b\"\n".into()), None, Some("é中".into())]);
        assert_eq!(parse("[]").unwrap(), Vec::<Option<String>>::new());
        assert_eq!(parse(" [ null ] ").unwrap(), vec![None]);
    }

    #[test]
    fn surrogates() {
        assert_eq!(
            parse(r#"["\ud83d\ude00"]"#).unwrap(),
            vec![Some("😀".into())]
        );
        assert_eq!(
            parse(r#"["x\ud83dy"]"#).unwrap(),
            vec![Some("x\u{FFFD}y".into())]
        );
        assert_eq!(
            parse(r#"["\ude00\ud83d"]"#).unwrap(),
            vec![Some("\u{FFFD}\u{FFFD}".into())]
        );
        assert_eq!(
            parse(r#"["\ud83d\u0041"]"#).unwrap(),
            vec![Some("\u{FFFD}A".into())]
        );
        assert_eq!(
            parse("[\"raw 😀 中文\"]").unwrap(),
            vec![Some("raw 😀 中文".into())]
        );
    }

    #[test]
    fn errors() {
        for bad in [
            "hello",
            "\"x\"",
            "[\"a\"",
            "[1]",
            "[\"a\" \"b\"]",
            "[\"a\"] x",
            "[\"\\q\"]",
            "[\"\\u12\"]",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should fail");
        }
    }
}
