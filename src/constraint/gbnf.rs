//! GBNF (llama.cpp's grammar format) translated to llguidance's Lark
//! dialect, character for character: every GBNF terminal becomes
//! single-character lexemes, so the translated grammar accepts exactly the
//! strings the GBNF grammar does (GBNF has no lexer; neither does this
//! translation, in effect). Pure text in, text out.

use std::collections::BTreeSet;

/// A GBNF grammar that cannot be translated, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GbnfError(pub String);

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    Def,
    Pipe,
    LParen,
    RParen,
    Star,
    Plus,
    Quest,
    Repeat(u32, Option<u32>),
    Literal(Vec<char>),
    Class(bool, Vec<(char, char)>),
    Dot,
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-'
}

/// One escaped character after a backslash (`it` is past the backslash).
fn escape(it: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<char, GbnfError> {
    let c = it
        .next()
        .ok_or_else(|| GbnfError("a backslash at the end of the grammar".into()))?;
    let hex = |it: &mut std::iter::Peekable<std::str::Chars<'_>>, n: usize| {
        let mut v = 0u32;
        for _ in 0..n {
            let d = it
                .next()
                .and_then(|d| d.to_digit(16))
                .ok_or_else(|| GbnfError(format!("expected {n} hex digits after \\{c}")))?;
            v = v * 16 + d;
        }
        char::from_u32(v).ok_or_else(|| GbnfError(format!("\\{c}{v:X} is not a character")))
    };
    Ok(match c {
        'n' => '\n',
        't' => '\t',
        'r' => '\r',
        'x' => hex(it, 2)?,
        'u' => hex(it, 4)?,
        'U' => hex(it, 8)?,
        '\\' | '"' | '[' | ']' | '-' | '^' | '/' => c,
        other => return Err(GbnfError(format!("unknown escape \\{other}"))),
    })
}

fn lex(src: &str) -> Result<Vec<Tok>, GbnfError> {
    let mut out = Vec::new();
    let mut it = src.chars().peekable();
    while let Some(&c) = it.peek() {
        match c {
            c if c.is_whitespace() => {
                it.next();
            }
            '#' => while it.next().is_some_and(|c| c != '\n') {},
            ':' => {
                it.next();
                if it.next() != Some(':') || it.next() != Some('=') {
                    return Err(GbnfError("expected ::=".into()));
                }
                out.push(Tok::Def);
            }
            '|' | '(' | ')' | '*' | '+' | '?' | '.' => {
                it.next();
                out.push(match c {
                    '|' => Tok::Pipe,
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    '*' => Tok::Star,
                    '+' => Tok::Plus,
                    '?' => Tok::Quest,
                    _ => Tok::Dot,
                });
            }
            '{' => {
                it.next();
                let mut body = String::new();
                loop {
                    match it.next() {
                        Some('}') => break,
                        Some(c) => body.push(c),
                        None => return Err(GbnfError("unclosed {".into())),
                    }
                }
                let num = |s: &str| {
                    s.trim()
                        .parse::<u32>()
                        .map_err(|_| GbnfError(format!("bad repetition {{{body}}}")))
                };
                let tok = match body.split_once(',') {
                    None => {
                        let n = num(&body)?;
                        Tok::Repeat(n, Some(n))
                    }
                    Some((a, b)) if b.trim().is_empty() => Tok::Repeat(num(a)?, None),
                    Some((a, b)) => {
                        let (a, b) = (num(a)?, num(b)?);
                        if b < a {
                            return Err(GbnfError(format!("bad repetition {{{body}}}")));
                        }
                        Tok::Repeat(a, Some(b))
                    }
                };
                out.push(tok);
            }
            '"' => {
                it.next();
                let mut s = Vec::new();
                loop {
                    match it.next() {
                        Some('"') => break,
                        Some('\\') => s.push(escape(&mut it)?),
                        Some(c) => s.push(c),
                        None => return Err(GbnfError("unclosed string literal".into())),
                    }
                }
                out.push(Tok::Literal(s));
            }
            '[' => {
                it.next();
                let negated = it.next_if_eq(&'^').is_some();
                let mut ranges = Vec::new();
                loop {
                    let lo = match it.next() {
                        Some(']') => break,
                        Some('\\') => escape(&mut it)?,
                        Some(c) => c,
                        None => return Err(GbnfError("unclosed character class".into())),
                    };
                    let mut hi = lo;
                    if it.peek() == Some(&'-') {
                        let mut look = it.clone();
                        look.next();
                        if look.peek().is_some_and(|c| *c != ']') {
                            it.next();
                            hi = match it.next() {
                                Some('\\') => escape(&mut it)?,
                                Some(c) => c,
                                None => unreachable!("peeked"),
                            };
                            if hi < lo {
                                return Err(GbnfError(format!("bad range {lo}-{hi}")));
                            }
                        }
                    }
                    ranges.push((lo, hi));
                }
                if ranges.is_empty() && !negated {
                    return Err(GbnfError("empty character class".into()));
                }
                out.push(Tok::Class(negated, ranges));
            }
            c if is_word(c) => {
                let mut name = String::new();
                while let Some(&c) = it.peek().filter(|c| is_word(**c)) {
                    name.push(c);
                    it.next();
                }
                out.push(Tok::Name(name));
            }
            other => return Err(GbnfError(format!("unexpected character {other:?}"))),
        }
    }
    Ok(out)
}

/// A rule name as a Lark rule name: lower-case letters and digits kept,
/// `-` as `_d`, an upper-case letter as `_u` and its lower case (so two GBNF
/// names never meet), behind `g_`.
fn rule_name(name: &str) -> String {
    let mut s = String::from("g_");
    for c in name.chars() {
        match c {
            '-' => s.push_str("_d"),
            c if c.is_ascii_uppercase() => {
                s.push_str("_u");
                s.push(c.to_ascii_lowercase());
            }
            c => s.push(c),
        }
    }
    s
}

/// A character inside a regex, escaped unless it is a letter or digit.
fn rx_char(c: char) -> String {
    if c.is_ascii_alphanumeric() {
        c.to_string()
    } else {
        format!("\\x{{{:X}}}", c as u32)
    }
}

struct Parser<'a> {
    toks: &'a [Tok],
    at: usize,
    used: BTreeSet<String>,
    /// Groups open now: the descent recurses once per group, so it stops
    /// at [`super::MAX_CONSTRAINT_NESTING`] whatever checked the text before.
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }

    /// The next token starts a new rule (`name ::=`).
    fn at_rule_start(&self) -> bool {
        matches!(self.peek(), Some(Tok::Name(_))) && self.toks.get(self.at + 1) == Some(&Tok::Def)
    }

    fn alternatives(&mut self, nested: bool) -> Result<String, GbnfError> {
        let mut alts = vec![self.sequence(nested)?];
        while self.peek() == Some(&Tok::Pipe) {
            self.at += 1;
            alts.push(self.sequence(nested)?);
        }
        Ok(alts.join(" | "))
    }

    fn sequence(&mut self, nested: bool) -> Result<String, GbnfError> {
        let mut items: Vec<String> = Vec::new();
        loop {
            if !nested && self.at_rule_start() {
                break;
            }
            let item = match self.peek() {
                None | Some(Tok::Pipe | Tok::RParen) => break,
                Some(Tok::Name(n)) => {
                    let n = n.clone();
                    self.at += 1;
                    self.used.insert(n.clone());
                    rule_name(&n)
                }
                Some(Tok::Literal(chars)) => {
                    let chars = chars.clone();
                    self.at += 1;
                    if chars.is_empty() {
                        "\"\"".to_string()
                    } else {
                        let parts: Vec<String> =
                            chars.iter().map(|c| format!("/{}/", rx_char(*c))).collect();
                        format!("({})", parts.join(" "))
                    }
                }
                Some(Tok::Class(negated, ranges)) => {
                    let (negated, ranges) = (*negated, ranges.clone());
                    self.at += 1;
                    let body: String = ranges
                        .iter()
                        .map(|(lo, hi)| {
                            if lo == hi {
                                rx_char(*lo)
                            } else {
                                format!("{}-{}", rx_char(*lo), rx_char(*hi))
                            }
                        })
                        .collect();
                    if negated && body.is_empty() {
                        "/(?s:.)/".to_string()
                    } else {
                        format!("/[{}{body}]/", if negated { "^" } else { "" })
                    }
                }
                Some(Tok::Dot) => {
                    self.at += 1;
                    "/(?s:.)/".to_string()
                }
                Some(Tok::LParen) => {
                    self.at += 1;
                    self.depth += 1;
                    if self.depth > super::MAX_CONSTRAINT_NESTING {
                        return Err(GbnfError(format!(
                            "groups nest deeper than {} levels",
                            super::MAX_CONSTRAINT_NESTING
                        )));
                    }
                    let inner = self.alternatives(true)?;
                    self.depth -= 1;
                    if self.peek() != Some(&Tok::RParen) {
                        return Err(GbnfError("unclosed (".into()));
                    }
                    self.at += 1;
                    format!("({inner})")
                }
                Some(t) => return Err(GbnfError(format!("unexpected {t:?}"))),
            };
            let item = match self.peek() {
                Some(Tok::Star) => format!("{item}*"),
                Some(Tok::Plus) => format!("{item}+"),
                Some(Tok::Quest) => format!("{item}?"),
                Some(Tok::Repeat(a, b)) => match b {
                    Some(b) => format!("{item}{{{a},{b}}}"),
                    None => format!("{item}{{{a},}}"),
                },
                _ => {
                    items.push(item);
                    continue;
                }
            };
            self.at += 1;
            items.push(item);
        }
        Ok(if items.is_empty() {
            "\"\"".to_string()
        } else {
            items.join(" ")
        })
    }
}

/// Translate a GBNF grammar (start rule `root`) into llguidance Lark.
pub(crate) fn to_lark(gbnf: &str) -> Result<String, GbnfError> {
    let toks = lex(gbnf)?;
    let mut p = Parser {
        toks: &toks,
        at: 0,
        used: BTreeSet::new(),
        depth: 0,
    };
    let mut defined = BTreeSet::new();
    let mut out = String::from("start: g_root\n");
    while p.at < toks.len() {
        let Some(Tok::Name(name)) = p.peek().cloned() else {
            return Err(GbnfError(format!(
                "expected a rule name, found {:?}",
                p.peek()
            )));
        };
        p.at += 1;
        if p.peek() != Some(&Tok::Def) {
            return Err(GbnfError(format!("expected ::= after {name}")));
        }
        p.at += 1;
        let body = p.alternatives(false)?;
        if !defined.insert(name.clone()) {
            return Err(GbnfError(format!("rule {name} is defined twice")));
        }
        out.push_str(&format!("{}: {body}\n", rule_name(&name)));
    }
    if !defined.contains("root") {
        return Err(GbnfError("the grammar has no root rule".into()));
    }
    if let Some(missing) = p.used.difference(&defined).next() {
        return Err(GbnfError(format!("rule {missing} is used but not defined")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_never_collide() {
        let names = ["a-b", "aB", "a-d", "ab", "A", "a", "x-u", "xU"];
        let mangled: BTreeSet<String> = names.iter().map(|n| rule_name(n)).collect();
        assert_eq!(mangled.len(), names.len());
    }

    #[test]
    fn errors_are_typed_and_say_where() {
        for (g, want) in [
            ("root ::= foo", "rule foo is used but not defined"),
            ("item ::= \"x\"", "no root rule"),
            ("root ::= \"x", "unclosed string"),
            ("root ::= [a-", "unclosed character class"),
            ("root ::= (\"a\"", "unclosed ("),
            ("root ::= \"a\"{3,1}", "bad repetition"),
            ("root ::= \"\\q\"", "unknown escape"),
            ("root ::= \"a\"\nroot ::= \"b\"", "defined twice"),
            ("root : \"a\"", "expected ::="),
        ] {
            let e = to_lark(g).unwrap_err();
            assert!(e.0.contains(want), "{g:?}: {e:?}");
        }
    }

    /// The translation itself refuses deep nesting (it is also called
    /// directly, e.g. by the remote backend), on a small stack.
    #[test]
    fn deep_groups_are_an_error_not_a_stack_overflow() {
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(|| {
                let deep = format!(
                    "root ::= {}\"x\"{}",
                    "(".repeat(100_000),
                    ")".repeat(100_000)
                );
                let e = to_lark(&deep).unwrap_err();
                assert!(e.0.contains("deeper than"), "{e:?}");
                let n = crate::constraint::MAX_CONSTRAINT_NESTING;
                let ok = format!("root ::= {}\"x\"{}", "(".repeat(n), ")".repeat(n));
                assert!(to_lark(&ok).is_ok());
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn rules_span_lines_and_comments() {
        let g = "# a comment\nroot ::= greeting \" \" name # trailing\n  | \"hi\"\ngreeting ::= (\"hello\" |\n \"hey\")\nname ::= [A-Z] [a-z]{1,8}\n";
        let lark = to_lark(g).unwrap();
        assert!(lark.starts_with("start: g_root\n"), "{lark}");
        assert_eq!(lark.lines().count(), 4, "{lark}");
    }
}
