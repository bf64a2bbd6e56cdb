//! Finished text checked against its constraint where generation did not
//! enforce it: a remote server may ignore `json_schema` or `grammar`. The
//! check runs the same llguidance grammar the local engine samples with, on
//! a byte-level vocabulary, with JSON whitespace left free (a server lays
//! JSON out its own way): text the local engine could not have produced
//! for the constraint never reaches the game as a value or an action.

use std::sync::OnceLock;

use serde_json::Value;

use super::matcher::ConstraintCompiler;
use super::{JsonLayout, OutputConstraint, OutputError, parse_output};
use crate::request::FinishReason;

/// The compiler for a byte-level vocabulary (built once: cheap, 256 tokens).
fn byte_compiler() -> Option<&'static ConstraintCompiler> {
    static COMPILER: OnceLock<Option<ConstraintCompiler>> = OnceLock::new();
    COMPILER
        .get_or_init(|| ConstraintCompiler::for_bytes().ok())
        .as_ref()
}

/// Whether `text` satisfies `constraint` whole.
pub(crate) fn satisfies(constraint: &OutputConstraint, text: &str) -> bool {
    let Some(compiler) = byte_compiler() else {
        return false;
    };
    // JSON whitespace is free: a server lays JSON out its own way.
    let Ok(mut m) = compiler.matcher_with(constraint, JsonLayout::Free) else {
        return false;
    };
    let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
    m.consume_tokens(&bytes).is_ok() && m.is_accepting().unwrap_or(false)
}

/// What a completion reports as its output when generation did not enforce
/// the constraint: for JSON the value, only when it parses *and* satisfies
/// the schema; for a grammar nothing, or [`OutputError::DoesNotMatch`].
/// `None` without a constraint.
pub(crate) fn unenforced_output(
    constraint: Option<&OutputConstraint>,
    text: &str,
    finish: FinishReason,
) -> Option<Result<Value, OutputError>> {
    let c = constraint?;
    let mismatch = || OutputError::DoesNotMatch {
        kind: c.kind(),
        text: text.to_string(),
    };
    if c.is_json() {
        Some(parse_output(c, text, finish).and_then(|v| {
            if satisfies(c, text) {
                Ok(v)
            } else {
                Err(mismatch())
            }
        }))
    } else if satisfies(c, text) {
        None
    } else if finish == FinishReason::EndOfTurn {
        Some(Err(mismatch()))
    } else {
        Some(Err(OutputError::Unfinished {
            finish,
            kind: c.kind(),
            text: text.to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"type":"object","properties":{"say":{"type":"string"},"action":{"anyOf":[{"type":"null"},{"type":"object","properties":{"Give":{"type":"object","properties":{"item":{"enum":["bread","apple"]}},"required":["item"]}},"required":["Give"]}]}},"required":["say","action"]}"#;

    #[test]
    fn only_text_the_constraint_allows_is_a_value() {
        let c = OutputConstraint::JsonSchema(LINE.into());
        let end = FinishReason::EndOfTurn;
        for ok in [
            r#"{"say": "Here.", "action": {"Give": {"item": "bread"}}}"#,
            r#"{"say":"Hi","action":null}"#,
            "{\n  \"say\" : \"Hi\",\n  \"action\" : null\n}",
        ] {
            assert!(
                matches!(unenforced_output(Some(&c), ok, end), Some(Ok(_))),
                "{ok}"
            );
        }
        for bad in [
            r#"{"say": 5, "action": null}"#,
            r#"{"say": "Hi", "action": {"Give": {"item": "crown"}}}"#,
            r#"{"say": "Hi"}"#,
            r#"{"say": "Hi", "action": null, "extra": 1}"#,
        ] {
            assert!(
                matches!(
                    unenforced_output(Some(&c), bad, end),
                    Some(Err(OutputError::DoesNotMatch { .. }))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            unenforced_output(Some(&c), &"[".repeat(100_000), end),
            Some(Err(OutputError::NotJson { .. }))
        ));
        let g = OutputConstraint::Gbnf(r#"root ::= "yes" | "no""#.into());
        assert_eq!(unenforced_output(Some(&g), "yes", end), None);
        assert!(matches!(
            unenforced_output(Some(&g), "maybe", end),
            Some(Err(OutputError::DoesNotMatch { .. }))
        ));
        assert_eq!(unenforced_output(None, "anything", end), None);
    }
}
