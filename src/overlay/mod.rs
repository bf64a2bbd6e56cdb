//! The status overlay / debug panel: plain functions over plain data, drawn
//! with `egui`, so they run (and are tested) without a window. The
//! `debug-ui` feature adds `NpcLlmOverlayPlugin`, which fills
//! [`OverlayData`] from the plugin's resources every frame and draws it with
//! `bevy_egui` (toggle with F1).

#[cfg(feature = "debug-ui")]
mod plugin;
#[cfg(feature = "debug-ui")]
pub use plugin::{NpcLlmOverlayPlugin, OverlayState};

use egui::{Color32, RichText};

/// Where requests are served, as the overlay shows it: the backend and the
/// device (a remote server's URL, or the GPU the hardware plan chose).
#[cfg_attr(not(feature = "debug-ui"), allow(dead_code))]
pub(crate) fn backend_label(
    remote_server: Option<&str>,
    plan: Option<&crate::hardware::BackendPlan>,
) -> (String, Option<String>) {
    match remote_server {
        Some(url) => (
            "Remote server".into(),
            Some(crate::settings::redact_url(url).into_owned()),
        ),
        None => (
            plan.map_or("CPU".into(), |p| p.backend.clone()),
            plan.and_then(|p| p.device.clone()),
        ),
    }
}

/// The model's state, as the overlay shows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum OverlayModelState {
    /// Nothing loaded yet.
    #[default]
    Unloaded,
    /// Verifying or loading.
    Loading {
        /// Model id.
        model: String,
        /// "verifying sha256" or "loading".
        phase: String,
        /// 0..=1.
        progress: f32,
    },
    /// Serving.
    Ready {
        /// Model id.
        model: String,
    },
    /// The last load failed.
    Failed {
        /// Model id.
        model: String,
        /// The error, in words.
        error: String,
    },
}

/// One NPC's panel.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NpcView {
    /// Name.
    pub name: String,
    /// Text streaming now, if the NPC is speaking.
    pub speaking: Option<String>,
    /// Recent transcript lines (`Name: text`).
    pub transcript: Vec<String>,
    /// Memories, newest last (shared with the overlay's cache: rebuilt only
    /// when the NPC's memory changes, never copied per frame).
    pub memories: std::sync::Arc<[String]>,
}

/// A model in the picker.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChoice {
    /// Registry id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// `None` when this machine can run it, else why not.
    pub shortfall: Option<String>,
}

/// Everything the overlay shows, copied from the plugin's resources.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OverlayData {
    /// Model state.
    pub state: OverlayModelState,
    /// Backend (`CPU`, `CUDA`, ...).
    pub backend: String,
    /// Device description, if a GPU.
    pub device: Option<String>,
    /// GPU layers offloaded.
    pub gpu_layers: u32,
    /// Inference threads.
    pub threads: u32,
    /// KV cache size in MB (the loaded model's contexts; before a load,
    /// the plan's estimate).
    pub kv_mb: f64,
    /// llama.cpp contexts (lanes) the slots are split across.
    pub lanes: u32,
    /// Why this model and placement.
    pub reason: String,
    /// Generated tokens per second, recent.
    pub tokens_per_second: f32,
    /// Time to first token of the last request, ms.
    pub ttft_ms: Option<f32>,
    /// Requests waiting.
    pub queued: usize,
    /// Sequences generating.
    pub active: usize,
    /// Sequence slots.
    pub slots: usize,
    /// KV cells used / total.
    pub kv_cells: (usize, usize),
    /// Tokens generated since start.
    pub generated: u64,
    /// Requests completed / failed / cancelled.
    pub totals: (u64, u64, u64),
    /// Dialogue lines / retries / fallbacks.
    pub dialogue: (u64, u64, u64),
    /// Models in the registry.
    pub models: Vec<ModelChoice>,
    /// NPC panels.
    pub npcs: Vec<NpcView>,
    /// Playground output so far.
    pub playground_output: String,
    /// A playground request is running.
    pub playground_running: bool,
    /// Model downloads running now.
    pub downloads: Vec<crate::download::ModelDownloadProgress>,
}

/// The overlay's own widget state (text fields, sliders), kept between frames.
#[derive(Debug, Clone, PartialEq)]
pub struct OverlayUi {
    /// The window is shown.
    pub open: bool,
    /// The window starts collapsed to its title bar (click it to expand), so
    /// it does not cover the game. Read when the window first appears.
    pub start_collapsed: bool,
    /// Playground prompt text.
    pub prompt: String,
    /// Sampling sliders.
    pub temperature: f32,
    /// Sampling sliders.
    pub top_p: f32,
    /// Sampling sliders.
    pub top_k: u32,
    /// Sampling sliders.
    pub max_tokens: u32,
    /// Model chosen in the picker.
    pub picked_model: String,
}

impl Default for OverlayUi {
    fn default() -> Self {
        Self {
            open: true,
            start_collapsed: false,
            prompt: "Say hello to the village in one sentence.".into(),
            temperature: 0.7,
            top_p: 0.95,
            top_k: 40,
            max_tokens: 96,
            picked_model: String::new(),
        }
    }
}

/// What the player asked for in the overlay.
#[derive(Debug, Clone, PartialEq)]
pub enum OverlayAction {
    /// Load this registry model.
    SwitchModel(String),
    /// New default sampling.
    SetSampling {
        /// Temperature.
        temperature: f32,
        /// Top-p.
        top_p: f32,
        /// Top-k.
        top_k: u32,
        /// Max tokens.
        max_tokens: u32,
    },
    /// Send a playground prompt.
    SendPrompt(String),
    /// Cancel the playground request.
    CancelPrompt,
}

/// Draw the overlay window; returns what the player asked for.
pub fn draw_overlay(
    ctx: &egui::Context,
    data: &OverlayData,
    ui_state: &mut OverlayUi,
) -> Vec<OverlayAction> {
    let mut actions = Vec::new();
    if !ui_state.open {
        return actions;
    }
    let mut open = ui_state.open;
    egui::Window::new("NPC LLM (F1)")
        .open(&mut open)
        .default_width(340.0)
        .default_pos([10.0, 10.0])
        .default_open(!ui_state.start_collapsed)
        .show(ctx, |ui| {
            status_section(ui, data);
            ui.separator();
            model_section(ui, data, ui_state, &mut actions);
            sampling_section(ui, ui_state, &mut actions);
            npc_section(ui, data);
            playground_section(ui, data, ui_state, &mut actions);
        });
    ui_state.open = open;
    actions
}

/// "12.0 / 98.4 MB · 3.1 MB/s · 28 s left", as the overlay and the AI town show it.
#[must_use]
pub fn download_text(p: &crate::download::ModelDownloadProgress) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let mut s = format!("{:.1} / {:.1} MB", mb(p.bytes), mb(p.total));
    if p.bytes_per_s > 0.0 {
        s.push_str(&format!(" · {:.1} MB/s", p.bytes_per_s / 1e6));
    }
    if let Some(eta) = p.eta {
        s.push_str(&format!(" · {} s left", eta.as_secs()));
    }
    s
}

fn status_section(ui: &mut egui::Ui, d: &OverlayData) {
    match &d.state {
        OverlayModelState::Unloaded => {
            ui.label("Model: not loaded (loads on the first request)");
        }
        OverlayModelState::Loading {
            model,
            phase,
            progress,
        } => {
            ui.label(format!("Model: {model}"));
            ui.add(
                egui::ProgressBar::new(*progress).text(format!("{phase} {:.0}%", progress * 100.0)),
            );
        }
        OverlayModelState::Ready { model } => {
            ui.label(RichText::new(format!("Model: {model} — ready")).color(Color32::LIGHT_GREEN));
        }
        OverlayModelState::Failed { model, error } => {
            ui.label(RichText::new(format!("Model: {model} — failed")).color(Color32::LIGHT_RED));
            ui.label(RichText::new(error).color(Color32::LIGHT_RED).small());
        }
    }
    for dl in &d.downloads {
        ui.label(format!("Downloading {}", dl.id));
        ui.add(egui::ProgressBar::new(dl.fraction()).text(download_text(dl)));
    }
    ui.label(format!(
        "Backend: {}{} · GPU layers {} · threads {}",
        d.backend,
        d.device
            .as_deref()
            .map(|x| format!(" ({x})"))
            .unwrap_or_default(),
        d.gpu_layers,
        d.threads
    ));
    if !d.reason.is_empty() {
        ui.label(RichText::new(&d.reason).small().weak());
    }
    egui::Grid::new("npc_llm_stats")
        .num_columns(2)
        .show(ui, |ui| {
            ui.label("Tokens/s");
            ui.label(format!("{:.1}", d.tokens_per_second));
            ui.end_row();
            ui.label("Time to first token");
            ui.label(d.ttft_ms.map_or("–".into(), |t| format!("{t:.0} ms")));
            ui.end_row();
            ui.label("Queue / active / slots");
            ui.label(format!(
                "{} / {} / {} in {} lane{}",
                d.queued,
                d.active,
                d.slots,
                d.lanes,
                if d.lanes == 1 { "" } else { "s" }
            ));
            ui.end_row();
            ui.label("KV cache");
            ui.label(format!(
                "{} / {} cells ({:.0} MB)",
                d.kv_cells.0, d.kv_cells.1, d.kv_mb
            ));
            ui.end_row();
            ui.label("Totals");
            ui.label(format!(
                "{} tokens · {} done · {} failed · {} cancelled",
                d.generated, d.totals.0, d.totals.1, d.totals.2
            ));
            ui.end_row();
            ui.label("Dialogue");
            ui.label(format!(
                "{} lines · {} retried · {} fallback",
                d.dialogue.0, d.dialogue.1, d.dialogue.2
            ));
            ui.end_row();
        });
}

fn model_section(
    ui: &mut egui::Ui,
    d: &OverlayData,
    s: &mut OverlayUi,
    actions: &mut Vec<OverlayAction>,
) {
    egui::CollapsingHeader::new("Model picker")
        .default_open(true)
        .show(ui, |ui| {
            egui::ComboBox::from_label("Model")
                .selected_text(if s.picked_model.is_empty() {
                    "choose…".to_string()
                } else {
                    s.picked_model.clone()
                })
                .show_ui(ui, |ui| {
                    for m in &d.models {
                        let enabled = m.shortfall.is_none();
                        ui.add_enabled_ui(enabled, |ui| {
                            ui.selectable_value(&mut s.picked_model, m.id.clone(), &m.name)
                                .on_disabled_hover_text(m.shortfall.clone().unwrap_or_default());
                        });
                    }
                });
            let loading = matches!(d.state, OverlayModelState::Loading { .. });
            if ui
                .add_enabled(
                    !s.picked_model.is_empty() && !loading,
                    egui::Button::new("Switch model"),
                )
                .clicked()
            {
                actions.push(OverlayAction::SwitchModel(s.picked_model.clone()));
            }
        });
}

fn sampling_section(ui: &mut egui::Ui, s: &mut OverlayUi, actions: &mut Vec<OverlayAction>) {
    egui::CollapsingHeader::new("Sampling")
        .default_open(true)
        .show(ui, |ui| {
            let mut changed = false;
            changed |= ui
                .add(egui::Slider::new(&mut s.temperature, 0.0..=2.0).text("temperature"))
                .changed();
            changed |= ui
                .add(egui::Slider::new(&mut s.top_p, 0.05..=1.0).text("top-p"))
                .changed();
            changed |= ui
                .add(egui::Slider::new(&mut s.top_k, 0..=200).text("top-k"))
                .changed();
            changed |= ui
                .add(egui::Slider::new(&mut s.max_tokens, 8..=512).text("max tokens"))
                .changed();
            if changed {
                actions.push(OverlayAction::SetSampling {
                    temperature: s.temperature,
                    top_p: s.top_p,
                    top_k: s.top_k,
                    max_tokens: s.max_tokens,
                });
            }
        });
}

fn npc_section(ui: &mut egui::Ui, d: &OverlayData) {
    egui::CollapsingHeader::new(format!("NPCs ({})", d.npcs.len())).show(ui, |ui| {
        egui::ScrollArea::vertical()
            .max_height(240.0)
            .show(ui, |ui| {
                for npc in &d.npcs {
                    egui::CollapsingHeader::new(&npc.name)
                        .id_salt(("npc", &npc.name))
                        .show(ui, |ui| {
                            if let Some(t) = &npc.speaking {
                                ui.label(RichText::new(format!("speaking: {t}")).italics());
                            }
                            for l in &npc.transcript {
                                ui.label(RichText::new(l).small());
                            }
                            if !npc.memories.is_empty() {
                                ui.label(RichText::new("Memories").strong());
                                for m in npc.memories.iter() {
                                    ui.label(RichText::new(format!("• {m}")).small());
                                }
                            }
                        });
                }
            });
    });
}

fn playground_section(
    ui: &mut egui::Ui,
    d: &OverlayData,
    s: &mut OverlayUi,
    actions: &mut Vec<OverlayAction>,
) {
    egui::CollapsingHeader::new("Prompt playground")
        .default_open(true)
        .show(ui, |ui| {
            ui.text_edit_multiline(&mut s.prompt);
            ui.horizontal(|ui| {
                if ui
                    .add_enabled(!d.playground_running, egui::Button::new("Send"))
                    .clicked()
                {
                    actions.push(OverlayAction::SendPrompt(s.prompt.clone()));
                }
                if ui
                    .add_enabled(d.playground_running, egui::Button::new("Cancel"))
                    .clicked()
                {
                    actions.push(OverlayAction::CancelPrompt);
                }
            });
            if !d.playground_output.is_empty() {
                ui.label(&d.playground_output);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every text the overlay painted in one frame.
    fn texts(data: &OverlayData, ui_state: &mut OverlayUi) -> String {
        let ctx = egui::Context::default();
        let mut out = String::new();
        // Two passes: egui sizes windows on the first.
        for _ in 0..2 {
            let mut full = ctx.run_ui(egui::RawInput::default(), |ui| {
                let _ = draw_overlay(ui.ctx(), data, ui_state);
            });
            out.clear();
            for clipped in std::mem::take(&mut full.shapes) {
                collect(&clipped.shape, &mut out);
            }
            // No renderer here: drop the font texture upload on purpose.
            full.textures_delta.clear();
        }
        out
    }

    fn collect(shape: &egui::Shape, out: &mut String) {
        match shape {
            egui::Shape::Text(t) => {
                out.push_str(t.galley.text());
                out.push('\n');
            }
            egui::Shape::Vec(v) => v.iter().for_each(|s| collect(s, out)),
            _ => {}
        }
    }

    #[test]
    fn a_remote_server_is_shown_as_the_backend() {
        let (backend, device) = backend_label(Some("http://10.0.0.5:8080"), None);
        let mut d = data(OverlayModelState::Ready {
            model: "smol".into(),
        });
        d.backend = backend;
        d.device = device;
        let out = texts(&d, &mut OverlayUi::default());
        assert!(
            out.contains("Backend: Remote server (http://10.0.0.5:8080)"),
            "{out}"
        );
        assert_eq!(backend_label(None, None), ("CPU".to_string(), None));
    }

    fn data(state: OverlayModelState) -> OverlayData {
        OverlayData {
            state,
            backend: "CPU".into(),
            threads: 1,
            tokens_per_second: 42.5,
            queued: 2,
            active: 3,
            slots: 8,
            lanes: 1,
            kv_cells: (600, 8192),
            models: vec![ModelChoice {
                id: "smollm2".into(),
                name: "SmolLM2".into(),
                shortfall: None,
            }],
            npcs: vec![NpcView {
                name: "Mira".into(),
                speaking: Some("Good morn".into()),
                transcript: vec!["Brom: Hello.".into()],
                memories: vec!["I sold bread.".to_string()].into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn loading_state_shows_progress_and_controls() {
        let t = texts(
            &data(OverlayModelState::Loading {
                model: "smollm2".into(),
                phase: "verifying sha256".into(),
                progress: 0.4,
            }),
            &mut OverlayUi::default(),
        );
        for needle in [
            "NPC LLM",
            "Model: smollm2",
            "verifying sha256 40%",
            "Backend: CPU",
            "Tokens/s",
            "Queue / active / slots",
            "2 / 3 / 8",
            "Model picker",
            "Sampling",
            "NPCs (1)",
            "Prompt playground",
            "Switch model",
            "temperature",
            "top-p",
            "max tokens",
            "Send",
            "Cancel",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in:\n{t}");
        }
    }

    #[test]
    fn a_running_download_shows_a_progress_bar() {
        let mut d = data(OverlayModelState::Loading {
            model: "smollm2".into(),
            phase: "downloading".into(),
            progress: 0.25,
        });
        d.downloads = vec![crate::download::ModelDownloadProgress {
            id: "smollm2".into(),
            bytes: 24_600_000,
            total: 98_400_000,
            bytes_per_s: 3_100_000.0,
            eta: Some(std::time::Duration::from_secs(23)),
        }];
        let t = texts(&d, &mut OverlayUi::default());
        for needle in [
            "Downloading smollm2",
            "24.6 / 98.4 MB · 3.1 MB/s · 23 s left",
            "downloading 25%",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in:\n{t}");
        }
    }

    #[test]
    fn ready_and_failed_states() {
        let t = texts(
            &data(OverlayModelState::Ready {
                model: "smollm2".into(),
            }),
            &mut OverlayUi::default(),
        );
        assert!(t.contains("smollm2 — ready") && t.contains("42.5"), "{t}");
        let t = texts(
            &data(OverlayModelState::Failed {
                model: "gemma".into(),
                error: "model file not found: x.gguf".into(),
            }),
            &mut OverlayUi::default(),
        );
        assert!(
            t.contains("gemma — failed") && t.contains("model file not found"),
            "{t}"
        );
        // Closed: nothing drawn.
        let mut closed = OverlayUi {
            open: false,
            ..Default::default()
        };
        assert!(texts(&data(OverlayModelState::Unloaded), &mut closed).is_empty());
    }
}
