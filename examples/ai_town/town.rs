//! The town simulation, without rendering: villagers walk between their
//! homes and the plaza, meet when close and talk through the dialogue
//! system. Used by the windowed example, its `--headless` mode and the
//! integration test.
#![allow(clippy::type_complexity, clippy::too_many_arguments)] // Bevy systems

use std::time::Duration;

use bevy::math::Vec2;
use bevy::prelude::*;
use bevy_npc_llm::dialogue::{
    DialogueCooldowns, InConversation, NpcAction, NpcActionPlugin, NpcActions, Persona,
};
use bevy_npc_llm::prelude::*;
use schemars::JsonSchema;
use serde::Deserialize;

/// What a villager may do while it talks (the model picks one, or none,
/// with each line; anything else cannot be generated).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum VillagerAction {
    /// Go to a place afterwards.
    WalkTo {
        /// Where.
        place: Place,
    },
    /// Hand over something you carry.
    Give {
        /// What.
        item: Item,
    },
    /// Make a gesture.
    Emote {
        /// Which.
        emote: Emote,
    },
    /// Say goodbye and go home (only when leaving).
    EndConversation,
}

/// Named places of the town.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum Place {
    /// The plaza in the middle.
    Plaza,
    /// The well, north-west.
    Well,
    /// The market, east.
    Market,
    /// The mill, south.
    Mill,
    /// The villager's own home.
    Home,
}

impl Place {
    /// Where it is (`home`: the villager's home).
    pub fn position(self, home: Vec2) -> Vec2 {
        match self {
            Place::Plaza => PLAZA,
            Place::Well => Vec2::new(-260.0, 200.0),
            Place::Market => Vec2::new(320.0, 40.0),
            Place::Mill => Vec2::new(40.0, -300.0),
            Place::Home => home,
        }
    }
}

/// Things villagers carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum Item {
    /// A loaf.
    Bread,
    /// An apple.
    Apple,
    /// A flower.
    Flower,
    /// A coin.
    Coin,
    /// A letter.
    Letter,
    /// Nails from the forge.
    Nails,
}

/// Gestures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum Emote {
    /// A wave.
    Wave,
    /// A laugh.
    Laugh,
    /// A nod.
    Nod,
    /// A shrug.
    Shrug,
}

/// What each villager carries, by its place in `agents.ron` (a persona may
/// only give these: its action schema lists no other item).
const CARRIES: [&[Item]; 8] = [
    &[Item::Bread, Item::Coin],
    &[Item::Nails, Item::Coin],
    &[Item::Flower, Item::Apple],
    &[Item::Letter],
    &[Item::Apple, Item::Bread],
    &[Item::Coin, Item::Letter],
    &[Item::Flower],
    &[Item::Nails, Item::Apple],
];

/// The items a villager carries (what its `Give` actions may name).
#[derive(Component, Debug, Clone)]
pub struct Carries(pub Vec<Item>);

/// A villager's actions: [`VillagerAction`] with `Give` limited to what it
/// carries (the schema's item list is cut to those).
pub fn villager_actions(items: &[Item]) -> NpcActions {
    let mut schema = schemars::schema_for!(VillagerAction).to_value();
    let names: Vec<serde_json::Value> = items
        .iter()
        .map(|i| serde_json::Value::String(format!("{i:?}")))
        .collect();
    if let Some(item) = schema.pointer_mut("/$defs/Item") {
        item["enum"] = serde_json::Value::Array(names);
        if let Some(obj) = item.as_object_mut() {
            obj.remove("oneOf");
        }
    }
    NpcActions::from_schema(schema)
}

/// What a villager shows above its head for a while (an emote or where it
/// is going); the window draws it, the headless run counts it.
#[derive(Component, Debug, Clone)]
pub struct Doing {
    /// The text of the badge.
    pub label: String,
    /// Game time it disappears.
    pub until: f64,
}

/// One villager in `assets/town/agents.ron`.
#[derive(Debug, Clone, Deserialize)]
pub struct AgentDef {
    /// Who.
    pub persona: Persona,
    /// Colour, r g b in 0..1.
    pub color: (f32, f32, f32),
    /// Home position.
    pub home: (f32, f32),
}

/// Load the villagers.
pub fn load_agents(path: &str) -> Vec<AgentDef> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    ron::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Town options.
#[derive(Resource, Debug, Clone)]
pub struct TownConfig {
    /// Villagers to spawn (at most the file's count).
    pub npcs: usize,
    /// Seed for walking and topics.
    pub seed: u64,
    /// Print lines as `[time] Name → Name: text`.
    pub print_lines: bool,
    /// Most conversations at once.
    pub max_conversations: usize,
    /// Distance at which villagers meet.
    pub meet_distance: f32,
    /// Walking speed, units per second.
    pub speed: f32,
    /// Game seconds per real second (`Time<Virtual>`'s relative speed): a
    /// long run is cheap at 10–20×. Inference still runs in real time.
    pub time_scale: f64,
}

impl Default for TownConfig {
    fn default() -> Self {
        Self {
            npcs: 6,
            seed: 7,
            print_lines: false,
            max_conversations: 3,
            meet_distance: 60.0,
            speed: 90.0,
            time_scale: 1.0,
        }
    }
}

/// A villager's place in the town (rendering copies it to `Transform`).
#[derive(Component, Debug, Clone, Copy)]
pub struct Position(pub Vec2);

/// A walking villager.
#[derive(Component, Debug, Clone)]
pub struct Villager {
    /// Home.
    pub home: Vec2,
    /// Where it walks to.
    pub target: Vec2,
    /// Colour.
    pub color: (f32, f32, f32),
    /// Seconds to wait before walking on.
    pub rest: f32,
}

/// Town figures for the summary.
#[derive(Resource, Debug, Default, Clone)]
pub struct TownStats {
    /// Finished lines between NPCs.
    pub lines: usize,
    /// Conversations started.
    pub started: usize,
    /// Conversations ended.
    pub ended: usize,
    /// Conversations started in each 10 minutes of game time (index = minute / 10).
    pub started_per_10_min: Vec<u32>,
    /// Actions taken, by kind (`WalkTo`, `Give`, `Emote`, `EndConversation`).
    pub actions: std::collections::BTreeMap<&'static str, usize>,
    /// Actions outside the actor's declared set (a `Give` of an item it does
    /// not carry); the schema makes them impossible, this counts to show it.
    pub undeclared_actions: usize,
}

/// Sets the game clock's speed from [`TownConfig::time_scale`]; frames may
/// then advance game time by more than the default 250 ms cap.
fn apply_time_scale(config: Res<TownConfig>, mut time: ResMut<Time<Virtual>>) {
    if config.is_changed() {
        let scale = config.time_scale.clamp(0.01, 1000.0);
        time.set_relative_speed_f64(scale);
        time.set_max_delta(Duration::from_secs_f64(0.25 * scale.max(1.0)));
    }
}

#[derive(Resource)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Places villagers walk to besides home.
pub const PLAZA: Vec2 = Vec2::ZERO;
const TOPICS: [&str; 6] = [
    "the harvest fair",
    "the strange lights in the forest",
    "the price of bread",
    "the river running low",
    "a wolf seen near the mill",
    "the new song about the village",
];

/// Adds the simulation (needs `NpcLlmPlugin` and `NpcDialoguePlugin`).
pub struct TownPlugin {
    /// Villagers.
    pub agents: Vec<AgentDef>,
}

impl Plugin for TownPlugin {
    fn build(&self, app: &mut App) {
        let agents = self.agents.clone();
        app.add_plugins(NpcActionPlugin::<VillagerAction>::default())
            .init_resource::<TownConfig>()
            .init_resource::<TownStats>()
            .add_systems(
                Startup,
                move |mut commands: Commands, config: Res<TownConfig>| {
                    commands.insert_resource(Rng(config.seed.max(1)));
                    for (i, a) in agents.iter().take(config.npcs).enumerate() {
                        let home = Vec2::new(a.home.0, a.home.1);
                        let items = CARRIES[i % CARRIES.len()];
                        commands.spawn((
                            villager_actions(items),
                            Carries(items.to_vec()),
                            Name::new(a.persona.name.clone()),
                            a.persona.clone(),
                            Position(home),
                            Villager {
                                home,
                                // First stroll: part of the way to the plaza.
                                target: home.lerp(PLAZA, 0.55),
                                color: a.color,
                                rest: 0.0,
                            },
                        ));
                    }
                },
            )
            .add_systems(First, apply_time_scale)
            .add_systems(Update, (walk, meet))
            .add_observer(on_line)
            .add_observer(on_action)
            .add_observer(|_: On<ConversationEnded>, mut s: ResMut<TownStats>| s.ended += 1)
            .add_observer(
                |_: On<ConversationStarted>, time: Res<Time>, mut s: ResMut<TownStats>| {
                    s.started += 1;
                    let window = (time.elapsed_secs_f64() / 600.0) as usize;
                    if s.started_per_10_min.len() <= window {
                        s.started_per_10_min.resize(window + 1, 0);
                    }
                    s.started_per_10_min[window] += 1;
                },
            );
    }
}

fn walk(
    time: Res<Time>,
    config: Res<TownConfig>,
    mut rng: ResMut<Rng>,
    mut q: Query<(&mut Position, &mut Villager, Option<&InConversation>)>,
) {
    // Large steps are fine at a high time scale: walking is a straight line.
    let dt = time.delta_secs().min(5.0);
    for (mut pos, mut v, talking) in &mut q {
        if talking.is_some() {
            continue;
        }
        if v.rest > 0.0 {
            v.rest -= dt;
            continue;
        }
        let to = v.target - pos.0;
        let step = config.speed * dt;
        if to.length() <= step {
            pos.0 = v.target;
            v.rest = 1.0 + 2.0 * rng.next();
            // Next: the plaza (where people meet) or home, with a little wander.
            let base = if v.target.distance(PLAZA) < 80.0 {
                v.home
            } else {
                PLAZA
            };
            v.target = base + Vec2::new(rng.next() - 0.5, rng.next() - 0.5) * 360.0;
        } else {
            pos.0 += to.normalize() * step;
        }
    }
}

fn meet(
    mut asked: Local<std::collections::HashMap<Entity, f64>>,
    time: Res<Time>,
    config: Res<TownConfig>,
    cooldowns: Res<DialogueCooldowns>,
    mut rng: ResMut<Rng>,
    free: Query<(Entity, &Position), (With<Villager>, Without<InConversation>)>,
    talking: Query<&Conversation>,
    mut start: MessageWriter<StartConversation>,
) {
    let now = time.elapsed_secs_f64();
    // A start takes effect next frame: don't ask twice for the same villagers.
    asked.retain(|_, t| now - *t < 2.0);
    // Only live conversations count (ended ones are despawned a frame later).
    let mut running = talking
        .iter()
        .filter(|c| c.state != ConversationState::Ended)
        .count();
    let list: Vec<(Entity, Vec2)> = free.iter().map(|(e, p)| (e, p.0)).collect();
    let mut used = Vec::new();
    for (i, (a, pa)) in list.iter().enumerate() {
        for (b, pb) in &list[i + 1..] {
            if running >= config.max_conversations {
                return;
            }
            if used.contains(a)
                || used.contains(b)
                || asked.contains_key(a)
                || asked.contains_key(b)
            {
                continue;
            }
            if pa.distance(*pb) <= config.meet_distance && cooldowns.ready(*a, *b, now) {
                let topic = TOPICS[(rng.next() * TOPICS.len() as f32) as usize % TOPICS.len()];
                start.write(StartConversation {
                    participants: vec![*a, *b],
                    topic: Some(topic.into()),
                });
                used.extend([*a, *b]);
                asked.insert(*a, now);
                asked.insert(*b, now);
                running += 1;
            }
        }
    }
}

fn on_action(
    action: On<NpcAction<VillagerAction>>,
    time: Res<Time>,
    config: Res<TownConfig>,
    mut stats: ResMut<TownStats>,
    mut villagers: Query<(&Persona, &mut Villager, &Carries)>,
    mut commands: Commands,
) {
    let Ok((persona, mut v, carries)) = villagers.get_mut(action.entity) else {
        return;
    };
    let now = time.elapsed_secs_f64();
    let (kind, label) = match &action.action {
        VillagerAction::WalkTo { place } => {
            v.target = place.position(v.home);
            v.rest = 0.0;
            ("WalkTo", format!("-> {place:?}"))
        }
        VillagerAction::Give { item } => {
            if !carries.0.contains(item) {
                stats.undeclared_actions += 1;
            }
            ("Give", format!("gives {item:?}"))
        }
        VillagerAction::Emote { emote } => ("Emote", format!("{emote:?}!")),
        VillagerAction::EndConversation => {
            v.target = v.home;
            ("EndConversation", "-> home".to_string())
        }
    };
    *stats.actions.entry(kind).or_default() += 1;
    if config.print_lines {
        println!("[{now:6.1}s] {} does {:?}", persona.name, action.action);
    }
    commands.entity(action.entity).insert(Doing {
        label,
        until: now + 4.0,
    });
}

fn on_line(
    line: On<ConversationLineFinished>,
    time: Res<Time>,
    config: Res<TownConfig>,
    convs: Query<&Conversation>,
    mut stats: ResMut<TownStats>,
) {
    let Ok(conv) = convs.get(line.entity) else {
        return;
    };
    if !conv.with_player {
        stats.lines += 1;
    }
    if config.print_lines {
        let to: Vec<&str> = conv
            .names
            .iter()
            .filter(|n| **n != line.name)
            .map(String::as_str)
            .collect();
        println!(
            "[{:6.1}s] {} → {}: {}",
            time.elapsed_secs_f64(),
            line.name,
            to.join(", "),
            line.text
        );
    }
}

/// The summary printed at the end of a run: the town's figures, the
/// dialogue system's and the engine's.
pub fn summary(
    s: &TownStats,
    d: &bevy_npc_llm::dialogue::DialogueStats,
    e: &LlmEngineStats,
    elapsed: Duration,
    game_secs: f64,
) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let served = match &e.remote_server {
        Some(url) => format!("served by the remote server {url}"),
        None => format!("largest batch {} sequences", e.counters.max_batch_sequences),
    };
    let windows: Vec<String> = s.started_per_10_min.iter().map(u32::to_string).collect();
    let actions: Vec<String> = ["WalkTo", "Give", "Emote", "EndConversation"]
        .iter()
        .map(|k| format!("{k} {}", s.actions.get(k).copied().unwrap_or(0)))
        .collect();
    format!(
        "summary: {} lines spoken; actions {} ({} outside declared sets); conversations {} started / {} ended / {} still open; {} retries, {} fallbacks; player lines {} answered of {}; started per 10 game-minutes [{}]; {:.1} game-minutes in {:.0} s; {} tokens generated ({:.1} tok/s), {served}",
        s.lines,
        actions.join(", "),
        s.undeclared_actions,
        s.started,
        s.ended,
        s.started.saturating_sub(s.ended),
        d.retries,
        d.fallbacks,
        d.player_lines.saturating_sub(d.player_lines_unanswered),
        d.player_lines,
        windows.join(", "),
        game_secs / 60.0,
        secs,
        e.counters.generated_tokens,
        e.counters.generated_tokens as f64 / secs,
    )
}
