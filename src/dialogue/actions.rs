//! What an NPC may *do* while it talks, and the shape of every line.
//!
//! Every line is generated under a JSON schema, inside the batched step:
//! `{"say": "...", "action": ...}`. `say` is plain speech by construction
//! (see [`DialogueSettings::plain_speech`](super::DialogueSettings::plain_speech)):
//! no parentheses or asterisk actions, no `Name:` labels, no newlines, whole
//! sentences. `action` exists only for an NPC with [`NpcActions`]: `null` or
//! one value of the game's action type, so an action outside the NPC's
//! declared set cannot be generated at all. The `say` text still streams
//! token by token ([`ConversationLineToken`](crate::events::ConversationLineToken));
//! the action arrives with the finished line
//! ([`ConversationLineFinished::action`](crate::events::ConversationLineFinished::action))
//! and, typed, as [`NpcAction<A>`] from [`NpcActionPlugin<A>`].
//!
//! ```no_run
//! use bevy::prelude::*;
//! use bevy_npc_llm::dialogue::{NpcActionPlugin, NpcActions, NpcAction, Persona};
//! use schemars::JsonSchema;
//! use serde::Deserialize;
//!
//! #[derive(Debug, Clone, Deserialize, JsonSchema)]
//! enum Villager {
//!     WalkTo { place: Place },
//!     Wave,
//!     EndConversation,
//! }
//! #[derive(Debug, Clone, Deserialize, JsonSchema)]
//! enum Place { Well, Market }
//!
//! fn setup(mut commands: Commands) {
//!     commands.spawn((Persona::new("Mira", "The baker."), NpcActions::of::<Villager>()));
//! }
//! fn act(action: On<NpcAction<Villager>>) {
//!     println!("{:?} does {:?}", action.entity, action.action);
//! }
//! # let _ = App::new().add_plugins(NpcActionPlugin::<Villager>::default()).add_observer(act);
//! ```

use std::marker::PhantomData;

use bevy::prelude::*;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::NpcLlmSystems;
use crate::events::ConversationLineFinished;

/// The actions an NPC may take, as the JSON schema of a game-defined type.
#[derive(Component, Debug, Clone, PartialEq)]
pub struct NpcActions {
    schema: Value,
    hint: String,
}

impl NpcActions {
    /// The actions of the Rust type `A` (its `schemars` schema). Read them
    /// back typed with [`NpcActionPlugin::<A>`].
    #[must_use]
    pub fn of<A: schemars::JsonSchema>() -> Self {
        Self::from_schema(schemars::schema_for!(A).to_value())
    }

    /// Actions from a JSON schema (one value of it is one action).
    #[must_use]
    pub fn from_schema(schema: Value) -> Self {
        let mut names = Vec::new();
        action_names(&schema, &schema, &mut names, 0);
        names.dedup();
        let hint = names.join("; ");
        Self { schema, hint }
    }

    /// The schema.
    #[must_use]
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// The actions as told to the model: the schema's variant names, with
    /// their descriptions (doc comments) where the schema has them.
    #[must_use]
    pub fn hint(&self) -> &str {
        &self.hint
    }
}

/// The names of an action schema's variants, each with its description
/// when the schema has one (a doc comment, through `schemars`): the strings
/// of `const`/`enum` values and single-key object variants (serde's
/// externally tagged enums), following `$ref`s a few levels.
fn action_names(root: &Value, s: &Value, out: &mut Vec<String>, depth: u32) {
    if depth > 4 {
        return;
    }
    if let Some(r) = s.get("$ref").and_then(Value::as_str)
        && let Some(name) = r.strip_prefix("#/$defs/")
        && let Some(def) = root.get("$defs").and_then(|d| d.get(name))
    {
        action_names(root, def, out, depth + 1);
    }
    for key in ["oneOf", "anyOf"] {
        for v in s.get(key).and_then(Value::as_array).into_iter().flatten() {
            action_names(root, v, out, depth + 1);
        }
    }
    let described = |name: &str| match s.get("description").and_then(Value::as_str) {
        Some(d) => format!("{name} ({})", d.trim().trim_end_matches('.')),
        None => name.to_string(),
    };
    if let Some(c) = s.get("const").and_then(Value::as_str) {
        out.push(described(c));
    }
    for v in s
        .get("enum")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(c) = v.as_str() {
            out.push(c.to_string());
        }
    }
    if let Some(props) = s.get("properties").and_then(Value::as_object)
        && props.len() == 1
        && s.get("required")
            .and_then(Value::as_array)
            .is_some_and(|r| r.len() == 1)
    {
        out.extend(props.keys().map(|k| described(k)));
    }
}

/// The regular expression every spoken line matches: one to `sentences`
/// sentences, each starting with a capital letter, digit or opening
/// punctuation and ending in `.`, `!`, `?` or `…`, one space between them;
/// no parentheses, brackets, braces, asterisks, colons, semicolons, quotes,
/// angle brackets, `#`, `|`, `_`, `~`, backslashes, tabs or newlines.
#[must_use]
pub fn plain_speech_pattern(sentences: u32) -> String {
    let sentence = r#"[\p{Lu}\p{N}¡¿'][^.!?…()\[\]{}*:;"<>#|_~\\\n\r\t]*[.!?…]+"#;
    format!("^{sentence}( {sentence}){{0,{}}}$", sentences.max(1) - 1)
}

/// The JSON schema of one line: `say` (plain speech when `plain`, at most
/// `max_chars` characters) and, for an NPC with actions, `action` (`null` or
/// one action). The action type's `$defs` move to the root so its `$ref`s
/// still resolve.
pub(crate) fn line_schema(
    actions: Option<&NpcActions>,
    plain: bool,
    sentences: u32,
    max_chars: usize,
) -> Value {
    let mut say = json!({"type": "string", "minLength": 1, "maxLength": max_chars.max(1)});
    if plain {
        say["pattern"] = plain_speech_pattern(sentences).into();
    }
    let mut schema = json!({
        "type": "object",
        "properties": { "say": say },
        "required": ["say"],
        "additionalProperties": false,
    });
    if let Some(a) = actions {
        let mut action = a.schema.clone();
        let mut defs = Value::Null;
        if let Some(obj) = action.as_object_mut() {
            defs = obj.remove("$defs").unwrap_or(Value::Null);
            obj.remove("$schema");
            obj.remove("title");
            obj.remove("description");
        }
        schema["properties"]["action"] = json!({"anyOf": [{"type": "null"}, action]});
        schema["required"] = json!(["say", "action"]);
        if !defs.is_null() {
            schema["$defs"] = defs;
        }
    }
    schema
}

/// An NPC chose an action with its line (sent when the line is finished,
/// right after its [`ConversationLineFinished`]). `entity` is the NPC.
#[derive(EntityEvent, Message, Debug, Clone)]
pub struct NpcAction<A: Send + Sync + 'static> {
    /// The NPC.
    pub entity: Entity,
    /// The conversation entity.
    pub conversation: Entity,
    /// The line it said with it.
    pub line: String,
    /// The action.
    pub action: A,
}

/// Turns the actions of finished lines into typed [`NpcAction<A>`] events
/// (add one per action type; NPCs get theirs with [`NpcActions::of::<A>`]).
/// Runs in [`NpcLlmSystems::Dialogue`](crate::NpcLlmSystems::Dialogue),
/// after the dialogue's own systems.
pub struct NpcActionPlugin<A>(PhantomData<fn() -> A>);

impl<A> Default for NpcActionPlugin<A> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<A: DeserializeOwned + Clone + Send + Sync + 'static> Plugin for NpcActionPlugin<A> {
    fn build(&self, app: &mut App) {
        app.add_message::<NpcAction<A>>().add_systems(
            Update,
            emit_actions::<A>
                .in_set(NpcLlmSystems::Dialogue)
                .in_set(LineActions),
        );
    }
}

/// The systems that turn finished lines into typed actions: after the
/// dialogue's own step (which finishes the lines).
#[derive(SystemSet, Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct LineActions;

/// Actions of NPCs whose [`NpcActions`] is of type `A`: a line's action is
/// offered to every registered type and delivered by the one it parses as.
fn emit_actions<A: DeserializeOwned + Clone + Send + Sync + 'static>(
    mut commands: Commands,
    mut lines: MessageReader<ConversationLineFinished>,
    mut out: MessageWriter<NpcAction<A>>,
) {
    for line in lines.read() {
        let Some(v) = &line.action else { continue };
        if let Ok(action) = A::deserialize(v) {
            let e = NpcAction {
                entity: line.speaker,
                conversation: line.entity,
                line: line.text.clone(),
                action,
            };
            commands.trigger(e.clone());
            out.write(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constraint::OutputConstraint;
    use crate::constraint::matcher::tests::accepts;

    #[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
    #[allow(dead_code)]
    enum Act {
        WalkTo { place: Place },
        Wave,
        EndConversation,
    }
    #[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
    enum Place {
        Well,
        Market,
    }

    fn line(actions: Option<&NpcActions>) -> OutputConstraint {
        OutputConstraint::JsonSchema(line_schema(actions, true, 2, 80).to_string())
    }

    #[test]
    fn lines_are_plain_speech_by_construction() {
        let c = line(None);
        for ok in [
            "Good morning to you!",
            "The bread is warm. Take one?",
            "Étienne's cart broke… Again.",
            "42 loaves today!",
        ] {
            assert!(accepts(&c, &format!(r#"{{"say": "{ok}"}}"#)), "{ok}");
        }
        for bad in [
            "(smiling) Good morning.",
            "*waves* Hello.",
            "Q: what is new?",
            "Mira: hello.",
            "Hello.\nBye.",
            "One. Two. Three.",
            "no capital.",
            "Unfinished sentence",
            "",
        ] {
            assert!(!accepts(&c, &format!(r#"{{"say": "{bad}"}}"#)), "{bad}");
        }
        let long = format!("{}.", "A".repeat(80));
        assert!(
            !accepts(&c, &format!(r#"{{"say": "{long}"}}"#)),
            "maxLength"
        );
    }

    #[test]
    fn only_declared_actions_can_be_generated() {
        let actions = NpcActions::of::<Act>();
        let mut names: Vec<&str> = actions.hint().split("; ").collect();
        names.sort_unstable();
        assert_eq!(names, ["EndConversation", "WalkTo", "Wave"]);
        let c = line(Some(&actions));
        for ok in [
            r#"{"say": "Follow me!", "action": {"WalkTo": {"place": "Well"}}}"#,
            r#"{"say": "Hello there.", "action": "Wave"}"#,
            r#"{"say": "Farewell.", "action": null}"#,
        ] {
            assert!(accepts(&c, ok), "{ok}");
            let v: Value = serde_json::from_str(ok).unwrap();
            if !v["action"].is_null() {
                let _: Act = serde_json::from_value(v["action"].clone()).unwrap();
            }
        }
        for bad in [
            r#"{"say": "Follow me!", "action": {"WalkTo": {"place": "Moon"}}}"#,
            r#"{"say": "Hi.", "action": "Dance"}"#,
            r#"{"say": "Hi."}"#,
            r#"{"say": "Hi.", "action": "Wave", "extra": 1}"#,
        ] {
            assert!(!accepts(&c, bad), "{bad}");
        }
        // Without actions there is no action field at all.
        assert!(!accepts(&line(None), r#"{"say": "Hi.", "action": null}"#));
    }
}
