//! Constrained output: a request may ask for JSON matching a schema or for
//! text matching a grammar, and the engine masks every token the constraint
//! forbids while it samples, per sequence, inside the batched step. What a
//! constrained request produces is valid by construction; the completion
//! carries the parsed JSON value (or a typed error when generation stopped
//! before the constraint was satisfied, e.g. at `max_tokens`).
//!
//! Constraints are compiled by [llguidance](https://github.com/guidance-ai/llguidance)
//! (JSON Schema, Lark, regular expressions); GBNF grammars (llama.cpp's
//! format) are translated to its Lark dialect first. The remote
//! backend sends JSON schemas and GBNF to the server as llama-server's
//! `json_schema` / `grammar` fields and parses the result the same way.

pub(crate) mod gbnf;
pub(crate) mod matcher;
pub(crate) mod nesting;
pub(crate) mod validate;

pub use nesting::MAX_CONSTRAINT_NESTING;

use serde::de::DeserializeOwned;

use crate::request::FinishReason;

/// What a constrained request's output must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputConstraint {
    /// JSON matching this JSON Schema (its JSON text). Keywords the engine
    /// cannot enforce are ignored; `oneOf` is treated as `anyOf`. An object
    /// schema with `properties` but no `additionalProperties` is closed (only
    /// its listed properties), as a Rust type's would be: JSON Schema's own
    /// default lets a model add any key, and a small one will. Unless the
    /// schema sets its own `x-guidance` options, the JSON is written compactly
    /// (`", "` and `": "` separators, no free whitespace), so a small model
    /// cannot wander off into blank lines.
    JsonSchema(String),
    /// Text matching a GBNF grammar (llama.cpp's grammar format; the rule
    /// `root` is the start).
    Gbnf(String),
    /// Text matching a grammar in llguidance's Lark dialect (rule `start`).
    /// Local inference only: the remote backend refuses it.
    Lark(String),
}

impl OutputConstraint {
    /// JSON matching the JSON Schema of `T` (from `schemars`).
    #[must_use]
    pub fn json_for<T: schemars::JsonSchema>() -> Self {
        Self::JsonSchema(schemars::schema_for!(T).as_value().to_string())
    }

    /// Whether the output is JSON (parsed into [`LlmCompleted::output`](crate::events::LlmCompleted::output)).
    #[must_use]
    pub fn is_json(&self) -> bool {
        matches!(self, Self::JsonSchema(_))
    }

    /// Short name for messages.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonSchema(_) => "JSON schema",
            Self::Gbnf(_) => "GBNF grammar",
            Self::Lark(_) => "Lark grammar",
        }
    }
}

/// Why a constrained request's output is not the value asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    /// Generation ended before the constraint was complete (usually
    /// `max_tokens`; also a stop string or a full context).
    #[error("generation ended ({finish:?}) before the {kind} was complete: {text:?}")]
    Unfinished {
        /// Why generation ended.
        finish: FinishReason,
        /// The constraint's kind.
        kind: &'static str,
        /// What was generated.
        text: String,
    },
    /// The text is not JSON (only possible for a remote server that ignored
    /// the schema, or an unfinished generation).
    #[error("the output is not JSON ({error}): {text:?}")]
    NotJson {
        /// serde_json's message.
        error: String,
        /// What was generated.
        text: String,
    },
    /// The request asked for no JSON (no JSON schema).
    #[error("the request asked for no JSON output")]
    NotRequested,
    /// The text does not satisfy the constraint (only possible when a
    /// remote server ignored it: local generation cannot produce such text).
    /// Nothing of it reaches the game as a value or an action.
    #[error("the output does not match the {kind}: {text:?}")]
    DoesNotMatch {
        /// The constraint's kind.
        kind: &'static str,
        /// What was generated.
        text: String,
    },
    /// The JSON does not deserialize into the Rust type asked for.
    #[error("the JSON does not match the type {type_name}: {error}")]
    WrongType {
        /// The Rust type.
        type_name: &'static str,
        /// serde_json's message.
        error: String,
    },
}

/// The JSON value of a finished JSON-constrained generation, or why not.
///
/// Local generations end with the model's end-of-turn token only once the
/// grammar is complete, so `finish` tells whether it was.
pub(crate) fn parse_output(
    constraint: &OutputConstraint,
    text: &str,
    finish: FinishReason,
) -> Result<serde_json::Value, OutputError> {
    match serde_json::from_str(text) {
        Ok(v) => Ok(v),
        Err(e) if finish != FinishReason::EndOfTurn => {
            drop(e);
            Err(OutputError::Unfinished {
                finish,
                kind: constraint.kind(),
                text: text.to_string(),
            })
        }
        Err(e) => Err(OutputError::NotJson {
            error: e.to_string(),
            text: text.to_string(),
        }),
    }
}

/// A parsed JSON value as `T`.
pub(crate) fn value_as<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, OutputError> {
    T::deserialize(value).map_err(|e| OutputError::WrongType {
        type_name: std::any::type_name::<T>(),
        error: e.to_string(),
    })
}

/// How JSON is laid out under a schema: `Compact` as the engine generates
/// it (see [`OutputConstraint::JsonSchema`]), `Free` for checking text a
/// server laid out its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JsonLayout {
    Compact,
    Free,
}

/// The JSON schema with closed objects and the given JSON layout, unless
/// it sets `x-guidance` itself.
pub(crate) fn schema_with_defaults(
    schema: &str,
    layout: JsonLayout,
) -> Result<serde_json::Value, String> {
    let mut v: serde_json::Value =
        serde_json::from_str(schema).map_err(|e| format!("the JSON schema is not JSON: {e}"))?;
    close_objects(&mut v);
    if let Some(obj) = v.as_object_mut()
        && !obj.contains_key("x-guidance")
    {
        let guidance = match layout {
            JsonLayout::Compact => serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
                "coerce_one_of": true,
                "lenient": true,
            }),
            JsonLayout::Free => serde_json::json!({
                "whitespace_flexible": true,
                "coerce_one_of": true,
                "lenient": true,
            }),
        };
        obj.insert("x-guidance".into(), guidance);
    }
    Ok(v)
}

/// Every schema object with `properties` and no `additionalProperties` gets
/// `"additionalProperties": false` (see [`OutputConstraint::JsonSchema`]).
fn close_objects(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(obj) => {
            if obj
                .get("properties")
                .is_some_and(serde_json::Value::is_object)
                && !obj.contains_key("additionalProperties")
            {
                obj.insert("additionalProperties".into(), false.into());
            }
            for (key, child) in obj.iter_mut() {
                // Inside `properties` the keys are property names, the values
                // schemas; inside `enum`/`const` values are data, not schemas.
                if key != "enum" && key != "const" && key != "examples" && key != "default" {
                    close_objects(child);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}
