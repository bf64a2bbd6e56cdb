//! The overlay in a Bevy window, through `bevy_egui`.

use bevy::prelude::*;
use bevy_egui::{EguiContexts, EguiPlugin, EguiPrimaryContextPass};

use super::*;
use crate::dialogue::{Conversation, DialogueStats, NpcMemory, Persona};
use crate::events::{
    CancelLlmRequest, ConversationLineFinished, ConversationLineToken, LoadModel, LoadPhase,
};
use crate::hardware::{BackendStatus, HardwareProfile, plan};
use crate::registry::ModelRegistry;
use crate::request::{LlmRequest, LlmRequestStatus, RequestPriority};
use crate::settings::LlmSettings;
use crate::{LlmEngineStats, LlmModelState};

/// Draws the status overlay (F1 toggles it). Add after [`NpcLlmPlugin`](crate::NpcLlmPlugin);
/// adds `bevy_egui`'s `EguiPlugin` when missing.
#[derive(Default, Debug, Clone, Copy)]
pub struct NpcLlmOverlayPlugin;

/// The overlay's widget state; edit `open` to show or hide it.
#[derive(Resource, Default, Debug, Clone)]
pub struct OverlayState {
    /// Widget state.
    pub ui: OverlayUi,
    playground: Option<Entity>,
    /// The line each NPC is speaking, with its attempt number.
    speaking: std::collections::HashMap<Entity, (u32, String)>,
    /// Each NPC's memory texts, rebuilt when its `NpcMemory` changes; pruned
    /// to the NPCs that exist.
    memories: std::collections::HashMap<Entity, std::sync::Arc<[String]>>,
    /// The model picker's rows (a hardware plan per model), rebuilt when the
    /// settings, registry or hardware profile change.
    models: Option<Vec<ModelChoice>>,
}

impl Plugin for NpcLlmOverlayPlugin {
    fn build(&self, app: &mut App) {
        if !app.is_plugin_added::<EguiPlugin>() {
            app.add_plugins(EguiPlugin::default());
        }
        app.init_resource::<OverlayState>()
            .add_systems(Update, (toggle, track_speech))
            .add_systems(EguiPrimaryContextPass, draw);
    }
}

fn toggle(keys: Res<ButtonInput<KeyCode>>, mut state: ResMut<OverlayState>) {
    if keys.just_pressed(KeyCode::F1) {
        state.ui.open = !state.ui.open;
    }
}

fn track_speech(
    mut state: ResMut<OverlayState>,
    mut tokens: MessageReader<ConversationLineToken>,
    mut finished: MessageReader<ConversationLineFinished>,
) {
    for t in tokens.read() {
        let (attempt, text) = state.speaking.entry(t.speaker).or_default();
        // A new attempt restarts the line: the failed attempt's text goes.
        if *attempt != t.attempt {
            *attempt = t.attempt;
            text.clear();
        }
        text.push_str(&t.text);
    }
    for f in finished.read() {
        state.speaking.remove(&f.speaker);
    }
}

#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn draw(
    mut contexts: EguiContexts,
    mut commands: Commands,
    mut state: ResMut<OverlayState>,
    model: Res<LlmModelState>,
    backend: Res<BackendStatus>,
    stats: Res<LlmEngineStats>,
    registry: Res<ModelRegistry>,
    profile: Res<HardwareProfile>,
    mut settings: ResMut<LlmSettings>,
    dialogue: Option<Res<DialogueStats>>,
    npcs: Query<(
        Entity,
        &Persona,
        Option<Ref<NpcMemory>>,
        Option<&crate::dialogue::InConversation>,
    )>,
    convs: Query<&Conversation>,
    requests: Query<&LlmRequestStatus>,
    mut loads: MessageWriter<LoadModel>,
    mut cancels: MessageWriter<CancelLlmRequest>,
    downloads: Res<crate::download::ModelDownloads>,
) -> Result {
    let ctx = contexts.ctx_mut()?;
    let c = &stats.counters;
    let plan_ref = backend.plan.as_ref();
    let plan_ref = if stats.remote_server.is_some() {
        None
    } else {
        plan_ref
    };
    let (backend_name, device) = backend_label(stats.remote_server.as_deref(), plan_ref);
    let mut data = OverlayData {
        state: match &*model {
            LlmModelState::Unloaded => OverlayModelState::Unloaded,
            LlmModelState::Loading {
                model,
                phase,
                progress,
            } => OverlayModelState::Loading {
                model: model.clone(),
                phase: match phase {
                    LoadPhase::Verifying => "verifying sha256".into(),
                    LoadPhase::Loading => "loading".into(),
                    LoadPhase::Connecting => "connecting to the server".into(),
                    LoadPhase::Downloading => "downloading".into(),
                },
                progress: *progress,
            },
            LlmModelState::Ready(info) => OverlayModelState::Ready {
                model: info.model.clone(),
            },
            LlmModelState::Failed { model, error } => OverlayModelState::Failed {
                model: model.clone(),
                error: error.to_string(),
            },
        },
        backend: backend_name,
        device,
        gpu_layers: backend.layers_offloaded.unwrap_or(0),
        threads: plan_ref.map_or(0, |p| p.engine.threads),
        // What the worker made, once loaded; the plan's estimate before.
        kv_mb: match &*model {
            LlmModelState::Ready(info) if info.remote.is_none() => info.kv_bytes as f64 / 1e6,
            _ => plan_ref.map_or(0.0, |p| p.kv_bytes as f64 / 1e6),
        },
        lanes: match &*model {
            LlmModelState::Ready(info) => info.lanes,
            _ => plan_ref.map_or(1, |p| p.engine.lanes),
        },
        reason: plan_ref.map(|p| p.reason.clone()).unwrap_or_default(),
        tokens_per_second: stats.tokens_per_second,
        ttft_ms: stats
            .last_time_to_first_token
            .map(|d| d.as_secs_f32() * 1e3),
        queued: c.queued,
        active: c.active_sequences,
        slots: c.slots,
        kv_cells: (c.kv_cells_used, c.kv_cells_total),
        generated: c.generated_tokens,
        totals: (c.completed, c.failed, c.cancelled),
        dialogue: dialogue.map_or((0, 0, 0), |d| (d.lines, d.retries, d.fallbacks)),
        ..Default::default()
    };
    if state.models.is_none()
        || settings.is_changed()
        || registry.is_changed()
        || profile.is_changed()
    {
        let models = registry
            .iter()
            .map(|e| {
                let mut s = settings.clone();
                s.model.clone_from(&e.id);
                ModelChoice {
                    id: e.id.clone(),
                    name: e.name.clone(),
                    shortfall: plan(&profile, &registry, &s).err().map(|e| e.to_string()),
                }
            })
            .collect();
        state.models = Some(models);
    }
    data.models = state.models.clone().unwrap_or_default();
    data.downloads = downloads.iter().cloned().collect();
    state.memories.retain(|e, _| npcs.contains(*e));
    state.speaking.retain(|e, _| npcs.contains(*e));
    for (e, _, mem, _) in &npcs {
        match mem {
            Some(m) if m.is_changed() || !state.memories.contains_key(&e) => {
                let texts: Vec<String> = m.entries.iter().map(|x| x.text.clone()).collect();
                state.memories.insert(e, texts.into());
            }
            Some(_) => {}
            None => {
                state.memories.remove(&e);
            }
        }
    }
    let mut views: Vec<NpcView> = npcs
        .iter()
        .map(|(e, p, _, in_conv)| NpcView {
            name: p.name.clone(),
            speaking: state.speaking.get(&e).map(|(_, text)| text.clone()),
            transcript: in_conv
                .and_then(|c| convs.get(c.0).ok())
                .map(|c| {
                    c.lines
                        .iter()
                        .rev()
                        .take(6)
                        .rev()
                        .map(|l| format!("{}: {}", l.speaker, l.text))
                        .collect()
                })
                .unwrap_or_default(),
            memories: state
                .memories
                .get(&e)
                .cloned()
                .unwrap_or_else(|| Vec::new().into()),
        })
        .collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    data.npcs = views;
    if let Some(e) = state.playground
        && let Ok(status) = requests.get(e)
    {
        data.playground_output = status.text.clone();
        data.playground_running = !status.is_finished();
    }
    let actions = draw_overlay(ctx, &data, &mut state.ui);
    for action in actions {
        match action {
            OverlayAction::SwitchModel(id) => {
                loads.write(LoadModel { model: Some(id) });
            }
            OverlayAction::SetSampling {
                temperature,
                top_p,
                top_k,
                max_tokens,
            } => {
                settings.sampling.temperature = temperature;
                settings.sampling.top_p = top_p;
                settings.sampling.top_k = top_k;
                settings.sampling.max_tokens = max_tokens.min(settings.context_per_sequence / 2);
            }
            OverlayAction::SendPrompt(text) => {
                if let Some(old) = state.playground.take() {
                    commands.entity(old).despawn();
                }
                let e = commands
                    .spawn((
                        Name::new("Overlay playground"),
                        LlmRequest::chat([crate::request::ChatMessage::user(text)])
                            .with_priority(RequestPriority::High),
                    ))
                    .id();
                state.playground = Some(e);
            }
            OverlayAction::CancelPrompt => {
                if let Some(e) = state.playground {
                    cancels.write(CancelLlmRequest { entity: e });
                }
            }
        }
    }
    Ok(())
}
