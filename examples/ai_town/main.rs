//! AI town: villagers walk a little 2D town, meet, and talk with streamed
//! speech bubbles; walk up to one (WASD / arrows) and press E to talk.
//! F1 toggles the status overlay.
//!
//! ```text
//! cargo run --features debug-ui --example ai_town -- [--headless] [--seconds N] [--npcs N]
//!     [--time-scale X] [--game-minutes N]
//!     [--model ID] [--seed N] [--screenshot PATH --screenshot-after SECS]
//!     [--remote URL [--remote-model NAME] [--remote-completion]]
//!
//! `--time-scale X` runs the town's clock X times faster (inference still runs
//! in real time; line time-outs are scaled with it); `--game-minutes N` stops
//! after N minutes of game time. A long soak: `--headless --time-scale 15
//! --game-minutes 60`.
//! `--remote URL` serves the NPCs from an OpenAI-compatible server (e.g.
//! `llama-server -m model.gguf -np 8`) instead of llama.cpp in process.
//! ```
//! The default model is fetched with `scripts/fetch-models.sh` when missing.
#![allow(clippy::type_complexity, clippy::too_many_arguments)] // Bevy systems

mod town;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bevy::app::{AppExit, ScheduleRunnerPlugin};
use bevy::prelude::*;
use bevy::render::view::screenshot::{Screenshot, save_to_disk};
use bevy::sprite::Text2d;
use bevy::text::{Justify, TextBounds, TextLayout};
use bevy_egui::{EguiContexts, EguiPrimaryContextPass, egui};
use bevy_npc_llm::dialogue::{DialogueSettings, InConversation, Persona};
use bevy_npc_llm::overlay::{NpcLlmOverlayPlugin, OverlayState};
use bevy_npc_llm::prelude::*;
use bevy_npc_llm::registry::ModelRegistry;
use town::*;

#[derive(Resource, Debug, Clone)]
struct Args {
    headless: bool,
    seconds: Option<f64>,
    npcs: usize,
    model: Option<String>,
    seed: u64,
    screenshot: Option<PathBuf>,
    screenshot_after: f64,
    remote: Option<String>,
    remote_model: Option<String>,
    remote_completion: bool,
    time_scale: f64,
    game_minutes: Option<f64>,
    /// Download the model from here (the plugin's downloader) instead of
    /// fetching it with the development script.
    model_url: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        headless: false,
        seconds: None,
        npcs: 6,
        model: None,
        seed: 7,
        screenshot: None,
        screenshot_after: 25.0,
        remote: None,
        remote_model: None,
        remote_completion: false,
        time_scale: 1.0,
        game_minutes: None,
        model_url: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next().unwrap_or_else(|| {
                eprintln!("{flag} needs a value");
                std::process::exit(2)
            })
        };
        match flag.as_str() {
            "--headless" => a.headless = true,
            "--seconds" => a.seconds = val().parse().ok(),
            "--npcs" => a.npcs = val().parse().unwrap_or(6),
            "--model" => a.model = Some(val()),
            "--seed" => a.seed = val().parse().unwrap_or(7),
            "--screenshot" => a.screenshot = Some(PathBuf::from(val())),
            "--screenshot-after" => a.screenshot_after = val().parse().unwrap_or(25.0),
            "--remote" => a.remote = Some(val()),
            "--remote-model" => a.remote_model = Some(val()),
            "--remote-completion" => a.remote_completion = true,
            "--time-scale" => a.time_scale = val().parse().unwrap_or(1.0),
            "--game-minutes" => a.game_minutes = val().parse().ok(),
            "--model-url" => a.model_url = Some(val()),
            "--help" | "-h" => {
                println!(
                    "ai_town [--headless] [--seconds N] [--game-minutes N] [--time-scale X] [--npcs N] [--model ID] [--seed N] [--screenshot PATH --screenshot-after SECS] [--remote URL [--remote-model NAME] [--remote-completion]] [--model-url URL]"
                );
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown flag {other} (see --help)");
                std::process::exit(2);
            }
        }
    }
    a
}

/// Fetch the model the town will use when it is missing.
fn ensure_model(model: Option<&str>) {
    let Ok(registry) = ModelRegistry::load("assets/models/models.ron") else {
        return;
    };
    let entry = match model {
        Some(id) => registry.get(id),
        None => registry.default_model(),
    };
    let Some(entry) = entry else { return };
    if !registry.path_of(entry).exists() {
        eprintln!(
            "{} is missing: fetching it ...",
            registry.path_of(entry).display()
        );
        let ok = std::process::Command::new("bash")
            .args(["scripts/fetch-models.sh", &entry.id])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("could not fetch the model; run scripts/fetch-models.sh");
            std::process::exit(1);
        }
    }
}

fn main() -> AppExit {
    let args = parse_args();
    if args.remote.is_none() && args.model_url.is_none() {
        ensure_model(args.model.as_deref());
    }
    let agents = load_agents("assets/town/agents.ron");
    let mut settings = LlmSettings::load_or_default("assets/llm_settings.ron").unwrap_or_default();
    if let Some(m) = &args.model {
        settings.model.clone_from(m);
    }
    settings.max_parallel_sequences = settings.max_parallel_sequences.max(args.npcs as u32 + 1);
    if let Some(url) = &args.model_url {
        // The plugin downloads the model when the first load finds it missing.
        settings.downloads.allow_http = url.starts_with("http://");
    }
    if let Some(url) = &args.remote {
        settings.backend = BackendChoice::Remote;
        settings.remote = RemoteSettings::new(url.clone());
        if let Some(m) = &args.remote_model {
            settings.remote.model.clone_from(m);
        }
        if args.remote_completion {
            settings.remote.prompt_format = bevy_npc_llm::settings::RemotePromptFormat::Completion;
        }
        if let Err(e) = settings.validate() {
            eprintln!("--remote: {e}");
            std::process::exit(2);
        }
    }
    let mut app = App::new();
    if args.headless {
        app.add_plugins((
            MinimalPlugins.set(ScheduleRunnerPlugin::run_loop(Duration::from_secs_f64(
                1.0 / 60.0,
            ))),
            bevy::log::LogPlugin::default(),
        ));
    } else {
        app.add_plugins(DefaultPlugins.set(WindowPlugin {
            primary_window: Some(Window {
                title: "bevy_npc_llm — AI town".into(),
                resolution: (1280, 800).into(),
                ..default()
            }),
            ..default()
        }));
    }
    let mut dialogue = DialogueSettings {
        seed: args.seed as u32,
        ..Default::default()
    };
    // Inference runs in real time: a line may take as long in real seconds
    // at any time scale.
    dialogue.timeouts.line_secs *= args.time_scale.max(1.0);
    dialogue.timeouts.summary_secs *= args.time_scale.max(1.0);
    app.insert_resource(dialogue)
        .add_plugins((
            NpcLlmPlugin::default()
                .with_settings(settings)
                .with_load_on_startup(true),
            NpcDialoguePlugin,
            TownPlugin { agents },
        ))
        .insert_resource(TownConfig {
            npcs: args.npcs,
            seed: args.seed,
            print_lines: args.headless,
            time_scale: args.time_scale,
            ..Default::default()
        })
        .insert_resource(args.clone())
        .insert_resource(RunClock(Instant::now(), rss_bytes()))
        .init_resource::<WarmProbe>()
        .add_systems(Startup, model_url_in_registry)
        .add_systems(Update, (warm_probe, stop_after, download_line))
        .add_systems(Last, summary_on_exit);
    if !args.headless {
        app.add_plugins(NpcLlmOverlayPlugin)
            .init_resource::<ChatBox>()
            .add_systems(Startup, |mut o: ResMut<OverlayState>| {
                // A title bar until clicked: the town stays in view.
                o.ui.start_collapsed = true;
            })
            .add_systems(Startup, (setup_scene, spawn_player))
            .add_systems(
                Update,
                (
                    decorate_villagers,
                    sync_transforms,
                    (show_doing, lay_out_bubbles, lay_out_names)
                        .chain()
                        .after(sync_transforms),
                    move_player,
                    follow_camera,
                    talk_key,
                    screenshot,
                    download_banner,
                ),
            )
            .add_systems(EguiPrimaryContextPass, chat_window)
            .add_observer(bubble_token)
            .add_observer(bubble_finished)
            .add_observer(bubble_clear);
    }
    app.run()
}

/// `--model-url`: the town's model gets that download mirror.
fn model_url_in_registry(
    args: Res<Args>,
    settings: Res<LlmSettings>,
    mut registry: ResMut<ModelRegistry>,
) {
    let Some(url) = &args.model_url else { return };
    let id = registry.select(&settings.model).map(|e| e.id.clone());
    let Ok(id) = id else { return };
    let mut entry = registry.get(&id).cloned().expect("selected");
    entry.download = Some(bevy_npc_llm::registry::DownloadSource {
        urls: vec![url.clone()],
    });
    // Same id: replace the entry with its downloadable copy.
    let mut fresh = ModelRegistry::new(registry.models_dir());
    for e in registry.iter() {
        let _ = fresh.add(if e.id == id { entry.clone() } else { e.clone() });
    }
    if let Some(d) = registry.default_model().map(|d| d.id.clone()) {
        let _ = fresh.set_default_model(&d);
    }
    *registry = fresh;
}

/// While the model arrives: one progress line a second (the overlay shows a
/// bar in the window).
fn download_line(
    mut progress: MessageReader<ModelDownloadProgress>,
    mut done: MessageReader<ModelDownloaded>,
    mut failed: MessageReader<ModelDownloadFailed>,
    mut last: Local<Option<Instant>>,
) {
    if let Some(p) = progress.read().last()
        && last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
    {
        *last = Some(Instant::now());
        println!(
            "downloading model {}: {}",
            p.id,
            bevy_npc_llm::overlay::download_text(p)
        );
    }
    for d in done.read() {
        println!("model {} downloaded to {}", d.id, d.path.display());
    }
    for f in failed.read() {
        println!("model {} download failed: {}", f.id, f.error);
    }
}

/// The town's own progress line while its model arrives.
fn download_banner(
    downloads: Res<ModelDownloads>,
    mut banner: Query<&mut Text2d, With<DownloadBanner>>,
) {
    let Ok(mut text) = banner.single_mut() else {
        return;
    };
    let line = downloads
        .iter()
        .next()
        .map(|p| {
            let mb = |b: u64| b as f64 / 1e6;
            let left = p
                .eta
                .map(|e| format!(", {} s left", e.as_secs()))
                .unwrap_or_default();
            format!(
                "Downloading the villagers' voices: {:.1} of {:.1} MB{left}",
                mb(p.bytes),
                mb(p.total)
            )
        })
        .unwrap_or_default();
    if text.0 != line {
        text.0 = line;
    }
}

#[derive(Resource)]
struct RunClock(Instant, Option<u64>);

/// RSS and entity count once the town is warm (10 game-minutes in, or a
/// sixth of a `--game-minutes` run), to compare with the end.
#[derive(Resource, Default)]
struct WarmProbe(Option<(u64, usize)>);

fn warm_probe(
    args: Res<Args>,
    time: Res<Time>,
    entities: Query<Entity>,
    mut probe: ResMut<WarmProbe>,
) {
    let warm_at = args.game_minutes.map_or(600.0, |m| (m * 10.0).min(600.0));
    if probe.0.is_none() && time.elapsed_secs_f64() >= warm_at {
        probe.0 = Some((rss_bytes().unwrap_or(0), entities.iter().count()));
    }
}

/// Resident memory of this process (Linux), for the soak figures.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn stop_after(
    args: Res<Args>,
    clock: Res<RunClock>,
    time: Res<Time>,
    mut config: ResMut<TownConfig>,
    convs: Query<&Conversation>,
    mut exit: MessageWriter<AppExit>,
    mut draining: Local<Option<Instant>>,
    mut done: Local<bool>,
) {
    if *done {
        return;
    }
    let wall = args
        .seconds
        .is_some_and(|s| clock.0.elapsed().as_secs_f64() >= s);
    let game = args
        .game_minutes
        .is_some_and(|m| time.elapsed_secs_f64() >= m * 60.0);
    if game && draining.is_none() {
        // A soak ends cleanly: no new meetings; the open conversations finish.
        config.max_conversations = 0;
        *draining = Some(Instant::now());
    }
    let drained = draining.is_some_and(|since| {
        convs.iter().all(|c| c.state == ConversationState::Ended)
            || since.elapsed() > Duration::from_secs(300)
    });
    if wall || drained {
        *done = true;
        exit.write(AppExit::Success);
    }
}

/// The run's last line: what the town did (also when the window closes).
fn summary_on_exit(
    mut exits: MessageReader<AppExit>,
    clock: Res<RunClock>,
    time: Res<Time<Virtual>>,
    town: Res<TownStats>,
    dialogue: Res<bevy_npc_llm::dialogue::DialogueStats>,
    engine: Res<LlmEngineStats>,
    entities: Query<Entity>,
    convs: Query<&Conversation>,
    probe: Res<WarmProbe>,
    mut printed: Local<bool>,
) {
    if exits.read().next().is_none() || *printed {
        return;
    }
    *printed = true;
    let mb = |b: Option<u64>| b.map_or("?".to_string(), |b| format!("{:.0} MB", b as f64 / 1e6));
    let now_rss = rss_bytes();
    let warm = match (probe.0, now_rss) {
        (Some((rss, n)), Some(now)) => format!(
            "; when warm: {n} entities, RSS {} (growth since {:+.1}%)",
            mb(Some(rss)),
            (now as f64 / rss.max(1) as f64 - 1.0) * 100.0
        ),
        _ => String::new(),
    };
    println!(
        "soak: {} entities, {} conversation entities, RSS {} at start, {} now{warm}",
        entities.iter().count(),
        convs.iter().count(),
        mb(clock.1),
        mb(now_rss)
    );
    println!(
        "{}",
        summary(
            &town,
            &dialogue,
            &engine,
            clock.0.elapsed(),
            time.elapsed_secs_f64()
        )
    );
}

// ---------------------------------------------------------------- drawing --

#[derive(Component)]
struct Player;

#[derive(Component)]
struct Bubble(Entity);

#[derive(Component)]
struct BubbleParts {
    bg: Entity,
    label: Entity,
}

#[derive(Component)]
struct BubbleText {
    text: String,
    shown_until: f32,
    /// Attempt of the line shown (a retry starts the bubble afresh).
    attempt: u32,
}

/// A villager's badge under its name: an emote or where it is going.
#[derive(Component)]
struct Badge(Entity);

/// A villager's name under it.
#[derive(Component)]
struct NameTag(Entity, f32);

const PLAYER_SPEED: f32 = 220.0;

fn rect(color: Color, size: Vec2, at: Vec3) -> impl Bundle {
    (
        Sprite::from_color(color, size),
        Transform::from_translation(at),
    )
}

/// The on-screen line that shows the model's download (empty otherwise).
#[derive(Component)]
struct DownloadBanner;

fn setup_scene(mut commands: Commands) {
    commands
        .spawn((Camera2d, Transform::default()))
        .with_children(|cam| {
            // A child of the camera: fixed on screen, above the town.
            cam.spawn((
                DownloadBanner,
                Text2d::new(""),
                TextFont::from_font_size(20.0),
                TextColor(Color::WHITE),
                Transform::from_xyz(0.0, -370.0, 50.0),
            ));
        });
    // Grass, paths, plaza, houses.
    commands.spawn(rect(
        Color::srgb(0.36, 0.55, 0.3),
        Vec2::new(1400.0, 1000.0),
        Vec3::new(0.0, 0.0, -10.0),
    ));
    commands.spawn(rect(
        Color::srgb(0.76, 0.68, 0.5),
        Vec2::new(700.0, 36.0),
        Vec3::new(0.0, 0.0, -9.0),
    ));
    commands.spawn(rect(
        Color::srgb(0.76, 0.68, 0.5),
        Vec2::new(36.0, 620.0),
        Vec3::new(0.0, 0.0, -9.0),
    ));
    for (x, y) in [
        (-260.0, 150.0),
        (260.0, 150.0),
        (-260.0, -150.0),
        (260.0, -150.0),
    ] {
        commands.spawn(rect(
            Color::srgb(0.76, 0.68, 0.5),
            Vec2::new(36.0, 300.0),
            Vec3::new(x * 0.5, y * 0.5, -9.0),
        ));
    }
    commands.spawn(rect(
        Color::srgb(0.82, 0.78, 0.66),
        Vec2::new(180.0, 180.0),
        Vec3::new(0.0, 0.0, -8.0),
    ));
    commands.spawn((
        Text2d::new("Plaza"),
        TextFont::from_font_size(16.0),
        TextColor(Color::srgb(0.3, 0.25, 0.2)),
        Transform::from_xyz(0.0, -70.0, -7.0),
    ));
    for (x, y) in [
        (-260.0, 150.0),
        (260.0, 150.0),
        (-260.0, -150.0),
        (260.0, -150.0),
        (0.0, 260.0),
        (0.0, -260.0),
    ] {
        commands.spawn(rect(
            Color::srgb(0.55, 0.3, 0.22),
            Vec2::new(90.0, 70.0),
            Vec3::new(x, y + 55.0, -7.0),
        ));
        commands.spawn(rect(
            Color::srgb(0.45, 0.2, 0.15),
            Vec2::new(104.0, 24.0),
            Vec3::new(x, y + 98.0, -6.0),
        ));
    }
}

fn spawn_player(mut commands: Commands) {
    commands.spawn((
        Player,
        Sprite::from_color(Color::srgb(0.95, 0.95, 0.2), Vec2::splat(26.0)),
        Transform::from_xyz(0.0, -120.0, 2.0),
        children![(
            Text2d::new("You"),
            TextFont::from_font_size(14.0),
            TextColor(Color::WHITE),
            Transform::from_xyz(0.0, -24.0, 0.1),
        )],
    ));
}

/// Give newly spawned villagers a body, a name and a speech bubble.
fn decorate_villagers(
    mut commands: Commands,
    new: Query<(Entity, &Villager, &Persona, &Position), Added<Villager>>,
) {
    for (e, v, p, pos) in &new {
        let color = Color::srgb(v.color.0, v.color.1, v.color.2);
        commands.entity(e).insert((
            Sprite::from_color(color, Vec2::splat(28.0)),
            Transform::from_xyz(pos.0.x, pos.0.y, 1.0),
        ));
        let name = commands
            .spawn((
                NameTag(e, 8.0 * p.name.chars().count() as f32 + 6.0),
                Text2d::new(p.name.clone()),
                TextFont::from_font_size(15.0),
                TextColor(Color::WHITE),
                Transform::from_xyz(0.0, -26.0, 0.1),
            ))
            .id();
        // A bubble: a root that shows/hides, a white box, and the text above it.
        let bg = commands
            .spawn((
                Sprite::from_color(Color::srgba(1.0, 1.0, 1.0, 0.93), Vec2::new(212.0, 30.0)),
                Transform::default(),
            ))
            .id();
        let label = commands
            .spawn((
                Text2d::new(""),
                TextFont::from_font_size(13.0),
                TextColor(Color::srgb(0.1, 0.1, 0.12)),
                TextLayout::justify(Justify::Center),
                TextBounds::new_horizontal(200.0),
                Transform::from_xyz(0.0, 0.0, 0.5),
            ))
            .id();
        let bubble = commands
            .spawn((
                Bubble(e),
                BubbleText {
                    text: String::new(),
                    shown_until: 0.0,
                    attempt: 0,
                },
                BubbleParts { bg, label },
                Transform::from_xyz(0.0, 70.0, 5.0),
                Visibility::Hidden,
            ))
            .add_children(&[bg, label])
            .id();
        let badge = commands
            .spawn((
                Badge(e),
                Text2d::new(""),
                TextFont::from_font_size(13.0),
                TextColor(Color::srgb(1.0, 0.85, 0.3)),
                Transform::from_xyz(0.0, -42.0, 0.2),
            ))
            .id();
        commands.entity(e).add_children(&[name, bubble, badge]);
    }
}

fn sync_transforms(
    time: Res<Time>,
    mut q: Query<(&Position, &mut Transform), Without<Bubble>>,
    mut bubbles: Query<(&BubbleText, &BubbleParts, &mut Visibility)>,
    mut labels: Query<&mut Text2d>,
    mut boxes: Query<&mut Sprite>,
) {
    for (p, mut t) in &mut q {
        t.translation.x = p.0.x;
        t.translation.y = p.0.y;
    }
    let now = time.elapsed_secs();
    for (b, parts, mut vis) in &mut bubbles {
        let show = !b.text.is_empty() && now <= b.shown_until;
        *vis = if show {
            Visibility::Visible
        } else {
            Visibility::Hidden
        };
        if let Ok(mut text) = labels.get_mut(parts.label)
            && text.0 != b.text
        {
            text.0.clone_from(&b.text);
            // About 25 characters of the 13 px font fit a 200 px line.
            let lines = (b.text.chars().count() as f32 / 25.0).ceil().max(1.0);
            if let Ok(mut sprite) = boxes.get_mut(parts.bg) {
                sprite.custom_size = Some(Vec2::new(212.0, 17.0 * lines + 10.0));
            }
        }
    }
}

/// Badges: what a villager is doing ([`Doing`]), while it lasts.
fn show_doing(time: Res<Time>, doing: Query<&Doing>, mut badges: Query<(&Badge, &mut Text2d)>) {
    let now = time.elapsed_secs_f64();
    for (b, mut text) in &mut badges {
        let want = doing
            .get(b.0)
            .ok()
            .filter(|d| d.until > now)
            .map_or("", |d| d.label.as_str());
        if text.0 != want {
            text.0 = want.to_string();
        }
    }
}

/// Bubbles of villagers standing together would pile up: lift each shown
/// bubble above every shown bubble it would overlap (lowest first), so none
/// overlaps and each stays above its speaker.
fn lay_out_bubbles(
    villagers: Query<&Position>,
    mut bubbles: Query<(&Bubble, &BubbleParts, &Visibility, &mut Transform)>,
    boxes: Query<&Sprite>,
) {
    const GAP: f32 = 4.0;
    let mut shown: Vec<(Entity, Vec2, Vec2)> = Vec::new(); // bubble, base centre, size
    for (b, parts, vis, _) in &bubbles {
        if *vis == Visibility::Hidden {
            continue;
        }
        let (Ok(pos), Ok(sprite)) = (villagers.get(b.0), boxes.get(parts.bg)) else {
            continue;
        };
        let size = sprite.custom_size.unwrap_or(Vec2::new(212.0, 30.0));
        shown.push((b.0, pos.0 + Vec2::new(0.0, 52.0 + size.y / 2.0), size));
    }
    shown.sort_by(|a, b| a.1.y.total_cmp(&b.1.y).then(a.1.x.total_cmp(&b.1.x)));
    let mut placed: Vec<(Entity, Vec2, Vec2)> = Vec::new();
    for (e, base, size) in shown {
        let mut at = base;
        // Each lift clears one overlap; a bubble overlaps at most all placed ones.
        for _ in 0..=placed.len() {
            let hit = placed.iter().find(|(_, c, s)| {
                (at.x - c.x).abs() < (size.x + s.x) / 2.0
                    && (at.y - c.y).abs() < (size.y + s.y) / 2.0 + GAP
            });
            match hit {
                Some((_, c, s)) => at.y = c.y + (size.y + s.y) / 2.0 + GAP,
                None => break,
            }
        }
        placed.push((e, at, size));
    }
    for (b, _, _, mut t) in &mut bubbles {
        if let Some((_, at, _)) = placed.iter().find(|(e, ..)| *e == b.0)
            && let Ok(pos) = villagers.get(b.0)
        {
            t.translation.y = at.y - pos.0.y;
        }
    }
}

/// Names (and badges under them) of villagers standing together would
/// collide: shift each name down below every name it would overlap.
fn lay_out_names(
    villagers: Query<&Position>,
    mut tags: Query<(&NameTag, &mut Transform), Without<Badge>>,
    mut badges: Query<(&Badge, &mut Transform), Without<NameTag>>,
) {
    const H: f32 = 30.0; // a name and its badge
    let mut all: Vec<(Entity, Vec2, f32)> = tags
        .iter()
        .filter_map(|(t, _)| Some((t.0, villagers.get(t.0).ok()?.0 + Vec2::new(0.0, -26.0), t.1)))
        .collect();
    all.sort_by(|a, b| b.1.y.total_cmp(&a.1.y).then(a.1.x.total_cmp(&b.1.x)));
    let mut placed: Vec<(Entity, Vec2, f32)> = Vec::new();
    for (e, base, w) in all {
        let mut at = base;
        for _ in 0..=placed.len() {
            match placed
                .iter()
                .find(|(_, c, cw)| (at.x - c.x).abs() < (w + cw) / 2.0 && (at.y - c.y).abs() < H)
            {
                Some((_, c, _)) => at.y = c.y - H,
                None => break,
            }
        }
        placed.push((e, at, w));
    }
    for (t, mut tr) in &mut tags {
        if let (Some((_, at, _)), Ok(pos)) =
            (placed.iter().find(|(e, ..)| *e == t.0), villagers.get(t.0))
        {
            tr.translation.y = at.y - pos.0.y;
        }
    }
    for (b, mut tr) in &mut badges {
        if let (Some((_, at, _)), Ok(pos)) =
            (placed.iter().find(|(e, ..)| *e == b.0), villagers.get(b.0))
        {
            tr.translation.y = at.y - pos.0.y - 16.0;
        }
    }
}

fn bubble_for<'a>(
    bubbles: &'a mut Query<(&Bubble, &mut BubbleText)>,
    speaker: Entity,
) -> Option<Mut<'a, BubbleText>> {
    bubbles
        .iter_mut()
        .find(|(b, _)| b.0 == speaker)
        .map(|(_, t)| t)
}

fn bubble_token(
    tok: On<ConversationLineToken>,
    time: Res<Time>,
    convs: Query<&Conversation>,
    mut bubbles: Query<(&Bubble, &mut BubbleText)>,
) {
    // Only the one speaking in a conversation shows a bubble.
    if let Ok(c) = convs.get(tok.entity) {
        for p in c.participants.iter().filter(|p| **p != tok.speaker) {
            if let Some(mut b) = bubble_for(&mut bubbles, *p) {
                b.shown_until = b.shown_until.min(time.elapsed_secs());
            }
        }
    }
    if let Some(mut b) = bubble_for(&mut bubbles, tok.speaker) {
        // A finished line is still shown, or the line restarted after a
        // thrown-away attempt: this token starts the bubble afresh.
        if b.shown_until < 1e8 || b.attempt != tok.attempt {
            b.text.clear();
            b.attempt = tok.attempt;
        }
        b.text.push_str(&tok.text);
        b.shown_until = 1e9;
    }
}

fn bubble_finished(
    line: On<ConversationLineFinished>,
    time: Res<Time>,
    mut bubbles: Query<(&Bubble, &mut BubbleText)>,
) {
    if let Some(mut b) = bubble_for(&mut bubbles, line.speaker) {
        b.text.clone_from(&line.text);
        b.shown_until = time.elapsed_secs() + 5.0;
    }
}

fn bubble_clear(
    end: On<ConversationEnded>,
    convs: Query<&Conversation>,
    time: Res<Time>,
    mut bubbles: Query<(&Bubble, &mut BubbleText)>,
) {
    if let Ok(c) = convs.get(end.entity) {
        for p in &c.participants {
            if let Some(mut b) = bubble_for(&mut bubbles, *p) {
                b.shown_until = b.shown_until.min(time.elapsed_secs() + 3.0);
            }
        }
    }
}

fn move_player(
    keys: Res<ButtonInput<KeyCode>>,
    time: Res<Time>,
    chat: Res<ChatBox>,
    mut q: Query<&mut Transform, With<Player>>,
) {
    if chat.npc.is_some() {
        return;
    }
    let mut d = Vec2::ZERO;
    for (k, v) in [
        (KeyCode::KeyW, Vec2::Y),
        (KeyCode::ArrowUp, Vec2::Y),
        (KeyCode::KeyS, -Vec2::Y),
        (KeyCode::ArrowDown, -Vec2::Y),
        (KeyCode::KeyA, -Vec2::X),
        (KeyCode::ArrowLeft, -Vec2::X),
        (KeyCode::KeyD, Vec2::X),
        (KeyCode::ArrowRight, Vec2::X),
    ] {
        if keys.pressed(k) {
            d += v;
        }
    }
    if let Ok(mut t) = q.single_mut()
        && d != Vec2::ZERO
    {
        t.translation += (d.normalize() * PLAYER_SPEED * time.delta_secs()).extend(0.0);
    }
}

fn follow_camera(
    player: Query<&Transform, (With<Player>, Without<Camera2d>)>,
    mut cam: Query<&mut Transform, With<Camera2d>>,
) {
    if let (Ok(p), Ok(mut c)) = (player.single(), cam.single_mut()) {
        c.translation = c
            .translation
            .lerp(p.translation.with_z(c.translation.z), 0.1);
    }
}

#[derive(Resource, Default)]
struct ChatBox {
    npc: Option<Entity>,
    input: String,
}

fn talk_key(
    keys: Res<ButtonInput<KeyCode>>,
    mut chat: ResMut<ChatBox>,
    player: Query<&Transform, With<Player>>,
    villagers: Query<(Entity, &Position), (With<Villager>, Without<InConversation>)>,
) {
    if chat.npc.is_some() || !keys.just_pressed(KeyCode::KeyE) {
        return;
    }
    let Ok(p) = player.single() else { return };
    let me = p.translation.truncate();
    chat.npc = villagers
        .iter()
        .filter(|(_, pos)| pos.0.distance(me) < 70.0)
        .min_by(|a, b| a.1.0.distance(me).total_cmp(&b.1.0.distance(me)))
        .map(|(e, _)| e);
}

fn chat_window(
    mut contexts: EguiContexts,
    mut chat: ResMut<ChatBox>,
    names: Query<&Persona>,
    convs: Query<&Conversation>,
    in_conv: Query<&InConversation>,
    mut says: MessageWriter<PlayerSays>,
    mut leaves: MessageWriter<PlayerLeaves>,
) -> Result {
    let Some(npc) = chat.npc else { return Ok(()) };
    let ctx = contexts.ctx_mut()?;
    let name = names.get(npc).map_or("?".to_string(), |p| p.name.clone());
    let mut close = false;
    egui::Window::new(format!("Talking with {name}"))
        .default_pos([900.0, 560.0])
        .default_width(340.0)
        .show(ctx, |ui| {
            if let Ok(c) = in_conv.get(npc)
                && let Ok(conv) = convs.get(c.0)
            {
                for l in conv.lines.iter().rev().take(8).rev() {
                    ui.label(format!("{}: {}", l.speaker, l.text));
                }
            }
            let edit = ui.text_edit_singleline(&mut chat.input);
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            ui.horizontal(|ui| {
                if (ui.button("Send").clicked() || enter) && !chat.input.trim().is_empty() {
                    says.write(PlayerSays {
                        npc,
                        text: std::mem::take(&mut chat.input),
                    });
                }
                if ui.button("Leave").clicked() {
                    close = true;
                }
            });
        });
    if close {
        leaves.write(PlayerLeaves { npc });
        chat.npc = None;
    }
    Ok(())
}

fn screenshot(
    mut commands: Commands,
    args: Res<Args>,
    clock: Res<RunClock>,
    mut taken: Local<bool>,
) {
    if let Some(path) = &args.screenshot
        && !*taken
        && clock.0.elapsed().as_secs_f64() >= args.screenshot_after
    {
        *taken = true;
        commands
            .spawn(Screenshot::primary_window())
            .observe(save_to_disk(path.clone()));
    }
}
