//! Hardware detection and the selection of backend, layers, threads,
//! sequences and model.

mod common;

use bevy::prelude::*;
use bevy_npc_llm::errors::{ModelLoadError, SelectionError};
use bevy_npc_llm::hardware::{
    BackendStatus, BatchShaping, CUDA_GRAPH_PATCH_WIDTH, GpuDevice, GpuKind, HardwareProfile, plan,
};
use bevy_npc_llm::prelude::*;
use bevy_npc_llm::registry::ModelRegistry;
use bevy_npc_llm::settings::GpuLayers;
use common::*;

const GB: u64 = 1 << 30;

/// Four models from tiny to large, with real-looking numbers.
fn tiers() -> ModelRegistry {
    let entry = |id: &str,
                 size: u64,
                 mem: u64,
                 layers: u32,
                 kv: u64,
                 ram: u64,
                 vram: &str,
                 gpu: bool| {
        format!(
            r#"(id: "{id}", name: "{id}", file: "{id}.gguf", sha256: "{sha}",
                size_bytes: {size}, context_length: 8192, quantization: "Q4_K_M",
                memory_estimate_bytes: {mem}, n_layers: {layers}, kv_bytes_per_token: {kv},
                prompt_format: ChatTemplate,
                requirements: (min_ram_bytes: {ram}, min_vram_bytes: {vram}, gpu_recommended: {gpu}))"#,
            sha = "a".repeat(64)
        )
    };
    let text = format!(
        "(models: [{}, {}, {}, {}])",
        entry(
            "tiny",
            100_000_000,
            300_000_000,
            30,
            23_040,
            2 * GB,
            "None",
            false
        ),
        entry("small", GB, 2 * GB, 28, 114_688, 6 * GB, "None", false),
        entry(
            "mid",
            5 * GB,
            6 * GB,
            32,
            131_072,
            12 * GB,
            "Some(6442450944)",
            true
        ),
        entry(
            "large",
            40 * GB,
            48 * GB,
            80,
            327_680,
            64 * GB,
            "Some(48318382080)",
            true
        ),
    );
    ModelRegistry::from_ron_str(&text, "/models", "tiers").unwrap()
}

fn machine(cores: usize, ram_gb: u64, simd: &[&str], gpu: Option<(&str, u64)>) -> HardwareProfile {
    HardwareProfile {
        cpu_brand: "test cpu".into(),
        physical_cores: cores,
        logical_cores: cores * 2,
        simd: simd.iter().map(|s| (*s).to_string()).collect(),
        ram_total_bytes: ram_gb * GB,
        ram_available_bytes: ram_gb * GB * 3 / 4,
        gpus: gpu
            .map(|(name, free)| {
                vec![GpuDevice {
                    index: 0,
                    name: "CUDA0".into(),
                    description: name.into(),
                    backend: "CUDA".into(),
                    kind: GpuKind::Discrete,
                    memory_total_bytes: free + GB / 2,
                    memory_free_bytes: free,
                    graph_patch: Some(CUDA_GRAPH_PATCH_WIDTH),
                }]
            })
            .unwrap_or_default(),
        ..Default::default()
    }
}

struct Case {
    name: &'static str,
    profile: HardwareProfile,
    model: &'static str,
    gpu_layers: GpuLayers,
    expect_backend: &'static str,
    expect_layers: u32,
    expect_threads: u32,
    expect_model: &'static str,
    reason_has: &'static str,
}

#[test]
fn selection_over_synthetic_machines() {
    let reg = tiers();
    let cases = [
        Case {
            name: "no GPU, 2 cores, 4 GB",
            profile: machine(2, 4, &["avx", "avx2"], None),
            model: "auto",
            gpu_layers: GpuLayers::Auto,
            expect_backend: "CPU",
            expect_layers: 0,
            expect_threads: 1,
            expect_model: "tiny",
            reason_has: "smallest",
        },
        Case {
            name: "8 cores, 16 GB, AVX2",
            profile: machine(8, 16, &["avx2", "fma"], None),
            model: "auto",
            gpu_layers: GpuLayers::Auto,
            expect_backend: "CPU",
            expect_layers: 0,
            expect_threads: 7,
            expect_model: "small",
            reason_has: "CPU with avx2",
        },
        Case {
            name: "8 GB VRAM GPU",
            profile: machine(8, 32, &["avx2"], Some(("GeForce RTX 3070", 15 * GB / 2))),
            model: "auto",
            gpu_layers: GpuLayers::Auto,
            expect_backend: "CUDA",
            // 32 layers + llama.cpp's output layer: all of them.
            expect_layers: 33,
            expect_threads: 7,
            expect_model: "mid",
            reason_has: "modest GPU",
        },
        Case {
            name: "80 GB GPU",
            profile: machine(
                16,
                256,
                &["avx2", "avx512f"],
                Some(("NVIDIA H100 80GB HBM3", 79 * GB)),
            ),
            model: "auto",
            gpu_layers: GpuLayers::Auto,
            expect_backend: "CUDA",
            expect_layers: 81,
            expect_threads: 8,
            expect_model: "large",
            reason_has: "strong GPU",
        },
        Case {
            name: "small model on a nearly full 2 GB GPU: partial offload",
            profile: machine(4, 16, &["avx2"], Some(("GeForce GTX 1050", 3 * GB / 2))),
            model: "small",
            gpu_layers: GpuLayers::Auto,
            expect_backend: "CUDA",
            expect_layers: 22, // of 28 + the output layer
            expect_threads: 3,
            expect_model: "small",
            reason_has: "22 of 29 layers (output layer included) fit",
        },
        Case {
            name: "GPU present but offload disabled",
            profile: machine(4, 16, &["avx2"], Some(("GeForce RTX 3070", 7 * GB))),
            model: "tiny",
            gpu_layers: GpuLayers::Count(0),
            expect_backend: "CPU",
            expect_layers: 0,
            expect_threads: 3,
            expect_model: "tiny",
            reason_has: "disabled",
        },
        Case {
            name: "old CPU without AVX2, plenty of RAM",
            profile: machine(4, 32, &["sse4.2", "avx"], None),
            model: "auto",
            gpu_layers: GpuLayers::Auto,
            expect_backend: "CPU",
            expect_layers: 0,
            expect_threads: 3,
            expect_model: "tiny",
            reason_has: "no AVX2",
        },
    ];
    for c in cases {
        let settings = LlmSettings {
            model: c.model.into(),
            gpu_layers: c.gpu_layers,
            ..Default::default()
        };
        let p = plan(&c.profile, &reg, &settings).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(
            (
                p.backend.as_str(),
                p.engine.gpu_layers,
                p.engine.threads,
                p.model.as_str()
            ),
            (
                c.expect_backend,
                c.expect_layers,
                c.expect_threads,
                c.expect_model
            ),
            "{}: {p:?}",
            c.name
        );
        assert!(p.reason.contains(c.reason_has), "{}: {}", c.name, p.reason);
        assert!(p.engine.sequences >= 1 && p.engine.sequences <= settings.max_parallel_sequences);
        assert_eq!(
            p.kv_bytes,
            // The context holds one sequence more: the player's slot; each
            // lane's context a whole share.
            u64::from(p.engine.lanes * (p.engine.sequences + 1).div_ceil(p.engine.lanes))
                * u64::from(p.engine.context_per_sequence)
                * kv(&reg, c.expect_model)
        );
    }
}

fn kv(reg: &ModelRegistry, id: &str) -> u64 {
    reg.get(id).unwrap().kv_bytes_per_token
}

#[test]
fn machines_that_cannot_run_get_errors_naming_the_shortfall() {
    let reg = tiers();
    let tiny_ram = machine(1, 1, &[], None);
    match plan(&tiny_ram, &reg, &LlmSettings::default()) {
        Err(e @ SelectionError::NoModelFits { .. }) => {
            assert!(
                e.to_string()
                    .contains("needs 2.0 GB of RAM, this machine has 1.0 GB"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
    let laptop = machine(4, 16, &["avx2"], None);
    let explicit = LlmSettings {
        model: "large".into(),
        ..Default::default()
    };
    match plan(&laptop, &reg, &explicit) {
        Err(e @ SelectionError::CannotRun { .. }) => {
            assert!(
                e.to_string().contains("`large` needs 64.0 GB of RAM"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
    let big_ram_no_gpu = machine(16, 128, &["avx2"], None);
    match plan(&big_ram_no_gpu, &reg, &explicit) {
        Err(e @ SelectionError::CannotRun { .. }) => {
            assert!(
                e.to_string()
                    .contains("needs a GPU with 45.0 GB free, this machine has none"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
    let unknown = LlmSettings {
        model: "nope".into(),
        ..Default::default()
    };
    assert!(matches!(
        plan(&laptop, &reg, &unknown),
        Err(SelectionError::Registry(_))
    ));
}

#[test]
fn parallel_sequences_are_limited_by_memory() {
    let reg = tiers();
    // 4 GB RAM, 3 GB available: half of it minus the model for KV.
    let p = plan(
        &machine(2, 4, &["avx2"], None),
        &reg,
        &LlmSettings {
            model: "small".into(),
            context_per_sequence: 8192,
            max_parallel_sequences: 16,
            ..Default::default()
        },
    );
    // small needs 6 GB RAM: cannot run here at all.
    assert!(p.is_err());
    let p = plan(
        &machine(2, 8, &["avx2"], None),
        &reg,
        &LlmSettings {
            model: "small".into(),
            context_per_sequence: 8192,
            max_parallel_sequences: 16,
            ..Default::default()
        },
    )
    .unwrap();
    // (8 GB × 3/4 / 2 − 1 GB) / (8192 × 114688 B) = 2 GB / 896 MiB = 2
    // sequences of KV, one of them the player's slot: 1 for NPCs.
    assert_eq!(p.engine.sequences, 1, "{p:?}");
    assert!(
        p.reason.contains("1 parallel sequences fit"),
        "{}",
        p.reason
    );
}

/// This machine, detected for real: CPU backend, no GPU layers, threads =
/// physical cores − 1 (1 on the 2-core CI machine).
#[test]
fn real_detection_on_this_machine_runs_on_the_cpu() {
    let mut s = settings();
    s.threads = 0;
    let mut app = app_with(s);
    // Detection runs at startup (never in `Plugin::build`).
    app.update();
    let profile = app.world().resource::<HardwareProfile>().clone();
    assert!(profile.logical_cores >= 1 && profile.physical_cores >= 1);
    assert!(profile.ram_total_bytes > GB, "{profile:?}");
    assert!(profile.ram_available_bytes <= profile.ram_total_bytes);
    #[cfg(target_arch = "x86_64")]
    assert!(profile.simd.iter().any(|f| f == "sse4.2"), "{profile:?}");
    assert!(
        profile.gpus.is_empty(),
        "this test expects a CPU-only machine: {profile:?}"
    );
    load_ready(&mut app, None);
    let status = app.world().resource::<BackendStatus>();
    let p = status.plan.clone().unwrap();
    assert_eq!((p.backend.as_str(), p.engine.gpu_layers), ("CPU", 0));
    let expected = (profile.physical_cores as u32)
        .saturating_sub(1)
        .clamp(1, 8);
    assert_eq!(p.engine.threads, expected);
    if std::thread::available_parallelism().unwrap().get() == 2 {
        assert_eq!(p.engine.threads, 1);
    }
    assert_eq!(status.layers_offloaded, Some(0));
    match app.world().resource::<LlmModelState>() {
        LlmModelState::Ready(info) => assert_eq!(info.threads, p.engine.threads),
        other => panic!("{other:?}"),
    }
}

#[test]
fn explicit_model_the_machine_cannot_run_fails_the_load_with_the_shortfall() {
    let mut app = app();
    // The registry file is read at startup.
    app.update();
    {
        let mut reg = app.world_mut().resource_mut::<ModelRegistry>();
        let mut huge = reg.get(SMOL).unwrap().clone();
        huge.id = "huge".into();
        huge.requirements.min_ram_bytes = 1 << 50;
        reg.add(huge).unwrap();
    }
    app.world_mut().write_message(LoadModel {
        model: Some("huge".into()),
    });
    app.update();
    match app.world().resource::<LlmModelState>() {
        LlmModelState::Failed {
            error: ModelLoadError::Selection(SelectionError::CannotRun { shortfall, .. }),
            ..
        } => assert!(shortfall.contains("of RAM"), "{shortfall}"),
        other => panic!("{other:?}"),
    }
}

/// The example registry's real instruct models (docs/MODELS.md) on four
/// simulated machines: which model each gets, and why. Bigger machines never
/// get a smaller model; the 24 GB GPU runs a 3–4B model fully offloaded.
#[test]
fn real_model_tiers_on_simulated_machines() {
    let reg = ModelRegistry::load(models_dir().join("models.example.ron")).unwrap();
    assert_eq!(reg.len(), 8);
    let machines = [
        ("2 cores, 8 GB, no GPU", machine(2, 8, &["avx2"], None)),
        (
            "8 cores, 16 GB, no GPU",
            machine(8, 16, &["avx2", "fma"], None),
        ),
        (
            "8 cores, 32 GB, 8 GB GPU",
            machine(8, 32, &["avx2"], Some(("GeForce RTX 3070", 15 * GB / 2))),
        ),
        (
            "16 cores, 64 GB, 24 GB GPU",
            machine(16, 64, &["avx2"], Some(("GeForce RTX 4090", 23 * GB))),
        ),
    ];
    let mut sizes = Vec::new();
    for (name, profile) in &machines {
        let p = plan(profile, &reg, &LlmSettings::default()).unwrap();
        let entry = reg.get(&p.model).unwrap();
        println!(
            "{name:<28} -> {:<30} on {} ({} layers, {} threads, {} sequences): {}",
            p.model,
            p.device.as_deref().unwrap_or(&p.backend),
            p.engine.gpu_layers,
            p.engine.threads,
            p.engine.sequences,
            p.reason
        );
        assert!(entry.has_tag("instruct"));
        sizes.push(entry.size_bytes);
        if name.contains("24 GB") {
            assert!(entry.size_bytes >= 2_000_000_000, "{p:?}");
            // llama.cpp counts the output layer too: n_layers + 1 is all of them.
            assert_eq!(
                p.engine.gpu_layers,
                entry.n_layers + 1,
                "all layers on the GPU: {p:?}"
            );
            assert!(
                !p.engine.device_sampling && p.engine.sampling_threads > 1,
                "{p:?}"
            );
            assert_eq!(p.engine.lanes, 2, "two lanes on a GPU: {p:?}");
            // Lanes of at most 8 sequences up to eight lanes (llama.cpp's
            // matrix-vector kernels), at least two; four beyond 64 sequences.
            for (n, lanes) in [
                (1, 2),
                (8, 2),
                (16, 2),
                (17, 3),
                (24, 3),
                (25, 4),
                (32, 4),
                (33, 5),
                (64, 8),
                (65, 4),
                (128, 4),
            ] {
                let mut s = LlmSettings {
                    max_parallel_sequences: n,
                    context_per_sequence: 256,
                    ..Default::default()
                };
                s.sampling.max_tokens = 128;
                let q = plan(profile, &reg, &s).unwrap();
                assert_eq!(q.engine.sequences, n, "{q:?}");
                assert_eq!(q.engine.lanes, lanes, "{n} sequences: {q:?}");
            }
            // A number in the settings is kept.
            let mut s = LlmSettings {
                max_parallel_sequences: 32,
                ..Default::default()
            };
            s.gpu.lanes = 1;
            assert_eq!(plan(profile, &reg, &s).unwrap().engine.lanes, 1);
            assert!(
                p.engine.shaping.fill_gaps && !p.engine.kv_unified,
                "gap fillers on a GPU: {p:?}"
            );
            assert!(
                p.engine.shaping.even_prompt_steps,
                "even prompt steps on a GPU: {p:?}"
            );
            assert!(
                p.engine.shaping.round_prompt_steps,
                "rounded prompt steps on a GPU: {p:?}"
            );
            let mut s = LlmSettings::default();
            s.gpu.round_prompt_steps = Some(false);
            assert!(
                !plan(profile, &reg, &s)
                    .unwrap()
                    .engine
                    .shaping
                    .round_prompt_steps
            );
            // Unified KV asked for: nothing to fill.
            let mut s = LlmSettings::default();
            s.gpu.kv_unified = Some(true);
            let u = plan(profile, &reg, &s).unwrap();
            assert!(
                u.engine.kv_unified
                    && !u.engine.shaping.fill_gaps
                    && !u.engine.shaping.even_prompt_steps,
                "{u:?}"
            );
            // llama.cpp's CUDA module as shipped (or patched for another
            // width): no rounded prompt steps by default; another GPU
            // backend, where nothing was measured: no shaping by default.
            for width in [None, Some(CUDA_GRAPH_PATCH_WIDTH / 2)] {
                let mut unpatched = profile.clone();
                unpatched.gpus[0].graph_patch = width;
                let q = plan(&unpatched, &reg, &LlmSettings::default()).unwrap();
                let shaping = q.engine.shaping;
                assert!(
                    shaping.fill_gaps && shaping.even_prompt_steps && !shaping.round_prompt_steps,
                    "{q:?}"
                );
            }
            let mut vulkan = profile.clone();
            vulkan.gpus[0].backend = "Vulkan".into();
            vulkan.gpus[0].graph_patch = None;
            let q = plan(&vulkan, &reg, &LlmSettings::default()).unwrap();
            assert_eq!(q.engine.shaping, BatchShaping::default(), "{q:?}");
            let mut s = LlmSettings::default();
            s.gpu.round_prompt_steps = Some(true);
            assert!(
                plan(&vulkan, &reg, &s)
                    .unwrap()
                    .engine
                    .shaping
                    .round_prompt_steps
            );
        }
        if name.starts_with("2 cores") {
            assert!(entry.size_bytes <= 1_200_000_000, "{p:?}");
            assert_eq!(p.engine.lanes, 1, "one lane on the CPU: {p:?}");
            assert!(
                !p.engine.shaping.fill_gaps,
                "no gap fillers on the CPU by default: {p:?}"
            );
            assert!(
                !p.engine.shaping.even_prompt_steps && !p.engine.shaping.round_prompt_steps,
                "no padding on the CPU by default: {p:?}"
            );
            let mut s = LlmSettings::default();
            s.gpu.fill_gaps = Some(true);
            s.gpu.even_prompt_steps = Some(true);
            s.gpu.round_prompt_steps = Some(true);
            let asked = plan(profile, &reg, &s).unwrap();
            assert!(
                asked.engine.shaping.fill_gaps
                    && asked.engine.shaping.even_prompt_steps
                    && asked.engine.shaping.round_prompt_steps,
                "asked for on the CPU"
            );
        }
    }
    assert!(
        sizes.windows(2).all(|w| w[0] <= w[1]),
        "a bigger machine got a smaller model: {sizes:?}"
    );
    // Unverified example entries are never loaded as they are.
    let e = reg.get("qwen2.5-0.5b-instruct-q4_k_m").unwrap();
    assert_eq!(
        bevy_npc_llm::registry::verify_model_file(
            &smol_file(),
            &e.sha256,
            e.size_bytes,
            None,
            |_, _| true
        ),
        Err(bevy_npc_llm::errors::VerifyError::NoSha256(smol_file()))
    );
}
