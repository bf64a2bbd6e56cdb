//! How deeply a constraint nests, measured before any other work touches it:
//! the GBNF translation, serde_json, llguidance's compilers and the remote
//! server all walk nested groups recursively, and a grammar nested
//! thousands deep overflows the stack of the thread doing it (the inference
//! worker's, so every NPC with it). Each scan here is a loop over the text
//! with a counter: it cannot overflow whatever the input.

use super::OutputConstraint;

/// Deepest nesting a constraint may have: JSON objects and arrays for a
/// JSON schema (a schema level is usually two: `{"items": {…}}`), groups
/// `( … )` for GBNF, groups and optional groups `( … )` `[ … ]` for Lark.
/// Real schemas stay near 10 (an NPC's line schema with its actions is 10;
/// `schemars` keeps types flat with `$defs`) and grammars below that; deeper
/// ones are refused with
/// [`LlmError::InvalidConstraint`](crate::errors::LlmError::InvalidConstraint).
/// llguidance's own Lark parser stops at 30 levels, which a GBNF grammar
/// reaches with 28 groups: this bound keeps every kind below it.
pub const MAX_CONSTRAINT_NESTING: usize = 24;

/// The constraint, unless it nests deeper than [`MAX_CONSTRAINT_NESTING`].
pub(crate) fn check(constraint: &OutputConstraint) -> Result<(), String> {
    let (depth, what) = match constraint {
        OutputConstraint::JsonSchema(s) => (json_depth(s), "objects and arrays"),
        OutputConstraint::Gbnf(g) => (gbnf_depth(g), "groups"),
        OutputConstraint::Lark(g) => (lark_depth(g), "groups"),
    };
    if depth > MAX_CONSTRAINT_NESTING {
        return Err(format!(
            "the {} nests {what} deeper than {MAX_CONSTRAINT_NESTING} levels",
            constraint.kind()
        ));
    }
    Ok(())
}

/// Deepest `{`/`[` nesting of JSON text, strings skipped (stops counting
/// once past the bound).
pub(crate) fn json_depth(text: &str) -> usize {
    let mut depth = 0usize;
    let mut deepest = 0;
    let mut in_string = false;
    let mut escaped = false;
    for b in text.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
                if deepest > MAX_CONSTRAINT_NESTING {
                    return deepest;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Deepest `( … )` nesting of a GBNF grammar: string literals, character
/// classes and `#` comments skipped.
pub(crate) fn gbnf_depth(text: &str) -> usize {
    let mut depth = 0usize;
    let mut deepest = 0;
    let mut it = text.chars();
    while let Some(c) = it.next() {
        match c {
            '"' | '[' => {
                let close = if c == '"' { '"' } else { ']' };
                while let Some(d) = it.next() {
                    match d {
                        '\\' => {
                            it.next();
                        }
                        d if d == close => break,
                        _ => {}
                    }
                }
            }
            '#' => {
                for d in it.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            '(' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Deepest `( … )` / `[ … ]` / `{ … }` nesting of a Lark grammar: strings,
/// `/regex/` and `//` comments skipped (a regex's own groups are bounded by
/// its parser, which keeps no stack of its own).
pub(crate) fn lark_depth(text: &str) -> usize {
    let mut depth = 0usize;
    let mut deepest = 0;
    let mut it = text.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '/' if it.peek() == Some(&'/') => {
                for d in it.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            '"' | '/' => {
                while let Some(d) = it.next() {
                    match d {
                        '\\' => {
                            it.next();
                        }
                        '\n' => break,
                        d if d == c => break,
                        _ => {}
                    }
                }
            }
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested_json(levels: usize) -> String {
        let mut s = String::from(r#"{"type":"string"}"#);
        for _ in 0..levels {
            s = format!(r#"{{"type":"array","items":{s}}}"#);
        }
        s
    }

    fn nested_gbnf(levels: usize) -> String {
        format!("root ::= {}\"x\"{}", "(".repeat(levels), ")".repeat(levels))
    }

    fn nested_lark(levels: usize) -> String {
        format!("start: {}\"x\"{}", "(".repeat(levels), ")".repeat(levels))
    }

    #[test]
    fn depths_are_measured_outside_strings_and_comments() {
        assert_eq!(json_depth(r#"{"a":"{{{[[["}"#), 1);
        assert_eq!(json_depth(r#"{"a":"\"{{"}"#), 1);
        assert_eq!(json_depth(&nested_json(3)), 4);
        assert_eq!(gbnf_depth("root ::= \"((\" [(] # (((\n ( \"x\" )"), 1);
        assert_eq!(gbnf_depth(&nested_gbnf(5)), 5);
        assert_eq!(lark_depth("start: \"((\" /(((x)))/ // (((\n (\"x\")"), 1);
        assert_eq!(lark_depth(&nested_lark(7)), 7);
    }

    /// Deep nesting is refused before anything recursive runs: a million
    /// levels return an error quickly, on a small stack.
    #[test]
    fn deep_constraints_are_refused_whatever_the_depth() {
        let huge = 1_000_000;
        let cases = [
            OutputConstraint::JsonSchema("[".repeat(huge)),
            OutputConstraint::JsonSchema(nested_json(MAX_CONSTRAINT_NESTING)),
            OutputConstraint::Gbnf(nested_gbnf(huge)),
            OutputConstraint::Gbnf(nested_gbnf(MAX_CONSTRAINT_NESTING + 1)),
            OutputConstraint::Lark(nested_lark(huge)),
            OutputConstraint::Lark(format!("start: {}\"x\"", "[".repeat(huge))),
        ];
        std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || {
                for c in &cases {
                    let e = check(c).unwrap_err();
                    assert!(e.contains("deeper than"), "{e}");
                }
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// At the bound, every constraint compiles (llguidance included) on a
    /// thread with Rust's default 2 MiB stack: the bound is below where any
    /// walk could overflow.
    #[test]
    fn constraints_at_the_bound_compile_on_a_default_stack() {
        let cases = [
            OutputConstraint::JsonSchema(nested_json(MAX_CONSTRAINT_NESTING - 1)),
            OutputConstraint::Gbnf(nested_gbnf(MAX_CONSTRAINT_NESTING)),
            OutputConstraint::Lark(nested_lark(MAX_CONSTRAINT_NESTING)),
        ];
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let compiler = super::super::matcher::ConstraintCompiler::new(
                    &toktrie::ApproximateTokEnv::single_byte_env(),
                )
                .unwrap();
                for c in &cases {
                    check(c).unwrap();
                    if let Err(e) = compiler.matcher(c) {
                        panic!("{}: {e}", c.kind());
                    }
                }
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
