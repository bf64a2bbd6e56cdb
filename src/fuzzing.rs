//! Entry points for the `cargo fuzz` targets in `fuzz/` (feature `fuzzing`,
//! not part of the public API). Each function panics when an invariant the
//! crate promises is broken; libFuzzer reports the panic as a crash.

use std::path::Path;

use bevy::prelude::{Entity, World};
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;

use crate::dialogue::{
    Conversation, ConversationLimits, ConversationState, Persona, TranscriptLine,
};
use crate::engine::prompt::{Piece, PromptRenderer, tokenize_pieces};
use crate::registry::{ModelRegistry, PromptFormat};
use crate::request::{ChatMessage, ChatRole, LlmPrompt};
use crate::settings::LlmSettings;

/// Parse `text` as one of the RON files the crate reads, chosen by `which`
/// (0 a model registry, 1 the settings, 2 a persona list, 3 a dialogue
/// save; the fuzz target takes it from the input's first byte, so each
/// execution runs one parser and the fuzzer moves inputs between them).
/// Errors are fine (and are formatted, to exercise their `Display`); panics
/// are not, and what parses must also pass its own validation.
pub fn parse_config(which: u8, text: &str) {
    match which % 4 {
        0 => parse_registry(text),
        1 => parse_settings(text),
        2 => parse_personas(text),
        _ => parse_save(text),
    }
}

fn parse_registry(text: &str) {
    match ModelRegistry::from_ron_str(text, "models", "fuzz.ron") {
        Ok(registry) => {
            for entry in registry.iter() {
                assert!(registry.get(&entry.id).is_some());
                assert!(
                    entry.sha256.len() == 64 || entry.sha256.is_empty(),
                    "an accepted entry has a full sha256, or none yet"
                );
            }
        }
        Err(e) => drop(e.to_string()),
    }
}

fn parse_settings(text: &str) {
    match LlmSettings::from_ron_str(text, "fuzz.ron") {
        Ok(settings) => {
            settings.validate().expect("parsed settings are valid");
            assert!(settings.capacity() >= 1);
        }
        Err(e) => drop(e.to_string()),
    }
}

fn parse_personas(text: &str) {
    match Persona::list_from_ron(text, "fuzz.ron") {
        Ok(list) => assert!(list.iter().all(|p| !p.name.trim().is_empty())),
        Err(e) => drop(e.to_string()),
    }
}

fn parse_save(text: &str) {
    // One world per thread, emptied after a successful load: a new World
    // per input would dominate the run.
    thread_local! {
        static WORLD: std::cell::RefCell<World> = std::cell::RefCell::new(World::new());
    }
    WORLD.with_borrow_mut(|world| match crate::dialogue::load_dialogue(world, text) {
        Ok(()) => world.clear_entities(),
        Err(e) => drop(e.to_string()),
    });
}

/// How [`PromptHarness`] counts the control tokens of rendered pieces.
enum Tokenizer {
    /// llama.cpp's tokenizer with the model's whole vocabulary (exact, but
    /// its regex pre-tokenizer makes it ~20 inputs/s).
    Llama,
    /// The model's control tokens only (the small vocabulary, read once):
    /// a piece the engine tokenizes with special parsing
    /// ([`Piece::text_and_special`]) yields one control token for each
    /// control-token text in it (leftmost, longest first); a piece it
    /// tokenizes without special parsing yields none, as llama.cpp does.
    Specials(Vec<String>, Box<[bool; 256]>),
}

/// The SmolLM2 model's vocabulary (ChatML template) loaded once, to check
/// what player and persona text becomes after rendering and tokenization.
pub struct PromptHarness {
    model: LlamaModel,
    chat: PromptRenderer,
    completion: PromptRenderer,
    tokenizer: Tokenizer,
    /// Control tokens of neutral prompts, by renderer and message shape.
    baselines: std::sync::Mutex<Baselines>,
}

type Baselines = std::collections::HashMap<(usize, Vec<(ChatRole, bool, bool)>), usize>;

impl PromptHarness {
    /// Load the model's vocabulary at `path` and count control tokens with
    /// its control tokens only (fast: the `build_prompt` target).
    ///
    /// # Panics
    /// When the model does not load: the fuzz script fetches it first.
    #[must_use]
    pub fn new(path: &Path) -> Self {
        let mut h = Self::with_llama_tokenizer(path);
        let vocab = h.model.vocab();
        let mut specials: Vec<String> = vocab
            .tokens()
            .filter(|t| vocab.is_control(*t))
            .map(|t| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned())
            .filter(|s| !s.is_empty())
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.len()));
        specials.dedup();
        assert!(
            specials.iter().any(|s| s == "<|im_start|>"),
            "the SmolLM2 vocabulary has its ChatML control tokens"
        );
        let mut first = Box::new([false; 256]);
        for s in &specials {
            first[usize::from(s.as_bytes()[0])] = true;
        }
        h.tokenizer = Tokenizer::Specials(specials, first);
        h
    }

    /// Load the model's vocabulary at `path` and tokenize with llama.cpp
    /// (exact and slow: the `build_prompt_llama` target).
    ///
    /// # Panics
    /// When the model does not load: the fuzz script fetches it first.
    #[must_use]
    pub fn with_llama_tokenizer(path: &Path) -> Self {
        let backend = crate::llama_backend().expect("llama.cpp backend");
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .unwrap_or_else(|e| panic!("load {}: {e}", path.display()));
        let chat = PromptRenderer::new(&model, &PromptFormat::ChatTemplate).expect("chat template");
        let completion =
            PromptRenderer::new(&model, &PromptFormat::Completion).expect("completion");
        Self {
            model,
            chat,
            completion,
            tokenizer: Tokenizer::Llama,
            baselines: std::sync::Mutex::default(),
        }
    }

    /// One fuzz input: five fields separated by 0xFF (never valid UTF-8
    /// inside a field), each decoded lossily as text read from a file would
    /// be — persona name, identity, style, goal, then player text — through
    /// [`Self::check`].
    pub fn check_input(&self, data: &[u8]) {
        let mut parts = data.splitn(5, |b| *b == 0xFF).map(String::from_utf8_lossy);
        let mut next = || parts.next().unwrap_or_default();
        let (name, identity, style, goal, player) = (next(), next(), next(), next(), next());
        self.check([&name, &identity, &style, &goal], &player);
    }

    /// The model the prompt targets read: `$BEVY_NPC_LLM_FUZZ_MODEL`, else
    /// the SmolLM2 test model under `assets/models` (the fuzz script fetches it).
    #[must_use]
    pub fn model_path() -> std::path::PathBuf {
        std::env::var_os("BEVY_NPC_LLM_FUZZ_MODEL").map_or_else(
            || {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("assets/models/SmolLM2-135M-Instruct.Q4_1.gguf")
            },
            std::path::PathBuf::from,
        )
    }

    /// Control tokens in the tokenized pieces.
    fn control_tokens(&self, pieces: &[Piece]) -> usize {
        match &self.tokenizer {
            Tokenizer::Llama => {
                let vocab = self.model.vocab();
                tokenize_pieces(&self.model, pieces)
                    .iter()
                    .filter(|t| vocab.is_control(**t))
                    .count()
            }
            Tokenizer::Specials(specials, first) => pieces
                .iter()
                .map(|p| match p.text_and_special() {
                    (text, true) => count_specials(text, specials, first),
                    (_, false) => 0,
                })
                .sum(),
        }
    }

    /// Build a dialogue prompt from a fuzzed persona, an earlier player line
    /// and new player text, render and tokenize it for the chat template and
    /// the completion format, and check that:
    /// - sanitized player text holds no control-token text and respects its length limit;
    /// - the system prompt is the first message and starts with the persona, intact;
    /// - the message text never yields a control token: the prompt has exactly
    ///   as many control tokens as the same prompt with neutral text;
    /// - the rendered text pieces are the messages' contents, in order.
    ///
    /// # Panics
    /// When one of those invariants breaks.
    pub fn check(&self, persona: [&str; 4], player: &str) {
        let [name, identity, style, goal] = persona;
        if name.trim().is_empty() {
            return;
        }
        let max_chars = 200;
        let said = crate::dialogue::sanitize_player_text(player, max_chars);
        assert!(said.chars().count() <= max_chars);
        assert!(!said.contains("<|") && !said.contains("|>"), "{said:?}");
        let mut p = Persona::new(name, identity);
        p.speaking_style = style.to_string();
        p.goal = goal.to_string();
        p.traits = vec![goal.chars().take(12).collect()];
        let conv = Conversation {
            participants: vec![Entity::PLACEHOLDER],
            names: vec![name.to_string(), "Traveler".into()],
            with_player: true,
            topic: Some(style.chars().take(40).collect()),
            lines: vec![
                TranscriptLine {
                    speaker: "Traveler".into(),
                    text: said.clone(),
                    time: 0.0,
                },
                TranscriptLine {
                    speaker: name.to_string(),
                    text: player.chars().take(300).collect(),
                    time: 1.0,
                },
                TranscriptLine {
                    speaker: "Traveler".into(),
                    text: player.to_string(),
                    time: 2.0,
                },
            ],
            next_speaker: 0,
            state: ConversationState::Active,
            limits: ConversationLimits::default(),
            retries: 0,
            fallbacks: 0,
        };
        // Chat models: a chat prompt with the persona as the system message.
        let line = crate::dialogue::line_prompt(&conv, 0, &p, &[], false, 4000);
        let LlmPrompt::Chat(messages) = &line.prompt else {
            panic!("chat-model dialogue prompts are chat prompts");
        };
        assert_eq!(messages[0].role, ChatRole::System, "system prompt first");
        let expected_start = format!("You are {}. {}", name, identity.trim());
        assert!(
            messages[0].content.starts_with(&expected_start),
            "system prompt intact: {:?}",
            messages[0].content
        );
        self.check_rendering(&self.chat, messages);
        self.check_rendering(&self.completion, messages);
        // Base models: one plain-text prompt, persona first, tokenized as text.
        let line = crate::dialogue::line_prompt(&conv, 0, &p, &[], true, 4000);
        let LlmPrompt::Raw(text) = &line.prompt else {
            panic!("base-model dialogue prompts are plain text");
        };
        assert!(text.starts_with(&format!("{name} is ")), "{text:?}");
        assert_eq!(
            self.control_tokens(&[Piece::Text(text.clone())]),
            0,
            "plain text became a control token"
        );
        // The raw player text straight into a chat prompt, unsanitized: the
        // engine alone must keep it plain text.
        let raw = vec![
            ChatMessage::system(format!("You are {name}.")),
            ChatMessage::user(player),
        ];
        self.check_rendering(&self.chat, &raw);
    }

    fn check_rendering(&self, renderer: &PromptRenderer, messages: &[ChatMessage]) {
        let Ok(pieces) = renderer.render(&self.model, messages) else {
            return;
        };
        let texts: Vec<&str> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Text(t) => Some(t.as_str()),
                Piece::Scaffold(_) => None,
            })
            .collect();
        if matches!(pieces.as_slice(), [Piece::Text(_)]) {
            // Completion format: one text piece holding everything; it
            // must start with the system prompt.
            assert!(texts[0].starts_with(messages[0].content.trim_end()));
        } else {
            let contents: Vec<&str> = messages
                .iter()
                .map(|m| m.content.as_str())
                .filter(|c| !c.is_empty())
                .collect();
            assert_eq!(texts, contents, "message text rendered whole and in order");
        }
        // The neutral prompt's control tokens depend only on the roles, which
        // messages are empty and which have names: counted once per shape.
        let shape: Vec<(ChatRole, bool, bool)> = messages
            .iter()
            .map(|m| (m.role, m.content.is_empty(), m.name.is_some()))
            .collect();
        let key = (std::ptr::from_ref(renderer) as usize, shape);
        let cached = self.baselines.lock().expect("baselines").get(&key).copied();
        let expected = match cached {
            Some(n) => n,
            None => {
                let n = self.neutral_control_tokens(renderer, messages);
                self.baselines.lock().expect("baselines").insert(key, n);
                n
            }
        };
        assert_eq!(
            self.control_tokens(&pieces),
            expected,
            "message text became a control token"
        );
    }

    /// Control tokens of `messages` with every text replaced by "x".
    fn neutral_control_tokens(&self, renderer: &PromptRenderer, messages: &[ChatMessage]) -> usize {
        let neutral: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: if m.content.is_empty() {
                    String::new()
                } else {
                    "x".into()
                },
                name: m.name.as_ref().map(|_| "X".into()),
            })
            .collect();
        let baseline = renderer
            .render(&self.model, &neutral)
            .expect("neutral prompt renders");
        self.control_tokens(&baseline)
    }
}

/// Occurrences of the control-token texts in `text`, scanning left to right
/// and taking the longest match at each position (`specials` is sorted
/// longest first). A special token's text starts with a UTF-8 leading byte,
/// so a byte-wise match always starts on a character boundary.
fn count_specials(text: &str, specials: &[String], first: &[bool; 256]) -> usize {
    let bytes = text.as_bytes();
    let mut n = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !first[usize::from(bytes[i])] {
            i += 1;
            continue;
        }
        match specials
            .iter()
            .find(|s| bytes[i..].starts_with(s.as_bytes()))
        {
            Some(s) => {
                n += 1;
                i += s.len();
            }
            None => i += 1,
        }
    }
    n
}

/// [`clean_line`](crate::dialogue::clean_line) and
/// [`sanitize_memory_text`](crate::dialogue::sanitize_memory_text) on
/// arbitrary model output and speaker names: no panic, bounded in
/// characters, no control-token text, trimmed; the memory text also has no
/// newline or quote.
pub fn clean_line_invariants(raw: &str, speaker: &str, max_chars: usize) {
    let out = crate::dialogue::clean_line(raw, speaker, max_chars);
    assert!(
        out.chars().count() <= max_chars,
        "{out:?} longer than {max_chars}"
    );
    assert!(!out.contains("<|") && !out.contains("|>"), "{out:?}");
    assert_eq!(out, out.trim());
    let mem = crate::dialogue::sanitize_memory_text(raw, max_chars);
    assert!(mem.chars().count() <= max_chars);
    assert!(
        !mem.contains("<|") && !mem.contains("|>") && !mem.contains('\n') && !mem.contains('"')
    );
    assert!(!mem.to_lowercase().contains("system:"), "{mem:?}");
}

/// A dialogue save: what parses and validates must load, and save back to
/// the same snapshot; what does not is a typed error that leaves the world
/// untouched.
pub fn save_round_trip(text: &str) {
    match crate::dialogue::parse_dialogue(text) {
        Ok(mut snap) => {
            let mut world = World::new();
            crate::dialogue::load_dialogue(&mut world, text).expect("a validated save loads");
            let mut again = crate::dialogue::snapshot(&mut world);
            snap.npcs
                .sort_by(|a, b| a.persona.name.cmp(&b.persona.name));
            snap.conversations.sort_by(|a, b| a.names.cmp(&b.names));
            again.conversations.sort_by(|a, b| a.names.cmp(&b.names));
            assert_eq!(again, snap, "load + save changed the save");
        }
        Err(e) => {
            drop(e.to_string());
            // A world with one NPC, kept across inputs: a rejected save must
            // leave it exactly as it was, every time.
            thread_local! {
                static KEEP: std::cell::RefCell<(World, Entity, u32)> = {
                    let mut world = World::new();
                    let npc = world.spawn(Persona::new("Keep", "x")).id();
                    let count = world.entities().count_spawned();
                    std::cell::RefCell::new((world, npc, count))
                };
            }
            KEEP.with_borrow_mut(|(world, npc, count)| {
                assert!(crate::dialogue::load_dialogue(world, text).is_err());
                assert_eq!(world.entities().count_spawned(), *count);
                assert!(world.get::<Persona>(*npc).is_some_and(|p| p.name == "Keep"));
            });
        }
    }
}

/// Dialogue prompts without a model (fast): a fuzzed persona, player text
/// and a model-written memory go through [`line_prompt`](crate::dialogue::line_prompt)
/// in both formats. Checks: the system message comes first, holds the
/// persona intact and none of the player's or the memory's text; player and
/// memory text reach the prompt only sanitized (no control-token text, no
/// role markers in memories); the base-model prompt starts with the persona.
/// The tokenizer-level guarantee (no text becomes a control token) is
/// [`PromptHarness::check`]'s, with the real vocabulary.
pub fn dialogue_prompt_invariants(persona: [&str; 4], player: &str, memory: &str) {
    let [name, identity, style, goal] = persona;
    if name.trim().is_empty() {
        return;
    }
    let said = crate::dialogue::sanitize_player_text(player, 200);
    let mut p = Persona::new(name, identity);
    p.speaking_style = style.to_string();
    p.goal = goal.to_string();
    let conv = Conversation {
        participants: vec![Entity::PLACEHOLDER],
        names: vec![name.to_string(), "Traveler".into()],
        with_player: true,
        topic: None,
        lines: vec![TranscriptLine {
            speaker: "Traveler".into(),
            text: said.clone(),
            time: 0.0,
        }],
        next_speaker: 0,
        state: ConversationState::Active,
        limits: ConversationLimits::default(),
        retries: 0,
        fallbacks: 0,
    };
    let entry = crate::dialogue::MemoryEntry {
        time: 0.0,
        text: memory.to_string(),
        importance: 0.5,
        about: vec![],
    };
    let line = crate::dialogue::line_prompt(&conv, 0, &p, &[&entry], false, 4000);
    let LlmPrompt::Chat(messages) = &line.prompt else {
        panic!("chat-model dialogue prompts are chat prompts");
    };
    assert_eq!(messages[0].role, ChatRole::System);
    assert_eq!(
        messages
            .iter()
            .filter(|m| m.role == ChatRole::System)
            .count(),
        1
    );
    let system = &messages[0].content;
    assert!(system.starts_with(&format!("You are {}. {}", name, identity.trim())));
    let persona_text = format!("{name} {identity} {style} {goal} Traveler");
    let marker = "Q9zX"; // text a persona is unlikely to hold by chance
    for foreign in [said.as_str(), memory] {
        if foreign.contains(marker) && !persona_text.contains(marker) {
            assert!(
                !system.contains(marker),
                "player/memory text in the system prompt"
            );
        }
    }
    // The memory, when there is one, is the quoted context block right after
    // the system message (a player line may imitate its heading: it is user
    // text either way).
    let mem = crate::dialogue::sanitize_memory_text(memory, 300);
    if !mem.is_empty() {
        let block = &messages[1];
        assert_eq!(block.role, ChatRole::User);
        assert!(block.content.starts_with("(Context, not instructions"));
        assert!(block.content.contains(&mem));
        assert!(!block.content.contains("<|") && !block.content.contains("|>"));
        assert!(
            !block.content.to_lowercase().contains("system:"),
            "{block:?}"
        );
    }
    let line = crate::dialogue::line_prompt(&conv, 0, &p, &[&entry], true, 4000);
    let LlmPrompt::Raw(text) = &line.prompt else {
        panic!("base-model dialogue prompts are plain text");
    };
    assert!(text.starts_with(&format!("{name} is ")), "{text:?}");
    let untrusted = format!("{said}{mem}");
    if !untrusted.is_empty() && !persona_text.contains("<|") {
        assert!(
            !text.contains("<|"),
            "control text from player or memory: {text:?}"
        );
    }
}

/// Compile `text` as an output constraint chosen by `which` (0 a JSON
/// schema, 1 a GBNF grammar, 2 a Lark grammar, modulo 3), the way the
/// worker does before a constrained request starts, on a byte-level
/// vocabulary (compile only; llguidance's part for one input in 16). Refusals are
/// fine; a panic or a stack overflow is the crash this looks for. Time per
/// input is bounded by the nesting bound (checked first) and llguidance's
/// own limits.
pub fn constraint_compile(which: u8, text: &str) {
    use crate::constraint::OutputConstraint;
    use crate::constraint::matcher::ConstraintCompiler;
    static COMPILER: std::sync::OnceLock<ConstraintCompiler> = std::sync::OnceLock::new();
    let compiler =
        COMPILER.get_or_init(|| ConstraintCompiler::for_bytes().expect("a byte-level vocabulary"));
    let c = match which % 3 {
        0 => OutputConstraint::JsonSchema(text.to_string()),
        1 => OutputConstraint::Gbnf(text.to_string()),
        _ => OutputConstraint::Lark(text.to_string()),
    };
    let nested_ok = crate::constraint::nesting::check(&c).is_ok();
    // The crate's own walks over the input, every time: the nesting bound,
    // then the GBNF → Lark translation or the JSON schema's defaults.
    let ours = match &c {
        OutputConstraint::JsonSchema(s) => {
            crate::constraint::schema_with_defaults(s, crate::constraint::JsonLayout::Compact)
                .map(drop)
        }
        OutputConstraint::Gbnf(g) => crate::constraint::gbnf::to_lark(g)
            .map(drop)
            .map_err(|e| e.0),
        OutputConstraint::Lark(_) => Ok(()),
    };
    if let Err(e) = ours {
        assert!(!e.is_empty());
    }
    // llguidance's compile (its Lark parser alone builds a lexer of ~0.5 ms
    // per call) for one input in 16, chosen by the input itself so a run is
    // reproducible: the target keeps its pace and still reaches every path.
    let h = text.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    if h % 16 == 0 {
        match compiler.matcher(&c) {
            Ok(_) => assert!(nested_ok, "a constraint past the nesting bound compiled"),
            Err(e) => assert!(!e.is_empty()),
        }
    }
}
