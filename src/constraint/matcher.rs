//! The local engine's side of constraints: compile an [`OutputConstraint`]
//! with llguidance for the loaded model's vocabulary, and, per sequence and
//! step, the mask of allowed tokens that the sampler draws from.

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::TokEnv;

use super::{JsonLayout, OutputConstraint, gbnf, schema_with_defaults};

/// The llguidance grammar of a constraint (its nesting checked first:
/// nothing recursive runs on a constraint nested too deeply).
pub(crate) fn grammar(
    constraint: &OutputConstraint,
    layout: JsonLayout,
) -> Result<TopLevelGrammar, String> {
    super::nesting::check(constraint)?;
    Ok(match constraint {
        OutputConstraint::JsonSchema(schema) => {
            TopLevelGrammar::from_json_schema(schema_with_defaults(schema, layout)?)
        }
        OutputConstraint::Gbnf(g) => TopLevelGrammar::from_lark(
            gbnf::to_lark(g).map_err(|e| format!("the GBNF grammar is invalid: {}", e.0))?,
        ),
        OutputConstraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
    })
}

/// Compiles constraints for one vocabulary (built once per loaded model, on
/// the first constrained request: walking a 49k–262k vocabulary takes a
/// fraction of a second).
pub(crate) struct ConstraintCompiler {
    factory: ParserFactory,
}

impl ConstraintCompiler {
    pub(crate) fn new(env: &TokEnv) -> Result<Self, String> {
        let mut factory = ParserFactory::new_simple(env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A compiler for a byte-level vocabulary (a token per byte), without
    /// the vocabulary slices that speed up masks over a real model's
    /// vocabulary (they cost every compile a set of extra lexemes): for
    /// checking finished text against a constraint, and for fuzzing the
    /// compile path.
    pub(crate) fn for_bytes() -> Result<Self, String> {
        let env = toktrie::ApproximateTokEnv::single_byte_env();
        let mut factory =
            ParserFactory::new(&env, Default::default(), &[]).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A fresh matcher for one request, or why the constraint is unusable.
    pub(crate) fn matcher(&self, constraint: &OutputConstraint) -> Result<Matcher, String> {
        self.matcher_with(constraint, JsonLayout::Compact)
    }

    /// A fresh matcher with JSON laid out as `layout`.
    pub(crate) fn matcher_with(
        &self,
        constraint: &OutputConstraint,
        layout: JsonLayout,
    ) -> Result<Matcher, String> {
        let parser = self
            .factory
            .create_parser(grammar(constraint, layout)?)
            .map_err(|e| format!("the {} cannot be used: {e}", constraint.kind()))?;
        let m = Matcher::new(Ok(parser));
        match m.get_error() {
            Some(e) => Err(format!("the {} cannot be used: {e}", constraint.kind())),
            None => Ok(m),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Whether the constraint accepts `text` whole, on a byte-level vocabulary.
    pub(crate) fn accepts(c: &OutputConstraint, text: &str) -> bool {
        let compiler = ConstraintCompiler::new(&toktrie::ApproximateTokEnv::single_byte_env())
            .expect("factory");
        let mut m = compiler.matcher(c).expect("compiles");
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        m.consume_tokens(&bytes).is_ok() && m.is_accepting().unwrap_or(false)
    }

    fn gbnf(g: &str) -> OutputConstraint {
        OutputConstraint::Gbnf(g.into())
    }

    #[test]
    fn gbnf_grammars_accept_exactly_their_language() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            (
                r#"root ::= "yes" | "no""#,
                &["yes", "no"],
                &["", "y", "yesno", "No", "maybe"],
            ),
            (
                "root ::= [a-c]+ \"!\"?",
                &["a", "abc!", "cccc"],
                &["", "!", "ad", "ab!!"],
            ),
            (
                "root ::= [^\"\\n]{2,3}",
                &["ab", "é!?"],
                &["a", "abcd", "a\"", "a\n"],
            ),
            (
                "root ::= name \": \" word\nname ::= [A-Z] [a-z]*\nword ::= (\"hi\" | \"bye\") (\" \" word)?",
                &["Mira: hi", "Bo: bye hi bye"],
                &["mira: hi", "Mira:hi", "Mira: hi "],
            ),
            (
                "root ::= \"\\x41\\u00e9\\t\" . [\\]\\-]",
                &["Aé\tx]", "Aé\t\n-"],
                &["Aé\tx", "Ae\tx]"],
            ),
            (
                "root ::= \"a\"{3} \"b\"{1,} \"c\"{0,2}",
                &["aaab", "aaabbbcc"],
                &["aab", "aaa", "aaabccc"],
            ),
            (r#"root ::= "" | "x""#, &["", "x"], &["xx"]),
            (
                "root ::= bra-ket\nbra-ket ::= \"<\" braKet? \">\"\nbraKet ::= \"k\"",
                &["<>", "<k>"],
                &["<kk>"],
            ),
        ];
        for (g, yes, no) in cases {
            let c = gbnf(g);
            for t in *yes {
                assert!(accepts(&c, t), "{g:?} should accept {t:?}");
            }
            for t in *no {
                assert!(!accepts(&c, t), "{g:?} should refuse {t:?}");
            }
        }
    }

    #[test]
    fn json_schemas_are_written_compactly_and_enforced() {
        let c = OutputConstraint::JsonSchema(
            r#"{"type":"object","properties":{"say":{"type":"string","maxLength":5},"n":{"type":"integer","minimum":0}},"required":["say","n"],"additionalProperties":false}"#
                .into(),
        );
        assert!(accepts(&c, r#"{"say": "hi", "n": 3}"#));
        assert!(!accepts(&c, r#"{"say":"hi","n":3}"#), "compact separators");
        assert!(
            !accepts(&c, "{\"say\": \"hi\",\n\"n\": 3}"),
            "no free whitespace"
        );
        assert!(!accepts(&c, r#"{"say": "toolong", "n": 3}"#));
        assert!(!accepts(&c, r#"{"say": "hi", "n": -1}"#));
        assert!(!accepts(&c, r#"{"say": "hi"}"#));
    }

    #[test]
    fn objects_admit_only_their_properties_unless_the_schema_opens_them() {
        let nested = r#"{"type":"object","properties":{"a":{"type":"object","properties":{"k":{"type":"integer"}},"required":["k"]}},"required":["a"]}"#;
        let c = OutputConstraint::JsonSchema(nested.into());
        assert!(accepts(&c, r#"{"a": {"k": 1}}"#));
        assert!(!accepts(&c, r#"{"a": {"k": 1, "story": 2}}"#));
        assert!(!accepts(&c, r#"{"a": {"k": 1}, "b": 2}"#));
        let open = r#"{"type":"object","properties":{"k":{"type":"integer"}},"required":["k"],"additionalProperties":true}"#;
        let c = OutputConstraint::JsonSchema(open.into());
        assert!(accepts(&c, r#"{"k": 1, "story": 2}"#));
        // A schema that is data inside `enum`/`const` is left alone.
        let data = r#"{"enum":[{"properties":{"x":1}}]}"#;
        let v = schema_with_defaults(data, JsonLayout::Compact).unwrap();
        assert!(v["enum"][0].get("additionalProperties").is_none());
    }

    #[test]
    fn bad_constraints_are_errors_not_panics() {
        let compiler =
            ConstraintCompiler::new(&toktrie::ApproximateTokEnv::single_byte_env()).unwrap();
        for c in [
            OutputConstraint::JsonSchema("{not json".into()),
            OutputConstraint::JsonSchema(r#"{"type":"nonsense"}"#.into()),
            OutputConstraint::Gbnf("root ::= missing".into()),
            OutputConstraint::Lark("start: undefined_rule".into()),
        ] {
            match compiler.matcher(&c) {
                Ok(_) => panic!("{c:?} compiled"),
                Err(e) => assert!(!e.is_empty(), "{c:?}"),
            }
        }
    }
}
